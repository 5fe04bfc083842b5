"""The public SSANet factory: ``create_ssanet`` over any timm image model, and SSANet model names.

timm keeps its ``create_model`` in ``timm/models/_factory.py``; the builders users call live here in
the same way, while ``ssanet.py`` holds the model class, its configs and the registered entrypoints.
A registered body at its registered input size and tag goes through its registered name
(``ssanet_<body>_<aggregation>``); anything else through the generic ``ssanet`` entrypoint. Both are
timm entrypoints, so ``hf-hub:`` / ``local-dir:`` exports load back through ``timm.create_model``.
"""
from typing import Any, Optional, Tuple

import timm
from timm.models import get_pretrained_cfg

from ..layers import VARIANTS
from .ssanet import SSANet

__all__ = ['create_ssanet', 'create_ssanet_by_name', 'parse_ssanet_name']


def parse_ssanet_name(name: str) -> Tuple[str, str]:
    """Split ``'ssanet_<body>_<aggregation>'`` into the timm body name and the aggregation."""
    if name.startswith('ssanet_'):
        for aggregation in sorted(VARIANTS, key=len, reverse=True):  # 'no_alpha' before 'alpha'
            suffix = f'_{aggregation}'
            if name.endswith(suffix) and len(name) > len('ssanet_') + len(suffix):
                return name[len('ssanet_'):-len(suffix)], aggregation
    raise ValueError(f"expected a name 'ssanet_<timm body>_<aggregation>' with aggregation in {VARIANTS}, got {name!r}")


def _registered_name(arch: str, aggregation: str, tag: str, img_size: Optional[int]) -> Optional[str]:
    """The registered name that builds ``arch`` with ``aggregation`` from weights ``tag`` at ``img_size``
    ('' and None: the registered ones), or None when no registered name does."""
    name = f'ssanet_{arch}_{aggregation}'
    if not timm.is_model(name):
        return None
    cfg = get_pretrained_cfg(name)  # each registered name has one tag
    if (tag and tag != cfg.tag) or (img_size is not None and img_size != cfg.input_size[-1]):
        return None
    return name


def create_ssanet(
        body: str,
        aggregation: str = 'plus',
        pretrained: bool = False,
        img_size: Optional[int] = None,
        **kwargs: Any,
) -> SSANet:
    """Build an SSANet over any timm image model, e.g. ``create_ssanet('convnext_tiny', 'plus')``.

    Registered bodies at their registered input size go through
    ``timm.create_model('ssanet_<body>_<aggregation>')``; anything else through the generic
    ``ssanet`` entrypoint (so ``hf-hub:`` / ``local-dir:`` exports load back through timm).
    ``pretrained=True`` loads the body's timm weights for its tag (its default tag when none is given).

    Args:
        body: timm model name, optionally with a pretrained tag, e.g. 'vit_small_patch14_dinov2.lvd142m'.
        aggregation: One of ``VARIANTS`` (``SSANet`` checks it).
        pretrained: Load the body's timm weights.
        img_size: Input size (default: the registered size, else 448).
        **kwargs: ``SSANet`` arguments (num_classes, in_chans, global_pool, head_width, ...).
    """
    arch, _, tag = body.partition('.')
    name = _registered_name(arch, aggregation, tag, img_size)
    if name is not None:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    return timm.create_model(
        'ssanet', pretrained=pretrained, body=body, aggregation=aggregation,
        img_size=448 if img_size is None else img_size, **kwargs)


def create_ssanet_by_name(name: str, pretrained: bool = False, **kwargs: Any) -> SSANet:
    """``create_ssanet`` from a name ``'ssanet_<timm body>_<aggregation>'``, registered or not."""
    body, aggregation = parse_ssanet_name(name)
    return create_ssanet(body, aggregation, pretrained=pretrained, **kwargs)
