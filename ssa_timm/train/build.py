"""The parts a training run is made of, from its ``RunConfig``: datasets, the model and its starting
weights, the training and validation data (images, or cached body maps) and their loaders."""
import json
import os
import pickle
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.models import get_model_args
from torch.utils.data import DataLoader, Dataset

from ..data import EpochFlip, Transformed, TransformedStream, build_dataset, model_transform
from ..data.streams import epoch_samples, is_stream
from ..errors import UserError, WeightsMismatch, one_line
from ..feature_cache import CachedFeatures, HeadsOnCachedFeatures, build_feature_cache
from ..hub import load_model
from ..models.ssanet import check_weights_fit, renamed_keys
from .config import RunConfig

__all__ = ['build_datasets', 'build_loaders', 'build_model', 'build_training_data', 'load_initial_checkpoint',
           'make_accelerator', 'prepare', 'save_body_weights', 'seed_everything',
           'set_up_model']


def build_datasets(config: RunConfig, accelerator=None) -> Tuple[Dataset, Dataset]:
    """Training and validation images; validation labels are indices into the training classes (a
    note is printed through ``accelerator`` for training classes the validation split lacks)."""
    train = build_dataset(config.dataset, **config.dataset_options(training=True))
    val = build_dataset(config.dataset, classes=train.classes, **config.dataset_options(training=False))
    if val.missing_classes and accelerator is not None:
        accelerator.print(f'note: the validation split has no images of {len(val.missing_classes)} training '
                          f'class(es): {val.missing_classes[:10]}')
    counts = epoch_samples(train), epoch_samples(val)  # over all processes: every process decides alike
    if 0 in counts:
        raise UserError(f'the {config.dataset} dataset has {counts[0]} training and {counts[1]} validation images')
    if is_stream(train) and config.cache_features:
        raise UserError(f'--cache-features needs a map-style dataset; {config.dataset} is streamed (use hfds/)')
    if is_stream(train) and config.checkpoint_steps:
        raise UserError(f'--checkpoint-steps saves in the middle of an epoch, which a streamed dataset '
                        f'({config.dataset}) cannot resume from; checkpoints are saved at each epoch\'s end')
    return train, val


def build_model(config: RunConfig, num_classes: int, device: Optional[str] = None) -> torch.nn.Module:
    """The SSANet of ``config`` for ``num_classes``: ImageNet body weights (``pretrained``), or body
    weights from ``pretrained_path`` through the body's own checkpoint filter (``load_initial_checkpoint``
    then loads a whole SSANet, if any).

    Raises:
        WeightsMismatch: ``pretrained_path`` holds weights of another body (keys beyond what the body's
            cut explains, missing keys, other shapes).
        UserError: ``pretrained_path`` is not a readable weights file.
    """
    kwargs: Dict[str, Any] = dict(num_classes=num_classes, img_size=config.img_size, **config.model_kwargs())
    if device is not None:
        kwargs['device'] = device
    if config.pretrained_path:
        kwargs['pretrained_cfg_overlay'] = dict(file=str(_body_file(Path(config.pretrained_path)).resolve()))
    try:
        return load_model(config.model, pretrained=bool(config.pretrained or config.pretrained_path), **kwargs)
    except WeightsMismatch as e:
        if not config.pretrained_path:
            raise
        raise WeightsMismatch(f'body weights {config.pretrained_path} do not fit the body of {config.model}: '
                              f'{e.details or e}') from e
    except (RuntimeError, ValueError, SafetensorError, pickle.UnpicklingError, EOFError, KeyError) as e:
        if not config.pretrained_path:
            raise
        raise UserError(f'body weights {config.pretrained_path} are damaged or not a weights file; expected a '
                        f'.safetensors file or a torch state dict of tensors ({_load_error(e)})') from e


def _load_error(error: Exception) -> str:
    """What a failed load says, less torch's advice to load with ``weights_only=False``: a command line cannot
    do that, and unpickling an untrusted file would run its code."""
    if 'weights_only' in str(error):
        return 'it is not a safetensors file, and torch.load read it as a pickle of objects other than tensors'
    return f'{type(error).__name__}: {one_line(error)[:300]}'


def _body_file(path: Path) -> Path:
    """``path`` after checking it is a file (a folder or a missing path is one line)."""
    if path.is_dir():
        raise UserError(f'body weights {path} is a folder; expected a weights file (.safetensors, or a torch '
                        'state dict, read weights-only)')
    if not path.is_file():
        raise UserError(f'body weights {path}: no such file')
    return path


def set_up_model(model: torch.nn.Module, config: RunConfig) -> None:
    """Switch on what training needs: both heads' logits (distilled training), gradient
    checkpointing, a frozen body, channels-last memory."""
    model.set_distilled_training(True)
    if config.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if config.freeze_body:
        model.body.requires_grad_(False)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)


def load_initial_checkpoint(model: torch.nn.Module, path: Path) -> List[str]:
    """Load a whole SSANet's weights (an export folder or a ``.safetensors`` file) into ``model``; the
    final classifier layers only when the class counts match (else they stay freshly initialised).

    Returns:
        Notes for the user: that the classifiers start fresh, when they do.

    Raises:
        WeightsMismatch: The weights are of another model (architecture, body, ``body_feature_index``).
        UserError: No such export or file, or a damaged one.
    """
    weights = path / 'model.safetensors' if path.is_dir() else path
    if not weights.is_file():
        raise UserError(f'initial checkpoint {path}: expected an export folder with model.safetensors or a '
                        '.safetensors file')
    try:
        state = renamed_keys(load_file(str(weights)))
    except (SafetensorError, OSError) as e:
        raise UserError(f'initial checkpoint {weights} is damaged or not a safetensors file ({one_line(e)})') from e
    if not any(key.startswith('body.') for key in state):
        raise UserError(f'initial checkpoint {weights} holds no SSANet (no body.* weights); body weights alone go '
                        'through the body filter instead (--pretrained-path)')
    _check_architecture(weights.parent / 'config.json', model)
    architecture = model.pretrained_cfg.get('architecture')
    own = model.state_dict()
    classifier = model.pretrained_cfg.get('classifier', ())
    classifiers = tuple(f'{name}.' for name in ((classifier,) if isinstance(classifier, str) else classifier))
    fresh = [k for k in own if k.startswith(classifiers) and k in state and state[k].shape != own[k].shape]
    check_weights_fit({k: v for k, v in state.items() if k not in fresh},
                      {k: v for k, v in own.items() if k not in fresh}, f'initial checkpoint {weights}',
                      f'{architecture} of this run (another body or --body-feature-index?)')
    model.load_state_dict({k: v for k, v in state.items() if k not in fresh}, strict=False)
    if not fresh:
        return []
    saved = state[next(k for k in fresh if k.endswith('.weight'))].shape[0]
    return [f'note: initial checkpoint {weights} has {saved} classes and this run {model.num_classes}: its '
            f'classifiers ({", ".join(sorted({k.rpartition(".")[0] for k in fresh}))}) start fresh']


def _check_architecture(config_path: Path, model: torch.nn.Module) -> None:
    """An export's ``config.json`` describes the run's model: the same architecture, body and
    ``body_feature_index`` (what differs is named)."""
    try:
        saved = json.loads(config_path.read_text())
    except (ValueError, OSError):
        return  # no config (a bare .safetensors file): the weights' keys and shapes decide
    if not isinstance(saved, dict) or not isinstance(saved.get('model_args', {}), dict):
        return
    architecture = model.pretrained_cfg.get('architecture')
    ours, theirs = get_model_args(model), saved.get('model_args', {})
    differences = [f'architecture {saved.get("architecture")} vs {architecture}']
    if saved.get('architecture') == architecture:
        body_of = lambda args: str(args.get('body', '')).partition('.')[0]  # noqa: E731 (the tag may differ)
        differences = [f'{name} {theirs_value} vs {ours_value}' for name, theirs_value, ours_value in (
            ('body', body_of(theirs), body_of(ours)),
            ('body_feature_index', theirs.get('body_feature_index'), ours.get('body_feature_index'))
        ) if theirs_value != ours_value]
    if differences:
        raise WeightsMismatch(f'initial checkpoint {config_path.parent} is another model than this run\'s '
                              f'({"; ".join(differences)}, the checkpoint\'s first); give the --model and '
                              '--body-feature-index it was trained with')


def save_body_weights(export: Path, path: Path) -> Path:
    """Write the body of an exported SSANet (``export/model.safetensors``) as a bare body checkpoint in
    the body's own key layout, ready for ``pretrained_path``; written through a temporary file."""
    from safetensors.torch import save_file
    weights = export / 'model.safetensors'
    if not weights.is_file():
        raise UserError(f'{export} is not an exported model: it has no model.safetensors')
    body = {k[len('body.'):]: v.contiguous() for k, v in load_file(str(weights)).items() if k.startswith('body.')}
    if not body:
        raise UserError(f'{weights} holds no body weights')
    tmp = path.with_name(f'.{path.name}.tmp')
    save_file(body, str(tmp))
    os.replace(tmp, path)
    return path


def build_training_data(config: RunConfig, model: torch.nn.Module, train_images: Dataset, val_images: Dataset,
                        accelerator) -> Tuple[Dataset, Dataset, torch.nn.Module]:
    """The training data (random flips drawn per epoch), the validation data and the module to train:
    the model on images, or with ``cache_features`` its SSA module and heads on cached body maps."""
    transform, _ = model_transform(model)
    if is_stream(train_images):
        train_data = TransformedStream(train_images, transform, flip_seed=config.seed)
    else:
        train_data = EpochFlip(Transformed(train_images, transform), seed=config.seed)
    val_data = TransformedStream(val_images, transform) if is_stream(val_images) else Transformed(val_images, transform)
    if not config.cache_features:
        return train_data, val_data, model
    model.to(accelerator.device)
    cache_dir = config.cache_path
    common = dict(accelerator=accelerator, batch_size=config.batch_size, num_workers=config.workers)
    train_path = build_feature_cache(model, train_data.dataset, cache_dir / 'train.npy', True,
                                     meta=config.feature_cache_key('train'), **common)
    val_path = build_feature_cache(model, val_data, cache_dir / 'val.npy', False,
                                   meta=config.feature_cache_key('val'), **common)
    zoom = getattr(model, 'zoom', False)  # the crops of the second pass need the images beside their maps
    return (CachedFeatures(train_path, train_data.dataset.dataset.targets, flip=train_data.schedule,
                           images=train_data.dataset if zoom else None),
            CachedFeatures(val_path, val_data.dataset.targets, images=val_data if zoom else None),
            HeadsOnCachedFeatures(model))


def make_accelerator(config: RunConfig):
    """The run's ``accelerate.Accelerator``: device, mixed precision, accumulation, trackers, compile, and
    a seedable sampler (the shuffle order of an epoch is a function of the seed and the epoch). With
    ``deterministic``, cuBLAS gets the fixed workspace its deterministic mode needs (before CUDA starts)."""
    from accelerate import Accelerator, DataLoaderConfiguration
    if config.deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
    return Accelerator(
        cpu=config.cpu, mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.grad_accum,
        log_with=list(config.log_with or ()) or None, project_dir=config.output_dir,
        dynamo_backend='inductor' if config.compile else None,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))


def seed_everything(config: RunConfig, accelerator) -> None:
    """Seed Python, NumPy and torch (every process alike). With ``deterministic`` also torch's
    deterministic algorithms (an error for an operation that has none), deterministic cuDNN, and on the
    CPU one intra-op thread: CPU kernels split their sums by thread count, so a run's losses differ in
    the fourth digit between thread counts (and are identical for the same count). Data order and flips
    are functions of (seed, epoch, index) already, whatever the loader workers."""
    from accelerate.utils import set_seed
    set_seed(config.seed, deterministic=config.deterministic)
    if config.deterministic and accelerator.device.type == 'cpu':
        torch.set_num_threads(1)


def prepare(accelerator, trainable: torch.nn.Module, optimizer, train_loader: DataLoader, val_loader: DataLoader):
    """``accelerator.prepare`` the module, the optimizer and the loaders; a stream's loaders stay as they
    are (each process already reads its own share of the stream)."""
    trainable, optimizer = accelerator.prepare(trainable, optimizer)
    if not is_stream(train_loader.dataset):
        train_loader = accelerator.prepare(train_loader)
    if not is_stream(val_loader.dataset):
        val_loader = accelerator.prepare(val_loader)
    return trainable, optimizer, train_loader, val_loader


def build_loaders(config: RunConfig, accelerator, train_data: Dataset,
                  val_data: Dataset) -> Tuple[DataLoader, DataLoader]:
    """Loaders of the training and validation data (not yet prepared by accelerate).

    BatchNorm1d cannot train on one image: one process drops a last batch of one; several processes
    pad their last batches to full size; a stream's processes stop at the first step one of them
    cannot fill (``ssa_timm.data.streams``).
    """
    stream = is_stream(train_data)
    one_left = accelerator.num_processes == 1 and not stream and len(train_data) % config.batch_size == 1
    train_loader = DataLoader(train_data, batch_size=config.batch_size, shuffle=not stream,
                              num_workers=config.workers, drop_last=one_left or stream)
    val_loader = DataLoader(val_data, batch_size=config.batch_size, shuffle=False, num_workers=config.workers)
    return train_loader, val_loader

