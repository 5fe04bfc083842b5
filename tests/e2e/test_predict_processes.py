"""predict.py under ``accelerate launch`` with two CPU processes (gloo): each process predicts its share
of a folder into a part file and the main process merges the parts into one file equal to a
one-process run's. The merge of CSV, JSON and table parts is checked in-process in
tests/test_predict_shards.py; here, the process boundary (one launch, to keep the slow tier short)."""
import json
from pathlib import Path

import pytest
import torch
from dataset_layouts import write_image
from recipe_runs import TWO_CPU_PROCESSES, run_main, run_recipe

import ssa_timm
from ssa_timm.hub import export_model

pytestmark = pytest.mark.slow


def records(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_processes_write_the_file_of_one(tmp_path, capsys):
    torch.manual_seed(0)
    model = ssa_timm.create_ssanet_by_name('ssanet_test_resnet_plus', num_classes=3, img_size=32)
    tiny = export_model(model, str(tmp_path / 'model'), ['ant', 'bee', 'cat'])
    folder = tmp_path / 'images'
    for i in range(8):  # and an unreadable file: 9 paths, shares of 5 and 4
        write_image(folder / ('sub' if i % 3 == 0 else '') / f'img_{i}.png', i)
    broken = folder / 'sub' / 'img_9b.jpg'
    broken.write_bytes(b'\xff\xd8 not a jpeg')
    one = tmp_path / 'one.jsonl'
    assert run_main('predict', '--model', str(tiny), str(folder), '--format', 'jsonl', '--output', str(one)) == 0
    out = tmp_path / 'out' / 'two.jsonl'
    proc = run_recipe('predict.py', '--model', str(tiny), str(folder), '--device', 'cpu', '--format', 'jsonl',
                      '--output', str(out), '--batch-size', '2', '--workers', '1', launcher=TWO_CPU_PROCESSES)
    # img_1, img_2, img_4, img_5, img_7 | sub/img_0, sub/img_3, sub/img_6, sub/img_9b.jpg (skipped)
    assert '8 image(s) predicted on 2 processes (5, 3); merged into' in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count(f'warning: skipping cannot read image {broken}') == 1
    assert proc.stderr.count(f'skipped 1 unreadable image(s): {broken}') == 1
    assert sorted(p.name for p in out.parent.iterdir()) == ['two.jsonl']  # parts removed, no temporary file
    two, expected = records(out), records(one)
    assert [r['image'] for r in two] == [r['image'] for r in expected] and len(two) == 8
    for got, want in zip(two, expected):
        assert [(t['label'], t['index']) for t in got['top']] == [(t['label'], t['index']) for t in want['top']]
        assert [t['prob'] for t in got['top']] == pytest.approx([t['prob'] for t in want['top']], abs=1e-6)
