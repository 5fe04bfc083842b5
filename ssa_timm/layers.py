"""SSANet layers: the spatial self-attention module and the classifier head.

``in_channels`` is the channel count K of the feature map F ``(B, K, H, W)`` that both layers read
(an image's channels are ``in_chans``, as in timm).

Paper: `Spatial self-attention network with self-attention distillation for fine-grained image
recognition` (Baffour et al., JVCIR 2021), sections 3.2 (spatial self-attention, Fig. 3) and
3.4 (classifier).
"""
import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import SelectAdaptivePool2d, use_fused_attn

__all__ = ['AGGREGATIONS', 'VARIANTS', 'BottleneckHead', 'SpatialSelfAttention', 'SpectralNormConv2d',
           'check_aggregation']

# How the attended map O is combined with the body map F (paper Table 2 rows 2-5).
AGGREGATIONS = ('plus', 'multiply', 'alpha', 'no_alpha')
# Paper Table 2 rows: the four aggregations plus the body-only baseline, which has no SSA module.
VARIANTS = AGGREGATIONS + ('no_attention',)


def check_aggregation(aggregation: str) -> str:
    """The one check of an ``aggregation`` argument: it must be one of ``VARIANTS``.

    ``SpatialSelfAttention`` calls it (``SSAHeads`` passes its aggregation on to that layer) and so
    does ``SSANet``, before it builds its body; ``create_ssanet`` and the entrypoints pass theirs to
    ``SSANet``.

    Returns:
        ``aggregation``, unchanged.
    """
    if aggregation not in VARIANTS:
        raise ValueError(f'aggregation must be one of {VARIANTS}, got {aggregation!r}')
    return aggregation


def _check_feature_map(x: torch.Tensor, in_channels: int) -> None:
    """Fail with the expected and actual shapes (``torch._assert`` keeps it FX-traceable)."""
    torch._assert(x.ndim == 4, f'expected a (B, {in_channels}, H, W) feature map, got shape {x.shape}')
    torch._assert(x.shape[1] == in_channels, f'expected a (B, {in_channels}, H, W) feature map, got shape {x.shape}')


class SpectralNormConv2d(nn.Conv2d):
    """A 1x1 (or any) conv whose weight is divided by its largest singular value, estimated by one power
    iteration per training step (Miyato et al. 2018, "Spectral Normalization for Generative Adversarial
    Networks"; SAGAN, Zhang et al. 2019, applies it to its attention's query and key convs).

    It computes what ``torch.nn.utils.parametrizations.spectral_norm`` computes with one iteration (the
    bias is not normalised), written out so that the module stays TorchScript- and FX-friendly and its
    state dict keeps ``weight`` and ``bias`` under their plain names; the left singular vector estimate
    ``sn_u`` is a buffer (saved, not trained). In eval mode ``sn_u`` is not updated.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, device=None, dtype=None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, device=device, dtype=dtype)
        self.register_buffer('sn_u', F.normalize(torch.randn(out_channels, device=device, dtype=dtype), dim=0))

    def normalized_weight(self) -> torch.Tensor:
        """The weight over its spectral norm estimate (after one power iteration in training)."""
        w = self.weight.flatten(1)
        with torch.no_grad():
            u = self.sn_u
            if self.training:
                u = F.normalize(w @ F.normalize(w.t() @ u, dim=0, eps=1e-12), dim=0, eps=1e-12)
                self.sn_u.copy_(u)
            v = F.normalize(w.t() @ u, dim=0, eps=1e-12)
            u = u.clone()
        sigma = torch.dot(u, w @ v)
        return self.weight / sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.normalized_weight(), self.bias)


class SpatialSelfAttention(nn.Module):
    """Spatial self-attention over the positions of a feature map (paper Eqs. 1-2, Fig. 3).

    Three 1x1 convs give A, B, C. With N = H*W positions, ``S[j, i] = softmax_i(A_i . B_j)``
    and ``O_j = sum_i S[j, i] C_i``; O is aggregated with the input F:

    * ``plus``: ``alpha * O + F`` (Eq. 1)
    * ``multiply``: ``alpha * O * F`` (Eq. 2)
    * ``alpha``: ``alpha * O``
    * ``no_alpha``: ``O``

    ``alpha`` is a learnable scalar initialised to 0. With ``qk_norm`` the logits are cosine
    similarities times a learnable temperature (Swin-V2's cosine attention): A and B are
    L2-normalised per position, so ``|A_i . B_j| <= tau`` and the softmax cannot saturate by the
    growth of A and B alone; tau starts at 10 and is clamped at 100. With ``sagan_qk`` the layer takes
    SAGAN's safeguard (Zhang et al. 2019, "Self-Attention Generative Adversarial Networks", the paper's
    ref. 28): A and B narrowed to K/8 channels and their 1x1 convs spectrally normalised
    (``SpectralNormConv2d``), so the logits grow only with the features, not with the convs' weights.
    The attention runs either through
    ``F.scaled_dot_product_attention`` (fused kernels) or through the plain matmul-softmax path,
    which ``forward_with_attention`` always takes because it must return S. By default the fused
    path serves eval mode (same speed or faster, and no N x N map in memory) and the plain path
    serves training: with A and B as wide as the paper's (K = 512 channels) no flash kernel applies,
    and the fused backward runs slower than the plain one on CPU and on GPU (docs/benchmarks.md).
    """

    def __init__(
            self,
            in_channels: int,
            aggregation: str = 'plus',
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
            in_channels: Channels K of the input map F (C keeps K channels, as O is combined with F).
            aggregation: One of ``AGGREGATIONS`` ('no_attention' means no such layer at all).
            qk_ratio: Channels of A and B as a fraction of ``in_channels`` (the paper uses 1.0).
            scale_attn: Scale the logits by 1/sqrt(channels of A); the paper does not.
            qk_norm: Cosine attention: L2-normalise A and B per position and scale by a learnable
                temperature (the paper does not); replaces ``scale_attn``.
            fused_attn: True: always ``scaled_dot_product_attention``; False: always the plain path;
                None: fused in eval mode (unless timm's ``TIMM_FUSED_ATTN=0`` or exportable
                layer config turns it off), plain in training.
            sagan_qk: SAGAN's safeguard: A and B with K/8 channels (``qk_ratio`` must stay 1.0) from
                spectrally normalised 1x1 convs (the paper does not; it excludes ``qk_norm``).
            alpha_init: The starting value of alpha (the paper: 0, so O enters only as alpha learns; any other
                value lets the attention learn from the first step).
        """
        super().__init__()
        if check_aggregation(aggregation) == 'no_attention':
            raise ValueError("aggregation 'no_attention' means no SpatialSelfAttention at all (SSAHeads builds none)")
        if not 0. < qk_ratio <= 1.:
            raise ValueError(f'qk_ratio must be in (0, 1], got {qk_ratio}')
        if qk_norm and scale_attn:
            raise ValueError('qk_norm and scale_attn exclude each other: qk_norm scales the logits by its own '
                             'learnable temperature')
        if sagan_qk and (qk_norm or qk_ratio != 1.):
            raise ValueError('sagan_qk sets the width of A and B (K/8) and their normalisation itself: it excludes '
                             f'qk_norm and a qk_ratio other than 1.0 (got qk_norm={qk_norm}, qk_ratio={qk_ratio})')
        dd = {'device': device, 'dtype': dtype}
        qk_dim = max(1, in_channels // 8) if sagan_qk else max(1, int(in_channels * qk_ratio))
        self.in_channels = in_channels
        self.aggregation = aggregation
        self.scale_attn = scale_attn
        self.scale = qk_dim ** -0.5 if scale_attn else 1.0
        self.fused_attn_train = bool(fused_attn)
        self.fused_attn_eval = use_fused_attn() if fused_attn is None else fused_attn
        qk_conv = SpectralNormConv2d if sagan_qk else nn.Conv2d
        self.sagan_qk = sagan_qk
        self.conv_a = qk_conv(in_channels, qk_dim, 1, **dd)
        self.conv_b = qk_conv(in_channels, qk_dim, 1, **dd)
        self.conv_c = nn.Conv2d(in_channels, in_channels, 1, **dd)
        self.alpha = None if aggregation == 'no_alpha' else nn.Parameter(torch.full((), float(alpha_init), **dd))
        self.qk_norm = qk_norm
        # log of the cosine attention's temperature (Swin-V2: init 10, clamped at 100)
        self.logit_scale = nn.Parameter(torch.full((), math.log(10.), **dd)) if qk_norm else None

    def _queries_keys(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """B (queries) and A (keys) as ``(B, d, N)``; with ``qk_norm`` unit vectors per position, the
        queries times the temperature."""
        q = self.conv_b(x).flatten(2)
        k = self.conv_a(x).flatten(2)
        if self.logit_scale is not None:
            temperature = self.logit_scale.clamp(max=math.log(100.)).exp()
            q = F.normalize(q, dim=1) * temperature
            k = F.normalize(k, dim=1)
        return q, k

    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        """O through ``F.scaled_dot_product_attention``, shaped like ``x``.

        B (queries, index j), A (keys, index i) and C (values) go in as contiguous
        ``(B, 1, N, ch)``: the fused kernels need a unit stride on the channel axis.
        """
        q, k = self._queries_keys(x)
        q = q.transpose(1, 2).unsqueeze(1).contiguous()
        k = k.transpose(1, 2).unsqueeze(1).contiguous()
        v = self.conv_c(x).flatten(2).transpose(1, 2).unsqueeze(1).contiguous()
        attended = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return attended.squeeze(1).transpose(1, 2).reshape(x.shape)

    def attention_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The logits ``A_i . B_j`` (scaled as configured) as ``(B, N, N)``, row j: query position j."""
        q, k = self._queries_keys(x)  # (B, d, N)
        return q.transpose(1, 2) @ k * self.scale

    def _plain(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """O (shaped like ``x``) and S ``(B, N, N)`` through matmul + softmax, channels first."""
        v = self.conv_c(x).flatten(2)  # (B, K, N)
        attn = self.attention_logits(x).softmax(dim=-1)  # S[j, i]
        # S @ C^T rather than C @ S^T: the gradient of S then comes out contiguous, with no N x N copy
        return (attn @ v.transpose(1, 2)).transpose(1, 2).reshape(x.shape), attn

    def _combine(self, attended: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Combine O with F as the aggregation says."""
        out = attended
        if self.alpha is not None:
            out = self.alpha * out
        if self.aggregation == 'plus':
            out = out + x
        elif self.aggregation == 'multiply':
            out = out * x
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the aggregated map H, same shape as ``x``."""
        _check_feature_map(x, self.in_channels)
        fused = self.fused_attn_train if self.training else self.fused_attn_eval
        attended = self._fused(x) if fused else self._plain(x)[0]
        return self._combine(attended, x)

    def forward_with_attention(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return H and the attention map S of shape ``(B, N, N)`` (row j: query position j)."""
        _check_feature_map(x, self.in_channels)
        attended, attn = self._plain(x)
        return self._combine(attended, x), attn


class BottleneckHead(nn.Module):
    """Classifier head of paper section 3.4: GAP -> Linear(K, width) -> BatchNorm1d -> Linear.

    SSANet has two: the SSA head on H and the FE head on F.

    ``pre_logits`` output is the normalised hidden vector. With ``num_classes=0`` the last Linear is
    absent (``None``); with ``pool_type=''`` and ``num_classes=0`` the head is a pass-through that
    returns the unpooled map (timm's ``reset_classifier(0, '')`` contract).
    """

    def __init__(
            self,
            in_channels: int,
            num_classes: int,
            width: int = 1024,
            pool_type: str = 'avg',
            drop_rate: float = 0.,
            act_layer: Optional[Callable[..., nn.Module]] = None,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            in_channels: Channels K of the map the head reads (its pooled width).
            num_classes: Classes; 0 removes the final Linear.
            width: Hidden width (the paper: 1024).
            pool_type: timm global pool type with one output per channel ('avg', 'max', 'avgmax')
                or '' for no pooling.
            drop_rate: Dropout before the final Linear.
            act_layer: Optional activation after the BatchNorm (the paper has none).
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.in_channels = in_channels
        self.width = width
        self.global_pool = self._make_pool(pool_type)
        self.is_pooled = bool(pool_type)
        self.fc_hidden = nn.Linear(in_channels, width, **dd)
        self.norm = nn.BatchNorm1d(width, **dd)
        self.act = act_layer() if act_layer is not None else None
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(width, num_classes, **dd) if num_classes > 0 else None

    @staticmethod
    def _make_pool(pool_type: str) -> SelectAdaptivePool2d:
        pool = SelectAdaptivePool2d(pool_type=pool_type, flatten=True)
        if pool.feat_mult() != 1:
            raise ValueError(f'pool_type {pool_type!r} changes the channel count; use avg, max or avgmax')
        return pool

    def reset(self, num_classes: int, pool_type: Optional[str] = None) -> None:
        """Replace the final Linear (and the pool, when given); the hidden layers are kept."""
        if pool_type is None:
            pool_type = self.global_pool.pool_type
        self.global_pool = self._make_pool(pool_type)
        self.is_pooled = bool(pool_type)
        ref = self.fc_hidden.weight
        self.fc = nn.Linear(self.width, num_classes, device=ref.device, dtype=ref.dtype) if num_classes > 0 else None
        self.train(self.training)  # new modules follow the head's mode

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if not self.is_pooled:
            if self.fc is not None:
                raise RuntimeError("an unpooled head (pool_type='') has no classifier: reset it with num_classes=0")
            return x
        x = self.norm(self.fc_hidden(self.global_pool(x)))
        if self.act is not None:
            x = self.act(x)
        x = self.drop(x)
        if pre_logits or self.fc is None:
            return x
        return self.fc(x)
