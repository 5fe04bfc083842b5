"""Datasets and transforms for fine-grained recognition (paper section 4.1)."""
from typing import Optional

from torch.utils.data import Dataset

from .builtin import BuiltinFineGrained
from .readers import (
    CorruptImageError, DatasetLayoutError, LabeledImages, read_cars, read_cub, read_dogs, read_image_folder)
from .transforms import EpochFlip, Transformed, eval_transform, model_transform

__all__ = [
    'BuiltinFineGrained', 'CorruptImageError', 'DATASETS', 'DatasetLayoutError', 'EpochFlip', 'LabeledImages',
    'Transformed', 'build_dataset', 'eval_transform', 'model_transform',
]

DATASETS = ('builtin', 'cub', 'dogs', 'cars', 'imagefolder')


def build_dataset(name: str, split: str, data_dir: Optional[str] = None, crop_bbox: bool = False,
                  seed: int = 0, samples_per_class: Optional[int] = None) -> Dataset:
    """``(PIL image, label)`` dataset with a ``classes`` list.

    Args:
        name: One of ``DATASETS``.
        split: 'train' or 'val' (the test split of CUB, Dogs and Cars).
        data_dir: Dataset root (not used by 'builtin').
        crop_bbox: CUB only: crop to ``bounding_boxes.txt``.
        seed: 'builtin' only: the generation seed.
        samples_per_class: 'builtin' only: images per class (default 300 train, 50 val).
    """
    if split not in ('train', 'val'):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if name == 'builtin':
        default = 300 if split == 'train' else 50
        return BuiltinFineGrained(split, samples_per_class=samples_per_class or default, seed=seed)
    if name not in DATASETS:
        raise ValueError(f'dataset must be one of {DATASETS}, got {name!r}')
    if not data_dir:
        raise ValueError(f'--data-dir is required for dataset {name!r}')
    if name == 'cub':
        return read_cub(data_dir, split, crop_bbox=crop_bbox)
    if crop_bbox:
        raise ValueError('crop_bbox is only available for cub')
    return {'dogs': read_dogs, 'cars': read_cars, 'imagefolder': read_image_folder}[name](data_dir, split)
