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

Writes ``<output-dir>/ablation.md`` (Markdown tables) and ``ablation.json``; every number is the
best validation top-1 of a run (mean and spread over ``--seeds``), with the attention diagnostics
of its best epoch. Finished runs in ``--output-dir`` are reused and unfinished ones resumed, so an
interrupted ablation goes on where it stopped.
"""
import argparse
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

from ssa_timm.cli import at_least
from ssa_timm.errors import UserError, exit_on_user_error
from ssa_timm.train import save_body_weights

TRAIN = Path(__file__).resolve().parent / 'train.py'

# Paper Tables 2 and 3, CUB-200-2011 top-1 (%), shown beside the measured numbers for reference
# (Table 2 rows in the paper's order: every variant of ssa_timm.VARIANTS).
PAPER_TABLE2_CUB = {'no_attention': 75.0, 'no_alpha': 82.3, 'alpha': 82.7, 'multiply': 86.5, 'plus': 88.4}
PAPER_TABLE3_CUB = {'alpha': (81.4, 82.7), 'multiply': (85.6, 86.5), 'plus': (87.1, 88.4)}
REMEDIES = ('qk-norm', 'scale-attn', 'sagan-qk')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--body', default=None, help='timm body (default: resnet18 on builtin, else vgg16)')
    p.add_argument('--dataset', default='builtin', help='passed to train.py')
    p.add_argument('--epochs', type=at_least(1), default=6, help='passed to train.py')
    p.add_argument('--seeds', default='0', help='comma separated; numbers are means over seeds')
    p.add_argument('--variants', default=','.join(PAPER_TABLE2_CUB), help='comma separated aggregation variants')
    p.add_argument('--losses', default='ad,ce',
                   help='comma separated: ad (Table 2), ce (Table 3 for alpha, multiply, plus)')
    p.add_argument('--remedies', default='',
                   help='comma separated train.py attention flags to try on plus: qk-norm, scale-attn, sagan-qk')
    p.add_argument('--regime', choices=('scratch', 'transfer'), default='scratch',
                   help='transfer: one body pretrained on family 1 of the built-in task, frozen for every run '
                   '(builtin only)')
    p.add_argument('--pretrain-epochs', type=at_least(1), default=6, help='transfer: epochs of the body pretraining')
    p.add_argument('--output-dir', default='runs/ablation')
    p.add_argument('--cache-dir', help='transfer: the body-map caches every run shares (one per body, data and '
                   'seed); default: feature_cache in --output-dir')
    p.add_argument('--launcher', default=sys.executable,
                   help='command that runs train.py, e.g. "accelerate launch --multi_gpu --num_processes 8"')
    p.add_argument('--debug', action='store_true', help='show the traceback of user errors')
    args, train_args = p.parse_known_args(argv)
    try:
        args.seeds = [int(s) for s in args.seeds.split(',')]
    except ValueError:
        p.error(f'--seeds must be comma separated integers, got {args.seeds!r}')
    args.variants, args.losses = args.variants.split(','), args.losses.split(',')
    args.remedies = [r for r in args.remedies.split(',') if r]
    if args.regime == 'transfer' and args.dataset != 'builtin':
        p.error('--regime transfer pretrains on another family of the built-in glyphs: it needs --dataset builtin')
    for values, allowed, flag in ((args.variants, PAPER_TABLE2_CUB, '--variants'),
                                  (args.losses, ('ad', 'ce'), '--losses'),
                                  (args.remedies, REMEDIES, '--remedies')):
        unknown = [v for v in values if v not in allowed]
        if unknown:
            p.error(f'{flag}: {unknown} not among {list(allowed)}')
    return args, train_args


def configs(args: argparse.Namespace) -> List[tuple]:
    """(variant, loss, remedy) of every run: Table 2, Table 3 and the remedies on plus."""
    runs = [(v, 'ad', '') for v in args.variants if 'ad' in args.losses]
    runs += [(v, 'ce', '') for v in args.variants if v in PAPER_TABLE3_CUB and 'ce' in args.losses]
    runs += [('plus', loss, remedy) for remedy in args.remedies for loss in args.losses]
    return runs


def train_once(args: argparse.Namespace, run_dir: Path, flags: List[str], epochs: int) -> Dict:
    """The best epoch's metrics line of ``train.py flags`` in ``run_dir``: trained in a train.py process,
    or reused when finished (an unfinished run is resumed)."""
    command = [*shlex.split(args.launcher), str(TRAIN), *flags, '--epochs', str(epochs), '--output-dir', str(run_dir)]
    flags = command[len(shlex.split(args.launcher)) + 1:]
    record = run_dir / 'ablation_run.json'
    if record.is_file() and json.loads(record.read_text())['train_args'] != flags:
        raise UserError(f'{run_dir} was trained with other train.py flags ({record}); use another --output-dir')
    if best_epoch_line(run_dir, epochs) is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({'train_args': flags}))
        resume = ['--resume', 'latest'] if (run_dir / 'checkpoints').is_dir() else []
        if subprocess.run([*command, *resume]).returncode != 0:
            raise UserError(f'training {run_dir.name} failed: {shlex.join(command)}')
    line = best_epoch_line(run_dir, epochs)
    if line is None:
        raise UserError(f'{run_dir} has no finished run of {epochs} epochs')
    return line


def pretrained_body(args: argparse.Namespace, body: str, train_args: List[str]) -> List[str]:
    """``--regime transfer``: train ``body`` once on family 1 of the built-in task (no attention, seed 0) and save it;
    the train.py flags that start a run from it, frozen, on cached body maps."""
    run_dir = Path(args.output_dir) / 'pretrain_family1'
    train_once(args, run_dir, [*train_args, '--dataset', 'builtin', '--builtin-family', '1', '--model',
                               f'ssanet_{body}_no_attention', '--seed', '0'], args.pretrain_epochs)
    weights = save_body_weights(run_dir / 'best', run_dir / 'body.safetensors')
    cache = args.cache_dir or str(Path(args.output_dir) / 'feature_cache')
    return ['--pretrained-path', str(weights), '--freeze-body', '--cache-features', '--cache-dir', cache]


def run(args: argparse.Namespace, body: str, config: tuple, seed: int, train_args: List[str]) -> Dict:
    """Train one configuration in a train.py process, or reuse its finished run (resuming an unfinished one)."""
    variant, loss, remedy = config
    run_dir = Path(args.output_dir) / f'{variant}{"_" + remedy if remedy else ""}_{loss}_seed{seed}'
    # the grid compares the paper's attention (Tables 2 and 3) with each remedy, whatever the name's default
    flags = [*train_args, '--dataset', args.dataset, '--model', f'ssanet_{body}_{variant}', '--loss', loss,
             '--seed', str(seed), f'--{remedy or "no-qk-norm"}']
    line = train_once(args, run_dir, flags, args.epochs)
    if line is None:
        raise UserError(f'{run_dir} has no finished run of {args.epochs} epochs')
    report = line['val']
    heads = {k: v['top1'] for k, v in report['heads'].items()}
    return dict(variant=variant, loss=loss, remedy=remedy, seed=seed, top1=report['output']['top1'], heads=heads,
                attention=report.get('attention'), localization=report.get('localization'), epoch=line['epoch'])


def best_epoch_line(run_dir: Path, epochs: int) -> Optional[Dict]:
    """The ``metrics.jsonl`` line of the best epoch of a finished run (None when unfinished)."""
    metrics = run_dir / 'metrics.jsonl'
    lines = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.is_file() else []
    if not lines or lines[-1]['epoch'] != epochs - 1:
        return None
    return max(lines, key=lambda m: m['val'].get('tta', m['val'])['output']['top1'])


def mean_over_seeds(rows: List[Dict], variant: str, loss: str, remedy: str = '') -> Optional[Dict]:
    """The runs of one configuration over the seeds: top-1 mean and sample standard deviation, each seed's
    top-1, each head's mean, and the means of the attention diagnostics and the localisation metrics."""
    picked = [r for r in rows if r['variant'] == variant and r['loss'] == loss and r['remedy'] == remedy]
    if not picked:
        return None
    heads = {h: statistics.mean(r['heads'][h] for r in picked) for h in picked[0]['heads']}
    spread = statistics.stdev(r['top1'] for r in picked) if len(picked) > 1 else 0.0
    return dict(top1=statistics.mean(r['top1'] for r in picked), std=spread, heads=heads,
                seeds=[r['top1'] for r in picked],
                attention=_means(picked, 'attention', ('alpha', 'entropy_ratio', 'row_max'), absolute=True),
                localization=_means(picked, 'localization', ('in_box_mass', 'box_share', 'pointing_cam',
                                                             'pointing_attention')))


def _means(picked: List[Dict], part: str, keys: tuple, absolute: bool = False) -> Dict[str, Optional[float]]:
    """Mean over the runs of each of ``keys`` of their ``part`` report (None where no run has a value)."""
    means: Dict[str, Optional[float]] = {}
    if not picked[0].get(part):
        return means
    for key in keys:
        values = [r[part][key] for r in picked if r.get(part) and r[part].get(key) is not None]
        means[key] = statistics.mean(abs(v) if absolute else v for v in values) if values else None
    return means


def attention_cells(m: Dict) -> str:
    """abs(alpha), row entropy as a fraction of uniform, row maximum (best epoch, mean over seeds), then
    with boxes the in-box attention mass (uniform's beside it) and the pointing game of Grad-CAM and of
    the most attended position."""
    a, where = m['attention'], m.get('localization')
    cells = '- | - | -'
    if a:
        alpha = f'{a["alpha"]:.3f}' if a['alpha'] is not None else '-'
        cells = f'{alpha} | {a["entropy_ratio"]:.2f} | {a["row_max"]:.2f}'
    if not where:
        return cells
    mass, point = where['in_box_mass'], where['pointing_attention']
    return (cells + (f' | {mass:.2f} ({where["box_share"]:.2f})' if mass is not None else
                     f' | - ({where["box_share"]:.2f})') +
            f' | {where["pointing_cam"]:.2f} | ' + (f'{point:.2f}' if point is not None else '-'))


def seed_cells(m: Dict) -> str:
    """Each seed's top-1, in the order of ``--seeds``."""
    return ' / '.join(f'{v:.1f}' for v in m['seeds'])


def tables(rows: List[Dict], seeds: List[int], dataset: str) -> str:
    """Tables 2 and 3 and the remedies, each with the rows that were trained."""
    fmt = (lambda m: f'{m["top1"]:.1f} ± {m["std"]:.1f}') if len(seeds) > 1 else (lambda m: f'{m["top1"]:.1f}')
    diagnostics = 'abs(alpha) | row entropy / uniform | row max'
    boxes = any(r.get('localization') for r in rows)
    if boxes:
        diagnostics += ' | in-box attention (uniform) | pointing: Grad-CAM | pointing: attention'
    rule = '|---' * (9 + 3 * boxes) + '|'
    lines = [f'Table 2 ({dataset}, top-1 %, best epoch, mean ± sd of {len(seeds)} seed(s); Self-AD loss)', '',
             f'| variant | model output (mean of heads) | seeds | SSA head | FE head | paper, CUB | {diagnostics} |',
             rule]
    for variant in PAPER_TABLE2_CUB:
        m = mean_over_seeds(rows, variant, 'ad')
        if m:
            ssa = f'{m["heads"]["ssa"]:.1f}' if 'ssa' in m['heads'] else '-'
            lines.append(f'| {variant} | {fmt(m)} | {seed_cells(m)} | {ssa} | {m["heads"]["fe"]:.1f} | '
                         f'{PAPER_TABLE2_CUB[variant]} | {attention_cells(m)} |')
    pairs = [(v, mean_over_seeds(rows, v, 'ce'), mean_over_seeds(rows, v, 'ad')) for v in PAPER_TABLE3_CUB]
    if any(ce and ad for _, ce, ad in pairs):
        lines += ['', f'Table 3 ({dataset}, top-1 %): CE on both heads vs Self-AD', '',
                  '| variant | CE | Self-AD | paper, CUB (CE -> Self-AD) |', '|---|---|---|---|']
        lines += [f'| {v} | {fmt(ce)} | {fmt(ad)} | {PAPER_TABLE3_CUB[v][0]} -> {PAPER_TABLE3_CUB[v][1]} |'
                  for v, ce, ad in pairs if ce and ad]
    lines += remedies_table(rows, seeds, dataset, fmt, diagnostics, rule)
    return '\n'.join(lines) + '\n'


def remedies_table(rows: List[Dict], seeds: List[int], dataset: str, fmt, diagnostics: str, rule: str) -> List[str]:
    """The lines of the table of ``plus`` with each attention remedy beside the paper's attention."""
    remedies = sorted({r['remedy'] for r in rows if r['remedy']})
    if not remedies:
        return []
    lines = ['', f'Attention remedies on plus ({dataset}, top-1 %, best epoch, mean ± sd of {len(seeds)} seed(s))',
             '', f'| setting | loss | model output | seeds | SSA head | FE head | {diagnostics} |', rule]
    for remedy in ['', *remedies]:
        for loss in ('ad', 'ce'):
            m = mean_over_seeds(rows, 'plus', loss, remedy)
            if m:
                lines.append(f'| plus{" --" + remedy if remedy else " (paper)"} | {loss} | {fmt(m)} | {seed_cells(m)} '
                             f'| {m["heads"]["ssa"]:.1f} | {m["heads"]["fe"]:.1f} | {attention_cells(m)} |')
    return lines


def _option(flags: List[str], name: str, default: str) -> str:
    """The value of ``name`` among train.py flags (``--name value`` or ``--name=value``), or ``default``."""
    for i, flag in enumerate(flags):
        if flag == name and i + 1 < len(flags):
            return flags[i + 1]
        if flag.startswith(name + '='):
            return flag.split('=', 1)[1]
    return default


def main(argv=None) -> Dict:
    args, train_args = parse_args(argv)
    dataset, seeds = args.dataset, args.seeds
    body = args.body or ('resnet18' if dataset == 'builtin' else 'vgg16')
    out = Path(args.output_dir)
    if args.regime == 'transfer':
        train_args = [*train_args, *pretrained_body(args, body, train_args)]
    rows = [run(args, body, config, seed, train_args) for seed in seeds for config in configs(args)]
    task = _option(train_args, '--builtin-task', 'glyph') if dataset == 'builtin' else ''
    setting = f'{dataset}{" " + task if task else ""}, {args.regime}' + (
        f': frozen body pretrained on {task} family 1' if args.regime == 'transfer' else ': bodies from scratch')
    markdown = tables(rows, seeds, setting)
    result = dict(body=body, dataset=dataset, regime=args.regime, epochs=args.epochs, seeds=seeds,
                  train_args=train_args, runs=rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'ablation.json').write_text(json.dumps(result, indent=1))
    (out / 'ablation.md').write_text(markdown)
    print(markdown)
    if args.regime == 'transfer':
        print(cache_report(Path(args.cache_dir or out / 'feature_cache')))
    return result


def cache_report(folder: Path) -> str:
    """The body-map caches the grid's runs shared, with their sizes."""
    files = sorted(folder.glob('*.npy'))
    sizes = [f.stat().st_size for f in files]
    lines = [f'feature caches in {folder}: {len(files)} file(s), {sum(sizes) / 2 ** 20:.1f} MiB']
    return '\n'.join([*lines, *(f'  {f.name}: {n / 2 ** 20:.1f} MiB' for f, n in zip(files, sizes))])


if __name__ == '__main__':
    exit_on_user_error(main)
