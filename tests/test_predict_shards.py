"""Prediction over many processes, in-process: shares of the inputs (each path once, in order), part
files merged in rank order (one CSV header, one JSON list, atomically, parts removed; a failed merge
keeps the parts), the device of a launched process, and the recipe's per-process steps run one rank
after another here, merged into the file of a one-process run. tests/e2e/test_predict_processes.py
runs the same under ``accelerate launch``."""
import csv
import errno
import io
import json
from pathlib import Path

import pytest
import torch
from dataset_layouts import write_image
from recipe_runs import recipe, run_main

import ssa_timm
from ssa_timm.errors import UserError
from ssa_timm.hub import export_model
from ssa_timm.prediction import (ImageFiles, collate_images, launched_world_size, merge_json_lines, merge_parts,
                                 part_path, part_paths, process_device, shard, shard_bounds)


@pytest.fixture(scope='module')
def tiny(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = ssa_timm.create_ssanet_by_name('ssanet_test_resnet_plus', num_classes=3, img_size=32)
    return export_model(model, str(tmp_path_factory.mktemp('tiny') / 'best'), ['ant', 'bee', 'cat'])


@pytest.fixture(scope='module')
def images(tmp_path_factory) -> Path:
    """Seven images, one of them in a subfolder, and an unreadable file among them (8 paths)."""
    folder = tmp_path_factory.mktemp('images')
    for i in range(7):
        write_image(folder / ('sub' if i == 3 else '') / f'img_{i}.png', i)
    (folder / 'img_4b.jpg').write_bytes(b'\xff\xd8 not a jpeg')
    return folder


def test_shares_hold_every_item_once_in_order():
    for count in range(12):
        items = list(range(count))
        for world in range(1, 6):
            shares = [shard(items, rank, world) for rank in range(world)]
            assert sum(shares, []) == items
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
            assert [len(s) for s in shares] == sorted((len(s) for s in shares), reverse=True)  # larger first
    assert shard_bounds(9, 0, 2) == (0, 5) and shard_bounds(9, 1, 2) == (5, 9)
    for rank, world in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(ValueError):
            shard_bounds(3, rank, world)


def test_part_files_and_devices(monkeypatch):
    out = Path('/data/p.jsonl')
    assert part_paths(out, 2) == [Path('/data/p.jsonl.part-0-of-2'), Path('/data/p.jsonl.part-1-of-2')]
    assert part_path(out, 1, 2) == part_paths(out, 2)[1]
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    assert launched_world_size() == 1
    monkeypatch.setenv('WORLD_SIZE', '3')
    assert launched_world_size() == 3
    own = torch.device('cuda', 1)
    assert process_device(None, own) == 'cuda:1' and process_device('cuda', own) == 'cuda:1'
    assert process_device('cuda:0', own) == 'cuda:0' and process_device('cpu', own) == 'cpu'
    assert process_device(None, torch.device('cpu')) == 'cpu'


def write_parts(tmp_path: Path, texts) -> list:
    parts = part_paths(tmp_path / 'out', len(texts))
    for part, text in zip(parts, texts):
        part.write_text(text, newline='')
    return parts


def test_merge_parts_concatenates_in_rank_order_with_one_header(tmp_path):
    out = tmp_path / 'out'
    out.write_text('an older result')
    parts = write_parts(tmp_path, ['h\r\na,1\r\nb,1\r\n', 'h\r\n', 'h\r\nc,1\r\n'])
    merge_parts(parts, out, header_lines=1)
    assert out.read_bytes() == b'h\r\na,1\r\nb,1\r\nc,1\r\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out']  # parts removed, no temporary file
    merge_parts(write_parts(tmp_path, ['{"a": 1}\n', '{"b": 2}\n']), out)
    assert out.read_text() == '{"a": 1}\n{"b": 2}\n'


def test_merge_json_lines_is_the_json_list_of_the_records(tmp_path):
    records = [dict(image='a "b"\n.png', top=[dict(label='é', index=0, prob=0.1 + 0.2)]), dict(image='c', top=[]), {}]
    lines = [json.dumps(r) + '\n' for r in records]
    merge_json_lines(write_parts(tmp_path, [lines[0], '', ''.join(lines[1:])]), tmp_path / 'out')
    assert (tmp_path / 'out').read_text() == json.dumps(records, indent=1) + '\n'
    merge_json_lines(write_parts(tmp_path, ['', '']), tmp_path / 'out')
    assert (tmp_path / 'out').read_text() == '[]\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out']


def test_a_failed_merge_keeps_the_parts_and_the_output(tmp_path, monkeypatch):
    import shutil
    out = tmp_path / 'out'
    out.write_text('an older result')
    parts = write_parts(tmp_path, ['x\n', 'y\n'])

    def fills_up(source, target):
        target.write(b'x')
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(shutil, 'copyfileobj', fills_up)
    with pytest.raises(UserError) as failed:
        merge_parts(parts, out)
    assert str(failed.value) == (f'cannot write --output {out}: No space left on device '
                                 f'(the results stay in {parts[0]}, {parts[1]})')
    assert out.read_text() == 'an older result' and all(p.is_file() for p in parts)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out', *(p.name for p in parts)]  # no temporary file
    parts[1].unlink()
    with pytest.raises(UserError, match=f'part file\\(s\\) {parts[1]} missing'):
        merge_json_lines(parts, out)


def test_image_files_batches_skip_unreadable_files(images):
    paths = sorted(images.rglob('*.*'))
    batches = list(torch.utils.data.DataLoader(ImageFiles(paths, lambda img: torch.tensor(img.size)), batch_size=3,
                                               collate_fn=collate_images))
    indices = sum((b[0] for b in batches), [])
    assert [paths[i].name for i in indices] == [p.name for p in paths if p.suffix == '.png']
    assert batches[0][1].tolist() == [[40, 30]] * 3
    (bad, message), = sum((b[2] for b in batches), [])
    assert paths[bad].name == 'img_4b.jpg' and message.startswith(f'cannot read image {paths[bad]}')


def rows(path: Path, fmt: str) -> list:
    """``(image, rank, label, index, prob)`` of every image and rank in a csv or json file; table lines."""
    text = path.read_text()
    if fmt == 'csv':
        return [(r['image'], int(r['rank']), r['label'], int(r['index']), float(r['prob']))
                for r in csv.DictReader(io.StringIO(text))]
    if fmt == 'json':
        return [(r['image'], rank, t['label'], t['index'], t['prob'])
                for r in json.loads(text) for rank, t in enumerate(r['top'], 1)]
    return text.splitlines()


def assert_same_rows(a: list, b: list) -> None:
    """Equal rows, probabilities up to float rounding (the batches differ)."""
    assert [r[:-1] for r in a] == [r[:-1] for r in b] and len(a) > 0
    assert [r[-1] for r in a] == pytest.approx([r[-1] for r in b], abs=1e-6)


@pytest.mark.parametrize('fmt', ['csv', 'json', 'table'])
def test_shares_of_three_processes_merge_into_the_one_process_file(tiny, images, tmp_path, capsys, fmt):
    """The recipe's per-process steps (each its share, 2 loader workers, batches of 2) run here for ranks
    0, 1, 2 in turn: the merged file equals a one-process run's, with one CSV header and one JSON list."""
    predict = recipe('predict')
    one = tmp_path / f'one.{fmt}'
    assert run_main('predict', '--model', str(tiny), str(images), '--format', fmt, '--output', str(one)) == 0
    out = tmp_path / f'three.{fmt}'
    args = predict.parse_args(['--model', str(tiny), str(images), '--format', fmt, '--output', str(out),
                               '--workers', '2', '--batch-size', '2', '--device', 'cpu'])
    paths = ssa_timm.data.find_images([str(images)])
    shares = [predict.predict_share(args, shard(paths, r, 3), part_path(out, r, 3), r == 0) for r in range(3)]
    assert [count for count, _ in shares] == [3, 2, 2]  # of 3 + 3 + 2 paths: img_4b.jpg is rank 1's
    skipped = sum((s for _, s in shares), [])
    assert skipped == [str(images / 'img_4b.jpg')] and 'warning: skipping cannot read image' in capsys.readouterr().err
    predict.merge(args, out, 3, 7, paths, skipped)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([one.name, out.name])  # parts removed
    if fmt == 'table':
        assert rows(out, fmt) == rows(one, fmt)
    else:
        assert_same_rows(rows(out, fmt), rows(one, fmt))


def test_a_launched_run_needs_an_output_and_one_readable_image(tiny, images, tmp_path, monkeypatch, capsys):
    predict = recipe('predict')
    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.setattr(predict, 'load_model', lambda *a, **k: pytest.fail('the model was loaded first'))
    assert run_main('predict', '--model', str(tiny), str(images)) == 1
    assert capsys.readouterr().err.strip() == ('error: give --output when predicting on 2 processes: each process '
                                               'writes its part next to it, merged into it at the end')
    out = tmp_path / 'p.csv'
    args = predict.parse_args(['--model', str(tiny), str(images), '--format', 'csv', '--output', str(out)])
    for part in part_paths(out, 2):
        part.write_text('image,rank,label,index,prob\r\n')
    with pytest.raises(UserError, match='none of the 8 image file'):
        predict.merge(args, out, 2, 0, list(range(8)), ['a.png'])
    assert list(tmp_path.iterdir()) == []  # the parts removed, no output


@pytest.mark.parametrize('fmt', ['jsonl', 'json'])
def test_an_interrupted_share_keeps_its_whole_records(tiny, images, tmp_path, monkeypatch, capsys, fmt):
    predict = recipe('predict')
    real, seen = predict.load_image, []

    def load_then_interrupt(path):
        if len(seen) == 2:
            raise KeyboardInterrupt
        seen.append(path)
        return real(path)

    monkeypatch.setattr(predict, 'load_image', load_then_interrupt)
    part = part_path(tmp_path / f'p.{fmt}', 1, 2)
    args = predict.parse_args(['--model', str(tiny), str(images), '--format', fmt, '--output', str(tmp_path / 'p'),
                               '--batch-size', '1', '--device', 'cpu'])
    with pytest.raises(SystemExit) as stopped:
        predict.predict_share(args, sorted(images.glob('*.png')), part, False)
    assert stopped.value.code == 130
    if fmt == 'json':  # a json part is never a result on its own
        assert not part.exists() and capsys.readouterr().err.strip() == 'interrupted after 2 image(s)'
    else:
        assert [json.loads(line)['image'] for line in part.read_text().splitlines()] == seen
        assert capsys.readouterr().err.strip() == f'interrupted after 2 image(s); {part} holds their results'
