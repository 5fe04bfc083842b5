"""ssa_timm: SSANet (Baffour et al., JVCIR 2021) as a timm plugin.

``import ssa_timm`` registers the ``ssanet_*`` models with timm.
"""
from .layers import AGGREGATIONS, SpatialSelfAttention, SSAHead
from .loss import SelfADLoss
from .models import SSANet, VARIANTS, create_ssanet, create_ssanet_by_name, parse_ssanet_name

__version__ = '0.1.0'

__all__ = [
    'AGGREGATIONS', 'SSAHead', 'SSANet', 'SelfADLoss', 'SpatialSelfAttention', 'VARIANTS', 'create_ssanet',
    'create_ssanet_by_name', 'parse_ssanet_name',
]
