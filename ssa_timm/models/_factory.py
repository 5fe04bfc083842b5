"""The public SSANet factory: from a model name to a model, in timm's layering.

The route, one verb per layer as in timm (``create_model`` -> ``_create_x`` -> ``build_model_with_cfg``):

1. ``ssa_timm.hub.load_model(spec)``: any spec a recipe takes. Export folders, ``local-dir:`` and
   ``hf-hub:`` are validated there and loaded through ``timm.create_model``; every model *name* comes here.
2. ``create_ssanet_by_name(name)``: ``ssanet_<timm body>_<aggregation>[.<tag>]`` (registered or not) and
   the generic ``ssanet`` name.
3. ``create_ssanet(body, aggregation)``: a registered body with its registered tag goes through its
   registered name, anything else through the generic ``ssanet`` entrypoint (both timm entrypoints, so
   exports load back through ``timm.create_model``), at any input size.
4. ``ssanet._build_ssanet``, the one private builder under every entrypoint: ``build_model_with_cfg``
   with a ``pretrained_cfg`` that records the input and pool size the model is built for, so the
   transform and the export read the size from the model.
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


def _registered_name(arch: str, aggregation: str, tag: str) -> Optional[str]:
    """The registered name that builds ``arch`` with ``aggregation`` from weights ``tag`` ('': the registered
    one), or None when no registered name does. A registered name builds at any input size: its
    ``pretrained_cfg`` then records the size it was built for."""
    name = f'ssanet_{arch}_{aggregation}'
    if not timm.is_model(name):
        return None
    cfg = get_pretrained_cfg(name)  # each registered name has one tag
    return None if tag and tag != cfg.tag else name


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
    name = _registered_name(arch, aggregation, tag)
    if name is not None:
        return timm.create_model(name, pretrained=pretrained, **({} if img_size is None else {'img_size': img_size}),
                                 **kwargs)
    return timm.create_model(
        'ssanet', pretrained=pretrained, body=body, aggregation=aggregation,
        img_size=448 if img_size is None else img_size, **kwargs)


def create_ssanet_by_name(name: str, pretrained: bool = False, **kwargs: Any) -> SSANet:
    """An SSANet from a name: ``'ssanet_<timm body>_<aggregation>'`` with an optional ``.<tag>`` of the
    body's weights (registered or not; ``create_ssanet``), or the generic ``'ssanet'`` (body and
    aggregation as ``kwargs``).

    Raises:
        ValueError: Not such a name.
    """
    base, _, tag = name.partition('.')
    if base == 'ssanet':
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    body, aggregation = parse_ssanet_name(base)
    return create_ssanet(f'{body}.{tag}' if tag else body, aggregation, pretrained=pretrained, **kwargs)
