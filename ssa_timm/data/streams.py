"""Streamed (iterable) datasets over several processes: each sample exactly once per epoch.

timm's ``hfids/`` and ``wds/`` readers split a stream across processes and loader workers by shard
and, in training, repeat each worker's part up to a fixed sample count, so that every process takes
the same number of steps; in an epoch some samples are then seen twice and others not at all. Here
the reader splits the stream only across the loader workers of a process (timm's own worker split,
one pass, the same in every process), ``rank_share`` keeps every ``world``-th sample of each worker's
stream for this process, and ``batches_on_every_process`` stops every process at the first step at
which one of them has no full batch left. Per-process counts differ by at most one sample per
loader worker, so what is dropped is less than a batch per process and worker (what ``drop_last``
drops), plus, with gradient accumulation over k batches, an unfinished window of up to k - 1
batches per process. The price is that every process decodes the whole stream and keeps its share.
"""
import random
from itertools import islice
from typing import Iterable, Iterator, List, Tuple, TypeVar

import torch

__all__ = ['batches_on_every_process', 'buffer_shuffle', 'epoch_samples', 'is_stream', 'process_rank', 'rank_share']

T = TypeVar('T')


def is_stream(dataset) -> bool:
    """Whether ``dataset`` is streamed (timm's ``hfids/`` and ``wds/`` specs, and their transforms)."""
    return bool(getattr(dataset, 'iterable', False))


def process_rank() -> Tuple[int, int]:
    """``(rank, world size)`` of this process in the default process group, ``(0, 1)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def rank_share(items: Iterable[T], rank: int, world: int) -> Iterator[T]:
    """Items ``rank``, ``rank + world``, ... of ``items``: this process's share of a stream that every
    process reads in the same order."""
    return islice(items, rank, None, world)


def buffer_shuffle(items: Iterable[T], size: int, seed: List[int]) -> Iterator[T]:
    """``items`` shuffled through a buffer of ``size`` (as timm's and WebDataset's readers do), by an RNG
    seeded with ``seed``: the same order in every process that reads the same stream."""
    rng = random.Random(repr(seed))
    buffer: List[T] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def batches_on_every_process(loader: Iterable, accelerator, group: int = 1) -> Iterator:
    """Batches of ``loader``, ``group`` at a time (a gradient accumulation's worth), while every
    process has ``group`` more: one small all-reduce per group keeps the processes in step when
    their streams end at different batches.

    Args:
        loader: This process's batches (not prepared by accelerate: each process reads its own share).
        accelerator: The run's ``accelerate.Accelerator``.
        group: Batches that must all be present on every process before any of them is yielded.
    """
    batches = iter(loader)
    while True:
        window = list(islice(batches, group))
        have = torch.tensor(float(len(window) == group), device=accelerator.device)
        if accelerator.num_processes > 1:
            have = accelerator.reduce(have, reduction='sum') / accelerator.num_processes
        if have.item() < 1:
            return
        yield from window


def epoch_samples(dataset) -> int:
    """Samples of an epoch over all processes: a stream's declared count, a map-style dataset's length."""
    return dataset.num_samples if is_stream(dataset) else len(dataset)
