"""Datasets read through timm's own dataset specs (``timm.data.create_dataset``): ``hfds/<hub id or
folder>`` (Hugging Face datasets, map-style), ``hfids/<hub id or folder>`` (the same, streamed) and
``wds/<folder>`` (WebDataset tar shards listed in the folder's ``_info.json``). ``tfds/`` is refused.

Each yields ``(RGB PIL image, label)`` and has ``classes``, named by the dataset itself (the
``ClassLabel`` of the target column, the ``classes`` of a WebDataset ``_info.json``) or by a timm
class map file. Given the training split's ``classes``, labels are remapped to them by name.
"""
import dataclasses
import importlib
import os
import pickle
import random
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ..errors import UserError
from .images import to_rgb
from .readers import DatasetLayoutError
from .streams import buffer_shuffle, process_rank, rank_share

__all__ = ['STREAM_SHUFFLE_SIZE', 'TIMM_PREFIXES', 'TimmImageStream', 'TimmImages', 'build_timm_dataset',
           'is_timm_spec']

TIMM_PREFIXES = ('hfds/', 'hfids/', 'wds/', 'tfds/')
_PACKAGES = {'hfds/': 'datasets', 'hfids/': 'datasets', 'wds/': 'webdataset'}
_WDS_INFO = ('_info.json', 'info.json')  # what timm's reader_wds reads, in this order
STREAM_SHUFFLE_SIZE = 4096  # timm's default buffer for hfids/
_CLASS_MAP_FORMAT = 'a .txt file with one class name per line, or a .pkl {name: index} dict'


def is_timm_spec(name: str) -> bool:
    """Whether ``name`` is a timm dataset spec (starts with one of ``TIMM_PREFIXES``, any case)."""
    return name.lower().startswith(TIMM_PREFIXES)


class _Relabel:
    """Source label -> index into ``classes`` by class name; a label without one raises
    ``DatasetLayoutError`` naming its class."""

    def __init__(self, source_names: Sequence[str], own: Sequence[str], classes: Sequence[str], where: str) -> None:
        self.source_names = list(source_names)
        self.own = set(own)
        self.where = where
        index = {name: i for i, name in enumerate(classes)}
        self.index = {label: index[name] for label, name in enumerate(source_names)
                      if name in self.own and name in index}

    def __call__(self, label: int) -> int:
        try:
            return self.index[label]
        except (KeyError, TypeError):
            raise DatasetLayoutError(self.unknown([label])) from None

    def unknown(self, labels: Sequence[int]) -> str:
        """Why ``labels`` have no index, naming their classes."""
        names = [self.source_names[label] if isinstance(label, int) and 0 <= label < len(self.source_names) else label
                 for label in labels]
        unnamed = [name for name in names if not isinstance(name, str)]
        if unnamed:
            return f'{self.where} has label(s) {unnamed[:10]}, not among its {len(self.source_names)} classes'
        lacking = [name for name in names if name not in self.own]
        if lacking:
            return f'{self.where} has class(es) {lacking[:10]} that the class map lacks'
        return (f'{self.where} has class(es) {names[:10]} that the training split lacks; a model trained on '
                'it cannot predict them')


class TimmImages(Dataset):
    """Map-style ``(image, label)`` pairs of a timm dataset (``hfds/``), relabelled to ``classes``.

    Attributes:
        classes: Class names; labels index them.
        targets: Every label, in order.
        missing_classes: Classes of ``classes`` without images here (only when remapped).
    """

    iterable = False

    def __init__(self, dataset: Dataset, classes: Sequence[str], relabel: _Relabel, targets: Sequence[int],
                 missing_classes: Sequence[str]) -> None:
        self.dataset = dataset
        self.classes = list(classes)
        self.relabel = relabel
        self.targets = list(targets)
        self.missing_classes = list(missing_classes)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tuple[Image.Image, int]:
        img, label = self.dataset[index]
        return to_rgb(img), self.relabel(label)


class TimmImageStream(IterableDataset):
    """Iterable ``(image, label)`` pairs of a timm dataset (``hfids/``, ``wds/``), relabelled to
    ``classes`` on the fly; one pass per epoch, each sample once over all processes (``streams``).

    timm's reader runs as if it were alone: one pass over the split, divided only across this
    process's loader workers (timm's worker split), so every process reads the same streams. With
    ``shuffle_size`` set, the shard order is shuffled by ``(seed, epoch)`` before that split and each
    worker's stream by a buffer seeded by ``(seed, epoch, worker)``, the same in every process; this
    process keeps its ``rank_share`` of it.

    Attributes:
        classes: Class names; labels index them.
        missing_classes: Classes of ``classes`` this split does not declare (only when remapped).
        num_samples: Samples of an epoch over all processes, as the dataset declares them.
    """

    iterable = True

    def __init__(self, dataset: IterableDataset, classes: Sequence[str], relabel: _Relabel,
                 missing_classes: Sequence[str], shuffle_size: int = 0, seed: int = 0) -> None:
        self.dataset = dataset
        self.classes = list(classes)
        self.relabel = relabel
        self.missing_classes = list(missing_classes)
        self.num_samples = int(dataset.reader.num_samples)
        split_info = getattr(dataset.reader, 'split_info', None)  # wds: the shards the reader starts from
        self.shards = tuple(split_info.filenames) if split_info is not None else None
        self.shuffle_size = shuffle_size
        self.seed = seed
        self.epoch = 0

    def __iter__(self) -> Iterator[Tuple[Image.Image, int]]:
        worker = get_worker_info()
        worker_id = worker.id if worker else 0
        reader = self.dataset.reader
        # timm reads the distributed world from torch and splits by it; here it is told it is alone and
        # set up afresh in this worker (not reused from a copy made in another process)
        reader.dist_rank, reader.dist_num_replicas = 0, 1
        reader.ds, reader.worker_info = None, None
        reader.num_workers = worker.num_workers if worker else 1
        if self.shuffle_size:
            self._shuffle_shards(reader, random.Random(repr([self.seed, self.epoch])).randrange(2 ** 32))
        items: Iterable = iter(self.dataset)
        if self.shuffle_size:
            items = buffer_shuffle(items, self.shuffle_size, [self.seed, self.epoch, worker_id])
        rank, world = process_rank()
        for img, label in rank_share(items, rank, world):
            yield to_rgb(img), self.relabel(label)

    def _shuffle_shards(self, reader, seed: int) -> None:
        """Put the split's shards in an order drawn from ``seed`` before the reader divides them among
        loader workers: a WebDataset shard list, or the data files of a Hugging Face dataset (which
        ``datasets`` shuffles, with a buffer of one sample, i.e. no sample shuffle of its own)."""
        if self.shards is not None:
            order = list(self.shards)
            random.Random(seed).shuffle(order)
            reader.split_info = dataclasses.replace(reader.split_info, filenames=tuple(order))
        else:
            reader._lazy_init()  # timm builds the datasets IterableDataset here; reused by its __iter__
            reader.ds = reader.ds.shuffle(seed=seed, buffer_size=1, max_buffer_input_shards=1)

    def __len__(self) -> int:
        """Samples per epoch on this process (within one per loader worker)."""
        rank, world = process_rank()
        return max(0, -(-(self.num_samples - rank) // world))

    def set_epoch(self, epoch: int) -> None:
        """Seed this epoch's shuffle (the same in every process)."""
        self.epoch = epoch


def build_timm_dataset(
        spec: str,
        split: str,
        *,
        data_dir: Optional[str] = None,
        class_map: str = '',
        input_key: Optional[str] = None,
        target_key: Optional[str] = None,
        num_samples: Optional[int] = None,
        download: bool = False,
        seed: int = 0,
        is_training: bool = False,
        classes: Optional[Sequence[str]] = None,
) -> Dataset:
    """``(RGB PIL image, label)`` dataset of a timm spec, with ``classes`` and ``missing_classes``.

    Args:
        spec: ``hfds/<hub id or folder>``, ``hfids/<hub id or folder>`` or ``wds/<shard folder>``
            (relative to ``data_dir`` when given; ``wds/`` alone reads ``data_dir``). Only the prefix
            is case-insensitive.
        split: Split name, e.g. 'train' or 'validation' (hfds also takes slices: 'train[:10%]').
        data_dir: timm's ``root``: the datasets cache folder for hfds/hfids, the shards' folder for wds.
        class_map: timm class map file naming the classes in label order; for a dataset without class
            names it names its labels.
        input_key: Image column / WebDataset extension(s) (timm's default: 'image', 'jpg;png;webp').
        target_key: Label column (default 'label') / WebDataset json field (default: the .cls file).
        num_samples: Samples of an iterable split (default: from the dataset's metadata); an epoch is
            still one pass over the split, this sizes progress bars and the schedule.
        download: hfids: prepare the dataset in the cache first instead of streaming it.
        seed: Shuffle seed of iterable splits, the same in every process.
        is_training: Iterable splits: shuffle through a buffer of ``STREAM_SHUFFLE_SIZE`` samples.
        classes: The training split's classes: labels become indices into them by name, a class not
            among them raises ``DatasetLayoutError``.
    """
    prefix, rest = _check_spec(spec)
    # timm's reader in evaluation mode: one pass, no repeats (its training mode repeats to a count)
    # no colour conversion in timm's reader (its convert('RGB') would whiten 16-bit images): to_rgb here
    kwargs = dict(split=split, input_key=input_key, target_key=target_key, seed=seed, is_training=False,
                  input_img_mode='',
                  num_samples=num_samples, download=download)
    if prefix == 'wds/':
        dataset, names, num_classes = _open_wds(spec, rest, data_dir, kwargs)
    else:
        if not rest:
            raise UserError(f'{spec!r} names no dataset: use {prefix}<hub id or folder>')
        dataset, names = _open_hf(spec, prefix, rest, data_dir, kwargs)
        num_classes = None
    where = f'the {split} split of {spec}'
    own = _read_class_map(class_map) if class_map else None
    if names is None:
        names = own or ([str(i) for i in range(num_classes)] if num_classes else None)
        if names is None:
            raise UserError(f'{where} does not name its classes; pass a class map file ({_CLASS_MAP_FORMAT})')
    return _labelled(dataset, prefix, names, own or names, classes, where, STREAM_SHUFFLE_SIZE if is_training else 0,
                     seed)

def _check_spec(spec: str) -> Tuple[str, str]:
    """``(prefix, rest)`` of a timm spec whose reader can run here (its package installed)."""
    prefix, _, rest = spec.partition('/')
    prefix = prefix.lower() + '/'
    if prefix not in TIMM_PREFIXES:
        raise UserError(f'{spec!r} is not a timm dataset spec: it must start with one of {TIMM_PREFIXES}')
    if prefix == 'tfds/':
        raise UserError(f'{spec}: tfds/ datasets are not supported (they need tensorflow-datasets); '
                        'use an hfds/, hfids/ or wds/ copy of the dataset')
    package = _PACKAGES[prefix]
    try:
        importlib.import_module(package)
    except ImportError as e:
        raise UserError(f"{prefix} datasets need the {package!r} package: pip install 'ssa-timm[data]'") from e
    return prefix, rest


def _labelled(dataset, prefix: str, names: List[str], own: List[str], classes: Optional[Sequence[str]], where: str,
              shuffle_size: int, seed: int) -> Dataset:
    """The dataset with labels as indices into ``classes`` (by name) or else into its ``own`` names."""
    remap = classes is not None and list(classes) != own
    relabel = _Relabel(names, own, classes if remap else own, where)
    if prefix == 'hfds/':
        labels = dataset.reader.dataset.with_format('arrow')[dataset.reader.label_key].to_pylist()
        unknown = sorted({label for label in labels if label not in relabel.index}, key=str)
        if unknown:
            raise DatasetLayoutError(relabel.unknown(unknown))
        targets = [relabel.index[label] for label in labels]
        used = {names[label] for label in set(labels)}
        missing = [c for c in classes if c not in used] if remap else []
        return TimmImages(dataset, classes if remap else own, relabel, targets, missing)
    if remap:
        unknown = [label for label, name in enumerate(names) if name in own and label not in relabel.index]
        if unknown:
            raise DatasetLayoutError(relabel.unknown(unknown))
    missing = [c for c in classes if c not in set(own)] if remap else []
    return TimmImageStream(dataset, classes if remap else own, relabel, missing,
                           shuffle_size=shuffle_size, seed=seed)



def _create(spec: str, prefix: str, name: str, root: Optional[str], kwargs: dict) -> Dataset:
    from timm.data import create_dataset
    try:
        return create_dataset(prefix + name, root=root, **kwargs)
    except (OSError, ValueError, RuntimeError) as e:  # datasets and timm's readers: no data, unknown split, ...
        raise UserError(f'cannot read the {kwargs["split"]!r} split of {spec}: {e}') from e


def _open_hf(spec: str, prefix: str, name: str, root: Optional[str], kwargs: dict
             ) -> Tuple[Dataset, Optional[List[str]]]:
    """timm's hfds / hfids dataset and the names of its ``ClassLabel``, if it has one."""
    from timm.data.readers._hfds import get_class_labels
    split = kwargs['split']
    if prefix == 'hfds/':
        dataset = _create(spec, prefix, name, root, kwargs)
        _check_columns(spec, split, dataset.reader.dataset.features, [dataset.reader.label_key])
        return dataset, _names(dataset.reader.class_to_idx)
    if not kwargs['num_samples'] and not kwargs['download'] and os.path.isdir(name):
        # timm needs the split's size, which a folder of data files has no metadata for
        kwargs = {**kwargs, 'num_samples': _parquet_rows(spec, name, root, split)}
    dataset = _create(spec, prefix, name, root, kwargs)
    reader = dataset.reader
    splits = reader.builder.info.splits or reader.builder.config.data_files or {}
    if splits and split not in splits:
        raise UserError(f'{spec} has no split {split!r}; it has {sorted(splits)}')
    # a folder of data files has no features in its metadata either: streaming reads them from its files
    info = reader.builder.info if reader.builder.info.features else reader.builder.as_streaming_dataset(split=split)
    _check_columns(spec, split, info.features, [reader.input_key, reader.target_key])
    return dataset, _names(get_class_labels(info, reader.target_key))


def _check_columns(spec: str, split: str, features: Optional[dict], keys: Sequence[str]) -> None:
    missing = [key for key in keys if features is not None and key not in features]
    if missing:
        raise UserError(f'the {split!r} split of {spec} has no column(s) {missing}, it has {list(features)}; '
                        'set input_key / target_key')


def _parquet_rows(spec: str, name: str, root: Optional[str], split: str) -> Optional[int]:
    """Rows of a split of a folder of parquet files, from their footers (None for other files)."""
    import datasets
    import pyarrow.parquet as pq
    try:
        data_files = datasets.load_dataset_builder(name, cache_dir=root).config.data_files or {}
    except (OSError, ValueError) as e:
        raise UserError(f'cannot read {spec}: {e}') from e
    if split not in data_files:
        raise UserError(f'{spec} has no split {split!r}; it has {sorted(data_files)}')
    files = list(data_files[split])
    if not all(f.endswith('.parquet') and os.path.isfile(f) for f in files):
        return None
    return sum(pq.read_metadata(f).num_rows for f in files)


def _open_wds(spec: str, rest: str, data_dir: Optional[str], kwargs: dict
              ) -> Tuple[Dataset, Optional[List[str]], Optional[int]]:
    """timm's wds dataset and the ``classes`` (or ``num_classes``) of its ``_info.json``."""
    root = os.path.join(data_dir, rest) if data_dir and rest and '://' not in rest else (rest or data_dir)
    if not root:
        raise UserError(f'{spec!r} names no folder: use wds/<shard folder> or pass data_dir')
    if '://' not in root:
        if not os.path.isdir(root):
            raise UserError(f'{spec}: no WebDataset folder {root}')
        if not any(os.path.isfile(os.path.join(root, n)) for n in _WDS_INFO) and not _is_shard_pattern(kwargs['split']):
            raise UserError(f'{spec}: {root} has no {" or ".join(_WDS_INFO)} listing its splits and shards')
    dataset = _create(spec, 'wds/', '', root, kwargs)
    info = dataset.reader.info
    names = info.get('classes')
    return dataset, [str(n) for n in names] if names else None, info.get('num_classes')


def _is_shard_pattern(split: str) -> bool:
    """Whether a wds split is a brace pattern of shard names (timm's test), rather than a split name."""
    return 'tar' in split or '..' in split


def _names(class_to_idx: Dict[str, int]) -> Optional[List[str]]:
    return [name for name, _ in sorted(class_to_idx.items(), key=lambda kv: kv[1])] if class_to_idx else None


def _read_class_map(path: str) -> List[str]:
    """Class names in index order from a timm class map file."""
    from timm.data.readers.class_map import load_class_map
    if not os.path.isfile(path):
        raise UserError(f'no class map file {path}; expected {_CLASS_MAP_FORMAT}')
    try:
        class_to_idx = load_class_map(path)
    except (AssertionError, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:  # timm asserts on a bad suffix
        raise UserError(f'cannot read class map {path}: {e}; expected {_CLASS_MAP_FORMAT}') from e
    if sorted(class_to_idx.values()) != list(range(len(class_to_idx))):
        raise UserError(f'class map {path}: the indices must be 0..{len(class_to_idx) - 1}, each once')
    return [str(name) for name in _names(class_to_idx)]
