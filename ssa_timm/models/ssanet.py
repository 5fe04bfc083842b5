"""SSANet: spatial self-attention network with self-attention distillation

Any timm image model with its classifier removed gives the feature map F (``models/body.py``:
CNN maps, NHWC maps and ViT-style patch tokens are all read as ``(B, K, H, W)``); the SSA head
module (``ssa_timm.SSAHeads``) turns F into H and classifies H (the SSA head) and F (the FE head).
In eval mode ``forward`` returns the mean of the two heads' logits (timm's DeiT-distilled
precedent); in train mode with ``set_distilled_training(True)`` it returns ``(z_ssa, z_fe)`` for
``SelfADLoss``.

The file follows timm's model files: the model class, ``_create_*``, ``_cfg`` and ``default_cfgs``,
then the ``@register_model`` entrypoints. The builders users call (``create_ssanet``,
``create_ssanet_by_name``, ``parse_ssanet_name``) are in ``_factory.py``, as timm keeps
``create_model`` in its ``_factory.py``.

Attention. The paper's 25 names keep the paper's unscaled dot products (they are the reproduction); the
curated modern names, the generic ``ssanet`` and ``create_ssanet`` over any other body compute cosine
attention (``qk_norm=True``) unless told otherwise. The default lives in the body's ``BodySpec``;
``default_qk_norm(name)`` tells a recipe a name's default.

Paper: `Spatial self-attention network with self-attention distillation for fine-grained image
recognition` - Baffour et al., JVCIR 81 (2021), https://doi.org/10.1016/j.jvcir.2021.103368
"""
import dataclasses
import sys
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn

from timm.layers import get_act_layer, to_2tuple
from timm.models import (
    PretrainedCfg, build_model_with_cfg, create_model, generate_default_cfgs, get_pretrained_cfg, register_model,
    resolve_pretrained_cfg,
)
# private: timm 1.0.31 exports feature_take_indices from neither timm.models nor timm.layers
# (timm's own model files import it from here too)
from timm.models._features import feature_take_indices
from timm.models._input import update_model_args  # private too: timm's model files import it from here

from ..errors import WeightsMismatch
from ..heads import SSAHeads
from ..layers import VARIANTS, check_aggregation
from ..zoom import attention_box, zoom_crop
from .body import create_body, prefixed_group_matcher, probe_body, tokens_to_map

__all__ = [
    'VARIANTS', 'BodySpec', 'SSANet', 'check_weights_fit', 'checkpoint_filter_fn', 'default_qk_norm', 'generic_cfg',
    'renamed_keys',
]

_PAPER = 'Spatial self-attention network with self-attention distillation for fine-grained image recognition'
_PAPER_ID = 'doi:10.1016/j.jvcir.2021.103368'
_NO_WEIGHTS_NOTE = "Built without pretrained weights: timm's init for the body, fresh SSA module and heads."


class BodySpec(NamedTuple):
    """A registered body: the timm weights its default tag loads and the input it is registered at."""
    tag: str  # pretrained tag of the body in timm's own Hub repos ('tv_in1k': timm/vgg16.tv_in1k)
    img_size: int  # input size of the registered names
    map_size: int  # height = width of F at img_size (the cfg's pool_size)
    fixed_input_size: bool = False
    min_input_size: Optional[int] = None  # below this the body's last map collapses
    body_kwargs: Optional[Dict[str, Any]] = None  # extra kwargs of the body's timm constructor
    aggregations: Tuple[str, ...] = VARIANTS  # one registered name per aggregation
    # the attention its names (and any SSANet over this body) compute when no attention option is given:
    # cosine attention, except on the paper's bodies, which keep the paper's unscaled dot products
    qk_norm: bool = True


_CURATED = ('plus', 'no_attention')
# The paper's five bodies at the paper's 448 px with every aggregation and the paper's attention (the
# reproduction), then a curated set of modern bodies with cosine attention (qk_norm), each at the input
# size it was trained for or 448 where that fits.
_BODIES: Dict[str, BodySpec] = {
    'vgg16': BodySpec('tv_in1k', 448, 14, qk_norm=False),
    'resnet50': BodySpec('tv_in1k', 448, 14, qk_norm=False),
    'inception_v3': BodySpec('tv_in1k', 448, 12, min_input_size=224, qk_norm=False),
    'densenet121': BodySpec('tv_in1k', 448, 14, qk_norm=False),
    'densenet161': BodySpec('tv_in1k', 448, 14, qk_norm=False),
    'resnet18': BodySpec('a1_in1k', 448, 14, aggregations=_CURATED),
    'convnext_tiny': BodySpec('in12k_ft_in1k', 448, 14, aggregations=_CURATED),
    'efficientnet_b0': BodySpec('ra_in1k', 448, 14, aggregations=_CURATED),
    # token bodies at a fixed size, like timm's own cfgs of these models: FX tracing cannot follow the
    # dynamic position-embedding resampling (create_ssanet reads token bodies at any size)
    'vit_small_patch16_384': BodySpec(
        'augreg_in21k_ft_in1k', 384, 24, True, body_kwargs={'dynamic_img_size': False}, aggregations=_CURATED),
    'eva02_tiny_patch14_336': BodySpec(
        'mim_in22k_ft_in1k', 336, 24, True, body_kwargs={'dynamic_img_size': False}, aggregations=_CURATED),
    'swin_tiny_patch4_window7_224': BodySpec('ms_in1k', 224, 7, True, aggregations=_CURATED),
}
# registered name -> (body, aggregation)
_MODEL_DEFS: Dict[str, Tuple[str, str]] = {
    f'ssanet_{body}_{aggregation}': (body, aggregation)
    for body, spec in _BODIES.items() for aggregation in spec.aggregations
}
_GENERIC_BODY = 'resnet18'  # the generic entrypoint's default body (body= picks another)
_QK_NORM_KEY = 'head.attn.logit_scale'  # the one parameter cosine attention (qk_norm) adds
# key prefixes of checkpoints written before the SSA head module existed (0.1) -> today's keys
_LEGACY_KEYS = {'attn.': 'head.attn.', 'head_ssa.': 'head.ssa.', 'head_fe.': 'head.fe.'}


class SSANet(nn.Module):
    """SSANet over any timm image model as body (paper Fig. 2): ``body`` + ``head`` (``SSAHeads``).

    ``forward_features`` returns the unpooled map: F for ``no_attention``, otherwise F and H
    concatenated on the channel axis. ``forward_head`` with ``pre_logits=True`` returns the hidden
    vectors of the two heads concatenated, of which the eval logits (mean of the two heads) are a
    linear function.

    Order. The maps are F then H: ``forward_features`` channels ``[0, K)`` are the body map F, the
    input of the SSA module, and ``[K, 2K)`` its output H. The heads are SSA then FE wherever they
    are listed: the train-mode logits ``(z_ssa, z_fe)`` (``SelfADLoss`` takes the teacher first),
    ``pre_logits`` (SSA hidden vector, then FE), ``get_classifier()``, the cfg's ``classifier``,
    ``head.heads()`` and the per-head dicts ``{'ssa': z_ssa, 'fe': z_fe}``.

    Args:
        body: timm model name of the body, e.g. 'vgg16'; a tag ('resnet18.a1_in1k') picks its weights.
        aggregation: One of ``VARIANTS`` ('plus', 'multiply', 'alpha', 'no_alpha', 'no_attention').
        num_classes: Classes of both heads; 0 keeps the heads' hidden layers only.
        in_chans: Input image channels.
        global_pool: Pool of the heads ('avg', 'max', 'avgmax'; '' for unpooled output).
        drop_rate: Dropout before each head's final Linear.
        img_size: Input size the body is built for (position embeddings, attention windows).
        head_width: Hidden width of each head (paper: 1024).
        head_act_layer: Optional activation after each head's BatchNorm (paper: none).
        qk_ratio: Channels of A and B relative to K (``SpatialSelfAttention``; paper: 1.0).
        scale_attn: Scale the attention logits by 1/sqrt(d) (paper: unscaled).
        qk_norm: Cosine attention with a learnable temperature (paper: plain dot products). The
            registered names and builders pass their own default (``default_qk_norm``).
        fused_attn: Use ``scaled_dot_product_attention`` (None: fused in eval mode only).
        sagan_qk: SAGAN's safeguard on A and B (spectral norm, K/8 channels; ``SpatialSelfAttention``).
        alpha_init: The starting value of the attention's alpha (paper: 0).
        body_pretrained: Load the body's timm weights for its tag (set by ``pretrained=True``).
        body_kwargs: Extra keyword arguments for the body's timm constructor.
        body_feature_index: Read F at this entry of the body's ``feature_info`` (timm's
            ``forward_intermediates`` indices), pruning the later stages; default: the body's end.
        zoom: Look twice (``ssa_timm.zoom``): crop the input where the first pass's attention points, run the
            same body and heads on the crop, and output the mean of both passes' logits (not in the paper).
        zoom_threshold: Cells with at least this fraction of the largest attended mass are in the zoom box.
        zoom_margin: The zoom box's sides move out by this fraction of its size.
        zoom_min_size: The zoom box's width and height are at least this fraction of the image's.
    """

    def __init__(
            self,
            body: str = _GENERIC_BODY,
            aggregation: str = 'plus',
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            img_size: Union[int, Tuple[int, int]] = 448,
            head_width: int = 1024,
            head_act_layer: Optional[str] = None,
            qk_ratio: float = 1.0,
            scale_attn: bool = False,
            qk_norm: bool = False,
            fused_attn: Optional[bool] = None,
            sagan_qk: bool = False,
            alpha_init: float = 0.,
            body_pretrained: bool = False,
            body_kwargs: Optional[Dict[str, Any]] = None,
            body_feature_index: Optional[int] = None,
            zoom: bool = False,
            zoom_threshold: float = 0.5,
            zoom_margin: float = 0.1,
            zoom_min_size: float = 0.25,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        check_aggregation(aggregation)  # before the body is built (or its weights downloaded)
        _check_zoom(zoom, aggregation, zoom_threshold, zoom_margin, zoom_min_size)
        self.zoom = zoom
        self.zoom_threshold, self.zoom_margin, self.zoom_min_size = zoom_threshold, zoom_margin, zoom_min_size
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.body_name = body
        self.aggregation = aggregation

        # the body first: from the same seed it gets exactly the bare timm model's init
        self.body, layout = create_body(body, in_chans, to_2tuple(img_size), body_pretrained, dict(body_kwargs or {}),
                                        device, dtype, body_feature_index)
        self.body_channels = layout.channels  # K
        self.map_fmt, self.map_reduction = layout.fmt, layout.reduction  # how forward_body reads F
        self.num_prefix_tokens, self.map_pad = layout.num_prefix_tokens, layout.pad
        self.feature_info = [dict(info, module=f'body.{info["module"]}') for info in self.body.feature_info]

        self.head: Optional[SSAHeads] = SSAHeads(
            self.body_channels, num_classes, aggregation=aggregation, width=head_width, pool_type=global_pool,
            drop_rate=drop_rate, act_layer=get_act_layer(head_act_layer) if head_act_layer else None,
            qk_ratio=qk_ratio, scale_attn=scale_attn, qk_norm=qk_norm, fused_attn=fused_attn, sagan_qk=sagan_qk,
            alpha_init=alpha_init, device=device, dtype=dtype)
        self.num_features, self.head_hidden_size = self.head.num_features, self.head.head_hidden_size  # 2K, 2 x width

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Union[Dict[str, Any], Callable]:
        # the SSA head module matches no body group, so timm puts it in the last group
        return prefixed_group_matcher(self.body.group_matcher(coarse=coarse), 'body.')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.body.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        skip = {f'body.{n}' for n in getattr(self.body, 'no_weight_decay', lambda: set())()}
        attn = self.head.attn if self.head is not None else None
        if attn is not None:
            skip.update(f'head.attn.{n}' for n in ('alpha', 'logit_scale') if getattr(attn, n) is not None)
        return skip

    @torch.jit.ignore
    def set_distilled_training(self, enable: bool = True) -> None:
        """In train mode, make ``forward`` return ``(z_ssa, z_fe)`` for ``SelfADLoss``."""
        if self.head is not None:
            self.head.set_distilled_training(enable)

    @torch.jit.ignore
    def get_classifier(self) -> Union[nn.Module, Tuple[nn.Module, ...]]:
        """The final Linear of each head: ``(SSA, FE)``, or the FE head's alone for ``no_attention``."""
        if self.head is None:
            raise RuntimeError('the heads were removed by prune_intermediate_layers()')
        heads = self.head.heads()
        return heads[0].fc if len(heads) == 1 else tuple(h.fc for h in heads)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the final Linear of each head (new layers follow the model's device, dtype, mode).

        The heads' hidden layers are kept, so a frozen model stays frozen after
        ``reset_classifier(0)`` or ``reset_classifier(0, '')``.
        """
        if self.head is None:
            raise RuntimeError('the heads were removed by prune_intermediate_layers(); build a new model instead')
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)

    def body_map(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The body's native ``forward_features`` output for an image ``height`` x ``width`` -> F (NCHW)."""
        if self.map_fmt == 'NHWC':
            return x.permute(0, 3, 1, 2)
        if self.map_fmt == 'NLC':
            return tokens_to_map(x, height, width, self.map_reduction, self.num_prefix_tokens, self.map_pad)
        return x

    def forward_body(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> the body's map F ``(B, K, H, W)``."""
        height, width = x.shape[-2], x.shape[-1]
        return self.body_map(self.body.forward_features(x), height, width)

    def forward_ssa(self, x: torch.Tensor) -> torch.Tensor:
        """Body map F -> ``forward_features`` output: F and the SSA-aggregated H on the channel axis
        (F alone for ``no_attention``).

        ``forward_features(x) == forward_ssa(forward_body(x))``: the heads train on cached body maps
        with ``forward_head(forward_ssa(F))``.
        """
        if self.head is None:
            return x
        return self.head.forward_features(x)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """The body's intermediate taps; the final output is ``forward_features`` (SSA included)
        unless ``stop_early`` ends the body before its last tap.
        """
        height, width = x.shape[-2], x.shape[-1]
        out = self.body.forward_intermediates(
            x, indices=indices, norm=norm, stop_early=stop_early, output_fmt=output_fmt,
            intermediates_only=intermediates_only)
        if intermediates_only:
            return out
        x, intermediates = out
        _, max_index = feature_take_indices(len(self.feature_info), indices)
        if stop_early and max_index < len(self.feature_info) - 1:
            return x, intermediates
        return self.forward_ssa(self.body_map(x, height, width)), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Prune the body after the last wanted tap; with ``prune_head`` (or when the body's end is
        pruned) the SSA head module goes too, and ``forward_features`` returns the body map.
        """
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        # the body's own head is gone already; prune_head=False keeps layers some bodies run after
        # their last tap (EfficientNet's conv_head, FastViT's final conv), which F is read after
        self.body.prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
        prune_end = max_index < len(self.feature_info) - 1
        if prune_head or prune_end:
            self.head = None
            self.num_classes = 0
            self.num_features = self.feature_info[max_index]['num_chs'] if prune_end else self.body.num_features
            self.head_hidden_size = self.num_features
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_ssa(self.forward_body(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.head is None:  # pruned
            return x
        return self.head.forward_head(x, pre_logits=pre_logits)

    @torch.jit.ignore
    def logits_per_head(self, features: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Logits of each head from ``forward_features`` output, in any mode:
        ``{'ssa': z_ssa, 'fe': z_fe}`` (``no_attention``: ``'fe'`` only)."""
        if self.head is None or self.num_classes == 0:
            raise RuntimeError('the model has no classifier (num_classes=0 or pruned heads)')
        return self.head.logits_per_head(features)

    @torch.jit.ignore
    def forward_per_head(self, x: torch.Tensor, body_map: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Images -> ``logits_per_head``: each head's logits, whatever the mode (with ``zoom``, each head's
        mean over both passes; ``body_map`` as in ``forward_zoom_features``)."""
        if not self.zoom:
            return self.logits_per_head(self.forward_features(x))
        full, zoomed, _ = self.forward_zoom_features(x, body_map)
        first, second = self.logits_per_head(full), self.logits_per_head(zoomed)
        return {k: (first[k] + second[k]) / 2 for k in first}

    @torch.jit.ignore
    def zoom_args(self) -> Dict[str, Any]:
        """The zoom's model arguments (what an export records); empty when the zoom is off."""
        if not self.zoom:
            return {}
        return dict(zoom=True, zoom_threshold=self.zoom_threshold, zoom_margin=self.zoom_margin,
                    zoom_min_size=self.zoom_min_size)

    @torch.jit.ignore
    def zoom_box(self, mass: torch.Tensor) -> torch.Tensor:
        """The box this model's zoom draws on each ``(B, h, w)`` map of mass (``ssa_timm.zoom.attention_box``
        with its ``zoom_threshold``, ``zoom_margin`` and ``zoom_min_size``; fractions of the image, no gradient);
        a model built without the zoom draws it with the defaults."""
        return attention_box(mass.detach(), self.zoom_threshold, self.zoom_margin, self.zoom_min_size)

    @torch.jit.ignore
    def zoom_boxes(self, body_map: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """F -> the SSA layer's output H and the zoom box of each image (``zoom_box``), drawn from the
        attended mass of each position (the column mean of S)."""
        aggregated, attention = self.head.attn.forward_with_attention(body_map)
        return aggregated, self.zoom_box(attention.float().mean(1).reshape(body_map.shape[0], *body_map.shape[-2:]))

    @torch.jit.ignore
    def forward_zoom_features(self, x: torch.Tensor, body_map: Optional[torch.Tensor] = None,
                              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images -> ``forward_features`` of the image and of its zoom crop (the input cropped at the first
        pass's zoom box and resized to the input size), and the boxes (fractions of the image; no gradient).

        ``body_map``: the images' body map F when it is known already (a frozen body's feature cache): the
        first pass reads it instead of running the body; the crops always run through the body.
        """
        body_map = self.forward_body(x) if body_map is None else body_map
        aggregated, boxes = self.zoom_boxes(body_map)
        crops = zoom_crop(x, boxes, (x.shape[-2], x.shape[-1]))
        return torch.cat([body_map, aggregated], dim=1), self.forward_features(crops), boxes

    @torch.jit.ignore
    def forward_with_zoom_box(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode logits of a ``zoom`` model (the mean of both passes) and its zoom boxes, in one pass."""
        full, zoomed, boxes = self.forward_zoom_features(x)
        return (self.forward_head(full) + self.forward_head(zoomed)) / 2, boxes

    @torch.jit.ignore
    def forward_zoom(self, x: torch.Tensor, body_map: Optional[torch.Tensor] = None) -> Any:
        """``forward`` of a ``zoom`` model (``body_map`` as in ``forward_zoom_features``): the mean of both
        passes' logits, or in distilled training each pass's ``(z_ssa, z_fe)``, as a list."""
        full, zoomed, _ = self.forward_zoom_features(x, body_map)
        first, second = self.forward_head(full), self.forward_head(zoomed)
        if isinstance(first, tuple):  # distilled training: each pass's (z_ssa, z_fe), both get the Self-AD loss
            return [first, second]
        return (first + second) / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.zoom:
            if not torch.jit.is_scripting():
                return self.forward_zoom(x)
            raise RuntimeError('a zoom model cannot be scripted (its box and crop run in Python): export it to ONNX')
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


def _check_zoom(zoom: bool, aggregation: str, threshold: float, margin: float, min_size: float) -> None:
    """Refuse zoom settings that cannot draw a box."""
    if zoom and aggregation == 'no_attention':
        raise ValueError("zoom draws its box from the SSA attention: aggregation 'no_attention' has none")
    if not 0 < threshold <= 1 or margin < 0 or not 0 < min_size <= 1:
        raise ValueError(f'zoom_threshold must be in (0, 1], zoom_margin >= 0 and zoom_min_size in (0, 1]; got '
                         f'{threshold}, {margin}, {min_size}')


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: SSANet) -> Dict[str, torch.Tensor]:
    """Load an SSANet checkpoint (older key names converted), or a bare body checkpoint.

    A bare body checkpoint (e.g. ``pretrained_cfg_overlay=dict(file=...)``) goes through the body
    module's own ``checkpoint_filter_fn`` where it has one; the freshly initialised SSA head module is
    kept. Either way the weights must fit: a missing key, a key the model (or, for a bare body, the
    whole timm model the body was cut from) does not have, or another shape raises ``WeightsMismatch``.
    """
    if any(k.startswith('body.') for k in state_dict):
        out = renamed_keys(state_dict)
        check_weights_fit(out, model.state_dict(), 'the checkpoint', type(model).__name__)
        return out
    body_filter = getattr(sys.modules[type(model.body).__module__], 'checkpoint_filter_fn', None)
    if body_filter is not None:
        state_dict = body_filter(state_dict, model.body)
    body_state = model.body.state_dict()
    cut_away = _cut_away_keys(model.body)  # stages pruned by body_feature_index, the removed classifier
    check_weights_fit({k: v for k, v in state_dict.items() if k not in cut_away}, body_state, 'the pretrained weights',
               f'{type(model.body).__name__} body')
    out = {f'body.{k}': state_dict[k] for k in body_state}
    out.update({k: v for k, v in model.state_dict().items() if not k.startswith('body.')})
    return out


def renamed_keys(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """An SSANet state dict with the key names of older releases converted to today's."""
    out = {}
    for key, value in state_dict.items():
        prefix = next((p for p in _LEGACY_KEYS if key.startswith(p)), None)
        out[_LEGACY_KEYS[prefix] + key[len(prefix):] if prefix else key] = value
    return out


def _cut_away_keys(body: nn.Module) -> Set[str]:
    """Keys of the whole timm model ``body`` was built from that the body no longer has."""
    arch = (getattr(body, 'pretrained_cfg', None) or {}).get('architecture')
    if not arch:
        return set()
    with torch.device('meta'):
        whole = create_model(arch, pretrained=False, in_chans=getattr(body, 'in_chans', 3))
    return set(whole.state_dict()) - set(body.state_dict())


def check_weights_fit(state: Dict[str, torch.Tensor], own: Dict[str, torch.Tensor], what: str, where: str) -> None:
    """Raise ``WeightsMismatch`` naming the first missing, unexpected and differently shaped keys."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f'{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}' for k in own
              if k in state and state[k].shape != own[k].shape]
    problems = [f'{len(keys)} {kind}, e.g. {keys[:3]}' for kind, keys in
                (('missing', missing), ('unexpected', unexpected), ('of another shape', shapes)) if keys]
    if problems:
        details = 'keys ' + '; '.join(problems) + _attention_hint(missing, unexpected)
        error = WeightsMismatch(f'{what} do not fit the {where}: {details}')
        error.details = details
        raise error


def _attention_hint(missing: List[str], unexpected: List[str]) -> str:
    """What a missing or unexpected ``qk_norm`` temperature means: weights of the other attention."""
    if _QK_NORM_KEY in missing:
        return ("; the weights have no qk_norm temperature: they were trained with the paper's attention, "
                'so build the model with qk_norm=False')
    if _QK_NORM_KEY in unexpected:
        return '; the weights were trained with cosine attention: build the model with qk_norm=True'
    return ''


def _names_a_checkpoint(cfg: PretrainedCfg) -> bool:
    """The cfg points at a whole checkpoint: an SSANet export (hf-hub: / local-dir:) or a file / url /
    state_dict overlay, which ``checkpoint_filter_fn`` loads."""
    return cfg.source in ('hf-hub', 'local-dir') or bool(cfg.file or cfg.url or cfg.state_dict)


def _body_weights_tag(cfg: PretrainedCfg) -> Optional[str]:
    """'<body>.<tag>' when the cfg points at a body's weights in timm's Hub repos, else None."""
    if not _names_a_checkpoint(cfg) and cfg.hf_hub_id and cfg.hf_hub_id.startswith('timm/'):
        return cfg.hf_hub_id[len('timm/'):]
    return None


def _body_weights_note(hf_hub_id: str) -> Tuple[str]:
    return (f'Body weights from {hf_hub_id}; the SSA module and heads are freshly initialised.',)


def default_qk_norm(model_name: str) -> bool:
    """Whether the model ``model_name`` builds computes cosine attention (``qk_norm=True``) by default.

    The default belongs to the body (``BodySpec.qk_norm``): the paper's 25 names (VGG-16, ResNet-50,
    Inception-v3, DenseNet-121 and -161 with each aggregation) keep the paper's unscaled dot products
    (False) under any tag; every other name computes cosine attention (True): the curated modern names, the
    generic ``ssanet`` (over its default body; for ``body=B, aggregation=A`` ask for ``'ssanet_B_A'``) and
    any ``ssanet_<timm body>_<aggregation>`` (``create_ssanet``). A ``no_attention`` name computes no
    attention (False). What a build does beyond the default: an explicit ``qk_norm`` wins; an explicit
    ``scale_attn=True`` or ``sagan_qk=True`` (they exclude ``qk_norm``) turns the default off; an export
    (``hf-hub:`` / ``local-dir:``) loads with the attention its ``config.json`` records, the paper's when it
    records none (it predates this default).

    Args:
        model_name: 'ssanet', or 'ssanet_<timm body>_<aggregation>', either with or without a '.<tag>'.

    Raises:
        ValueError: Not such a name.
    """
    from ._factory import parse_ssanet_name  # _factory imports this module
    base = model_name.partition('.')[0]
    body, aggregation = (_GENERIC_BODY, 'plus') if base == 'ssanet' else parse_ssanet_name(base)
    return aggregation != 'no_attention' and _body_qk_norm(body)


def _body_qk_norm(body: str) -> bool:
    """The default ``qk_norm`` of an SSANet over ``body`` ('<timm model>[.<tag>]'): its registered
    spec's, cosine attention for a body without one."""
    spec = _BODIES.get(body.partition('.')[0])
    return spec is None or spec.qk_norm


def _fill_in_attention(kwargs: Dict[str, Any], cfg: PretrainedCfg) -> None:
    """Set ``kwargs['qk_norm']`` where the caller gave none (or None) and the model has attention."""
    if kwargs.get('qk_norm') is not None:
        return
    kwargs.pop('qk_norm', None)
    if kwargs.get('aggregation', 'plus') == 'no_attention':
        return
    if cfg.source in ('hf-hub', 'local-dir'):
        # exports record their attention (hub.attention_args); one without a record was written before
        # the modern names took qk_norm, when every name computed the paper's attention
        kwargs['qk_norm'] = False
    elif kwargs.get('scale_attn') or kwargs.get('sagan_qk'):
        kwargs['qk_norm'] = False  # they exclude qk_norm: an explicit choice wins over the default
    else:
        kwargs['qk_norm'] = _body_qk_norm(kwargs['body'])


def _build_ssanet(variant: str, pretrained: bool, **kwargs: Any) -> SSANet:
    """``build_model_with_cfg`` for the timm model name ``variant``: body weights from timm's Hub repos
    through the body (``body_pretrained``), a whole checkpoint through ``checkpoint_filter_fn``."""
    cfg = resolve_pretrained_cfg(
        variant, pretrained_cfg=kwargs.pop('pretrained_cfg', None),
        pretrained_cfg_overlay=kwargs.pop('pretrained_cfg_overlay', None))
    _fill_in_attention(kwargs, cfg)
    body_weights = _body_weights_tag(cfg) if pretrained else None
    if pretrained and not body_weights and not _names_a_checkpoint(cfg):
        raise RuntimeError(f'{variant} has no pretrained weights: its config names no body weights in timm\'s Hub '
                           f'repos and no SSANet export (hf_hub_id={cfg.hf_hub_id!r})')
    if body_weights:
        kwargs['body'] = body_weights
        kwargs['body_pretrained'] = True
    if not cfg.fixed_input_size:
        kwargs.setdefault('img_size', cfg.input_size[-2:])
    cfg = _built_cfg(cfg, kwargs)
    feature_cfg = dict(feature_cls='getter')
    if kwargs.get('features_only'):
        levels = probe_body(kwargs['body'], kwargs.get('in_chans', 3), cfg.input_size[-1], kwargs.get('body_kwargs'),
                            kwargs.get('body_feature_index'))
        feature_cfg['out_indices'] = tuple(range(len(levels.model.feature_info)))
    model = build_model_with_cfg(
        SSANet,
        variant,
        pretrained and not body_weights,
        pretrained_cfg=cfg,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=feature_cfg,
        **kwargs,
    )
    if 'qk_norm' in kwargs:  # a plain save_for_hf records the attention too, whatever the default
        update_model_args(model, qk_norm=kwargs['qk_norm'])
    if kwargs.get('zoom'):
        update_model_args(model, zoom=True, **{k: kwargs[k] for k in ('zoom_threshold', 'zoom_margin', 'zoom_min_size')
                                               if k in kwargs})
    # the config says what was loaded, not what could have been
    if body_weights:
        model.pretrained_cfg['notes'] = _body_weights_note(cfg.hf_hub_id)
    elif not pretrained:
        model.pretrained_cfg['hf_hub_id'] = None
        model.pretrained_cfg['notes'] = (_NO_WEIGHTS_NOTE,)
    return model


def _built_cfg(cfg: PretrainedCfg, kwargs: Dict[str, Any]) -> PretrainedCfg:
    """``cfg`` with the input and pool size the model is built for (``img_size``, ``in_chans`` and
    ``body_feature_index`` may differ from the name's defaults), so transforms and exports read the
    model's own size."""
    in_chans, (height, width) = kwargs.get('in_chans', 3), _sides(kwargs.get('img_size') or cfg.input_size[-2:])
    if (in_chans, height, width) == tuple(cfg.input_size) and kwargs.get('body_feature_index') is None:
        return cfg
    probe = probe_body(kwargs['body'], in_chans, (height, width), kwargs.get('body_kwargs'),
                       kwargs.get('body_feature_index'))
    return dataclasses.replace(cfg, input_size=(in_chans, height, width), pool_size=tuple(probe.map_size))


def _sides(img_size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    return (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)


def _create_registered(variant: str, pretrained: bool = False, **kwargs: Any) -> SSANet:
    """A registered ``ssanet_<body>_<aggregation>``: its body, tag and body kwargs from ``_BODIES``."""
    body, aggregation = _MODEL_DEFS[variant]
    spec = _BODIES[body]
    kwargs.setdefault('body', f'{body}.{spec.tag}')
    if spec.body_kwargs:
        kwargs.setdefault('body_kwargs', dict(spec.body_kwargs))
    return _build_ssanet(variant, pretrained, aggregation=aggregation, **kwargs)


def _cfg(
        body_cfg: Optional[PretrainedCfg],
        aggregation: str,
        img_size: int,
        pool_size: Tuple[int, int],
        fixed_input_size: bool = False,
        **kwargs: Any,
) -> Dict[str, Any]:
    """Config of an SSANet whose body starts from the timm weights ``body_cfg`` describes (if any).

    Preprocessing is the paper's: squash to ``img_size`` (no crop) with the body's interpolation and
    normalisation, which ``timm.data.resolve_data_config`` + ``create_transform`` reproduce.
    """
    body_cfg = body_cfg or PretrainedCfg(interpolation='bilinear')
    first_conv = body_cfg.first_conv
    if isinstance(first_conv, (tuple, list)):
        first_conv = tuple(f'body.{c}' for c in first_conv)
    elif first_conv:
        first_conv = f'body.{first_conv}'
    classifier = 'head.fe.fc' if aggregation == 'no_attention' else ('head.ssa.fc', 'head.fe.fc')
    hub = body_cfg.hf_hub_id
    return {
        'hf_hub_id': hub,
        'num_classes': 1000,
        'input_size': (3, img_size, img_size),
        'fixed_input_size': fixed_input_size,
        'pool_size': pool_size,
        'crop_pct': 1.0,
        'crop_mode': 'squash',
        'interpolation': body_cfg.interpolation,
        'mean': body_cfg.mean,
        'std': body_cfg.std,
        'first_conv': first_conv,
        'classifier': classifier,
        'license': body_cfg.license,
        'paper_ids': _PAPER_ID,
        'paper_name': _PAPER,
        'notes': _body_weights_note(hub) if hub else None,
        **kwargs,
    }


def _registered_cfg(body: str, aggregation: str, **kwargs: Any) -> Dict[str, Any]:
    spec = _BODIES[body]
    if spec.min_input_size:
        kwargs.setdefault('min_input_size', (3, spec.min_input_size, spec.min_input_size))
    return _cfg(get_pretrained_cfg(f'{body}.{spec.tag}'), aggregation, spec.img_size, (spec.map_size, spec.map_size),
                spec.fixed_input_size, **kwargs)


def generic_cfg(
        body: str,
        aggregation: str,
        img_size: int,
        in_chans: int = 3,
        body_kwargs: Optional[Dict[str, Any]] = None,
        body_feature_index: Optional[int] = None,
) -> Dict[str, Any]:
    """Config of the generic ``ssanet`` entrypoint over ``body`` ('<timm model>[.<tag>]') at ``img_size``.

    A meta-device probe of the body (``probe_body``) gives the map size; an unknown model is refused here.
    """
    probe = probe_body(body, in_chans, img_size, body_kwargs, body_feature_index)
    body_cfg = get_pretrained_cfg(body)
    fixed = bool(body_cfg is not None and body_cfg.fixed_input_size and not probe.dynamic_img_size)
    cfg = _cfg(body_cfg, aggregation, img_size, probe.map_size, fixed, architecture='ssanet')
    cfg['input_size'] = (in_chans, img_size, img_size)
    return cfg


default_cfgs = generate_default_cfgs({
    **{f'{name}.{_BODIES[b].tag}': _registered_cfg(b, a) for name, (b, a) in _MODEL_DEFS.items()},
    # generic entrypoint: body=, aggregation= and img_size= pick the model; this is its default
    f'ssanet.{_BODIES[_GENERIC_BODY].tag}': _registered_cfg(_GENERIC_BODY, 'plus', architecture='ssanet'),
})


@register_model
def ssanet(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet over the timm model named by ``body=`` (default 'resnet18', a tag picks its weights) with
    ``aggregation=`` (default 'plus') at ``img_size=`` (default 448); cosine attention (``qk_norm``) unless
    the body is one of the paper's (``default_qk_norm``)."""
    body = kwargs.setdefault('body', _GENERIC_BODY)
    aggregation = kwargs.setdefault('aggregation', 'plus')
    img_size = to_2tuple(kwargs.get('img_size', 448))[0]
    if not kwargs.get('pretrained_cfg') and (body, aggregation, img_size) != (_GENERIC_BODY, 'plus', 448):
        kwargs['pretrained_cfg'] = generic_cfg(
            body, aggregation, img_size, kwargs.get('in_chans', 3), kwargs.get('body_kwargs'),
            kwargs.get('body_feature_index'))
    return _build_ssanet('ssanet', pretrained, **kwargs)


@register_model
def ssanet_resnet18_plus(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet-plus (H = alpha*O + F) on ResNet-18 (the built-in demo's model), cosine attention (qk_norm)."""
    return _create_registered('ssanet_resnet18_plus', pretrained, **kwargs)


@register_model
def ssanet_resnet18_no_attention(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet without attention (body + FE head) on ResNet-18."""
    return _create_registered('ssanet_resnet18_no_attention', pretrained, **kwargs)


@register_model
def ssanet_convnext_tiny_plus(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet-plus on ConvNeXt-Tiny (ImageNet-12k -> 1k body), 448 px; cosine attention (qk_norm)."""
    return _create_registered('ssanet_convnext_tiny_plus', pretrained, **kwargs)


@register_model
def ssanet_convnext_tiny_no_attention(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet without attention on ConvNeXt-Tiny, 448 px."""
    return _create_registered('ssanet_convnext_tiny_no_attention', pretrained, **kwargs)


@register_model
def ssanet_efficientnet_b0_plus(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet-plus on EfficientNet-B0, 448 px; cosine attention (qk_norm)."""
    return _create_registered('ssanet_efficientnet_b0_plus', pretrained, **kwargs)


@register_model
def ssanet_efficientnet_b0_no_attention(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet without attention on EfficientNet-B0, 448 px."""
    return _create_registered('ssanet_efficientnet_b0_no_attention', pretrained, **kwargs)


@register_model
def ssanet_vit_small_patch16_384_plus(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet-plus on ViT-S/16 (AugReg ImageNet-21k -> 1k), 384 px: a 24 x 24 patch grid; cosine attention (qk_norm)."""
    return _create_registered('ssanet_vit_small_patch16_384_plus', pretrained, **kwargs)


@register_model
def ssanet_vit_small_patch16_384_no_attention(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet without attention on ViT-S/16, 384 px."""
    return _create_registered('ssanet_vit_small_patch16_384_no_attention', pretrained, **kwargs)


@register_model
def ssanet_eva02_tiny_patch14_336_plus(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet-plus on EVA-02-Ti/14 (MIM ImageNet-22k -> 1k), 336 px: a 24 x 24 patch grid; cosine attention
    (qk_norm)."""
    return _create_registered('ssanet_eva02_tiny_patch14_336_plus', pretrained, **kwargs)


@register_model
def ssanet_eva02_tiny_patch14_336_no_attention(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet without attention on EVA-02-Ti/14, 336 px."""
    return _create_registered('ssanet_eva02_tiny_patch14_336_no_attention', pretrained, **kwargs)


@register_model
def ssanet_swin_tiny_patch4_window7_224_plus(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet-plus on Swin-T, 224 px (fixed input size): a 7 x 7 map; cosine attention (qk_norm)."""
    return _create_registered('ssanet_swin_tiny_patch4_window7_224_plus', pretrained, **kwargs)


@register_model
def ssanet_swin_tiny_patch4_window7_224_no_attention(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet without attention on Swin-T, 224 px (fixed input size)."""
    return _create_registered('ssanet_swin_tiny_patch4_window7_224_no_attention', pretrained, **kwargs)


@register_model
def ssanet_vgg16_plus(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet-plus (H = alpha*O + F) on VGG-16 with the paper's attention: the paper's best model."""
    return _create_registered('ssanet_vgg16_plus', pretrained, **kwargs)


@register_model
def ssanet_vgg16_multiply(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet-multiply (H = alpha*O * F) on VGG-16."""
    return _create_registered('ssanet_vgg16_multiply', pretrained, **kwargs)


@register_model
def ssanet_vgg16_alpha(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet-alpha (H = alpha*O) on VGG-16."""
    return _create_registered('ssanet_vgg16_alpha', pretrained, **kwargs)


@register_model
def ssanet_vgg16_no_alpha(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet-no-alpha (H = O) on VGG-16."""
    return _create_registered('ssanet_vgg16_no_alpha', pretrained, **kwargs)


@register_model
def ssanet_vgg16_no_attention(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet without attention (body + FE head) on VGG-16."""
    return _create_registered('ssanet_vgg16_no_attention', pretrained, **kwargs)


@register_model
def ssanet_resnet50_plus(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet-plus (H = alpha*O + F) on ResNet-50."""
    return _create_registered('ssanet_resnet50_plus', pretrained, **kwargs)


@register_model
def ssanet_resnet50_multiply(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet-multiply (H = alpha*O * F) on ResNet-50."""
    return _create_registered('ssanet_resnet50_multiply', pretrained, **kwargs)


@register_model
def ssanet_resnet50_alpha(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet-alpha (H = alpha*O) on ResNet-50."""
    return _create_registered('ssanet_resnet50_alpha', pretrained, **kwargs)


@register_model
def ssanet_resnet50_no_alpha(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet-no-alpha (H = O) on ResNet-50."""
    return _create_registered('ssanet_resnet50_no_alpha', pretrained, **kwargs)


@register_model
def ssanet_resnet50_no_attention(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet without attention (body + FE head) on ResNet-50."""
    return _create_registered('ssanet_resnet50_no_attention', pretrained, **kwargs)


@register_model
def ssanet_inception_v3_plus(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet-plus (H = alpha*O + F) on Inception-v3."""
    return _create_registered('ssanet_inception_v3_plus', pretrained, **kwargs)


@register_model
def ssanet_inception_v3_multiply(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet-multiply (H = alpha*O * F) on Inception-v3."""
    return _create_registered('ssanet_inception_v3_multiply', pretrained, **kwargs)


@register_model
def ssanet_inception_v3_alpha(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet-alpha (H = alpha*O) on Inception-v3."""
    return _create_registered('ssanet_inception_v3_alpha', pretrained, **kwargs)


@register_model
def ssanet_inception_v3_no_alpha(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet-no-alpha (H = O) on Inception-v3."""
    return _create_registered('ssanet_inception_v3_no_alpha', pretrained, **kwargs)


@register_model
def ssanet_inception_v3_no_attention(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet without attention (body + FE head) on Inception-v3."""
    return _create_registered('ssanet_inception_v3_no_attention', pretrained, **kwargs)


@register_model
def ssanet_densenet121_plus(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet-plus (H = alpha*O + F) on DenseNet-121."""
    return _create_registered('ssanet_densenet121_plus', pretrained, **kwargs)


@register_model
def ssanet_densenet121_multiply(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet-multiply (H = alpha*O * F) on DenseNet-121."""
    return _create_registered('ssanet_densenet121_multiply', pretrained, **kwargs)


@register_model
def ssanet_densenet121_alpha(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet-alpha (H = alpha*O) on DenseNet-121."""
    return _create_registered('ssanet_densenet121_alpha', pretrained, **kwargs)


@register_model
def ssanet_densenet121_no_alpha(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet-no-alpha (H = O) on DenseNet-121."""
    return _create_registered('ssanet_densenet121_no_alpha', pretrained, **kwargs)


@register_model
def ssanet_densenet121_no_attention(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet without attention (body + FE head) on DenseNet-121."""
    return _create_registered('ssanet_densenet121_no_attention', pretrained, **kwargs)


@register_model
def ssanet_densenet161_plus(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet-plus (H = alpha*O + F) on DenseNet-161."""
    return _create_registered('ssanet_densenet161_plus', pretrained, **kwargs)


@register_model
def ssanet_densenet161_multiply(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet-multiply (H = alpha*O * F) on DenseNet-161."""
    return _create_registered('ssanet_densenet161_multiply', pretrained, **kwargs)


@register_model
def ssanet_densenet161_alpha(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet-alpha (H = alpha*O) on DenseNet-161."""
    return _create_registered('ssanet_densenet161_alpha', pretrained, **kwargs)


@register_model
def ssanet_densenet161_no_alpha(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet-no-alpha (H = O) on DenseNet-161."""
    return _create_registered('ssanet_densenet161_no_alpha', pretrained, **kwargs)


@register_model
def ssanet_densenet161_no_attention(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet without attention (body + FE head) on DenseNet-161."""
    return _create_registered('ssanet_densenet161_no_attention', pretrained, **kwargs)
