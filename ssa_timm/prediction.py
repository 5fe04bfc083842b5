"""Prediction over many processes: each process takes a contiguous share of the sorted inputs, loads it
through a ``torch.utils.data.DataLoader`` and streams its results into its own part file next to the
output; once every process is done, the main process merges the parts, in rank order, into the
output (written atomically) and removes them. Contiguous shares make the merge a concatenation: the
merged file lists the images in the order one process would.

    rank, world = ...                                  # accelerate's PartialState, torchrun's RANK
    mine = shard(paths, rank, world)                   # each path in exactly one share
    loader = DataLoader(ImageFiles(mine, transform), batch_size=16, num_workers=4, collate_fn=collate_images)
    ...                                                # write part_path(output, rank, world)
    merge_parts(part_paths(output, world), output)    # main process, after a barrier
"""
import json
import os
import shutil
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, TypeVar

import torch
from torch.utils.data import Dataset

from .data import CorruptImageError, load_image
from .errors import UserError

__all__ = ['ImageFiles', 'collate_images', 'launched_world_size', 'merge_json_lines', 'merge_parts', 'part_path',
           'part_paths', 'process_device', 'shard', 'shard_bounds']

T = TypeVar('T')


def launched_world_size() -> int:
    """The number of processes this one was launched among (``WORLD_SIZE``, set by ``accelerate launch``
    and ``torchrun``); 1 for a plain ``python`` run."""
    return max(1, int(os.environ.get('WORLD_SIZE', '1') or 1))


def shard_bounds(count: int, rank: int, world: int) -> Tuple[int, int]:
    """``(start, stop)`` of process ``rank``'s contiguous share of ``count`` items split over ``world``
    processes: the first ``count % world`` shares hold one item more than the others.

    Args:
        count: Number of items.
        rank: This process, ``0 <= rank < world``.
        world: Number of processes, at least 1.

    Raises:
        ValueError: ``world`` below 1 or ``rank`` outside ``[0, world)``.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f'rank {rank} of {world} process(es)')
    size, extra = divmod(count, world)
    start = rank * size + min(rank, extra)
    return start, start + size + (rank < extra)


def shard(items: Sequence[T], rank: int, world: int) -> List[T]:
    """Process ``rank``'s share of ``items`` (see ``shard_bounds``): every item is in exactly one share, and
    the shares of ranks 0, 1, ... concatenated are ``items`` in their order."""
    start, stop = shard_bounds(len(items), rank, world)
    return list(items[start:stop])


def part_path(output: Path, rank: int, world: int) -> Path:
    """The part file of process ``rank`` next to ``output``: ``<name>.part-<rank>-of-<world>``."""
    return output.with_name(f'{output.name}.part-{rank}-of-{world}')


def part_paths(output: Path, world: int) -> List[Path]:
    """The part files of all ``world`` processes, in rank order (the order to merge them in)."""
    return [part_path(output, rank, world) for rank in range(world)]


def process_device(requested: Optional[str], own: torch.device) -> str:
    """The device a launched process predicts on.

    Args:
        requested: ``--device`` as given: None or a device type without an index (``cuda``) means the
            process's own device; a device with an index (``cuda:1``) or ``cpu`` is used as given.
        own: The process's own device (accelerate's ``PartialState().device``: ``cuda:<local rank>``).
    """
    if requested is None:
        return str(own)
    device = torch.device(requested)
    if device.index is None and device.type == own.type:
        return str(own)
    return requested


class ImageFiles(Dataset):
    """Image files read with ``loader`` (``ssa_timm.data.load_image``: EXIF orientation, 16-bit and
    transparent images handled) and ``transform``; a file the loader cannot read (``CorruptImageError``,
    too large images included) is an item without an image and with the error's message, so one bad
    file does not stop a loader worker. Items are ``(index, image or None, message or None)``; batch
    them with ``collate_images``."""

    def __init__(self, paths: Sequence[Path], transform: Callable,
                 loader: Callable[[str], object] = load_image) -> None:
        self.paths, self.transform, self.loader = list(paths), transform, loader

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tuple[int, Optional[torch.Tensor], Optional[str]]:
        try:
            return index, self.transform(self.loader(str(self.paths[index]))), None
        except CorruptImageError as e:
            return index, None, str(e)


def collate_images(items: Sequence[Tuple[int, Optional[torch.Tensor], Optional[str]]]
                   ) -> Tuple[List[int], Optional[torch.Tensor], List[Tuple[int, str]]]:
    """A batch of ``ImageFiles`` items: ``(indices of the read images, their stacked images or None when
    none was read, [(index, message)] of the unreadable ones)``."""
    indices = [i for i, image, _ in items if image is not None]
    images = torch.stack([image for _, image, _ in items if image is not None]) if indices else None
    return indices, images, [(i, message) for i, _, message in items if message is not None]


def _replace_atomically(output: Path, write: Callable, parts: Sequence[Path], what: str) -> None:
    """``write(file)`` into a temporary sibling of ``output`` opened in binary mode, then renamed over
    ``output``; on failure the temporary file is removed, ``output`` is left as it was and the parts
    are kept (they hold every result)."""
    tmp = output.with_name(f'.{output.name}.tmp-{os.getpid()}')
    try:
        with open(tmp, 'wb') as f:
            write(f)
        os.replace(tmp, output)
    except OSError as e:
        kept = ', '.join(str(p) for p in parts if p.exists())
        raise UserError(f'cannot write {what} {output}: {e.strerror or e}' +
                        (f' (the results stay in {kept})' if kept else '')) from e
    finally:
        tmp.unlink(missing_ok=True)
    for part in parts:
        part.unlink(missing_ok=True)


def _check_parts(parts: Sequence[Path]) -> None:
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise UserError(f'cannot merge the results: part file(s) {", ".join(missing)} missing')


def merge_parts(parts: Sequence[Path], output: Path, header_lines: int = 0, what: str = '--output') -> None:
    """Concatenate the part files, in the given order, into ``output`` (atomically: a temporary sibling
    and a rename), then remove them. Text records (JSON lines, CSV rows, table lines) are copied as
    bytes, unchanged.

    Args:
        parts: The part files in rank order (``part_paths``); each must exist, an empty one is fine.
        output: The merged file.
        header_lines: Lines at the start of every part (a CSV header) written once, from the first part.
        what: The flag that names ``output``, for messages.

    Raises:
        UserError: A part is missing, or ``output`` cannot be written (named with ``what``; the parts
            are then kept).
    """
    _check_parts(parts)

    def write(out) -> None:
        for n, part in enumerate(parts):
            with open(part, 'rb') as f:
                for _ in range(header_lines if n else 0):
                    f.readline()
                shutil.copyfileobj(f, out)
    _replace_atomically(output, write, parts, what)


def merge_json_lines(parts: Sequence[Path], output: Path, indent: int = 1, what: str = '--output') -> None:
    """Merge part files of JSON lines into ``output`` as one JSON list, the text of
    ``json.dumps(records, indent=indent) + '\\n'``, streamed a record at a time (memory stays bounded);
    atomically, as ``merge_parts``, whose arguments and errors these are."""
    _check_parts(parts)
    pad = ' ' * indent

    def write(out) -> None:
        first = True
        for part in parts:
            with open(part, encoding='utf-8') as f:
                for line in filter(str.strip, f):
                    text = json.dumps(json.loads(line), indent=indent).replace('\n', '\n' + pad)
                    out.write(f'{"[" if first else ","}\n{pad}{text}'.encode())
                    first = False
        out.write(b'[]\n' if first else b'\n]\n')
    _replace_atomically(output, write, parts, what)
