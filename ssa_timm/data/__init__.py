"""Datasets and transforms for fine-grained recognition (paper section 4.1)."""
from typing import Any, Dict, Optional, Sequence

from torch.utils.data import Dataset

from .builtin import BUILTIN_TASKS, BuiltinFineGrained, BuiltinScene
from .images import (
    BACKGROUND, IMAGE_SUFFIXES, CorruptImageError, ImageTooLargeError, find_images, load_image, max_image_pixels,
    shown_size, to_rgb)
from .readers import (
    DatasetLayoutError, LabeledImages, align_classes, read_cars, read_cub, read_dogs, read_image_folder)
from .timm_datasets import TIMM_PREFIXES, build_timm_dataset, is_timm_spec
from .transforms import (
    EpochFlip, FlipSchedule, Transformed, TransformedStream, eval_transform, first_images, model_transform)

__all__ = [
    'BACKGROUND', 'BUILTIN_TASKS', 'BuiltinFineGrained', 'BuiltinScene', 'CorruptImageError', 'DATASETS',
    'DATASET_DEFAULTS',
    'DatasetLayoutError', 'EpochFlip', 'FlipSchedule', 'IMAGE_SUFFIXES', 'ImageTooLargeError', 'LabeledImages',
    'TIMM_PREFIXES', 'Transformed', 'TransformedStream', 'build_dataset', 'dataset_options', 'eval_transform',
    'find_images', 'first_images', 'is_timm_spec', 'load_image', 'max_image_pixels', 'model_transform', 'shown_size',
    'to_rgb',
]

DATASETS = ('builtin', 'cub', 'dogs', 'cars', 'imagefolder')


# The dataset settings, by the recipes' flag names, with their defaults: the one place they are set
# (ssa_timm.cli's flags, ssa_timm.train.RunConfig and dataset_options read them from here).
DATASET_DEFAULTS: Dict[str, Any] = dict(
    dataset='builtin', data_dir=None, crop_bbox=False, seed=0,
    builtin_train_per_class=300, builtin_val_per_class=50, builtin_family=0, builtin_task='glyph',
    builtin_part_cell=None, builtin_oracle_crop=False,
    train_split='train', val_split='validation', class_map='', input_key=None, target_key=None,
    train_num_samples=None, val_num_samples=None, dataset_download=False,
)
_SPLIT_SETTINGS = {True: ('builtin_train_per_class', 'train_split', 'train_num_samples'),
                   False: ('builtin_val_per_class', 'val_split', 'val_num_samples')}


def dataset_options(settings: Any, training: bool) -> Dict[str, Any]:
    """``build_dataset``'s arguments besides the name, for the training or the validation split, from
    settings named as the recipes' flags (an argparse namespace from ``ssa_timm.cli.add_dataset_args``
    or a ``ssa_timm.train.RunConfig``, which both hold every setting of ``DATASET_DEFAULTS`` that the split
    uses): the built-in readers' 'train' / 'val' split, sample count, family and task, or a timm spec's
    split name and reader options."""
    per_class, split, num_samples = (getattr(settings, name) for name in _SPLIT_SETTINGS[training])
    options: Dict[str, Any] = dict(data_dir=settings.data_dir, crop_bbox=settings.crop_bbox, seed=settings.seed,
                                   samples_per_class=per_class)
    if not is_timm_spec(settings.dataset):
        return dict(options, split='train' if training else 'val', family=settings.builtin_family,
                    task=settings.builtin_task, part_cell=settings.builtin_part_cell,
                    oracle_crop=settings.builtin_oracle_crop)
    return dict(options, split=split, class_map=settings.class_map, input_key=settings.input_key,
                target_key=settings.target_key, download=settings.dataset_download, is_training=training,
                num_samples=num_samples)


def build_dataset(name: str, split: str, data_dir: Optional[str] = None, crop_bbox: bool = False,
                  seed: int = 0, samples_per_class: Optional[int] = None, family: int = 0, task: str = 'glyph',
                  part_cell: Optional[int] = None, oracle_crop: bool = False,
                  classes: Optional[Sequence[str]] = None, classes_of: str = 'the training split',
                  **timm_options: Any) -> Dataset:
    """``(PIL image, label)`` dataset with a ``classes`` list (and ``missing_classes``).

    Args:
        name: One of ``DATASETS``, or a timm spec read by ``build_timm_dataset``.
        split: 'train' or 'val' (the test split of CUB, Dogs and Cars); a timm spec's split name.
        data_dir: Dataset root (not used by 'builtin').
        crop_bbox: CUB only: crop to ``bounding_boxes.txt``.
        seed: 'builtin' only: the generation seed.
        samples_per_class: 'builtin' only: images per class (default 300 train, 50 val).
        family: 'builtin' only: the glyph family (``BuiltinFineGrained``).
        task: 'builtin' only: one of ``BUILTIN_TASKS``: 'glyph' (``BuiltinFineGrained``) or 'scene'
            (``BuiltinScene``, with ground-truth part boxes).
        part_cell: 'builtin' scene only: the glyph cell (px) of every part (``BuiltinScene``).
        oracle_crop: 'builtin' scene only: each image cropped at its deciding part (``BuiltinScene``).
        classes: The run's class list (the training split's, or a model's label names): labels are
            indices into it, a class it lacks is an error (``align_classes``).
        classes_of: Where ``classes`` come from, for error messages.
        **timm_options: For timm specs: ``build_timm_dataset``'s keyword arguments (class_map, ...).
    """
    if is_timm_spec(name):
        return build_timm_dataset(name, split, data_dir=data_dir, seed=seed, classes=classes, **timm_options)
    scene = dict(part_cell=part_cell, oracle_crop=oracle_crop) if part_cell or oracle_crop else {}
    dataset = _read(name, split, data_dir, crop_bbox, seed, samples_per_class, family, task, scene)
    dataset.missing_classes = []
    if classes is not None and list(classes) != list(dataset.classes):
        if not isinstance(dataset, LabeledImages):
            raise DatasetLayoutError(f'the {name} {split} split has classes {dataset.classes[:5]}..., '
                                     f'{classes_of} has {list(classes)[:5]}...{_builtin_task_hint(name, classes)}')
        dataset = align_classes(dataset, classes, split, classes_of)
    return dataset


_BUILTIN_CLASS_PREFIXES = {'glyph': 'glyph_', 'scene': 'part_'}  # BuiltinFineGrained's, BuiltinScene's


def _builtin_task_hint(name: str, classes: Sequence[str]) -> str:
    """For built-in classes of another task (a scene model evaluated on the glyph task): the flag to pass."""
    for task, prefix in _BUILTIN_CLASS_PREFIXES.items():
        if name == 'builtin' and classes and all(str(c).startswith(prefix) for c in classes):
            return f' (those are classes of the built-in {task} task: pass --builtin-task {task})'
    return ''


def _read(name: str, split: str, data_dir: Optional[str], crop_bbox: bool, seed: int,
          samples_per_class: Optional[int], family: int = 0, task: str = 'glyph',
          scene: Optional[Dict[str, Any]] = None) -> Dataset:
    if split not in ('train', 'val'):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if name == 'builtin':
        default = 300 if split == 'train' else 50
        if task not in BUILTIN_TASKS:
            raise DatasetLayoutError(f'the built-in task must be one of {BUILTIN_TASKS}, got {task!r}')
        if scene and task != 'scene':
            raise DatasetLayoutError('the part cell and the oracle crop are settings of the built-in scene task: '
                                     'pass --builtin-task scene')
        if task == 'scene':
            try:
                return BuiltinScene(split, samples_per_class=samples_per_class or default, seed=seed, family=family,
                                    **(scene or {}))
            except ValueError as e:
                raise DatasetLayoutError(f'the built-in scene task: {e}') from e
        return BuiltinFineGrained(split, samples_per_class=samples_per_class or default, seed=seed, family=family)
    if name not in DATASETS:
        raise DatasetLayoutError(f'dataset must be one of {DATASETS}, got {name!r}')
    if not data_dir:
        raise DatasetLayoutError(f'dataset {name!r} needs its data folder (data_dir), none was given')
    if name == 'cub':
        return read_cub(data_dir, split, crop_bbox=crop_bbox)
    if crop_bbox:
        raise DatasetLayoutError(f'cropping to bounding boxes (crop_bbox) is only available for cub, not {name}')
    return {'dogs': read_dogs, 'cars': read_cars, 'imagefolder': read_image_folder}[name](data_dir, split)
