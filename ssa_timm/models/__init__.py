"""SSANet models; importing this package registers them with timm."""
from .ssanet import SSANet, VARIANTS, create_ssanet, create_ssanet_by_name, parse_ssanet_name

__all__ = ['SSANet', 'VARIANTS', 'create_ssanet', 'create_ssanet_by_name', 'parse_ssanet_name']
