"""Loading and exporting SSANet models for the recipes: model specs, timm's ``save_for_hf`` layout.

A model spec is a registered name (``ssanet_vgg16_plus``), any ``ssanet_<timm body>_<aggregation>``,
an export folder (``config.json`` + ``model.safetensors``), ``local-dir:PATH`` or ``hf-hub:ORG/NAME``.
"""
import json
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from safetensors import SafetensorError

import timm
from timm.models import save_for_hf

from .errors import UserError, one_line
from .models import SSANet, create_ssanet_by_name

__all__ = ['export_model', 'label_names', 'load_model']


def load_model(spec: str, pretrained: bool = False, **kwargs: Any) -> SSANet:
    """Build or load an SSANet from a spec (see module doc); saved weights are always loaded.

    A damaged export (truncated weights, a config that is not JSON or describes another
    architecture), a name that is no model and, offline, weights missing from the Hugging Face
    cache raise ``UserError`` naming the file or repo.

    Args:
        spec: Model name, export folder, ``local-dir:`` or ``hf-hub:`` reference.
        pretrained: For model names only: load the body's ImageNet weights.
        **kwargs: Model arguments (e.g. num_classes) for model names.
    """
    try:
        model = _create(spec, pretrained, **kwargs)
    except LocalEntryNotFoundError as e:
        raise UserError(_not_downloadable(spec, e)) from e
    except HfHubHTTPError as e:  # no such repo or file, no access
        raise UserError(f'cannot load {spec}: {one_line(e)}') from e
    except RuntimeError as e:
        if 'Invalid pretrained tag' not in str(e):
            raise
        raise UserError(f'cannot build {spec}: {one_line(e)}') from e
    if not isinstance(model, SSANet):
        raise UserError(f'{spec} is a {type(model).__name__}, not an SSANet')
    return model


def _create(spec: str, pretrained: bool, **kwargs: Any) -> SSANet:
    if spec.startswith('local-dir:') or (not spec.startswith('hf-hub:') and Path(spec).is_dir()):
        folder = Path(spec[len('local-dir:'):] if spec.startswith('local-dir:') else spec)
        weights = _check_export(folder)
        return _load_weights(f'local-dir:{folder}', str(weights), **kwargs)
    if spec.startswith('hf-hub:'):
        return _load_weights(spec, f'the weights of {spec}', **kwargs)
    if timm.is_model(spec):
        return timm.create_model(spec, pretrained=pretrained, **kwargs)
    try:
        return create_ssanet_by_name(spec, pretrained=pretrained, **kwargs)
    except ValueError as e:
        raise UserError(f'{spec!r} is neither an export folder nor a model name: {e}') from e


def _check_export(folder: Path) -> Path:
    """The weights file of an export folder, after checking its ``config.json`` names an SSANet."""
    config_path = folder / 'config.json'
    if not config_path.is_file():
        raise UserError(f'{folder} is not an exported model: it has no config.json')
    try:
        config = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f'{config_path} is not valid JSON ({e}); re-export the model') from e
    architecture = config.get('architecture') if isinstance(config, dict) else None
    if not isinstance(architecture, str) or not architecture.startswith('ssanet'):
        raise UserError(f'{config_path} describes a {architecture!r} model, not an SSANet')
    for name in ('model.safetensors', 'pytorch_model.bin'):
        if (folder / name).is_file():
            return folder / name
    raise UserError(f'{folder} has a config.json but no model.safetensors')


def _load_weights(spec: str, weights: str, **kwargs: Any) -> SSANet:
    try:
        return timm.create_model(spec, pretrained=True, **kwargs)
    except SafetensorError as e:
        raise UserError(f'{weights} is damaged or truncated ({e}); re-export or re-download it') from e
    except RuntimeError as e:
        if 'state_dict' not in str(e):
            raise
        raise UserError(f'{weights} does not fit the model its config describes: {str(e).splitlines()[1:2]}') from e


def _not_downloadable(spec: str, error: Exception) -> str:
    """What is missing when the Hub cannot be reached and the cache lacks a file."""
    found = re.search(r'https?://[^/\s]+/(.+?)/resolve/[^/\s]+/([^\s:]+)', str(error.__cause__ or error))
    what = f'{found.group(2)} of {found.group(1)}' if found else f'the weights of {spec}'
    reason = ('HF_HUB_OFFLINE is set' if os.environ.get('HF_HUB_OFFLINE', '').lower() in ('1', 'true', 'yes', 'on')
              else 'the Hub could not be reached')
    return f'cannot load {spec}: {what} is not in the Hugging Face cache and {reason}'


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
    # safetensors stores contiguous tensors only: a channels-last model is saved in the standard layout
    channels_last = any(p.dim() == 4 and not p.is_contiguous() for p in model.parameters())
    if channels_last:
        model.to(memory_format=torch.contiguous_format)
    try:
        save_for_hf(model, out_dir, model_config=config, safe_serialization=True,
                    data_config={'input_size': (model.in_chans, img_size, img_size), 'crop_pct': 1.0,
                                 'crop_mode': 'squash'})
    finally:
        if channels_last:
            model.to(memory_format=torch.channels_last)
    return Path(out_dir)
