"""Grids of runs (``ssa_timm.grid``, ``recipes/ablation.py``) without training: which runs a grid holds and
with which flags, how shards split it, what the folders say (finished, missing, started with other flags),
and the figures of a grid's rows."""
import json
from pathlib import Path

import pytest

from ssa_timm.grid import Grid, GridRun, collect, grid_configs, parse_shard, shard
from ssa_timm.grid_report import PAPER_TABLE2_CUB, PAPER_TABLE3_CUB, figures


def grid(tmp_path: Path, **kwargs) -> Grid:
    settings = grid_configs(['no_attention', 'plus'], ['ad'], ['qk-norm'])
    return Grid(tmp_path, Path('train.py'), 'resnet18', seeds=(0, 1), configs=tuple(settings), epochs=1, **kwargs)


def test_configs_cover_tables_2_and_3_and_the_remedies():
    settings = grid_configs(list(PAPER_TABLE2_CUB), ['ad', 'ce'], ['qk-norm'], PAPER_TABLE3_CUB)
    assert [c for c in settings if c[1] == 'ad' and not c[2]] == [(v, 'ad', '') for v in PAPER_TABLE2_CUB]
    assert [c[0] for c in settings if c[1] == 'ce' and not c[2]] == list(PAPER_TABLE3_CUB)
    assert [c for c in settings if c[2]] == [('plus', 'ad', 'qk-norm'), ('plus', 'ce', 'qk-norm')]


def test_rows_without_a_remedy_train_the_papers_attention(tmp_path):
    """The modern names default to qk_norm: the grid's paper rows ask for the paper's attention themselves."""
    g = grid(tmp_path, regime='transfer')
    flags = {run.name: g.flags(run) for run in g.runs()}
    assert '--no-qk-norm' in flags['plus_ad_seed0'] and '--no-qk-norm' in flags['no_attention_ad_seed1']
    assert '--qk-norm' in flags['plus_qk-norm_ad_seed0'] and '--no-qk-norm' not in flags['plus_qk-norm_ad_seed0']
    # the transfer runs share one cache folder and the body pretrained once
    assert all(f[f.index('--cache-dir') + 1] == str(tmp_path / 'feature_cache') for f in flags.values())
    assert all(f[f.index('--pretrained-path') + 1] == str(g.body_weights) for f in flags.values())


def test_a_settings_options_are_train_flags_and_finetune_trains_the_pretrained_body(tmp_path):
    configs = (('plus', 'ad', 'qk-norm+zoom'), ('plus', 'ad', 'zoom'), ('no_attention', 'ad', 'builtin-oracle-crop'),
               ('plus', 'ad', 'alpha-init=1'))
    g = Grid(tmp_path, Path('train.py'), 'resnet18', seeds=(0,), configs=configs, regime='finetune')
    flags = {run.name: g.flags(run) for run in g.runs()}
    assert set(flags) == {'plus_qk-norm+zoom_ad_seed0', 'plus_zoom_ad_seed0', 'plus_alpha-init=1_ad_seed0',
                          'no_attention_builtin-oracle-crop_ad_seed0'}
    assert flags['plus_qk-norm+zoom_ad_seed0'][-8:-5] == ['--qk-norm', '--zoom', '--pretrained-path']
    assert {'--zoom', '--no-qk-norm'} <= set(flags['plus_zoom_ad_seed0'])
    assert {'--alpha-init=1', '--no-qk-norm'} <= set(flags['plus_alpha-init=1_ad_seed0'])
    # fine-tuned: the pretrained body, trained (not frozen, no cache)
    for run_flags in flags.values():
        assert run_flags[run_flags.index('--pretrained-path') + 1] == str(g.body_weights)
        assert '--freeze-body' not in run_flags and '--cache-features' not in run_flags
    assert g.pretrains and not Grid(tmp_path, Path('train.py'), 'resnet18').pretrains


def test_a_settings_table_lists_the_chosen_settings_with_the_boxes(tmp_path):
    from ssa_timm.grid_report import tables
    configs = (('plus', 'ad', ''), ('plus', 'ad', 'zoom'))
    g = Grid(tmp_path, Path('train.py'), 'resnet18', seeds=(0, 1), configs=configs, epochs=1)
    for run, top1 in zip(g.runs(), (40.0, 50.0, 44.0, 60.0)):
        finish(g, run, top1)
    rows, missing, _ = collect(g)
    text = tables(rows, [0, 1], 'scene', list(configs))
    lines = [line for line in text.splitlines() if line.startswith('| plus')]
    assert lines[0].startswith('| plus | ad | 42.0 ± 2.8 | 40.0 / 44.0 |')
    assert lines[1].startswith('| plus --zoom | ad | 55.0 ± 7.1 | 50.0 / 60.0 |')
    assert 'zoom box IoU | zoom box hit | Grad-CAM box IoU | Grad-CAM box hit' in text
    assert lines[1].endswith('| 0.30 | 1.00 | 0.20 | 0.90 |') and not missing


def test_ablation_refuses_settings_that_are_no_variant_or_no_flag(capsys):
    from recipe_runs import run_main
    assert run_main('ablation', '--settings', 'plus,pluss+zoom', '--report') == 2
    assert "'pluss' is not among the variants" in capsys.readouterr().err
    assert run_main('ablation', '--settings', 'plus+--zoom', '--report') == 2
    assert 'not train.py flags without their dashes' in capsys.readouterr().err
    assert run_main('ablation', '--settings', 'plus+pretrained-path=a/b', '--report') == 2
    assert 'a value holds no /' in capsys.readouterr().err
    assert run_main('ablation', '--settings', 'plus+seed=3', '--report') == 2
    assert "['seed=3'] are set by the grid itself" in capsys.readouterr().err
    assert run_main('ablation', '--settings', 'plus', '--remedies', 'qk-norm', '--report') == 2
    assert '--settings replaces --variants and --remedies' in capsys.readouterr().err


def test_shards_split_the_grid_into_disjoint_parts_that_cover_it(tmp_path):
    runs = grid(tmp_path).runs()
    parts = [shard(runs, k, 4) for k in (1, 2, 3, 4)]
    assert sorted(r.name for p in parts for r in p) == sorted(r.name for r in runs) and len(runs) == 6
    assert parse_shard('2/4') == (2, 4)
    for bad in ('0/4', '5/4', '2', 'a/b', '-1/3'):
        with pytest.raises(ValueError, match='expected K/N'):
            parse_shard(bad)


def finish(g: Grid, run: GridRun, top1: float, flags=None, epochs: int = 1) -> None:
    """A run folder as a finished run leaves it."""
    folder = g.folder(run)
    folder.mkdir(parents=True)
    (folder / 'grid_run.json').write_text(json.dumps({'train_args': flags or g.flags(run)}))
    val = {'heads': {'ssa': {'top1': top1}, 'fe': {'top1': top1}}, 'output': {'top1': top1},
           'localization': {'in_box_mass': top1 / 100, 'box_share': 0.1, 'pointing_cam': 1, 'pointing_attention': 1,
                            'zoom_iou': 0.3, 'zoom_hit': 1.0, 'cam_box_iou': 0.2, 'cam_box_hit': 0.9}}
    (folder / 'metrics.jsonl').write_text(''.join(json.dumps({'epoch': e, 'val': val}) + '\n' for e in range(epochs)))


def test_collect_names_missing_runs_and_leaves_out_runs_of_other_flags(tmp_path):
    g = grid(tmp_path)
    runs = g.runs()
    finish(g, runs[0], 50.0)
    finish(g, runs[1], 60.0, flags=['--lr', '9'])  # started by another grid
    g.folder(runs[2]).mkdir()  # started, no epoch finished yet
    (g.folder(runs[2]) / 'grid_run.json').write_text(json.dumps({'train_args': g.flags(runs[2])}))
    rows, missing, mismatched = collect(g)
    assert [(r['variant'], r['seed'], r['top1']) for r in rows] == [(runs[0].variant, 0, 50.0)]
    assert mismatched == [runs[1].name]
    assert missing == [r.name for r in runs[2:]]


def test_figures_have_one_point_per_run(tmp_path):
    pytest.importorskip('matplotlib')
    g = grid(tmp_path)
    for n, run in enumerate(g.runs()):
        finish(g, run, 40.0 + n)
    rows, _, _ = collect(g)
    written = figures(rows, 'test grid', tmp_path / 'figures')
    assert sorted(p.name for p in written) == ['remedies_inbox.png', 'remedies_top1.png', 'table2_inbox.png',
                                               'table2_top1.png']
    assert all(p.stat().st_size > 1000 for p in written)


def test_the_figures_plot_every_run(tmp_path):
    pytest.importorskip('matplotlib')
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.collections import PathCollection

    from ssa_timm.grid_report import inbox_plot, strip_plot
    runs = [[{'top1': 50.0 + i, 'localization': {'in_box_mass': 0.1 * i}} for i in range(k)] for k in (3, 5)]
    settings = [('plus', 'ad', ''), ('plus', 'ad', 'qk-norm')]
    for plot in (strip_plot, inbox_plot):
        fig = plot(plt, settings, runs, 'title')
        points = sum(len(c.get_offsets()) for c in fig.axes[0].collections if isinstance(c, PathCollection))
        plt.close(fig)
        assert points == 8, plot.__name__


def test_a_record_cut_short_is_a_run_still_missing(tmp_path):
    g = grid(tmp_path)
    run = g.runs()[0]
    g.folder(run).mkdir(parents=True)
    (g.folder(run) / 'grid_run.json').write_text('{"train_args": ["--ep')
    _, missing, mismatched = collect(g)
    assert run.name in missing and not mismatched


def test_tables_name_missing_seeds_and_measures_no_run_had(tmp_path):
    from ssa_timm.grid_report import tables
    g = grid(tmp_path)
    runs = g.runs()
    for run in runs[:4]:  # seed 1's plus runs are missing
        finish(g, run, 50.0 + run.seed)
    rows, _, _ = collect(g)
    for r in rows:  # boxes over a whole coarse map: nothing measured
        r['localization'] = dict(r['localization'], in_box_mass=None, box_share=None, pointing_cam=None,
                                 pointing_attention=None)
    text = tables(rows, [0, 1], 'test')
    assert '| plus | 50.0 ± 0.0 | 50.0 / - |' in text and '| no_attention | 50.5 ± 0.7 | 50.0 / 51.0 |' in text
    assert '| - (-) | - | - |' in text


def test_slots_pin_gpus_only_with_several_jobs_and_keep_the_visible_ones(monkeypatch):
    from ssa_timm.grid import _slot_env, visible_gpus
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '2,3')
    assert visible_gpus(2) == ['2', '3']
    assert _slot_env(1, 4, visible_gpus(2))['CUDA_VISIBLE_DEVICES'] == '3'
    env = _slot_env(0, None, [])
    assert env['CUDA_VISIBLE_DEVICES'] == '2,3' and env.get('OMP_NUM_THREADS') == __import__('os').environ.get(
        'OMP_NUM_THREADS')


def test_an_array_task_checkpoint_stops_train_py_and_resubmits(tmp_path):
    """What submitit calls on preemption: train.py (here a stand-in that exits on SIGTERM) is stopped, the
    task comes back as a new submission of the same run."""
    import subprocess
    import sys

    from ssa_timm.grid import _ArrayTask
    g = grid(tmp_path)
    task = _ArrayTask(g, g.runs()[0])
    child = subprocess.Popen([sys.executable, '-c', 'import signal, sys, time\n'
                              'signal.signal(signal.SIGTERM, lambda *a: sys.exit(3))\nprint(1, flush=True)\n'
                              'time.sleep(60)'], stdout=subprocess.PIPE)
    child.stdout.readline()  # its handler is in place
    task._started.append(child)
    again = task.checkpoint()
    assert child.wait(timeout=5) == 3
    assert again.function.run == task.run and again.function is not task
