"""ssa_timm: SSANet (Baffour et al., JVCIR 2021) as a timm plugin.

``import ssa_timm`` registers the ``ssanet*`` models with timm. ``SSAHeads`` (the SSA module and
both classifier heads) goes on any ``(B, C, H, W)`` map, ``SelfADLoss`` trains it.
"""
from .heads import SSAHeads
from .layers import AGGREGATIONS, VARIANTS, BottleneckHead, SpatialSelfAttention
from .loss import SelfADLoss
from .models import SSANet, create_ssanet, create_ssanet_by_name, parse_ssanet_name

__version__ = '0.6.0'

__all__ = [
    'AGGREGATIONS', 'VARIANTS', 'BottleneckHead', 'SSAHeads', 'SSANet', 'SelfADLoss', 'SpatialSelfAttention',
    'create_ssanet', 'create_ssanet_by_name', 'parse_ssanet_name',
]
