"""timm dataset specs (hfds/, hfids/, wds/) on tiny datasets written in their real formats: a local
Hugging Face parquet folder and WebDataset tar shards with an ``_info.json``. Offline."""
import io
import json
import os
import sys
import tarfile
from collections import Counter
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import pytest
import torch
from PIL import Image

os.environ.setdefault('HF_DATASETS_OFFLINE', '1')

from recipe_runs import TWO_CPU_PROCESSES, run_main, run_python, run_recipe  # noqa: E402
from ssa_timm.data import DatasetLayoutError  # noqa: E402
from ssa_timm.data.timm_datasets import build_timm_dataset, is_timm_spec  # noqa: E402
from ssa_timm.errors import UserError  # noqa: E402

datasets = pytest.importorskip('datasets')
pytest.importorskip('webdataset')

CLASSES = ['ant', 'bee', 'cat']
Rows = List[Tuple[Tuple[int, int, int], int]]  # (colour, label) of each image, in order


def _png(colour: Tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new('RGB', (16, 16), colour).save(buf, format='PNG')
    return buf.getvalue()


def _rows(count: int, labels: int, offset: int = 0) -> Rows:
    return [((10 * i + offset, 255 - 10 * i, 7 * (i % labels)), i % labels) for i in range(count)]


def _write_hf(root: Path, splits: Dict[str, Rows], names: Sequence[str], files: int = 1) -> Path:
    features = datasets.Features({'image': datasets.Image(), 'label': datasets.ClassLabel(names=list(names))})
    (root / 'data').mkdir(parents=True)
    for split, rows in splits.items():
        size = -(-len(rows) // files)
        for f in range(files):
            part = rows[f * size:(f + 1) * size]
            ds = datasets.Dataset.from_dict(
                {'image': [{'bytes': _png(c), 'path': None} for c, _ in part], 'label': [label for _, label in part]},
                features=features)
            ds.to_parquet(str(root / 'data' / f'{split}-{f:05d}-of-{files:05d}.parquet'))
    return root


def _write_wds(root: Path, splits: Dict[str, Rows], info: dict, shards: int = 2) -> Path:
    root.mkdir(parents=True)
    info = {**info, 'splits': {}}
    for split, rows in splits.items():
        filenames, lengths = [], []
        for s in range(shards):
            name = f'tiny-{split}-{s:03d}.tar'
            part = rows[s::shards]
            with tarfile.open(root / name, 'w') as tar:
                for i, (colour, label) in enumerate(part):
                    for ext, data in (('png', _png(colour)), ('cls', str(label).encode())):
                        member = tarfile.TarInfo(f'{split}{s:03d}{i:04d}.{ext}')
                        member.size = len(data)
                        tar.addfile(member, io.BytesIO(data))
            filenames.append(name)
            lengths.append(len(part))
        info['splits'][split] = dict(name=split, num_samples=len(rows), filenames=filenames, shard_lengths=lengths)
    (root / '_info.json').write_text(json.dumps(info))
    return root


def _collate(item):
    return item


def _items(dataset) -> Rows:
    items = []
    for img, label in dataset:
        assert isinstance(img, Image.Image) and img.mode == 'RGB' and img.size == (16, 16)
        assert type(label) is int
        items.append((img.getpixel((3, 5)), label))
    return items


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp('timm_ds')
    splits = {'train': _rows(24, 3), 'validation': _rows(9, 3, offset=1)}
    return dict(
        splits=splits, cache=str(root / 'cache'),
        hf=_write_hf(root / 'hf', splits, CLASSES),
        wds=_write_wds(root / 'wds', splits, {'name': 'tiny', 'classes': CLASSES}),
    )


def test_is_timm_spec():
    assert all(is_timm_spec(s) for s in ('hfds/a/b', 'hfids//tmp/x', 'wds/x', 'TFDS/x', 'HFDS/x'))
    assert not any(is_timm_spec(s) for s in ('cub', 'imagefolder', 'torch/cifar10', 'hfdsx/y'))


def test_hfds_local_folder(data):
    train = build_timm_dataset(f'hfds/{data["hf"]}', 'train', data_dir=data['cache'])
    val = build_timm_dataset(f'hfds/{data["hf"]}', 'validation', data_dir=data['cache'], classes=CLASSES)
    assert train.iterable is False and val.iterable is False
    assert train.classes == CLASSES and val.classes == CLASSES and val.missing_classes == []
    assert len(train) == 24 and len(val) == 9
    assert train.targets == [label for _, label in data['splits']['train']]
    assert _items(train) == data['splits']['train'] and _items(val) == data['splits']['validation']
    assert train[5][1] == 2


def test_hfids_streams_the_same_folder(data):
    spec = f'hfids/{data["hf"]}'
    val = build_timm_dataset(spec, 'validation', data_dir=data['cache'])
    assert val.iterable is True and val.classes == CLASSES and len(val) == 9
    assert Counter(_items(val)) == Counter(data['splits']['validation'])
    train = build_timm_dataset(spec, 'train', data_dir=data['cache'], is_training=True, seed=3)
    orders = []
    for epoch in (1, 2, 1):
        train.set_epoch(epoch)
        orders.append(_items(train))
    # an epoch is one pass: each sample once (timm's training mode repeats up to a count), shuffled by
    # (seed, epoch), so the same in every process and different from epoch to epoch
    assert len(train) == 24 and Counter(orders[0]) == Counter(data['splits']['train'])
    assert orders[0] == orders[2] != orders[1] and orders[0] != data['splits']['train']


def test_wds_shards_with_info(data):
    spec = f'wds/{data["wds"]}'
    val = build_timm_dataset(spec, 'validation')
    assert val.iterable is True and val.classes == CLASSES and len(val) == 9
    assert Counter(_items(val)) == Counter(data['splits']['validation'])
    train = build_timm_dataset('wds/wds', 'train', data_dir=str(data['wds'].parent), is_training=True, seed=1)
    train.set_epoch(2)
    assert len(train) == 24 and Counter(_items(train)) == Counter(data['splits']['train'])


def test_wds_class_map_names_the_labels(data, tmp_path):
    root = _write_wds(tmp_path / 'unnamed', {'train': _rows(6, 3)}, {'name': 'unnamed'})
    with pytest.raises(UserError, match='does not name its classes'):
        build_timm_dataset(f'wds/{root}', 'train')
    (tmp_path / 'map.txt').write_text('x\ny\nz\n')
    ds = build_timm_dataset(f'wds/{root}', 'train', class_map=str(tmp_path / 'map.txt'))
    assert ds.classes == ['x', 'y', 'z'] and Counter(_items(ds)) == Counter(_rows(6, 3))
    numbered = _write_wds(tmp_path / 'numbered', {'train': _rows(6, 3)}, {'name': 'n', 'num_classes': 4})
    assert build_timm_dataset(f'wds/{numbered}', 'train').classes == ['0', '1', '2', '3']


def test_hfds_class_map_reorders_by_name(data, tmp_path):
    (tmp_path / 'map.txt').write_text('cat\nant\nbee\n')
    ds = build_timm_dataset(f'hfds/{data["hf"]}', 'validation', data_dir=data['cache'],
                            class_map=str(tmp_path / 'map.txt'))
    new = {0: 1, 1: 2, 2: 0}
    assert ds.classes == ['cat', 'ant', 'bee']
    assert ds.targets == [new[label] for _, label in data['splits']['validation']]
    assert ds[0][1] == ds.targets[0]


def test_validation_remapped_by_name(data, tmp_path):
    # a validation split that lacks 'ant' and orders its classes differently keeps the training indices
    rows = _rows(8, 2)  # labels 0 = 'cat', 1 = 'bee'
    expected = [(c, {0: 2, 1: 1}[label]) for c, label in rows]
    hf = _write_hf(tmp_path / 'hf', {'validation': rows}, ['cat', 'bee'])
    ds = build_timm_dataset(f'hfds/{hf}', 'validation', data_dir=data['cache'], classes=CLASSES)
    assert ds.classes == CLASSES and ds.missing_classes == ['ant']
    assert ds.targets == [label for _, label in expected] and _items(ds) == expected
    stream = build_timm_dataset(f'hfids/{hf}', 'validation', data_dir=data['cache'], classes=CLASSES)
    assert stream.missing_classes == ['ant'] and Counter(_items(stream)) == Counter(expected)
    wds = _write_wds(tmp_path / 'wds', {'validation': rows}, {'name': 'v', 'classes': ['cat', 'bee']})
    ds = build_timm_dataset(f'wds/{wds}', 'validation', classes=CLASSES)
    assert ds.missing_classes == ['ant'] and Counter(_items(ds)) == Counter(expected)

    # a class the training split lacks is an error naming it
    extra = _rows(8, 4)
    hf = _write_hf(tmp_path / 'hf_extra', {'validation': extra}, CLASSES + ['dog'])
    wds = _write_wds(tmp_path / 'wds_extra', {'validation': extra}, {'name': 'x', 'classes': CLASSES + ['dog']})
    for spec in (f'hfds/{hf}', f'hfids/{hf}', f'wds/{wds}'):
        with pytest.raises(DatasetLayoutError, match="'dog'"):
            build_timm_dataset(spec, 'validation', data_dir=None if 'wds' in spec else data['cache'], classes=CLASSES)


def test_loader_workers_share_the_shards(data):
    """timm's wds reader splits the shards across loader workers (each sample once per epoch); the
    map-style dataset and its relabelling work in workers too."""
    stream = build_timm_dataset(f'wds/{data["wds"]}', 'validation')
    _items(stream)  # read in this process first: the workers must not reuse its reader's state
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2, collate_fn=_collate)
    assert Counter(_items(loader)) == Counter(data['splits']['validation']) and len(stream) == 9
    images = build_timm_dataset(f'hfds/{data["hf"]}', 'validation', data_dir=data['cache'], classes=CLASSES[::-1])
    loader = torch.utils.data.DataLoader(images, batch_size=None, num_workers=2, collate_fn=_collate)
    reversed_labels = [2 - label for _, label in data['splits']['validation']]
    assert [label for _, label in _items(loader)] == images.targets == reversed_labels


@pytest.mark.parametrize('spec, package', [('hfds/x', 'datasets'), ('hfids/x', 'datasets'), ('wds/x', 'webdataset')])
def test_missing_extra_is_a_user_error(monkeypatch, spec, package):
    monkeypatch.setitem(sys.modules, package, None)
    with pytest.raises(UserError, match=rf"{package}.*pip install 'ssa-timm\[data\]'"):
        build_timm_dataset(spec, 'train')


def test_user_errors_name_the_path_or_split(data, tmp_path):
    cache = data['cache']
    for spec in (f'hfds/{tmp_path / "nope"}', f'hfids/{tmp_path / "nope"}', f'wds/{tmp_path / "nope"}'):
        with pytest.raises(UserError, match='nope'):
            build_timm_dataset(spec, 'train', data_dir=cache if 'hf' in spec else None)
    for spec in (f'hfds/{data["hf"]}', f'hfids/{data["hf"]}', f'wds/{data["wds"]}'):
        with pytest.raises(UserError, match="'val'"):
            build_timm_dataset(spec, 'val', data_dir=cache if 'hf' in spec else None)
    with pytest.raises(UserError, match='tensorflow-datasets'):
        build_timm_dataset('tfds/cifar10', 'train')
    with pytest.raises(UserError, match='_info.json'):
        build_timm_dataset(f'wds/{data["hf"]}', 'train')
    with pytest.raises(UserError, match="'category'"):
        build_timm_dataset(f'hfds/{data["hf"]}', 'train', data_dir=cache, target_key='category')
    with pytest.raises(UserError, match="'img'"):
        build_timm_dataset(f'hfids/{data["hf"]}', 'train', data_dir=cache, input_key='img')
    with pytest.raises(UserError, match='class map'):
        build_timm_dataset(f'wds/{data["wds"]}', 'train', class_map=str(tmp_path / 'none.txt'))


TRAIN_ARGS = ['--model', 'ssanet_test_resnet_plus', '--no-pretrained', '--img-size', '32', '--batch-size', '4',
              '--workers', '0', '--epochs', '1']
OFFLINE = {'HF_DATASETS_OFFLINE': '1'}


def spec_args(data: dict, kind: str) -> list:
    if kind == 'wds':
        return ['--dataset', f'wds/{data["wds"]}']
    return ['--dataset', f'{kind}/{data["hf"]}', '--data-dir', data['cache']]


@pytest.fixture
def offline(monkeypatch):
    """The datasets library offline, as ``HF_DATASETS_OFFLINE=1`` sets it at import."""
    import datasets.config
    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(datasets.config, 'HF_DATASETS_OFFLINE', True)


@pytest.mark.parametrize('kind', ['hfds', 'hfids', 'wds'])
def test_train_and_evaluate_through_timm_specs(data, tmp_path, kind, offline):
    out = tmp_path / 'run'
    assert run_main('train', *TRAIN_ARGS, *spec_args(data, kind), '--output-dir', str(out)) == 0
    line = json.loads((out / 'metrics.jsonl').read_text())
    assert line['val']['count'] == 9 and line['step'] == 6  # every validation image once; 24 / 4 steps
    config = json.loads((out / 'best' / 'config.json').read_text())
    assert config['label_names'] == CLASSES and config['training']['dataset'] == spec_args(data, kind)[1]
    report = tmp_path / 'eval.json'
    assert run_main('evaluate', '--model', str(out / 'best'), *spec_args(data, kind), '--workers', '0',
                    '--output', str(report)) == 0
    evaluated = json.loads(report.read_text())
    assert evaluated['count'] == 9 and evaluated['output']['top1'] == pytest.approx(line['val']['output']['top1'])


def test_streams_refuse_what_they_cannot_resume(data, tmp_path, offline, capsys):
    assert run_main('train', *TRAIN_ARGS, *spec_args(data, 'wds'), '--freeze-body', '--cache-features',
                    '--output-dir', str(tmp_path / 'b')) == 1
    assert '--cache-features needs a map-style dataset' in capsys.readouterr().err
    assert run_main('train', *TRAIN_ARGS, *spec_args(data, 'hfids'), '--checkpoint-steps', '2',
                    '--output-dir', str(tmp_path / 'c')) == 1
    assert 'a streamed dataset (hfids/' in capsys.readouterr().err


def _id_rows(count: int, first: int) -> Rows:
    """Images whose first pixel encodes their id (red + 256 * green), labels cycling over 3 classes."""
    return [(((first + i) % 256, (first + i) // 256, 0), i % 3) for i in range(count)]


@pytest.mark.slow
def test_two_processes_see_each_sample_once(tmp_path):
    """2 processes (gloo) read hfids/ and wds/ streams as train.py does, with 0 and 2 loader workers:
    in an epoch every training sample is seen once and every validation sample counted once, and the
    processes take the same number of steps."""
    splits = {'train': _id_rows(48, 0), 'validation': _id_rows(9, 100)}
    hf = _write_hf(tmp_path / 'hf', splits, CLASSES, files=2)
    wds = _write_wds(tmp_path / 'wds', splits, {'name': 'ids', 'classes': CLASSES}, shards=4)
    run_python(str(Path(__file__).parent / 'stream_shares.py'), str(hf), str(tmp_path / 'cache'), str(wds),
               str(tmp_path), env=OFFLINE, launcher=TWO_CPU_PROCESSES)
    ranks = [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in (0, 1)]
    assert ranks[0]['uneven'] == ranks[1]['uneven'] == 3
    train_ids, val_ids = set(range(48)), set(range(100, 109))
    for key in ranks[0]:
        if key == 'uneven':
            continue
        batches = [rank[key] for rank in ranks]
        seen = [i for rank in batches for batch in rank for i in batch]
        assert len(seen) == len(set(seen)), f'{key}: a sample was seen twice'
        if 'training=False' in key:
            assert set(seen) == val_ids, key  # the last, partial batches included
            continue
        assert len(batches[0]) == len(batches[1]), f'{key}: the processes took different numbers of steps'
        assert all(len(batch) == 4 for rank in batches for batch in rank)
        if 'group=1' in key:
            assert set(seen) == train_ids, key  # 24 per process, whole batches: nothing dropped
        else:  # gradient accumulation over 4 batches: one window of 4 of each process's 6 batches
            assert len(batches[0]) == 4 and set(seen) < train_ids, key


@pytest.mark.slow
def test_two_process_training_and_evaluation_on_a_stream(tmp_path):
    # 23 training images: 12 on one process (3 batches of 4), 11 on the other (2 batches): both take 2
    # steps an epoch, and a --max-steps at the end of the second epoch ends it on both
    wds = _write_wds(tmp_path / 'wds', {'train': _id_rows(23, 0), 'validation': _id_rows(9, 100)},
                     {'name': 'odd', 'classes': CLASSES}, shards=3)
    out = tmp_path / 'run'
    args = [*TRAIN_ARGS[:-2], '--dataset', f'wds/{wds}']
    run_recipe('train.py', '--cpu', *args, '--epochs', '3', '--max-steps', '4', '--output-dir', str(out), env=OFFLINE,
               launcher=TWO_CPU_PROCESSES)
    lines = [json.loads(text) for text in (out / 'metrics.jsonl').read_text().splitlines()]
    assert [(line['epoch'], line['step'], line['val']['count']) for line in lines] == [(0, 2, 9), (1, 4, 9)]
    line = max(lines, key=lambda line: line['val']['output']['top1'])
    report = tmp_path / 'eval.json'
    run_recipe('evaluate.py', '--cpu', '--model', str(out / 'best'), '--dataset', f'wds/{wds}', '--workers', '0',
               '--output', str(report), env=OFFLINE, launcher=TWO_CPU_PROCESSES)
    evaluated = json.loads(report.read_text())
    assert evaluated['count'] == 9 and evaluated['output']['top1'] == pytest.approx(line['val']['output']['top1'])


def test_timm_specs_read_images_through_the_one_loader(tmp_path, monkeypatch):
    """A 16-bit PNG in a parquet dataset and in WebDataset shards: scaled to 8 bits (timm's own
    convert('RGB') would clip it to white), as every other image path does."""
    import numpy as np
    module = sys.modules[__name__]

    def png16(colour: Tuple[int, int, int]) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.full((16, 16), colour[0] * 257, dtype=np.uint16)).save(buf, format='PNG')
        return buf.getvalue()
    monkeypatch.setattr(module, '_png', png16)
    splits = {'train': [((100, 0, 0), 0), ((20, 0, 0), 1)]}
    hf = _write_hf(tmp_path / 'hf', splits, ['a', 'b'])
    wds = _write_wds(tmp_path / 'wds', splits, {'name': 'deep', 'classes': ['a', 'b']}, shards=1)
    for spec in (f'hfds/{hf}', f'hfids/{hf}', f'wds/{wds}'):
        images = build_timm_dataset(spec, 'train', data_dir=str(tmp_path / 'cache'))
        pixels = sorted(img.getpixel((0, 0)) for img, _ in images)
        assert pixels == [(20, 20, 20), (100, 100, 100)], spec
