"""SSANet: spatial self-attention network with self-attention distillation

A timm CNN body with its classifier removed gives the feature map F; a spatial self-attention
module turns it into H; one classifier head reads H (the SSA head), another reads F (the FE head).
In eval mode ``forward`` returns the mean of the two heads' logits (timm's DeiT-distilled
precedent); in train mode with ``set_distilled_training(True)`` it returns ``(z_ssa, z_fe)`` for
``SelfADLoss``.

Paper: `Spatial self-attention network with self-attention distillation for fine-grained image
recognition` - Baffour et al., JVCIR 81 (2021), https://doi.org/10.1016/j.jvcir.2021.103368
"""
import math
import re
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Union

import torch
import torch.nn as nn

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import get_act_layer
from timm.models import build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, register_model
from timm.models._features import feature_take_indices
from timm.models.densenet import _filter_torchvision_pretrained as _densenet_filter
from timm.models.vgg import _filter_fn as _vgg_filter

from ..layers import AGGREGATIONS, SpatialSelfAttention, SSAHead

__all__ = ['SSANet', 'VARIANTS', 'create_ssanet', 'create_ssanet_by_name', 'parse_ssanet_name']

# Paper Table 2 rows: the four SSA aggregations plus the body-only baseline.
VARIANTS = AGGREGATIONS + ('no_attention',)

_PAPER = 'Spatial self-attention network with self-attention distillation for fine-grained image recognition'
_PAPER_ID = 'doi:10.1016/j.jvcir.2021.103368'

# Registered bodies: timm name -> (ImageNet weights tag in timm's own Hub repos, pool size at 448 px).
_BODIES = {
    'vgg16': ('tv_in1k', (14, 14)),
    'resnet50': ('tv_in1k', (14, 14)),
    'inception_v3': ('tv_in1k', (12, 12)),
    'densenet121': ('tv_in1k', (14, 14)),
    'densenet161': ('tv_in1k', (14, 14)),
}
_MODEL_DEFS = {f'ssanet_{b}_{a}': (b, a) for b in _BODIES for a in VARIANTS}

# timm's own checkpoint filters for bodies whose ImageNet weights may be in torchvision's layout.
_BODY_CHECKPOINT_FILTERS: Dict[str, Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]] = {
    'timm.models.vgg': _vgg_filter,
    'timm.models.densenet': _densenet_filter,
}


def _is_resettable(module: nn.Module) -> bool:
    """True when re-initialising the module after ``to_empty`` restores every tensor it owns."""
    owns_tensors = any(True for _ in module.parameters(recurse=False)) or any(
        True for _ in module.buffers(recurse=False))
    return not owns_tensors or isinstance(module, (nn.Conv2d, nn.Linear)) or hasattr(module, 'reset_parameters')


def _init_body_weights(body: nn.Module) -> None:
    """Standard CNN init: kaiming-normal (fan_out) convs, zero biases, norms reset."""
    for module in body.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode='fan_out', nonlinearity='relu')
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif hasattr(module, 'reset_parameters'):
            module.reset_parameters()


def _create_body(
        name: str,
        in_chans: int,
        body_kwargs: Dict[str, Any],
        device: torch.device,
        dtype: Optional[torch.dtype],
) -> nn.Module:
    """Build a timm CNN without its classifier / pre-logits layers.

    The body is built on the meta device and its head pruned before any memory is allocated, so the
    120M parameters of VGG-16's fc6/fc7 are never initialised. Bodies owning tensors that a
    re-init cannot restore (e.g. layer-scale parameters) are built eagerly instead.
    """
    def build(build_device: Union[str, torch.device]) -> nn.Module:
        with torch.device(build_device):
            body = timm.create_model(
                name, pretrained=False, num_classes=0, in_chans=in_chans, device=build_device, dtype=dtype,
                **body_kwargs)
        body.prune_intermediate_layers(len(body.feature_info), prune_head=True)
        return body

    body = build('meta')
    if device.type == 'meta':
        return body
    if not all(_is_resettable(m) for m in body.modules()):
        return build(device)
    body.to_empty(device=device)
    _init_body_weights(body)
    return body


def _prefixed_matcher(matcher: Union[Dict[str, Any], Callable], prefix: str) -> Union[Dict[str, Any], Callable]:
    """Re-root a timm ``group_matcher`` (regex dict or callable) under a submodule prefix."""
    if callable(matcher):
        def _matcher(name: str):
            return matcher(name[len(prefix):]) if name.startswith(prefix) else float('inf')
        return _matcher

    escaped = re.escape(prefix)

    def _re_root(pattern: str) -> str:
        return pattern.replace('^', '^' + escaped)

    out = {}
    for group, spec in matcher.items():
        if isinstance(spec, (list, tuple)):
            out[group] = [(_re_root(p), suffix) for p, suffix in spec]
        else:
            out[group] = _re_root(spec)
    return out


class SSANet(nn.Module):
    """SSANet over any timm CNN body (paper Fig. 2).

    ``forward_features`` returns the unpooled map: F for ``no_attention``, otherwise F and H
    concatenated on the channel axis (channels F then H). ``forward_head`` with
    ``pre_logits=True`` returns the hidden vectors of the FE and SSA heads concatenated, of which
    the eval logits (mean of the two heads) are a linear function.
    """

    def __init__(
            self,
            body: str = 'vgg16',
            aggregation: str = 'plus',
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            head_width: int = 1024,
            head_act_layer: Optional[str] = None,
            qk_ratio: float = 1.0,
            scale_attn: bool = False,
            fused_attn: Optional[bool] = None,
            body_kwargs: Optional[Dict[str, Any]] = None,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            body: timm model name of the CNN body, e.g. 'vgg16'.
            aggregation: One of ``VARIANTS`` ('plus', 'multiply', 'alpha', 'no_alpha', 'no_attention').
            num_classes: Classes of both heads; 0 keeps the heads' hidden layers only.
            in_chans: Input image channels.
            global_pool: Pool of the heads ('avg', 'max', 'avgmax'; '' for unpooled output).
            drop_rate: Dropout before each head's final Linear.
            head_width: Hidden width of each head (paper: 1024).
            head_act_layer: Optional activation after each head's BatchNorm (paper: none).
            qk_ratio: Channel fraction of the attention's A and B maps (paper: 1.0).
            scale_attn: Scale attention logits by 1/sqrt(d) (paper: unscaled).
            fused_attn: Attention through ``scaled_dot_product_attention`` always (True), never
                (False) or in eval mode only (None; see ``SpatialSelfAttention``).
            body_kwargs: Extra keyword arguments for the body's timm constructor.
        """
        super().__init__()
        if aggregation not in VARIANTS:
            raise ValueError(f'aggregation must be one of {VARIANTS}, got {aggregation!r}')
        dd = {'device': device, 'dtype': dtype}
        target = torch.device(device) if device is not None else torch.get_default_device()
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.body_name = body
        self.aggregation = aggregation
        self.distilled_training = False

        self.body = _create_body(body, in_chans, dict(body_kwargs or {}), target, dtype)
        self.body_channels = self.body.num_features
        self.feature_info = [dict(info, module=f'body.{info["module"]}') for info in self.body.feature_info]

        head_args = dict(
            width=head_width, pool_type=global_pool, drop_rate=drop_rate,
            act_layer=get_act_layer(head_act_layer) if head_act_layer else None, **dd)
        if aggregation == 'no_attention':
            self.attn = None
            self.head_ssa = None
        else:
            self.attn = SpatialSelfAttention(
                self.body_channels, aggregation=aggregation, qk_ratio=qk_ratio, scale_attn=scale_attn,
                fused_attn=fused_attn, **dd)
            self.head_ssa = SSAHead(self.body_channels, num_classes, **head_args)
        self.head_fe = SSAHead(self.body_channels, num_classes, **head_args)
        num_heads = 1 if self.attn is None else 2
        self.num_features = self.body_channels * num_heads
        self.head_hidden_size = head_width * num_heads

    def _heads(self) -> List[SSAHead]:
        return [h for h in (self.head_ssa, self.head_fe) if h is not None]

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Union[Dict[str, Any], Callable]:
        # attention and heads match no body group, so timm puts them in the last group
        return _prefixed_matcher(self.body.group_matcher(coarse=coarse), 'body.')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.body.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        skip = {f'body.{n}' for n in getattr(self.body, 'no_weight_decay', lambda: set())()}
        if self.attn is not None and self.attn.alpha is not None:
            skip.add('attn.alpha')
        return skip

    @torch.jit.ignore
    def set_distilled_training(self, enable: bool = True) -> None:
        """In train mode, make ``forward`` return ``(z_ssa, z_fe)`` for ``SelfADLoss``."""
        self.distilled_training = enable

    @torch.jit.ignore
    def get_classifier(self) -> Union[nn.Module, Tuple[nn.Module, ...]]:
        if self.head_ssa is None:
            return self.head_fe.fc
        return self.head_ssa.fc, self.head_fe.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the final Linear of each head (new layers follow the model's device, dtype, mode).

        The heads' hidden layers are kept, so a frozen model stays frozen after
        ``reset_classifier(0)`` or ``reset_classifier(0, '')``.
        """
        if not self._heads():
            raise RuntimeError('the heads were removed by prune_intermediate_layers(); build a new model instead')
        self.num_classes = num_classes
        for head in self._heads():
            head.reset(num_classes, global_pool)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """Body map F -> F, or [F, H] on the channel axis when the model has an SSA module.

        ``forward_features(x) == attend(body.forward_features(x))``: heads can be trained on cached
        body maps with ``forward_head(attend(F))``.
        """
        if self.attn is None:
            return x
        return torch.cat([x, self.attn(x)], dim=1)

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
        out = self.body.forward_intermediates(
            x, indices=indices, norm=norm, stop_early=stop_early, output_fmt=output_fmt,
            intermediates_only=intermediates_only)
        if intermediates_only:
            return out
        x, intermediates = out
        _, max_index = feature_take_indices(len(self.feature_info), indices)
        if stop_early and max_index < len(self.feature_info) - 1:
            return x, intermediates
        return self.attend(x), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Prune the body after the last wanted tap; with ``prune_head`` (or when the body's end is
        pruned) the SSA module and heads go too, and ``forward_features`` returns the body map.
        """
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        self.body.prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=True)
        prune_end = max_index < len(self.feature_info) - 1
        if prune_head or prune_end:
            self.attn = None
            self.head_ssa = None
            self.head_fe = None
            self.num_classes = 0
            self.num_features = self.feature_info[max_index]['num_chs'] if prune_end else self.body_channels
            self.head_hidden_size = self.num_features
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.attend(self.body.forward_features(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.head_fe is None:  # pruned
            return x
        if self.head_ssa is None:  # no_attention
            return self.head_fe(x, pre_logits=pre_logits)
        fe_map, ssa_map = x[:, :self.body_channels], x[:, self.body_channels:]
        if pre_logits or self.num_classes == 0:
            return torch.cat([self.head_fe(fe_map, pre_logits=True), self.head_ssa(ssa_map, pre_logits=True)], dim=1)
        z_ssa, z_fe = self.head_ssa(ssa_map), self.head_fe(fe_map)
        if self.distilled_training and self.training and not torch.jit.is_scripting():
            # separate logits for the Self-AD loss only when training in distilled mode
            return z_ssa, z_fe
        return (z_ssa + z_fe) / 2

    @torch.jit.ignore
    def head_logits(self, features: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Logits of each head from ``forward_features`` output, in any mode:
        ``{'ssa': z_ssa, 'fe': z_fe}`` (``no_attention``: ``'fe'`` only)."""
        if self.num_classes == 0 or self.head_fe is None:
            raise RuntimeError('the model has no classifier (num_classes=0 or pruned heads)')
        if self.head_ssa is None:
            return {'fe': self.head_fe(features)}
        return {
            'ssa': self.head_ssa(features[:, self.body_channels:]),
            'fe': self.head_fe(features[:, :self.body_channels]),
        }

    @torch.jit.ignore
    def forward_heads(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``head_logits`` of an image batch."""
        return self.head_logits(self.forward_features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


def _filter_body_weights(state_dict: Dict[str, torch.Tensor], model: SSANet) -> Dict[str, torch.Tensor]:
    """Load a body's ImageNet checkpoint into an SSANet, or pass an SSANet checkpoint through.

    The body's classifier / pre-logits weights are dropped and the freshly initialised SSA module
    and heads are kept, so the load stays strict for the body: a missing body key is an error.
    """
    if any(k.startswith('body.') for k in state_dict):
        return state_dict
    checkpoint_filter = _BODY_CHECKPOINT_FILTERS.get(type(model.body).__module__)
    if checkpoint_filter is not None:
        state_dict = checkpoint_filter(state_dict)
    body_keys = model.body.state_dict().keys()
    missing = [k for k in body_keys if k not in state_dict]
    if missing:
        raise RuntimeError(
            f'the pretrained weights do not fit the {type(model.body).__name__} body: '
            f'{len(missing)} keys missing, e.g. {missing[:5]}')
    out = {f'body.{k}': state_dict[k] for k in body_keys}
    out.update({k: v for k, v in model.state_dict().items() if not k.startswith('body.')})
    return out


def _create_ssanet(variant: str, pretrained: bool = False, **kwargs: Any) -> SSANet:
    body, aggregation = _MODEL_DEFS[variant]
    return _build(variant, pretrained, body=body, aggregation=aggregation, **kwargs)


def _build(variant: str, pretrained: bool, **kwargs: Any) -> SSANet:
    return build_model_with_cfg(
        SSANet,
        variant,
        pretrained,
        pretrained_filter_fn=_filter_body_weights,
        feature_cfg=dict(feature_cls='getter'),
        **kwargs,
    )


def _cfg(body_tag: str, pool_size: Tuple[int, int], aggregation: str, **kwargs: Any) -> Dict[str, Any]:
    """Config of an SSANet whose body starts from timm's ImageNet weights ``body_tag``."""
    body_cfg = get_pretrained_cfg(body_tag)
    if body_cfg is None or not body_cfg.hf_hub_id:
        raise ValueError(f'timm has no Hub weights for {body_tag!r}')
    first_conv = body_cfg.first_conv
    if isinstance(first_conv, (tuple, list)):
        first_conv = tuple(f'body.{c}' for c in first_conv)
    else:
        first_conv = f'body.{first_conv}'
    classifier = 'head_fe.fc' if aggregation == 'no_attention' else ('head_ssa.fc', 'head_fe.fc')
    return {
        'hf_hub_id': body_cfg.hf_hub_id,
        'num_classes': 1000,
        'input_size': (3, 448, 448),
        'pool_size': pool_size,
        'crop_pct': 1.0,
        'crop_mode': 'center',
        'interpolation': 'bilinear',
        'mean': body_cfg.mean,
        'std': body_cfg.std,
        'first_conv': first_conv,
        'classifier': classifier,
        'license': body_cfg.license,
        'paper_ids': _PAPER_ID,
        'paper_name': _PAPER,
        'notes': (f'Body weights from {body_cfg.hf_hub_id}; the SSA module and heads are freshly initialised.',),
        **kwargs,
    }


def parse_ssanet_name(name: str) -> Tuple[str, str]:
    """Split ``'ssanet_<body>_<aggregation>'`` into the timm body name and the aggregation."""
    if name.startswith('ssanet_'):
        for aggregation in sorted(VARIANTS, key=len, reverse=True):  # 'no_alpha' before 'alpha'
            suffix = f'_{aggregation}'
            if name.endswith(suffix) and len(name) > len('ssanet_') + len(suffix):
                return name[len('ssanet_'):-len(suffix)], aggregation
    raise ValueError(f"expected a name 'ssanet_<timm body>_<aggregation>' with aggregation in {VARIANTS}, got {name!r}")


def create_ssanet(
        body: str,
        aggregation: str = 'plus',
        pretrained: bool = False,
        img_size: int = 448,
        **kwargs: Any,
) -> SSANet:
    """Build an SSANet over any timm CNN body, e.g. ``create_ssanet('convnext_tiny', 'plus')``.

    Registered bodies go through ``timm.create_model('ssanet_<body>_<aggregation>')``. Other
    bodies are built by the generic ``ssanet`` entrypoint (so ``hf-hub:`` / ``local-dir:`` exports
    load back through timm), and ``pretrained=True`` loads the body's default ImageNet weights.

    Args:
        body: timm model name (optionally with a pretrained tag, e.g. 'resnet18.a1_in1k').
        aggregation: One of ``VARIANTS``.
        pretrained: Load ImageNet weights into the body.
        img_size: Default input size recorded in the config.
        **kwargs: ``SSANet`` arguments (num_classes, in_chans, global_pool, head_width, ...).
    """
    name = f'ssanet_{body}_{aggregation}'
    if name in _MODEL_DEFS:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    if aggregation not in VARIANTS:
        raise ValueError(f'aggregation must be one of {VARIANTS}, got {aggregation!r}')
    arch = body.partition('.')[0]
    if not timm.is_model(arch):
        raise ValueError(f'unknown timm body {arch!r}')
    reduction = timm.create_model(arch, pretrained=False, device='meta').feature_info[-1]['reduction']
    pool = math.ceil(img_size / reduction)
    try:
        cfg = _cfg(body, (pool, pool), aggregation, input_size=(3, img_size, img_size), architecture='ssanet')
    except ValueError:
        if pretrained:
            raise
        cfg = dict(timm.models.get_pretrained_cfg('ssanet').to_dict(), input_size=(3, img_size, img_size),
                   pool_size=(pool, pool), architecture='ssanet')
    return timm.create_model(
        'ssanet', pretrained=pretrained, pretrained_cfg=cfg, body=arch, aggregation=aggregation, **kwargs)


def create_ssanet_by_name(name: str, pretrained: bool = False, **kwargs: Any) -> SSANet:
    """``create_ssanet`` from a name ``'ssanet_<timm body>_<aggregation>'``, registered or not."""
    body, aggregation = parse_ssanet_name(name)
    return create_ssanet(body, aggregation, pretrained=pretrained, **kwargs)


default_cfgs = generate_default_cfgs({
    **{
        f'{name}.{_BODIES[b][0]}': _cfg(
            f'{b}.{_BODIES[b][0]}', _BODIES[b][1], a,
            **({'min_input_size': (3, 224, 224)} if b == 'inception_v3' else {}))
        for name, (b, a) in _MODEL_DEFS.items()
    },
    # generic entrypoint: body and aggregation come from its arguments, weights from create_ssanet
    # or from an exported config (hf-hub: / local-dir:), so it has no default weights of its own
    'ssanet': {
        'input_size': (3, 448, 448), 'num_classes': 1000, 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'paper_ids': _PAPER_ID, 'paper_name': _PAPER,
    },
})


@register_model
def ssanet(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet over the timm body named by ``body=`` (default 'vgg16') with ``aggregation=`` (default 'plus')."""
    return _build('ssanet', pretrained, **kwargs)


@register_model
def ssanet_vgg16_plus(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet-plus (H = alpha*O + F) on VGG-16: the paper's best model."""
    return _create_ssanet('ssanet_vgg16_plus', pretrained, **kwargs)


@register_model
def ssanet_vgg16_multiply(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet-multiply (H = alpha*O * F) on VGG-16."""
    return _create_ssanet('ssanet_vgg16_multiply', pretrained, **kwargs)


@register_model
def ssanet_vgg16_alpha(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet-alpha (H = alpha*O) on VGG-16."""
    return _create_ssanet('ssanet_vgg16_alpha', pretrained, **kwargs)


@register_model
def ssanet_vgg16_no_alpha(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet-no-alpha (H = O) on VGG-16."""
    return _create_ssanet('ssanet_vgg16_no_alpha', pretrained, **kwargs)


@register_model
def ssanet_vgg16_no_attention(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet without attention (body + FE head) on VGG-16."""
    return _create_ssanet('ssanet_vgg16_no_attention', pretrained, **kwargs)


@register_model
def ssanet_resnet50_plus(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet-plus (H = alpha*O + F) on ResNet-50."""
    return _create_ssanet('ssanet_resnet50_plus', pretrained, **kwargs)


@register_model
def ssanet_resnet50_multiply(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet-multiply (H = alpha*O * F) on ResNet-50."""
    return _create_ssanet('ssanet_resnet50_multiply', pretrained, **kwargs)


@register_model
def ssanet_resnet50_alpha(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet-alpha (H = alpha*O) on ResNet-50."""
    return _create_ssanet('ssanet_resnet50_alpha', pretrained, **kwargs)


@register_model
def ssanet_resnet50_no_alpha(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet-no-alpha (H = O) on ResNet-50."""
    return _create_ssanet('ssanet_resnet50_no_alpha', pretrained, **kwargs)


@register_model
def ssanet_resnet50_no_attention(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet without attention (body + FE head) on ResNet-50."""
    return _create_ssanet('ssanet_resnet50_no_attention', pretrained, **kwargs)


@register_model
def ssanet_inception_v3_plus(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet-plus (H = alpha*O + F) on Inception-v3."""
    return _create_ssanet('ssanet_inception_v3_plus', pretrained, **kwargs)


@register_model
def ssanet_inception_v3_multiply(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet-multiply (H = alpha*O * F) on Inception-v3."""
    return _create_ssanet('ssanet_inception_v3_multiply', pretrained, **kwargs)


@register_model
def ssanet_inception_v3_alpha(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet-alpha (H = alpha*O) on Inception-v3."""
    return _create_ssanet('ssanet_inception_v3_alpha', pretrained, **kwargs)


@register_model
def ssanet_inception_v3_no_alpha(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet-no-alpha (H = O) on Inception-v3."""
    return _create_ssanet('ssanet_inception_v3_no_alpha', pretrained, **kwargs)


@register_model
def ssanet_inception_v3_no_attention(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet without attention (body + FE head) on Inception-v3."""
    return _create_ssanet('ssanet_inception_v3_no_attention', pretrained, **kwargs)


@register_model
def ssanet_densenet121_plus(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet-plus (H = alpha*O + F) on DenseNet-121."""
    return _create_ssanet('ssanet_densenet121_plus', pretrained, **kwargs)


@register_model
def ssanet_densenet121_multiply(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet-multiply (H = alpha*O * F) on DenseNet-121."""
    return _create_ssanet('ssanet_densenet121_multiply', pretrained, **kwargs)


@register_model
def ssanet_densenet121_alpha(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet-alpha (H = alpha*O) on DenseNet-121."""
    return _create_ssanet('ssanet_densenet121_alpha', pretrained, **kwargs)


@register_model
def ssanet_densenet121_no_alpha(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet-no-alpha (H = O) on DenseNet-121."""
    return _create_ssanet('ssanet_densenet121_no_alpha', pretrained, **kwargs)


@register_model
def ssanet_densenet121_no_attention(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet without attention (body + FE head) on DenseNet-121."""
    return _create_ssanet('ssanet_densenet121_no_attention', pretrained, **kwargs)


@register_model
def ssanet_densenet161_plus(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet-plus (H = alpha*O + F) on DenseNet-161."""
    return _create_ssanet('ssanet_densenet161_plus', pretrained, **kwargs)


@register_model
def ssanet_densenet161_multiply(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet-multiply (H = alpha*O * F) on DenseNet-161."""
    return _create_ssanet('ssanet_densenet161_multiply', pretrained, **kwargs)


@register_model
def ssanet_densenet161_alpha(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet-alpha (H = alpha*O) on DenseNet-161."""
    return _create_ssanet('ssanet_densenet161_alpha', pretrained, **kwargs)


@register_model
def ssanet_densenet161_no_alpha(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet-no-alpha (H = O) on DenseNet-161."""
    return _create_ssanet('ssanet_densenet161_no_alpha', pretrained, **kwargs)


@register_model
def ssanet_densenet161_no_attention(pretrained: bool = False, **kwargs: Any) -> SSANet:
    """SSANet without attention (body + FE head) on DenseNet-161."""
    return _create_ssanet('ssanet_densenet161_no_attention', pretrained, **kwargs)
