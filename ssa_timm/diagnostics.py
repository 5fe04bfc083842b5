"""Is the SSA module doing anything? Statistics of its attention on a batch of body maps.

One-hot attention rows (entropy near 0, row maximum near 1) together with ``alpha`` near 0 mean
``H = alpha * O + F ~ F``: the SSA head reads the body map and the module is not used.
"""
import math
from contextlib import nullcontext
from typing import ContextManager, Dict, Optional

import torch

from .layers import SpatialSelfAttention

__all__ = ['attention_diagnostics', 'attention_kind', 'probe_attention']


@torch.no_grad()
def attention_diagnostics(attn: SpatialSelfAttention, body_map: torch.Tensor) -> Dict[str, float]:
    """Attention statistics of ``attn`` on body maps F ``(B, K, H, W)``.

    Returns:
        ``alpha`` (None without one), ``entropy`` (mean row entropy of S, nats), ``entropy_ratio``
        (that over the uniform entropy log N), ``row_max`` (mean largest weight of a row),
        ``logit_std`` (mean over images of the standard deviation of the logits ``A_i . B_j``),
        ``positions`` N, ``kind`` (which attention: ``paper``, ``qk_norm``, ``scale_attn``, with
        ``+sagan_qk``) and, for ``qk_norm``, its learned ``temperature``.
    """
    logits = attn.attention_logits(body_map.to(attn.conv_a.weight.dtype)).float()
    log_s = logits.log_softmax(dim=-1)
    s = log_s.exp()
    entropy = max(0.0, -(s * log_s).sum(-1).mean().item())
    positions = logits.shape[-1]
    uniform = math.log(positions) if positions > 1 else 1.0
    return {
        'alpha': float(attn.alpha) if attn.alpha is not None else None,
        'entropy': entropy,
        'entropy_ratio': entropy / uniform,
        'row_max': s.amax(-1).mean().item(),
        'logit_std': logits.flatten(1).std(dim=1, correction=0).mean().item(),
        'positions': positions,
        'kind': attention_kind(attn),
        'temperature': math.exp(min(attn.logit_scale.item(), math.log(100.))) if attn.qk_norm else None,
    }


def attention_kind(attn: SpatialSelfAttention) -> str:
    """Which attention ``attn`` computes: ``paper`` (unscaled dot products), ``qk_norm`` (cosine) or
    ``scale_attn`` (1/sqrt(d)), with ``+sagan_qk`` when SAGAN's safeguard is on."""
    kind = 'qk_norm' if attn.qk_norm else 'scale_attn' if attn.scale_attn else 'paper'
    return kind + ('+sagan_qk' if attn.sagan_qk else '')


@torch.no_grad()
def probe_attention(model: torch.nn.Module, inputs: torch.Tensor, autocast: Optional[ContextManager] = None,
                    body_maps: bool = False) -> Optional[Dict[str, float]]:
    """``attention_diagnostics`` of an ``SSANet``'s SSA module on a batch of images (or of body maps
    when ``body_maps``), under ``autocast`` when given; None for a model without one."""
    attn = model.head.attn
    if attn is None:
        return None
    with autocast or nullcontext():
        return attention_diagnostics(attn, inputs if body_maps else model.forward_body(inputs))
