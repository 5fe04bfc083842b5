"""Loading and exporting SSANet models for the recipes: model specs, timm's ``save_for_hf`` layout.

A model spec is a registered name (``ssanet_vgg16_plus``), any ``ssanet_<timm body>_<aggregation>``,
an export folder (``config.json`` + ``model.safetensors``), ``local-dir:PATH`` or ``hf-hub:ORG/NAME``.
"""
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import timm
from timm.models import save_for_hf

from .models import SSANet, create_ssanet_by_name

__all__ = ['export_model', 'label_names', 'load_model']


def load_model(spec: str, pretrained: bool = False, **kwargs: Any) -> SSANet:
    """Build or load an SSANet from a spec (see module doc); saved weights are always loaded.

    Args:
        spec: Model name, export folder, ``local-dir:`` or ``hf-hub:`` reference.
        pretrained: For model names only: load the body's ImageNet weights.
        **kwargs: Model arguments (e.g. num_classes) for model names.
    """
    if spec.startswith(('hf-hub:', 'local-dir:')):
        model = timm.create_model(spec, pretrained=True, **kwargs)
    elif Path(spec).is_dir():
        if not (Path(spec) / 'config.json').is_file():
            raise FileNotFoundError(f'{spec} is not an exported model: it has no config.json')
        model = timm.create_model(f'local-dir:{spec}', pretrained=True, **kwargs)
    elif timm.is_model(spec):
        model = timm.create_model(spec, pretrained=pretrained, **kwargs)
    else:
        model = create_ssanet_by_name(spec, pretrained=pretrained, **kwargs)
    if not isinstance(model, SSANet):
        raise ValueError(f'{spec} is a {type(model).__name__}, not an SSANet')
    return model


def label_names(model: SSANet) -> Optional[List[str]]:
    """Class names stored with an exported model, if any."""
    names = model.pretrained_cfg.get('label_names')
    return list(names) if names else None


def export_model(
        model: SSANet,
        out_dir: str,
        labels: Sequence[str],
        img_size: int,
        extra_config: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write ``config.json`` (architecture, model args, label names, the input size the weights
    were trained at) + ``model.safetensors`` in timm's ``save_for_hf`` layout, loadable by
    ``timm.create_model('local-dir:...')``."""
    if len(labels) != model.num_classes:
        raise ValueError(f'{len(labels)} label names for a model with {model.num_classes} classes')
    config = {'label_names': list(labels), **(extra_config or {})}
    save_for_hf(model, out_dir, model_config=config, safe_serialization=True,
                data_config={'input_size': (model.in_chans, img_size, img_size), 'crop_pct': 1.0})
    return Path(out_dir)
