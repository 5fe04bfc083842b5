"""The slow tier, grids (``recipes/ablation.py``): the same grid trained one run at a time, two at once
(``--jobs 2``), in two shards and as a job array through submitit's local executor gives the same tables;
``--report`` builds them from the folders and names the runs still missing."""
import json
import time
from pathlib import Path

import pytest

from recipe_runs import TINY_TRAIN, run_main

pytestmark = pytest.mark.slow

SMALL = [a for a in TINY_TRAIN if a not in ('--model', 'ssanet_test_resnet_plus')]
# two runs: plus, Self-AD, seeds 0 and 1; one CPU thread per run whatever runs beside it
GRID = ['--body', 'test_resnet', '--seeds', '0,1', '--variants', 'plus', '--losses', 'ad', '--epochs', '1',
        '--threads-per-run', '1', *SMALL]


def ablation(out: Path, *extra: str) -> int:
    return run_main('ablation', *GRID, '--output-dir', str(out), *extra)


def table_of(out: Path) -> tuple:
    result = json.loads((out / 'ablation.json').read_text())
    return (out / 'ablation.md').read_text(), sorted((r['variant'], r['seed'], r['top1']) for r in result['runs'])


@pytest.fixture(scope='module')
def one_at_a_time(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp('jobs1')
    assert ablation(out) == 0
    return out


def test_two_runs_at_once_give_the_table_of_one_at_a_time(one_at_a_time, tmp_path, capsys):
    assert ablation(tmp_path, '--jobs', '2') == 0
    assert table_of(tmp_path) == table_of(one_at_a_time) and len(table_of(tmp_path)[1]) == 2
    err = capsys.readouterr().err
    assert 'grid: 100%' in err and '2/2' in err  # the grid's progress line
    figures = sorted(p.name for p in (tmp_path / 'figures').glob('*.png'))
    assert figures == ['table2_top1.png']


def test_two_shards_then_the_report_give_the_one_machine_table(one_at_a_time, tmp_path, capsys):
    assert ablation(tmp_path, '--shard', '1/2') == 0
    out = capsys.readouterr().out
    assert 'missing (1 of 2 runs, not in the tables): plus_ad_seed1' in out  # every 2nd run
    assert ablation(tmp_path, '--report') == 0  # trains nothing
    assert not (tmp_path / 'plus_ad_seed1').exists()
    assert ablation(tmp_path, '--shard', '2/2') == 0
    capsys.readouterr()
    assert ablation(tmp_path, '--report') == 0
    assert 'missing' not in capsys.readouterr().out
    assert table_of(tmp_path) == table_of(one_at_a_time)
    # a run started with other flags is named and left out, not mixed in
    record = tmp_path / 'plus_ad_seed1' / 'grid_run.json'
    record.write_text(json.dumps({'train_args': ['--lr', '0.5']}))
    assert ablation(tmp_path, '--report') == 0
    assert 'left out, started with other train.py flags (grid_run.json): plus_ad_seed1' in capsys.readouterr().out
    assert len(json.loads((tmp_path / 'ablation.json').read_text())['runs']) == 1


def test_a_job_array_through_submitits_local_executor(one_at_a_time, tmp_path, capsys):
    """The SLURM submission path, run on this machine: submits and returns; the array trains every run."""
    pytest.importorskip('submitit')
    assert ablation(tmp_path, '--slurm-partition', 'any', '--submitit-cluster', 'local') == 0
    assert 'submitted 2 run(s) of 2 as one job array' in capsys.readouterr().out
    end = time.monotonic() + 600
    while len(list(tmp_path.glob('*/best/model.safetensors'))) < 2 or list(tmp_path.glob('*/.lock')):
        assert time.monotonic() < end, sorted(p.name for p in (tmp_path / 'submitit').glob('*'))
        time.sleep(1)
    time.sleep(1)
    assert ablation(tmp_path, '--report') == 0
    assert table_of(tmp_path) == table_of(one_at_a_time)
