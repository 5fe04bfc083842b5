"""Regenerate the paper's ablations: Table 2 (the five aggregation variants) and Table 3 (CE on both
heads vs Self-AD) by training each configuration with recipes/train.py, each in its own process;
with ``--remedies`` also ``plus`` with attention options the paper lacks (``--qk-norm``, ``--scale-attn``,
``--sagan-qk``).

``--regime scratch`` (the default) trains every run's body from scratch. ``--regime transfer`` is the
paper's regime on the built-in data: a body is first trained once on another glyph family
(``--builtin-family 1``, no attention), saved, then frozen for every run on family 0, whose SSA
module and heads train from the cached body maps (``--pretrained-path --freeze-body
--cache-features``). ``--builtin-task scene`` (passed on to train.py) runs both regimes on the built-in
scene task, whose ground-truth part boxes add the localisation columns: the attention's in-box mass
beside uniform attention's (the box's share of positions) and the pointing game of Grad-CAM and of the
most attended position (``ssa_timm.localization``).

    python recipes/ablation.py --seeds 0,1,2                    # built-in dataset, small body
    python recipes/ablation.py --seeds 0,1,2 --variants no_attention,plus --losses ad --remedies qk-norm,scale-attn
    python recipes/ablation.py --regime transfer --seeds 0,1,2 --variants no_attention,plus,multiply,no_alpha \
        --remedies qk-norm,scale-attn --epochs 10            # the paper's regime, frozen pretrained body
    python recipes/ablation.py --builtin-task scene --builtin-train-per-class 200 --seeds 0,1,2,3,4 \
        --variants no_attention,plus,no_alpha --losses ad --remedies scale-attn,qk-norm,sagan-qk \
        --sched cosine --workers 0   # the scene task: a part to find, localisation columns (docs/results.md)
    python recipes/ablation.py --body vgg16 --dataset cub --launcher "accelerate launch --multi_gpu" \
        --data-dir /data/CUB_200_2011                           # other flags go to train.py

``--settings`` replaces ``--variants`` and ``--remedies`` with one table of chosen settings, each a variant
and train.py flags (the zoom's evidence in docs/results.md; ``--regime finetune`` trains the pretrained
body in every run instead of freezing it):

    python recipes/ablation.py --builtin-task scene --builtin-part-cell 1 --builtin-train-per-class 200 \
        --regime transfer --epochs 10 --pretrain-epochs 10 --losses ad --seeds 0,1,2,3,4 --sched cosine \
        --workers 0 --settings no_attention,plus,plus+zoom,no_alpha,no_alpha+zoom,no_alpha+builtin-oracle-crop

Three ways to run a grid (``ssa_timm.grid``), each with the same tables:

    python recipes/ablation.py --seeds 0,1,2,3,4 --jobs 2          # one machine, two runs at once
    python recipes/ablation.py --seeds 0,1,2,3,4 --shard 2/4        # the 2nd of 4 parts (any scheduler)
    python recipes/ablation.py --seeds 0,1,2,3,4 --slurm-partition gpu --slurm-array-parallelism 8 \
        --slurm-gpus-per-task 1 --launcher "accelerate launch --num_processes 1"   # one SLURM job array
    python recipes/ablation.py --seeds 0,1,2,3,4 --report           # the tables from what is there

Writes ``<output-dir>/ablation.md`` (Markdown tables), ``ablation.json`` and, with matplotlib, the
figures ``<output-dir>/figures/*.png`` (every seed's top-1 per setting; in-box attention mass against
top-1 per run); every number is the best validation top-1 of a run (mean and spread over ``--seeds``),
with the attention diagnostics of its best epoch. Finished runs in ``--output-dir`` are reused and
unfinished ones resumed, so an interrupted grid goes on where it stopped; each run's train.py output is
in its folder's ``train.log``. ``--report`` trains nothing: it names the runs still missing and the
runs started with other flags (left out).
"""
import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Dict, List, Tuple

from ssa_timm.cli import at_least
from ssa_timm.errors import exit_on_user_error
from ssa_timm.grid import (ATTENTION_OPTIONS, REGIMES, RUN_RECORD, Grid, collect, grid_configs, parse_shard, run_local,
                           shard, submit_array)
from ssa_timm.grid_report import PAPER_TABLE2_CUB, PAPER_TABLE3_CUB, figures, tables

TRAIN = Path(__file__).resolve().parent / 'train.py'
# train.py flags each run of a grid gets from the grid (ssa_timm.grid.Grid.flags), never from a setting
GRID_FLAGS = ('model', 'dataset', 'loss', 'seed', 'epochs', 'output-dir', 'no-qk-norm', 'pretrained-path',
              'freeze-body', 'cache-features', 'cache-dir')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_grid_args(p)
    add_where_args(p)
    args, train_args = p.parse_known_args(argv)
    check_args(p, args)
    return args, train_args


def add_grid_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('The grid (other flags go to train.py)')
    g.add_argument('--body', default=None, help='timm body (default: resnet18 on builtin, else vgg16)')
    g.add_argument('--dataset', default='builtin', help='passed to train.py')
    g.add_argument('--epochs', type=at_least(1), default=6, help='passed to train.py')
    g.add_argument('--seeds', default='0', help='comma separated; numbers are means over seeds')
    g.add_argument('--variants', default=','.join(PAPER_TABLE2_CUB), help='comma separated aggregation variants')
    g.add_argument('--losses', default='ad,ce',
                   help='comma separated: ad (Table 2), ce (Table 3 for alpha, multiply, plus)')
    g.add_argument('--remedies', default='',
                   help='comma separated train.py attention flags to try on plus: qk-norm, scale-attn, sagan-qk')
    g.add_argument('--settings', help='instead of --variants and --remedies, one table of these settings: comma '
                   'separated variant[+option...], each option a train.py flag without its dashes (e.g. '
                   'plus,plus+zoom,plus+qk-norm+zoom,plus+alpha-init=1,no_attention+builtin-oracle-crop)')
    g.add_argument('--regime', choices=REGIMES, default='scratch',
                   help='transfer: one body pretrained on family 1 of the built-in task, frozen for every run; '
                   'finetune: the same body, trained by every run (builtin only)')
    g.add_argument('--pretrain-epochs', type=at_least(1), default=6, help='transfer: epochs of the body pretraining')
    g.add_argument('--output-dir', default='runs/ablation')
    g.add_argument('--cache-dir', help='transfer: the body-map caches every run shares (one per body, data and '
                   'seed); default: feature_cache in --output-dir')
    g.add_argument('--launcher', default=sys.executable,
                   help='command that runs train.py, e.g. "accelerate launch --multi_gpu --num_processes 8"')
    g.add_argument('--debug', action='store_true', help='show the traceback of user errors')


def add_where_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('Where the runs train')
    g.add_argument('--jobs', type=at_least(1), default=1, help='runs at once on this machine')
    g.add_argument('--threads-per-run', type=at_least(1),
                   help="CPU threads of each run (OMP_NUM_THREADS); default: the machine's cores shared out over "
                   '--jobs. A run\'s numbers depend on it, not on which runs share the machine')
    g.add_argument('--shard', metavar='K/N', help='train only the K-th of N parts of the grid (every N-th run from '
                   'the K-th), then write the tables of what is there')
    g.add_argument('--report', action='store_true', help='train nothing: the tables and figures of the finished '
                   'runs, naming those still missing')
    g.add_argument('--slurm-partition', help='submit the runs still missing as one SLURM job array (submitit) and '
                   'return; --report once it has run')
    g.add_argument('--slurm-array-parallelism', type=at_least(1), default=16, help='array tasks running at once')
    g.add_argument('--slurm-time', type=at_least(1), default=240, help='minutes per task (a requeued task resumes)')
    g.add_argument('--slurm-gpus-per-task', type=at_least(0), default=0)
    g.add_argument('--slurm-cpus-per-task', type=at_least(1), default=4)
    g.add_argument('--slurm-mem-gb', type=at_least(1), default=16)
    g.add_argument('--submitit-cluster', choices=('slurm', 'local'), default='slurm',
                   help="local: run the same array submission on this machine (submitit's local executor)")


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    try:
        args.seeds = [int(s) for s in args.seeds.split(',')]
    except ValueError:
        p.error(f'--seeds must be comma separated integers, got {args.seeds!r}')
    try:
        args.shard = parse_shard(args.shard) if args.shard else None
    except ValueError as e:
        p.error(f'--shard: {e}')
    args.variants, args.losses = args.variants.split(','), args.losses.split(',')
    args.remedies = [r for r in args.remedies.split(',') if r]
    if args.settings is not None:
        if args.remedies:
            p.error('--settings replaces --variants and --remedies: put each remedy in a setting (plus+qk-norm)')
        args.settings = [parse_setting(p, text) for text in args.settings.split(',')]
    if args.regime != 'scratch' and args.dataset != 'builtin':
        p.error(f'--regime {args.regime} pretrains on another family of the built-in task: it needs --dataset builtin')
    for values, allowed, flag in ((args.variants, PAPER_TABLE2_CUB, '--variants'),
                                  (args.losses, ('ad', 'ce'), '--losses'),
                                  (args.remedies, ATTENTION_OPTIONS, '--remedies')):
        unknown = [v for v in values if v not in allowed]
        if unknown:
            p.error(f'{flag}: {unknown} not among {list(allowed)}')
    if sum(bool(x) for x in (args.report, args.shard, args.slurm_partition)) > 1:
        p.error('--report, --shard and --slurm-partition are three ways to run a grid: give one')


def parse_setting(p: argparse.ArgumentParser, text: str) -> Tuple[str, str]:
    """``variant[+option...]`` of ``--settings`` as ``(variant, options)``: the options '+'-joined, as
    ``GridRun.remedy`` holds them."""
    variant, *options = text.strip().split('+')
    if variant not in PAPER_TABLE2_CUB:
        p.error(f'--settings: {variant!r} is not among the variants {list(PAPER_TABLE2_CUB)} (variant[+option...])')
    bad = [o for o in options if not re.fullmatch(r'[a-z][a-z0-9-]*(=[^\s+,/]+)?', o)]
    if bad:
        p.error(f'--settings: {bad} are not train.py flags without their dashes (e.g. qk-norm, alpha-init=1; '
                'a value holds no /, the run folders are named after it)')
    taken = [o for o in options if o.split('=')[0] in GRID_FLAGS]
    if taken:
        p.error(f'--settings: {taken} are set by the grid itself (its {", ".join(GRID_FLAGS)})')
    return variant, '+'.join(options)


def _option(flags: List[str], name: str, default: str) -> str:
    """The value of ``name`` among train.py flags (``--name value`` or ``--name=value``), or ``default``."""
    for i, flag in enumerate(flags):
        if flag == name and i + 1 < len(flags):
            return flags[i + 1]
        if flag.startswith(name + '='):
            return flag.split('=', 1)[1]
    return default


def setting_of(args: argparse.Namespace, train_args: List[str]) -> str:
    """The tables' description of the grid: dataset, task and regime."""
    task = _option(train_args, '--builtin-task', 'glyph') if args.dataset == 'builtin' else ''
    how = {'scratch': 'bodies from scratch', 'transfer': f'frozen body pretrained on {task} family 1',
           'finetune': f'body pretrained on {task} family 1, fine-tuned'}[args.regime]
    return f'{args.dataset}{" " + task if task else ""}, {args.regime}: {how}'


def write_report(args: argparse.Namespace, grid: Grid, setting: str) -> Dict:
    """The tables, JSON and figures of the finished runs of ``grid``; the missing and mismatched runs named."""
    rows, missing, mismatched = collect(grid)
    out = grid.output_dir
    out.mkdir(parents=True, exist_ok=True)
    chosen = list(grid.configs) if args.settings is not None else None
    markdown = tables(rows, args.seeds, setting, chosen)
    result = dict(body=grid.body, dataset=grid.dataset, regime=grid.regime, epochs=grid.epochs, seeds=args.seeds,
                  train_args=list(grid.train_args), runs=rows, missing=missing, other_flags=mismatched)
    (out / 'ablation.json').write_text(json.dumps(result, indent=1))
    (out / 'ablation.md').write_text(markdown)
    print(markdown)
    try:
        written = figures(rows, setting, out / 'figures', chosen) if rows else []
        print(f'figures: {", ".join(str(p) for p in written)}' if written else 'figures: none (no finished run)')
    except ImportError:
        print('figures: skipped (matplotlib is not installed: pip install ssa-timm[vis])')
    if missing:
        print(f'missing ({len(missing)} of {len(grid.runs())} runs, not in the tables): {", ".join(missing)}')
    if mismatched:
        print(f'left out, started with other train.py flags ({RUN_RECORD}): {", ".join(mismatched)}')
    if grid.regime == 'transfer':
        print(cache_report(grid.cache_dir or out / 'feature_cache'))
    return result


def cache_report(folder: Path) -> str:
    """The body-map caches the grid's runs shared, with their sizes."""
    files = sorted(folder.glob('*.npy'))
    sizes = [f.stat().st_size for f in files]
    lines = [f'feature caches in {folder}: {len(files)} file(s), {sum(sizes) / 2 ** 20:.1f} MiB']
    return '\n'.join([*lines, *(f'  {f.name}: {n / 2 ** 20:.1f} MiB' for f, n in zip(files, sizes))])


def submit(args: argparse.Namespace, grid: Grid, runs) -> None:
    """Submit the missing runs as one job array and say how to report once it has run."""
    _, missing, _ = collect(grid)
    todo = [run for run in runs if run.name in missing]
    parameters = dict(slurm_partition=args.slurm_partition, slurm_array_parallelism=args.slurm_array_parallelism,
                      timeout_min=args.slurm_time, gpus_per_node=args.slurm_gpus_per_task,
                      cpus_per_task=args.slurm_cpus_per_task, mem_gb=args.slurm_mem_gb)
    if args.submitit_cluster == 'local':
        parameters = dict(timeout_min=args.slurm_time)
    jobs = submit_array(grid, todo, grid.output_dir / 'submitit', parameters,
                        cluster=None if args.submitit_cluster == 'slurm' else 'local')
    print(f'submitted {len(todo)} run(s) of {len(runs)} as one job array ({jobs[-1].job_id if jobs else "none"}); '
          f'logs in {grid.output_dir / "submitit"}; then: python recipes/ablation.py <the same flags> --report')


def main(argv=None) -> Dict:
    args, train_args = parse_args(argv)
    body = args.body or ('resnet18' if args.dataset == 'builtin' else 'vgg16')
    settings = grid_configs(args.variants, args.losses, args.remedies, PAPER_TABLE3_CUB)
    if args.settings is not None:  # one table of the chosen settings, under each loss
        settings = [(variant, loss, options) for variant, options in args.settings for loss in args.losses]
    grid = Grid(Path(args.output_dir), TRAIN, body, args.dataset, args.epochs, tuple(args.seeds), tuple(settings),
                args.regime, args.pretrain_epochs, tuple(train_args), args.launcher,
                Path(args.cache_dir) if args.cache_dir else None)
    setting = setting_of(args, train_args)
    runs = shard(grid.runs(), *args.shard) if args.shard else grid.runs()
    if args.slurm_partition:
        submit(args, grid, runs)
        return {}
    if not args.report:
        gpus = _gpus()
        run_local(grid, runs, args.jobs, args.threads_per_run, gpus)
    return write_report(args, grid, setting)


def _gpus() -> int:
    """The GPUs this machine shares out over --jobs (none without CUDA)."""
    if 'CUDA_VISIBLE_DEVICES' in os.environ and not os.environ['CUDA_VISIBLE_DEVICES']:
        return 0
    import torch
    return torch.cuda.device_count()


if __name__ == '__main__':
    exit_on_user_error(main)
