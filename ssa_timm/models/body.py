"""How any timm image model becomes an SSANet body: classifier removed, final map read as NCHW.

SSANet needs the body's final unpooled map F as ``(B, K, H, W)``. timm models give it in one of
three layouts, decided once at construction by a forward pass on the meta device:

* ``NCHW``: CNN maps (ResNet, VGG, DenseNet, ConvNeXt, EfficientNet, RegNet, MaxViT, FastViT, ...).
* ``NHWC``: models whose ``output_fmt`` says so (Swin and its relatives); permuted.
* ``NLC``: token models (ViT, DeiT, EVA / EVA-02, BEiT, DINOv2, CLIP ViTs); the prefix tokens
  (class, register, distillation) are dropped and the patch grid is restored from the input size,
  with ``dynamic_img_size`` / ``dynamic_img_pad`` switched on where the model has them, so any
  input size works.

The classifier, pre-logits and pooling are removed with timm's own
``prune_intermediate_layers(prune_head=True)``, unless that would also cut into
``forward_features`` (FastViT's final conv, EfficientNet's conv_head), in which case only
``reset_classifier(0, '')`` is applied. A model whose ``forward_features`` has no spatial map is refused.

``prefixed_group_matcher`` re-roots the body's timm ``group_matcher`` under the model's ``body.``
prefix, so every body parameter keeps the layer id the bare timm model gives it.

``feature_index`` reads F earlier in the body: at that entry of its ``feature_info`` (the indices of
timm's ``forward_intermediates``), with the later stages and the final norm pruned, e.g. ResNet-18's
``layer2`` (index 2, stride 8) for a map four times as wide as its last one at a quarter of the cost.
"""
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn

import timm
from timm.layers import to_2tuple

from ..errors import WeightsMismatch

__all__ = [
    'BodyLayout', 'BodyProbe', 'create_body', 'prefixed_group_matcher', 'probe_body', 'token_grid', 'tokens_to_map',
]


@dataclass(frozen=True)
class BodyLayout:
    """How the body's ``forward_features`` output becomes F."""
    fmt: str  # 'NCHW', 'NHWC' or 'NLC'
    channels: int  # K
    reduction: int  # input pixels per map position (token models: the patch size)
    num_prefix_tokens: int = 0  # NLC only
    pad: bool = False  # NLC only: partial patches are padded (grid = ceil(size / reduction))


@dataclass(frozen=True)
class BodyProbe:
    """What a meta-device build of a body tells before any memory is allocated."""
    layout: BodyLayout
    map_size: Tuple[int, int]  # (H, W) of F at the probed input size
    prune_head: bool  # timm's prune_intermediate_layers(prune_head=True) keeps forward_features intact
    feature_index: Optional[int]  # F is read at this feature_info entry (later stages pruned), or at the end
    kwargs: Dict[str, Any] = field(default_factory=dict)  # the body's constructor kwargs
    model: Optional[nn.Module] = None  # the meta-device body, head stripped

    @property
    def dynamic_img_size(self) -> bool:
        return bool(self.kwargs.get('dynamic_img_size', False))


def token_grid(height: int, width: int, reduction: int, pad: bool) -> Tuple[int, int]:
    """Patch grid of an image ``height`` x ``width``: partial patches count when they are padded."""
    if pad:
        return (height + reduction - 1) // reduction, (width + reduction - 1) // reduction
    return height // reduction, width // reduction


def tokens_to_map(x: torch.Tensor, height: int, width: int, reduction: int, num_prefix_tokens: int,
                  pad: bool) -> torch.Tensor:
    """Token sequence ``(B, prefix + H*W, C)`` of an image ``height`` x ``width`` -> ``(B, C, H, W)``."""
    grid_h, grid_w = token_grid(height, width, reduction, pad)
    x = x[:, num_prefix_tokens:]
    return x.reshape(x.shape[0], grid_h, grid_w, x.shape[-1]).permute(0, 3, 1, 2)


def _re_root(pattern: str, prefix: str) -> str:
    """Anchor every alternative of a timm group regex under ``prefix`` ('^conv1|bn1' -> '^body\\.(?:conv1|bn1)')."""
    alternatives = pattern.split('|')
    return f'^{re.escape(prefix)}(?:' + '|'.join(a.removeprefix('^') for a in alternatives) + ')'


def prefixed_group_matcher(
        matcher: Union[Dict[str, Any], Callable[[str], Any]],
        prefix: str,
) -> Union[Dict[str, Any], Callable[[str], Any]]:
    """Re-root a timm ``group_matcher`` (regex dict or callable) under a submodule prefix such as 'body.'.

    Names outside the prefix match no group, so timm puts them in the last group.
    """
    if callable(matcher):
        def _matcher(name: str):
            return matcher(name[len(prefix):]) if name.startswith(prefix) else float('inf')
        return _matcher

    out = {}
    for group, spec in matcher.items():
        if isinstance(spec, (list, tuple)):
            out[group] = [(_re_root(p, prefix), suffix) for p, suffix in spec]
        else:
            out[group] = _re_root(spec, prefix)
    return out


def _create_timm_model(
        name: str,
        pretrained: bool,
        in_chans: int,
        kwargs: Dict[str, Any],
        device: torch.device,
        dtype: Optional[torch.dtype],
) -> nn.Module:
    """``timm.create_model`` of the body: without its classifier, unless weights are loaded."""
    # With weights the classifier keeps the checkpoint's size, so timm loads strictly: a checkpoint
    # of another model fails here instead of leaving layers at random init.
    head = {} if pretrained else {'num_classes': 0}
    with torch.device(device):
        return timm.create_model(
            name, pretrained=pretrained, in_chans=in_chans, device=device, dtype=dtype, **head, **kwargs)


def _output_shape(body: nn.Module, in_chans: int, img_size: Tuple[int, int]) -> Tuple[int, ...]:
    body.eval()  # a probe of one image: BatchNorm in train mode refuses a 1 x 1 map
    image = torch.empty(1, in_chans, *img_size, device='meta')
    try:
        with torch.no_grad():
            return tuple(body.forward_features(image).shape)
    except (RuntimeError, ValueError) as e:  # e.g. a map that shrinks to nothing, a patch larger than the image
        raise ValueError(f'{type(body).__name__} cannot read a {img_size[0]}x{img_size[1]} px input: '
                         f'{str(e).splitlines()[0]}') from e


def _probe_build(
        arch: str,
        in_chans: int,
        img_size: Tuple[int, int],
        body_kwargs: Dict[str, Any],
) -> Tuple[nn.Module, Dict[str, Any], Tuple[int, ...]]:
    """Build the body on the meta device with its constructor kwargs: ``img_size`` where the model
    takes one (token models, windowed models); for token models ``dynamic_img_size=True`` and
    ``dynamic_img_pad=True`` where the model has them, so any input size gives a grid (partial
    patches padded). Returns the model, the kwargs and its ``forward_features`` shape."""
    meta = torch.device('meta')
    kwargs = dict(body_kwargs)
    try:
        body = _create_timm_model(arch, False, in_chans, {'img_size': img_size, **kwargs}, meta, None)
        kwargs.setdefault('img_size', img_size)
    except TypeError:
        body = _create_timm_model(arch, False, in_chans, kwargs, meta, None)
    shape = _output_shape(body, in_chans, img_size)
    if len(shape) == 3 and 'dynamic_img_size' not in kwargs:
        for dynamic in ({'dynamic_img_size': True, 'dynamic_img_pad': True}, {'dynamic_img_size': True}):
            try:
                body = _create_timm_model(arch, False, in_chans, {**dynamic, **kwargs}, meta, None)
            except TypeError:
                continue
            kwargs = {**dynamic, **kwargs}
            shape = _output_shape(body, in_chans, img_size)
            break
    return body, kwargs, shape


def _strip_head(body: nn.Module, prune_head: bool, feature_index: Optional[int] = None) -> None:
    if feature_index is not None:
        body.prune_intermediate_layers([feature_index], prune_norm=True, prune_head=True)
        body.feature_info = body.feature_info[:feature_index + 1]
    elif prune_head:
        body.prune_intermediate_layers(len(body.feature_info), prune_head=True)
    else:
        body.reset_classifier(0, '')


def _feature_index(body: nn.Module, name: str, feature_index: Optional[int]) -> Optional[int]:
    """``feature_index`` as a non-negative index, None when it names the body's last entry."""
    if feature_index is None:
        return None
    count = len(body.feature_info)
    if not -count <= feature_index < count:
        raise ValueError(f'body_feature_index must be in [{-count}, {count}) for {name!r}, whose feature_info has '
                         f'{count} entries, got {feature_index}')
    index = feature_index % count
    if index == count - 1:
        return None
    if not hasattr(body, 'prune_intermediate_layers'):
        raise ValueError(f'{name!r} cannot be cut at a feature index: timm has no prune_intermediate_layers for it')
    return index


def _layout(body: nn.Module, name: str, shape: Tuple[int, ...], img_size: Tuple[int, int]) -> BodyLayout:
    reduction = int(body.feature_info[-1]['reduction'])
    if len(shape) == 4:
        nhwc = getattr(body, 'output_fmt', 'NCHW') == 'NHWC'
        fmt, channels = ('NHWC', shape[-1]) if nhwc else ('NCHW', shape[1])
        return BodyLayout(fmt, int(channels), reduction)
    if len(shape) == 3 and hasattr(body, 'patch_embed'):
        prefix = int(getattr(body, 'num_prefix_tokens', 0))
        pad = bool(getattr(body.patch_embed, 'dynamic_img_pad', getattr(body, 'dynamic_img_pad', False)))
        grid = token_grid(*img_size, reduction, pad)
        if shape[1] - prefix == grid[0] * grid[1]:
            return BodyLayout('NLC', int(shape[-1]), reduction, prefix, pad)
    raise ValueError(
        f'timm model {name!r} has no spatial feature map: its forward_features gives shape {list(shape)} '
        f'at {img_size[0]}x{img_size[1]} px, while SSANet needs a (B, C, H, W) map, an NHWC map or patch tokens '
        'on a grid (ViT-style)')


def probe_body(
        name: str,
        in_chans: int,
        img_size: Union[int, Tuple[int, int]],
        body_kwargs: Optional[Dict[str, Any]] = None,
        feature_index: Optional[int] = None,
) -> BodyProbe:
    """Build the body on the meta device and find how to strip its head and read its map.

    Probes are remembered per (model, in_chans, img_size, kwargs, feature_index): building the same SSANet again
    (timm's test suite, model cards, the recipes) skips the meta-device passes.
    """
    arch = name.partition('.')[0]
    if not timm.is_model(arch):
        raise ValueError(f'unknown timm model {arch!r} as SSANet body')
    img_size = tuple(to_2tuple(img_size))
    if not all(isinstance(s, int) and s > 0 for s in img_size):
        raise ValueError(f'img_size must be a positive number of pixels, got {img_size}')
    try:
        key = (arch, in_chans, img_size, tuple(sorted((body_kwargs or {}).items())), feature_index)
        hash(key)
    except TypeError:  # unhashable kwargs: probe without remembering
        return _probe(arch, name, in_chans, img_size, dict(body_kwargs or {}), feature_index)
    if key not in _PROBES:
        _PROBES[key] = _probe(arch, name, in_chans, img_size, dict(body_kwargs or {}), feature_index)
    return _PROBES[key]


_PROBES: Dict[Tuple, BodyProbe] = {}


def _probe(arch: str, name: str, in_chans: int, img_size: Tuple[int, int], body_kwargs: Dict[str, Any],
           feature_index: Optional[int]) -> BodyProbe:
    """The meta-device shape probe itself: build, strip the head, read the layout and map size."""
    body, kwargs, shape = _probe_build(arch, in_chans, img_size, body_kwargs)
    index = _feature_index(body, name, feature_index)
    if index is not None:
        _strip_head(body, True, index)
        shape = _output_shape(body, in_chans, img_size)
        prune_head = True
    else:
        body.prune_intermediate_layers(len(body.feature_info), prune_head=True)
        prune_head = _output_shape(body, in_chans, img_size) == shape
    if not prune_head:
        body = _create_timm_model(arch, False, in_chans, kwargs, torch.device('meta'), None)
        _strip_head(body, prune_head=False)
    layout = _layout(body, name, shape, img_size)
    if layout.fmt == 'NCHW':
        map_hw = shape[2:]
    elif layout.fmt == 'NHWC':
        map_hw = shape[1:3]
    else:
        map_hw = token_grid(*img_size, layout.reduction, layout.pad)
    return BodyProbe(layout, (int(map_hw[0]), int(map_hw[1])), prune_head, index, kwargs, body)


def create_body(
        name: str,
        in_chans: int,
        img_size: Union[int, Tuple[int, int]],
        pretrained: bool,
        body_kwargs: Dict[str, Any],
        device: Optional[Union[str, torch.device]],
        dtype: Optional[torch.dtype],
        feature_index: Optional[int] = None,
) -> Tuple[nn.Module, BodyLayout]:
    """Build a timm model without its classifier / pre-logits / pooling, and say how to read its map.

    A body built without weights is built eagerly, so it has exactly the init of the bare timm model
    (zero-init residual norms, layer scale, ...); with ``pretrained`` timm loads the weights through
    the body module's own checkpoint filter (position-embedding resampling, layout conversions,
    ``in_chans`` adaptation). On the meta device nothing is allocated.

    Args:
        name: timm model name, optionally with a pretrained tag ('vit_small_patch16_384.augreg_in21k_ft_in1k').
        in_chans: Input image channels.
        img_size: Input size the body is built for (position embeddings, attention windows).
        pretrained: Load the body's weights for the tag (timm's default tag when none is given).
        body_kwargs: Extra keyword arguments for the body's timm constructor.
        device: Where the parameters live (None: torch's default device).
        dtype: Parameter dtype.
        feature_index: Read F at this ``feature_info`` entry, pruning what follows (default: the end).

    Returns:
        The body and its ``BodyLayout``.
    """
    probe = probe_body(name, in_chans, img_size, body_kwargs, feature_index)
    device = torch.device(device) if device is not None else torch.get_default_device()
    if device.type == 'meta':
        body = _create_timm_model(name.partition('.')[0], False, in_chans, probe.kwargs, device, dtype)
    else:
        try:
            body = _create_timm_model(name, pretrained, in_chans, probe.kwargs, device, dtype)
        except RuntimeError as e:  # timm's strict load_state_dict: keys or shapes that differ
            if not pretrained:
                raise
            raise WeightsMismatch(f'the pretrained weights of {name!r} do not fit the {type(probe.model).__name__} '
                                  f'body: {str(e).splitlines()[0]} ...') from e
    _strip_head(body, probe.prune_head, probe.feature_index)
    return body, probe.layout
