"""Transforms of paper section 4.1: resize to a square (squash, no crop), random horizontal flip for
training, normalisation from the body's pretrained config; made by timm from the model's data config.

The flip is drawn from ``(seed, epoch, index)`` instead of a global RNG, so a run, its resumed
twin and its feature-cached twin flip the same images in the same epochs.
"""
from itertools import islice
from typing import Callable, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
from timm.data import create_transform, resolve_data_config
from torch.utils.data import Dataset, IterableDataset, default_collate, get_worker_info
from torchvision import transforms as T

from .streams import process_rank

__all__ = ['EpochFlip', 'FlipSchedule', 'Transformed', 'TransformedStream', 'eval_transform', 'first_images',
           'model_transform']


def eval_transform(
        img_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        interpolation: str = 'bilinear',
) -> T.Compose:
    """Squash to ``img_size`` x ``img_size`` (no crop, as the paper), to tensor, normalise: timm's
    ``create_transform`` with ``crop_mode='squash'``, ``crop_pct=1``."""
    return create_transform(
        img_size, interpolation=interpolation, mean=tuple(mean), std=tuple(std), crop_pct=1.0, crop_mode='squash')


def model_transform(model: torch.nn.Module, img_size: Optional[int] = None) -> Tuple[T.Compose, int]:
    """The model's eval transform from its data config (timm's ``resolve_data_config`` +
    ``create_transform``), at ``img_size`` or else the model's input size."""
    cfg = resolve_data_config(model=model)
    if img_size:
        cfg['input_size'] = (cfg['input_size'][0], img_size, img_size)
    return create_transform(**cfg), cfg['input_size'][-1]


class Transformed(Dataset):
    """Apply a transform to the image of each ``(image, label)`` pair."""

    def __init__(self, dataset: Dataset, transform: Callable) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        img, label = self.dataset[index]
        return self.transform(img), label


class TransformedStream(IterableDataset):
    """Apply a transform to the images of an iterable ``(image, label)`` dataset (a timm stream),
    and with ``flip_seed`` a random horizontal flip drawn from ``(seed, epoch, rank, worker)``."""

    iterable = True

    def __init__(self, dataset: IterableDataset, transform: Callable, flip_seed: Optional[int] = None) -> None:
        self.dataset = dataset
        self.transform = transform
        self.flip_seed = flip_seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def num_samples(self) -> int:
        """Samples of an epoch over all processes."""
        return self.dataset.num_samples

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, int]]:
        rng = None
        if self.flip_seed is not None:
            worker = get_worker_info()
            rng = np.random.default_rng([self.flip_seed, self.epoch, process_rank()[0], worker.id if worker else 0])
        for img, label in self.dataset:
            x = self.transform(img)
            yield (x.flip(-1) if rng is not None and rng.random() < 0.5 else x), label


def first_images(dataset: Dataset, count: int) -> torch.Tensor:
    """The first ``count`` (transformed) images of a map-style or iterable dataset, batched as a loader
    batches them (a tensor; a tuple of tensors for tuple inputs)."""
    items = islice(iter(dataset), count) if isinstance(dataset, IterableDataset) else (
        dataset[i] for i in range(min(count, len(dataset))))
    return default_collate([x for x, _ in items])


class FlipSchedule:
    """Which images are mirrored (p=0.5) in which epoch, drawn from ``(seed, epoch, index)``."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def flipped(self, index: int) -> bool:
        return bool(np.random.default_rng([self.seed, self.epoch, index]).random() < 0.5)


class EpochFlip(Dataset):
    """Random horizontal flip of ``(tensor, label)`` pairs by a ``FlipSchedule`` (built from ``seed``)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.schedule = FlipSchedule(seed)

    def set_epoch(self, epoch: int) -> None:
        self.schedule.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        x, label = self.dataset[index]
        return (x.flip(-1) if self.schedule.flipped(index) else x), label
