"""SSANet models; importing this package registers them with timm."""
from ._factory import create_ssanet, create_ssanet_by_name, parse_ssanet_name
from .ssanet import VARIANTS, SSANet, default_qk_norm

__all__ = ['VARIANTS', 'SSANet', 'create_ssanet', 'create_ssanet_by_name', 'default_qk_norm', 'parse_ssanet_name']
