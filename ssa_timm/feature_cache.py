"""Cache of frozen-body feature maps, so the heads (and the SSA module) train without the body.

With the body frozen (the paper's setting) the body map F of an image never changes, so it is
computed once per image and view (original and horizontally flipped) into a ``.npy`` file that
training reads through a memory map. Processes share the work: each computes every
``world_size``-th image and writes its rows of the same file (on one machine, or a shared
filesystem across machines). The cache is keyed by what the maps depend on, the body's weights
included (``weights_fingerprint``), and only a completed build is ever read. Runs that need the same
key share one file (a grid's runs of one seed, whatever their attention settings): the main process of
each run holds the key's lock file (``.locks/`` in the cache folder) while it checks and builds, so two
runs that need the same missing key build it once and the second reads it (an ``fcntl`` lock: a killed
builder releases it).
"""
import hashlib
import json
import os
from pathlib import Path
from functools import partial
from typing import Any, Dict, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
from filelock import FileLock
from torch.utils.data import DataLoader, Dataset, Subset

from .data.transforms import FlipSchedule
from .errors import UserError
from .output_paths import atomic_write_text
from .processes import from_main, run_on_main

__all__ = ['CachedFeatures', 'HeadsOnCachedFeatures', 'ZoomInputs', 'body_maps_of', 'build_feature_cache',
           'cached_logits_per_head', 'weights_fingerprint']


def weights_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 of a module's parameters and buffers (names, shapes, dtypes, values)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f'{name}:{tuple(tensor.shape)}:{tensor.dtype}'.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def build_feature_cache(
        model: torch.nn.Module,
        dataset: Dataset,
        path: Path,
        with_flips: bool,
        accelerator,
        meta: Dict[str, Any],
        batch_size: int = 32,
        num_workers: int = 0,
) -> Path:
    """Compute the body map F (``model.forward_body``) of every image of ``dataset`` into ``path`` (``.npy``).

    The array has shape ``(N, V, K, h, w)`` with V = 2 (original, flipped) when ``with_flips``.
    A cache whose recorded ``meta`` matches is reused. Returns the path of the cache file.

    Args:
        model: SSANet with a frozen body, already on ``accelerator.device``.
        dataset: ``(tensor image, label)`` pairs, no random augmentation.
        path: The ``.npy`` file, named ``<stem>-<hash of meta>.npy``; its ``.json`` sibling records
            ``meta`` once complete.
        with_flips: Also cache the horizontally flipped view.
        accelerator: The run's ``accelerate.Accelerator``.
        meta: What the features depend on (model, image size, dataset, split); a mismatch rebuilds.
            The body's ``weights_fingerprint`` is added to it.
    """
    meta = json.loads(json.dumps({**meta, 'body_weights': weights_fingerprint(model.body)}))  # tuples -> lists
    # one file per setting: a run with other settings never overwrites this one's cache
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    path = path.with_name(f'{path.stem}-{key}{path.suffix}')
    marker = path.with_suffix('.json')
    if from_main(accelerator, marker.is_file() and _read_marker(marker) == meta):
        return path  # built: read without the lock (a read-only shared cache works)
    # the key's lock file, kept (as the Hugging Face cache keeps its .locks): deleting one another process
    # may hold open would let two builders in
    lock = FileLock(path.parent / '.locks' / f'{path.stem}.lock') if accelerator.is_main_process else None
    run_on_main(accelerator, partial(_lock, lock, path))  # another run building this key: wait for it
    try:
        if from_main(accelerator, marker.is_file() and _read_marker(marker) == meta):
            return path
        views = 2 if with_flips else 1
        model.body.eval()
        sample = dataset[0][0].unsqueeze(0).to(accelerator.device)
        with torch.no_grad(), accelerator.autocast():
            shape = model.forward_body(sample).shape[1:]
        run_on_main(accelerator, partial(_allocate, path, marker, (len(dataset), views, *shape)))
        _fill(model, dataset, path, views, accelerator, batch_size, num_workers)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            atomic_write_text(marker, json.dumps(meta))
        return path
    finally:
        if lock is not None:
            lock.release()


def _lock(lock: FileLock, path: Path) -> None:
    """Take the key's lock (the cache folder and its ``.locks`` made first)."""
    try:
        (path.parent / '.locks').mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except OSError as e:
        raise UserError(f'cannot lock the feature cache {path}: {e.strerror or e}') from e


def _fill(model: torch.nn.Module, dataset: Dataset, path: Path, views: int, accelerator, batch_size: int,
          num_workers: int) -> None:
    """Write this process's rows (every ``world_size``-th image) of the cache file at ``path``."""
    out = np.load(path, mmap_mode='r+')
    shard = list(range(accelerator.process_index, len(dataset), accelerator.num_processes))
    loader = DataLoader(Subset(dataset, shard), batch_size=batch_size, num_workers=num_workers)
    start = 0
    with torch.no_grad(), accelerator.autocast():
        for images, _ in loader:
            images = images.to(accelerator.device)
            rows = shard[start:start + len(images)]
            start += len(images)
            for view in range(views):
                batch = images.flip(-1) if view else images
                out[rows, view] = model.forward_body(batch).float().cpu().numpy()
    out.flush()


def _allocate(path: Path, marker: Path, shape: Tuple[int, ...]) -> None:
    """Create the cache file with all its blocks allocated up front: a memory map written on a full
    disk would end the process with SIGBUS instead of an error (``UserError`` naming the file)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        marker.unlink(missing_ok=True)
        np.lib.format.open_memmap(path, mode='w+', dtype=np.float32, shape=shape).flush()
        with open(path, 'r+b') as f:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
    except OSError as e:
        path.unlink(missing_ok=True)
        raise UserError(f'cannot write the feature cache {path}: {e.strerror or e}') from e


def _read_marker(marker: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(marker.read_text())
    except ValueError:  # unreadable: the cache is rebuilt
        return None


class ZoomInputs(NamedTuple):
    """A ``zoom`` model's inputs from a feature cache: the images' cached body maps (the first pass) and the
    images themselves (the crops of the second pass). Loaders batch it field by field."""
    body_maps: torch.Tensor
    images: torch.Tensor


def body_maps_of(inputs: Union[torch.Tensor, ZoomInputs]) -> torch.Tensor:
    """The body maps of cached inputs: the maps themselves, or a zoom model's ``ZoomInputs.body_maps``."""
    return inputs.body_maps if isinstance(inputs, ZoomInputs) else inputs


def cached_logits_per_head(model: torch.nn.Module, inputs: Union[torch.Tensor, ZoomInputs]) -> Dict[str, torch.Tensor]:
    """An SSANet's ``logits_per_head`` from cached inputs: the SSA module and heads on the maps, or a zoom
    model's both passes (the first from the maps, the crops through the body)."""
    if isinstance(inputs, ZoomInputs):
        return model.forward_per_head(inputs.images, body_map=inputs.body_maps)
    return model.logits_per_head(model.forward_ssa(inputs))


class CachedFeatures(Dataset):
    """``(feature map, label)`` pairs read from a feature cache; with ``images`` ``(ZoomInputs, label)``.

    With ``flip`` (the ``FlipSchedule`` of the uncached images) each item is the flipped view
    exactly when that image would have been flipped in the current epoch, so cached and uncached
    training see the same inputs.

    Args:
        path: The cache file (``build_feature_cache``).
        targets: The labels, in the cache's order.
        flip: The flip schedule of the training images (None: never flipped).
        images: The ``(tensor image, label)`` dataset the cache was built from: each item also carries its
            image (flipped with its map), for the second pass of a ``zoom`` model.
    """

    def __init__(self, path: Path, targets, flip: Optional[FlipSchedule] = None,
                 images: Optional[Dataset] = None) -> None:
        self.path = path
        self.targets = list(targets)
        self.flip = flip
        self.images = images
        self._array: Optional[np.ndarray] = None  # opened lazily, once per worker

    def set_epoch(self, epoch: int) -> None:
        if self.flip is not None:
            self.flip.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Tuple[Union[torch.Tensor, ZoomInputs], int]:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode='r')
        view = 1 if self.flip is not None and self.flip.flipped(index) else 0
        body_map = torch.from_numpy(np.array(self._array[index, view]))
        if self.images is None:
            return body_map, self.targets[index]
        image = self.images[index][0]
        return ZoomInputs(body_map, image.flip(-1) if view else image), self.targets[index]

    def __getstate__(self):
        return {**self.__dict__, '_array': None}


class HeadsOnCachedFeatures(torch.nn.Module):
    """The SSA module and heads of an SSANet fed with cached body maps (the body stays frozen):
    ``forward(F) == model.forward_head(model.forward_ssa(F))``; a ``zoom`` model's ``ZoomInputs`` go to
    ``model.forward_zoom`` (the first pass from the cache, the crops through the frozen body)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: Union[torch.Tensor, ZoomInputs]):
        if isinstance(inputs, ZoomInputs):
            return self.model.forward_zoom(inputs.images, body_map=inputs.body_maps)
        return self.model.forward_head(self.model.forward_ssa(inputs))
