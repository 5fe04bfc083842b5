"""Loading and exporting SSANet models for the recipes: model specs, timm's ``save_for_hf`` layout.

A model spec is a registered name (``ssanet_vgg16_plus``), any ``ssanet_<timm body>_<aggregation>``,
an export folder (``config.json`` + ``model.safetensors``), ``local-dir:PATH`` or ``hf-hub:ORG/NAME``.

Model folders and Hub repos are untrusted input. Before anything is built their ``config.json`` is
checked (``validate_config``): an SSANet ``architecture`` timm knows, ``model_args`` keys the builder
accepts, ``num_classes >= 1``, as many ``label_names`` as classes, and every image size (``model_args
.img_size``, ``pretrained_cfg.input_size`` ...) within ``img_size_limit()`` (``MAX_IMG_SIZE`` = 1024 px
unless the environment variable ``SSA_TIMM_MAX_IMG_SIZE`` sets another). Only safetensors weights are
loaded (never a pickle), and their classifier must have ``num_classes`` rows.

Exports load in transformers too (``AutoModelForImageClassification``, ``pipeline('image-classification')``
through its ``TimmWrapper``, after ``import ssa_timm``): their ``model_args`` carry no ``num_classes``,
which ``TimmWrapper`` passes itself. ``fix_config`` rewrites an older export's ``config.json`` that way.
"""
import inspect
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from huggingface_hub import hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError
from safetensors import SafetensorError, safe_open
from timm.models import save_for_hf

from .errors import UserError, WeightsMismatch, one_line
from .models import SSANet, create_ssanet_by_name, parse_ssanet_name

__all__ = ['MAX_IMG_SIZE', 'attention_args', 'check_img_size', 'check_model_folder', 'export_model', 'fix_config',
           'fixed_config', 'img_size_limit', 'label_names', 'load_model', 'model_folder', 'validate_config']

MAX_IMG_SIZE = 1024
_LIMIT_ENV = 'SSA_TIMM_MAX_IMG_SIZE'
_SIZE_FIELDS = ('input_size', 'test_input_size', 'min_input_size')


def img_size_limit() -> int:
    """The largest image side a config or an ``--img-size`` may ask for: ``MAX_IMG_SIZE``, or the
    environment variable ``SSA_TIMM_MAX_IMG_SIZE`` when it is set (a positive integer)."""
    text = os.environ.get(_LIMIT_ENV, '').strip()
    if not text:
        return MAX_IMG_SIZE
    if not text.isdigit() or int(text) < 1:
        raise UserError(f'{_LIMIT_ENV}={text!r} is not a positive integer')
    return int(text)


def check_img_size(size: int | Sequence[int], what: str) -> int | Sequence[int]:
    """``size`` (one side, or ``(h, w)``) after checking it is positive and within ``img_size_limit()``.

    Args:
        size: An image side or a sequence of sides.
        what: What ``size`` is, for the message (a flag or a config field).

    Raises:
        UserError: Not a positive integer, or over the limit; the message names ``what`` and the limit.
    """
    sides = list(size) if isinstance(size, (list, tuple)) else [size]
    if not sides or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sides):
        raise UserError(f'{what} must be positive integer image sides, got {size!r}')
    limit = img_size_limit()
    if max(sides) > limit:
        raise UserError(f'{what} {size!r} is over the image-size limit of {limit} px (ssa_timm.hub.MAX_IMG_SIZE; '
                        f'set {_LIMIT_ENV} to allow larger images)')
    return size


def _accepted_model_args(architecture: str) -> set:
    """The ``model_args`` keys the builder of ``architecture`` accepts: ``SSANet``'s arguments (the
    registered names fix the aggregation themselves)."""
    accepted = set(inspect.signature(SSANet.__init__).parameters) - {'self', 'device', 'dtype'}
    return accepted if architecture == 'ssanet' else accepted - {'aggregation'}


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_model_args(model_args: Any, architecture: str, num_classes: int, where: str) -> None:
    if not isinstance(model_args, dict):
        raise UserError(f'{where}: model_args must be an object of model arguments, got {model_args!r}')
    unknown = sorted(set(model_args) - _accepted_model_args(architecture))
    if unknown:
        raise UserError(f'{where}: model_args has unknown key(s) {unknown}; {architecture} accepts '
                        f'{sorted(_accepted_model_args(architecture))}')
    if 'num_classes' in model_args and model_args['num_classes'] != num_classes:
        raise UserError(f'{where}: model_args.num_classes {model_args["num_classes"]!r} differs from num_classes '
                        f'{num_classes}')
    if 'in_chans' in model_args and not _is_count(model_args['in_chans']):
        raise UserError(f'{where}: model_args.in_chans must be an integer >= 1, got {model_args["in_chans"]!r}')
    if model_args.get('img_size') is not None:
        check_img_size(model_args['img_size'], f'{where}: model_args.img_size')


def _check_pretrained_cfg(pretrained_cfg: Any, where: str) -> None:
    if not isinstance(pretrained_cfg, dict):
        raise UserError(f'{where}: pretrained_cfg must be an object, got {pretrained_cfg!r}')
    for field in _SIZE_FIELDS:
        size = pretrained_cfg.get(field)
        if size is None:
            continue
        if not isinstance(size, (list, tuple)) or len(size) != 3 or not all(_is_count(s) for s in size):
            raise UserError(f'{where}: pretrained_cfg.{field} must be [channels, height, width], got {size!r}')
        check_img_size(list(size[1:]), f'{where}: pretrained_cfg.{field}')


def validate_config(config: Any, where: str) -> dict[str, Any]:
    """An export's ``config.json`` content, after checking it describes an SSANet that can be built
    safely (see the module doc), before anything is built.

    Args:
        config: The parsed ``config.json``.
        where: The file it came from, for messages.

    Raises:
        UserError: The first problem found, naming ``where`` and the field.
    """
    if not isinstance(config, dict):
        raise UserError(f'{where} must hold a JSON object, got {type(config).__name__}')
    architecture = config.get('architecture')
    if not isinstance(architecture, str) or not architecture.startswith('ssanet'):
        raise UserError(f'{where} describes a {architecture!r} model, not an SSANet')
    if not timm.is_model(architecture):
        raise UserError(f'{where}: architecture {architecture!r} is not a registered SSANet model '
                        f'(expected ssanet or one of timm.list_models("ssanet_*"))')
    num_classes = config.get('num_classes')
    if not _is_count(num_classes):
        raise UserError(f'{where}: num_classes must be an integer >= 1, got {num_classes!r}')
    _check_model_args(config.get('model_args', {}), architecture, num_classes, where)
    _check_pretrained_cfg(config.get('pretrained_cfg', {}), where)
    names = config.get('label_names', config.get('pretrained_cfg', {}).get('label_names'))
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise UserError(f'{where}: label_names must be a list of class names')
        if len(names) != num_classes:
            raise UserError(f'{where}: {len(names)} label_names for {num_classes} classes (num_classes); '
                            'the counts must match')
    return config


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f'{path} is not valid JSON ({e}); re-export the model') from e
    return validate_config(config, str(path))


def _check_classifier(config: dict[str, Any], weights: Path) -> None:
    """The weights' classifier has ``num_classes`` rows (read from the safetensors header only)."""
    classifier = config.get('pretrained_cfg', {}).get('classifier') or ()
    names = [classifier] if isinstance(classifier, str) else list(classifier)
    try:
        with safe_open(str(weights), framework='pt') as f:
            keys = set(f.keys())
            shapes = {n: f.get_slice(f'{n}.weight').get_shape() for n in names if f'{n}.weight' in keys}
    except SafetensorError as e:
        raise UserError(f'{weights} is damaged or truncated ({e}); re-export or re-download it') from e
    for name, shape in shapes.items():
        if shape[0] != config['num_classes']:
            raise UserError(f'{weights.parent / "config.json"}: num_classes {config["num_classes"]} does not match '
                            f'{weights.name}, whose {name} has {shape[0]} classes')


def check_model_folder(folder: Path) -> Path:
    """The ``model.safetensors`` of an export folder, after validating its ``config.json``
    (``validate_config``) and the classifier size in the weights' header.

    Raises:
        UserError: No config, an invalid config, no safetensors weights (a pickled
            ``pytorch_model.bin`` is never loaded), or a classifier of another size.
    """
    config_path, weights = folder / 'config.json', folder / 'model.safetensors'
    if not config_path.is_file():
        raise UserError(f'{folder} is not an exported model: it has no config.json')
    config = _read_config(config_path)
    if not weights.is_file():
        pickles = sorted(p.name for p in folder.glob('*') if p.suffix in ('.bin', '.pth', '.pt', '.ckpt'))
        found = f'it has {", ".join(pickles)} (pickled weights), ' if pickles else ''
        raise UserError(f'{folder} has a config.json but no model.safetensors: {found}only safetensors weights '
                        'are loaded; convert them with safetensors.torch.save_file')
    _check_classifier(config, weights)
    return weights


def _check_hub_repo(spec: str) -> None:
    """Validate ``config.json`` of an ``hf-hub:`` repo and check it has safetensors weights, before timm builds it."""
    repo_id, _, revision = spec[len('hf-hub:'):].partition('@')
    config = Path(hf_hub_download(repo_id, 'config.json', revision=revision or None))
    validated = _read_config(config)
    only_pickle = UserError(f'{spec} has no model.safetensors: only safetensors weights are loaded, never '
                            'pickled ones (pytorch_model.bin)')
    try:
        weights = Path(hf_hub_download(repo_id, 'model.safetensors', revision=revision or None))
    except LocalEntryNotFoundError:
        if isinstance(try_to_load_from_cache(repo_id, 'pytorch_model.bin', revision=revision or None), str):
            raise only_pickle from None  # offline, with the pickle of such a repo in the cache
        raise
    except EntryNotFoundError as e:
        raise only_pickle from e
    _check_classifier(validated, weights)


def model_folder(spec: str) -> Path | None:
    """The local folder a model spec reads (an export folder or ``local-dir:PATH``), else None."""
    if spec.startswith('local-dir:'):
        return Path(spec[len('local-dir:'):])
    if not spec.startswith('hf-hub:') and Path(spec).is_dir():
        return Path(spec)
    return None


def load_model(spec: str, pretrained: bool = False, **kwargs: Any) -> SSANet:
    """Build or load an SSANet from a spec (see module doc); saved weights are always loaded.

    A damaged or unsafe export (see ``check_model_folder``), a name that is no model and, offline,
    weights missing from the Hugging Face cache raise ``UserError`` naming the file or repo.

    Args:
        spec: Model name, export folder, ``local-dir:`` or ``hf-hub:`` reference.
        pretrained: For model names only: load the body's ImageNet weights.
        **kwargs: Model arguments (e.g. num_classes) for model names.
    """
    _check_tag(spec)
    try:
        model = _create(spec, pretrained, **kwargs)
    except LocalEntryNotFoundError as e:
        raise UserError(_not_downloadable(spec, e)) from e
    except HfHubHTTPError as e:  # no such repo or file, no access
        raise UserError(f'cannot load {spec}: {one_line(e)}') from e
    if not isinstance(model, SSANet):
        raise UserError(f'{spec} is a {type(model).__name__}, not an SSANet')
    return model


def _check_tag(spec: str) -> None:
    """A registered name's pretrained tag (``name.tag``) must be one timm lists for it."""
    name, _, tag = spec.partition('.')
    if not tag or model_folder(spec) is not None or spec.startswith('hf-hub:') or not timm.is_model(name):
        return
    tags = [n.partition('.')[2] for n in timm.list_pretrained(f'{name}.*')]
    if tag not in tags:
        raise UserError(f'cannot build {spec}: {name} has no pretrained tag {tag!r} (its tags: {tags})')


def _create(spec: str, pretrained: bool, **kwargs: Any) -> SSANet:
    folder = model_folder(spec)
    if folder is not None:
        weights = check_model_folder(folder)
        return _load_weights(f'local-dir:{folder}', str(weights), **kwargs)
    if spec.startswith('hf-hub:'):
        _check_hub_repo(spec)
        return _load_weights(spec, f'the weights of {spec}', **kwargs)
    base = spec.partition('.')[0]
    if base != 'ssanet':
        try:
            parse_ssanet_name(base)  # a name's own errors, not the model's (those keep their type and words)
        except ValueError as e:
            raise UserError(f'{spec!r} is neither an export folder nor a model name: {e}') from e
    return create_ssanet_by_name(spec, pretrained=pretrained, **kwargs)


def _load_weights(spec: str, weights: str, **kwargs: Any) -> SSANet:
    try:
        return timm.create_model(spec, pretrained=True, **kwargs)
    except SafetensorError as e:
        raise UserError(f'{weights} is damaged or truncated ({e}); re-export or re-download it') from e
    except (TypeError, ValueError) as e:  # model_args of the right names with values the model refuses
        raise UserError(f'the config.json of {spec} describes a model that cannot be built: {one_line(e)}') from e
    except WeightsMismatch as e:  # checked by the checkpoint filter before timm's strict load
        raise WeightsMismatch(f'{weights} does not fit the model its config describes: {e}') from e


def _not_downloadable(spec: str, error: Exception) -> str:
    """What is missing when the Hub cannot be reached and the cache lacks a file."""
    found = re.search(r'https?://[^/\s]+/(.+?)/resolve/[^/\s]+/([^\s:]+)', str(error.__cause__ or error))
    what = f'{found.group(2)} of {found.group(1)}' if found else f'the weights of {spec}'
    reason = ('HF_HUB_OFFLINE is set' if os.environ.get('HF_HUB_OFFLINE', '').lower() in ('1', 'true', 'yes', 'on')
              else 'the Hub could not be reached')
    return f'cannot load {spec}: {what} is not in the Hugging Face cache and {reason}'


def label_names(model: SSANet) -> list[str] | None:
    """Class names stored with an exported model, if any."""
    names = model.pretrained_cfg.get('label_names')
    return list(names) if names else None


def fixed_config(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of an export's ``config.json`` content that transformers' ``TimmWrapper`` can load.

    timm 1.0.31's ``save_for_hf`` records ``num_classes`` and ``in_chans`` in ``model_args``;
    ``TimmWrapper`` passes ``num_classes`` itself (so loading fails with "got multiple values for
    keyword argument 'num_classes'"). Both loaders take the class count from the top-level
    ``num_classes`` and timm the channels from ``pretrained_cfg.input_size``, so ``num_classes`` is
    dropped, and ``in_chans`` when it is 3 (``TimmWrapper`` builds the model from ``model_args``
    alone, so a model of other channels keeps it). A model with attention whose ``model_args`` record no
    ``qk_norm`` (exported before 0.7) gets ``qk_norm: false``, the attention it was trained with.
    """
    config = json.loads(json.dumps(config))
    model_args = config.get('model_args')
    if isinstance(model_args, dict):
        model_args.pop('num_classes', None)
        if model_args.get('in_chans') == 3:
            model_args.pop('in_chans')
        no_attention = (model_args.get('aggregation') == 'no_attention'
                        or str(config.get('architecture', '')).endswith('_no_attention'))
        if not no_attention and 'qk_norm' not in model_args:
            # written before exports recorded their attention: the paper's, which every name computed then
            # (TimmWrapper builds from model_args alone, where a modern name would now default to qk_norm)
            model_args['qk_norm'] = False
    return config


def fix_config(folder: str | Path) -> bool:
    """Rewrite an export's ``config.json`` so transformers loads it (see ``fixed_config``); timm loads
    it before and after. The file is replaced atomically; an already fixed one is left alone.

    Args:
        folder: The export folder (``config.json`` + ``model.safetensors``).

    Returns:
        Whether ``config.json`` was changed.

    Raises:
        UserError: The folder is not a valid export, or ``config.json`` cannot be written.
    """
    path = Path(folder) / 'config.json'
    if not path.is_file():
        raise UserError(f'{folder} is not an exported model: it has no config.json')
    config = _read_config(path)
    fixed = fixed_config(config)
    if fixed == config:
        return False
    tmp = path.with_name(f'.{path.name}.tmp-{os.getpid()}')
    try:
        tmp.write_text(json.dumps(fixed, indent=2) + '\n')
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f'cannot write {path}: {e.strerror or e}') from e
    return True


def attention_args(model: SSANet) -> dict[str, bool]:
    """The attention options of ``model`` as model arguments (``qk_norm``, ``scale_attn``; none for a
    model without attention): an export records them whatever the name's default, so it loads with the
    attention it was trained with even if a later release changes a default. Exports written before these
    were recorded (no ``qk_norm`` in ``model_args``) load with the paper's attention, which every name
    computed then, though the modern names now default to ``qk_norm`` (``ssa_timm.models.default_qk_norm``)."""
    attn = model.head.attn
    if attn is None:
        return {}
    sagan = {'sagan_qk': True} if attn.sagan_qk else {}  # recorded when on: older exports' args stay as they were
    return {'qk_norm': bool(attn.qk_norm), 'scale_attn': bool(attn.scale_attn), **sagan}


def export_model(
        model: SSANet,
        out_dir: str,
        labels: Sequence[str],
        extra_config: dict[str, Any] | None = None,
) -> Path:
    """Write ``config.json`` (architecture, model args, label names, the input size the model was
    built and trained at, from its ``pretrained_cfg``) + ``model.safetensors`` in timm's ``save_for_hf``
    layout, loadable by ``timm.create_model('local-dir:...')`` and by transformers (``fixed_config``)."""
    if len(labels) != model.num_classes:
        raise ValueError(f'{len(labels)} label names for a model with {model.num_classes} classes')
    config = {'label_names': list(labels), **(extra_config or {})}
    # safetensors stores contiguous tensors only: a channels-last model is saved in the standard layout
    channels_last = any(p.dim() == 4 and not p.is_contiguous() for p in model.parameters())
    if channels_last:
        model.to(memory_format=torch.contiguous_format)
    try:
        data_config = {'input_size': tuple(model.pretrained_cfg['input_size']), 'crop_pct': 1.0, 'crop_mode': 'squash'}
        model_args = {**attention_args(model), **model.zoom_args()}  # what it computes, whatever later defaults
        save_for_hf(model, out_dir, model_config=config, model_args=model_args, safe_serialization=True,
                    data_config=data_config)
    finally:
        if channels_last:
            model.to(memory_format=torch.channels_last)
    path = Path(out_dir) / 'config.json'
    saved = fixed_config(json.loads(path.read_text()))
    saved.get('model_args', {}).pop('alpha_init', None)  # where alpha started is in the weights; 0.6 refuses the key
    path.write_text(json.dumps(saved, indent=2))
    return Path(out_dir)
