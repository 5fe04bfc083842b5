"""SSANet models; importing this package registers them with timm."""
from .ssanet import SSANet, VARIANTS, create_ssanet

__all__ = ['SSANet', 'VARIANTS', 'create_ssanet']
