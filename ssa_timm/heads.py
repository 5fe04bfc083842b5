"""The reusable SSA head module: spatial self-attention plus the SSA and FE classifier heads.

It is everything of paper Fig. 2 after the feature extractor, and takes any ``(B, C, H, W)`` map:
a timm body's (that is ``SSANet``), a torchvision model's through
``torchvision.models.feature_extraction.create_feature_extractor``, or any module with a spatial
output. In eval mode it returns one tensor, the mean of the two heads' logits; in train mode with
``set_distilled_training(True)`` it returns ``(z_ssa, z_fe)`` for ``SelfADLoss``.

Order: the maps are F then H (``forward_features``: the input map first, then the map the SSA
module adds); the heads are SSA then FE everywhere they are listed (the train-mode logits pair,
``pre_logits``, ``heads()``, the per-head dicts).

Paper: `Spatial self-attention network with self-attention distillation for fine-grained image
recognition` (Baffour et al., JVCIR 2021), sections 3.2 and 3.4.
"""
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

from .layers import VARIANTS, BottleneckHead, SpatialSelfAttention

__all__ = ['VARIANTS', 'SSAHeads']


class SSAHeads(nn.Module):
    """SSA module + SSA head (reads H) + FE head (reads F) over a ``(B, K, H, W)`` map F.

    ``forward_features(F)`` gives F and H concatenated on the channel axis (F alone for
    ``no_attention``); ``forward_head`` turns that into logits. ``forward(F)`` does both.
    Heads are listed SSA then FE (see the module docstring).
    """

    def __init__(
            self,
            in_channels: int,
            num_classes: int,
            aggregation: str = 'plus',
            width: int = 1024,
            pool_type: str = 'avg',
            drop_rate: float = 0.,
            act_layer: Optional[Callable[..., nn.Module]] = None,
            qk_ratio: float = 1.0,
            scale_attn: bool = False,
            qk_norm: bool = False,
            fused_attn: Optional[bool] = None,
            sagan_qk: bool = False,
            alpha_init: float = 0.,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            in_channels: Channels K of the input map F.
            num_classes: Classes of both heads; 0 keeps the heads' hidden layers only.
            aggregation: One of ``VARIANTS`` ('plus', 'multiply', 'alpha', 'no_alpha', 'no_attention').
            width: Hidden width of each head (paper: 1024).
            pool_type: Global pool of the heads ('avg', 'max', 'avgmax'; '' for unpooled output).
            drop_rate: Dropout before each head's final Linear.
            act_layer: Optional activation after each head's BatchNorm (paper: none).
            qk_ratio: Channel fraction of the attention's A and B maps (paper: 1.0).
            scale_attn: Scale attention logits by 1/sqrt(d) (paper: unscaled).
            qk_norm: Cosine attention with a learnable temperature (paper: plain dot products).
            fused_attn: Attention through ``scaled_dot_product_attention`` always (True), never
                (False) or in eval mode only (None; see ``SpatialSelfAttention``).
            sagan_qk: SAGAN's safeguard: spectrally normalised A and B convs of K/8 channels (paper: none).
            alpha_init: The starting value of the attention's alpha (paper: 0).
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        head_args = dict(width=width, pool_type=pool_type, drop_rate=drop_rate, act_layer=act_layer, **dd)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.aggregation = aggregation
        self.distilled_training = False
        if aggregation == 'no_attention':
            self.attn = None
            self.ssa = None
        else:  # SpatialSelfAttention checks the aggregation
            self.attn = SpatialSelfAttention(
                in_channels, aggregation=aggregation, qk_ratio=qk_ratio, scale_attn=scale_attn, qk_norm=qk_norm,
                fused_attn=fused_attn, sagan_qk=sagan_qk, alpha_init=alpha_init, **dd)
            self.ssa = BottleneckHead(in_channels, num_classes, **head_args)
        self.fe = BottleneckHead(in_channels, num_classes, **head_args)
        num_heads = 1 if self.attn is None else 2
        self.num_features = in_channels * num_heads
        self.head_hidden_size = width * num_heads

    def heads(self) -> List[BottleneckHead]:
        """The classifier heads: SSA then FE (FE only for ``no_attention``)."""
        return [h for h in (self.ssa, self.fe) if h is not None]

    @torch.jit.ignore
    def set_distilled_training(self, enable: bool = True) -> None:
        """In train mode, make ``forward`` / ``forward_head`` return ``(z_ssa, z_fe)`` for ``SelfADLoss``."""
        self.distilled_training = enable

    def reset(self, num_classes: int, pool_type: Optional[str] = None) -> None:
        """Replace the final Linear of each head (and the pool, when given); hidden layers are kept."""
        self.num_classes = num_classes
        for head in self.heads():
            head.reset(num_classes, pool_type)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """F -> F, or F and H concatenated on the channel axis when there is an SSA module."""
        if self.attn is None:
            return x
        return torch.cat([x, self.attn(x)], dim=1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``forward_features`` output -> mean logits (eval), ``(z_ssa, z_fe)`` (distilled training),
        or with ``pre_logits`` (or no classes) the hidden vectors, SSA then FE, concatenated."""
        if self.ssa is None:  # no_attention
            return self.fe(x, pre_logits=pre_logits)
        fe_map, ssa_map = x[:, :self.in_channels], x[:, self.in_channels:]
        if pre_logits or self.num_classes == 0:
            return torch.cat([self.ssa(ssa_map, pre_logits=True), self.fe(fe_map, pre_logits=True)], dim=1)
        z_ssa, z_fe = self.ssa(ssa_map), self.fe(fe_map)
        if self.distilled_training and self.training and not torch.jit.is_scripting():
            # separate logits for the Self-AD loss only when training in distilled mode
            return z_ssa, z_fe
        return (z_ssa + z_fe) / 2

    @torch.jit.ignore
    def logits_per_head(self, features: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Logits of each head from ``forward_features`` output, in any mode:
        ``{'ssa': z_ssa, 'fe': z_fe}`` (``no_attention``: ``'fe'`` only)."""
        if self.num_classes == 0:
            raise RuntimeError('the heads have no classifier (num_classes=0)')
        if self.ssa is None:
            return {'fe': self.fe(features)}
        return {'ssa': self.ssa(features[:, self.in_channels:]), 'fe': self.fe(features[:, :self.in_channels])}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """F ``(B, K, H, W)`` -> logits (see ``forward_head``)."""
        return self.forward_head(self.forward_features(x))
