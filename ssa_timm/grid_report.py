"""The tables and figures of a grid of runs (``ssa_timm.grid``, ``recipes/ablation.py``): the paper's
Table 2 (the aggregation variants, Self-AD) and Table 3 (CE against Self-AD), the attention remedies on
``plus``, each with every seed, mean ± sd, both heads, the attention diagnostics and, where boxes exist,
the localisation columns; and for each table a figure of every seed's top-1 per setting and, with boxes,
of in-box attention mass against top-1 per run (matplotlib, the ``vis`` extra).
"""
import statistics
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ['BOX_COLUMNS', 'LOCALIZATION_KEYS', 'PAPER_TABLE2_CUB', 'PAPER_TABLE3_CUB', 'figures', 'mean_over_seeds',
           'tables']

# Paper Tables 2 and 3, CUB-200-2011 top-1 (%), shown beside the measured numbers for reference
# (Table 2 rows in the paper's order: every variant of ssa_timm.VARIANTS).
PAPER_TABLE2_CUB = {'no_attention': 75.0, 'no_alpha': 82.3, 'alpha': 82.7, 'multiply': 86.5, 'plus': 88.4}
PAPER_TABLE3_CUB = {'alpha': (81.4, 82.7), 'multiply': (85.6, 86.5), 'plus': (87.1, 88.4)}
# the localisation metrics a run's best epoch reports (ssa_timm.localization), averaged over its seeds
LOCALIZATION_KEYS = ('in_box_mass', 'box_share', 'pointing_cam', 'pointing_attention', 'zoom_iou', 'zoom_hit',
                     'cam_box_iou', 'cam_box_hit')
BOX_COLUMNS = 'zoom box IoU | zoom box hit | Grad-CAM box IoU | Grad-CAM box hit'


def mean_over_seeds(rows: List[Dict], variant: str, loss: str, remedy: str = '') -> Optional[Dict]:
    """The runs of one configuration over the seeds: top-1 mean and sample standard deviation, each seed's
    top-1, each head's mean, and the means of the attention diagnostics and the localisation metrics."""
    picked = [r for r in rows if r['variant'] == variant and r['loss'] == loss and r['remedy'] == remedy]
    if not picked:
        return None
    heads = {h: statistics.mean(r['heads'][h] for r in picked) for h in picked[0]['heads']}
    spread = statistics.stdev(r['top1'] for r in picked) if len(picked) > 1 else 0.0
    return dict(top1=statistics.mean(r['top1'] for r in picked), std=spread, heads=heads,
                seeds=[r['top1'] for r in picked], by_seed={r['seed']: r['top1'] for r in picked},
                attention=_means(picked, 'attention', ('alpha', 'entropy_ratio', 'row_max'), absolute=True),
                localization=_means(picked, 'localization', LOCALIZATION_KEYS))


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
    def cell(key: str) -> str:  # None where no run measured it (e.g. boxes over a whole coarse map)
        return '-' if where.get(key) is None else f'{where[key]:.2f}'
    mass = where.get('in_box_mass')
    return (cells + f' | {cell("in_box_mass") if mass is not None else "-"} ({cell("box_share")})' +
            f' | {cell("pointing_cam")} | {cell("pointing_attention")}')


def box_cells(m: Dict) -> str:
    """The zoom box's and the Grad-CAM box's IoU with the true box and hit rate (mean over seeds; '-' where
    no run measured one)."""
    where = m.get('localization') or {}
    return ' | '.join('-' if where.get(key) is None else f'{where[key]:.2f}'
                      for key in ('zoom_iou', 'zoom_hit', 'cam_box_iou', 'cam_box_hit'))


def seed_cells(m: Dict, seeds: Sequence[int]) -> str:
    """Each seed's top-1, in the order of ``seeds`` ('-' for a seed whose run is missing)."""
    return ' / '.join(f'{m["by_seed"][s]:.1f}' if s in m['by_seed'] else '-' for s in seeds)


def tables(rows: List[Dict], seeds: List[int], dataset: str,
           settings: Optional[Sequence[Tuple[str, str, str]]] = None) -> str:
    """Tables 2 and 3 and the remedies, each with the rows that were trained; with ``settings`` (a grid of
    chosen settings, ``(variant, loss, options)``) one table of those settings instead."""
    fmt = (lambda m: f'{m["top1"]:.1f} ± {m["std"]:.1f}') if len(seeds) > 1 else (lambda m: f'{m["top1"]:.1f}')
    diagnostics = 'abs(alpha) | row entropy / uniform | row max'
    boxes = any(r.get('localization') for r in rows)
    if boxes:
        diagnostics += ' | in-box attention (uniform) | pointing: Grad-CAM | pointing: attention'
    rule = '|---' * (9 + 3 * boxes) + '|'
    if settings is not None:
        return '\n'.join(settings_table(rows, seeds, dataset, settings, fmt, diagnostics, boxes)) + '\n'
    lines = [f'Table 2 ({dataset}, top-1 %, best epoch, mean ± sd over {len(seeds)} seed(s); Self-AD loss)', '',
             f'| variant | model output (mean of heads) | seeds | SSA head | FE head | paper, CUB | {diagnostics} |',
             rule]
    for variant in PAPER_TABLE2_CUB:
        m = mean_over_seeds(rows, variant, 'ad')
        if m:
            ssa = f'{m["heads"]["ssa"]:.1f}' if 'ssa' in m['heads'] else '-'
            lines.append(f'| {variant} | {fmt(m)} | {seed_cells(m, seeds)} | {ssa} | {m["heads"]["fe"]:.1f} | '
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
                setting = f'plus{" --" + remedy if remedy else " (paper)"}'
                lines.append(f'| {setting} | {loss} | {fmt(m)} | {seed_cells(m, seeds)} '
                             f'| {m["heads"]["ssa"]:.1f} | {m["heads"]["fe"]:.1f} | {attention_cells(m)} |')
    return lines


def settings_table(rows: List[Dict], seeds: List[int], dataset: str, settings: Sequence[Tuple[str, str, str]], fmt,
                   diagnostics: str, boxes: bool) -> List[str]:
    """The lines of the table of a grid's chosen settings, in their order, with the boxes' columns where the
    runs have boxes."""
    columns = f'{diagnostics} | {BOX_COLUMNS}' if boxes else diagnostics
    lines = [f'Settings ({dataset}, top-1 %, best epoch, mean ± sd of {len(seeds)} seed(s))', '',
             f'| setting | loss | model output | seeds | SSA head | FE head | {columns} |',
             '|---' * (9 + 7 * boxes) + '|']
    for setting in settings:
        m = mean_over_seeds(rows, *setting)
        if m:
            ssa = f'{m["heads"]["ssa"]:.1f}' if 'ssa' in m['heads'] else '-'
            cells = f'{attention_cells(m)} | {box_cells(m)}' if boxes else attention_cells(m)
            lines.append(f'| {_name(setting)} | {setting[1]} | {fmt(m)} | {seed_cells(m, seeds)} | {ssa} '
                         f'| {m["heads"]["fe"]:.1f} | {cells} |')
    return lines


def table_settings(rows: List[Dict], settings: Optional[Sequence[Tuple[str, str, str]]] = None,
                   ) -> Dict[str, List[Tuple[str, str, str]]]:
    """The settings ``(variant, loss, remedy)`` of each table that has rows, in table order (with
    ``settings``: one table, 'settings', of those that have rows)."""
    have = {(r['variant'], r['loss'], r['remedy']) for r in rows}
    if settings is not None:
        return {'settings': [tuple(x) for x in settings if tuple(x) in have]}
    table2 = [(v, 'ad', '') for v in PAPER_TABLE2_CUB if (v, 'ad', '') in have]
    table3 = [(v, loss, '') for v in PAPER_TABLE3_CUB for loss in ('ce', 'ad')
              if (v, 'ce', '') in have and (v, 'ad', '') in have]
    remedies = sorted({r['remedy'] for r in rows if r['remedy']})
    remedy_rows = [('plus', loss, remedy) for remedy in ['', *remedies] for loss in ('ad', 'ce')
                   if remedies and ('plus', loss, remedy) in have]
    return {name: settings for name, settings in
            (('table2', table2), ('table3', table3), ('remedies', remedy_rows)) if settings}


def _name(setting: Tuple[str, str, str]) -> str:
    """A setting as its variant and train.py flags: ``plus --qk-norm --zoom``."""
    variant, _, options = setting
    return ' '.join([variant, *(f'--{o}' for o in options.split('+') if o)])


def _label(setting: Tuple[str, str, str]) -> str:
    return f'{_name(setting)} ({setting[1]})'


def figures(rows: List[Dict], title: str, out_dir: Path,
            settings: Optional[Sequence[Tuple[str, str, str]]] = None) -> List[Path]:
    """For each table: ``<table>_top1.png`` (every seed's top-1 per setting, mean ± sd beside) and, where the
    runs have boxes, ``<table>_inbox.png`` (in-box attention mass against top-1, one point per run,
    coloured by setting). Returns the files written."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    written = []
    for name, chosen in table_settings(rows, settings).items():
        picked = [[r for r in rows if (r['variant'], r['loss'], r['remedy']) == s] for s in chosen]
        fig = strip_plot(plt, chosen, picked, f'{title}: {name}')
        written.append(_save(fig, out_dir / f'{name}_top1.png', plt))
        if any(r.get('localization') and r['localization'].get('in_box_mass') is not None for r in rows):
            fig = inbox_plot(plt, chosen, picked, f'{title}: {name}')
            written.append(_save(fig, out_dir / f'{name}_inbox.png', plt))
    return written


def _save(fig, path: Path, plt) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches='tight')
    plt.close(fig)
    return path


def strip_plot(plt, settings: Sequence[Tuple[str, str, str]], picked: List[List[Dict]], title: str):
    """Every run's top-1 per setting (one point a run, jittered sideways), the mean ± sd as a bar beside."""
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(settings), 3.6))
    for x, runs in enumerate(picked):
        top1 = [r['top1'] for r in runs]
        offsets = [x - 0.12 + 0.24 * i / max(1, len(top1) - 1) for i in range(len(top1))]
        ax.scatter(offsets, top1, s=18, color='tab:blue', zorder=3, label='one run' if x == 0 else None)
        sd = statistics.stdev(top1) if len(top1) > 1 else 0.0
        ax.errorbar([x + 0.3], [statistics.mean(top1)], yerr=[sd], fmt='o', color='black', capsize=3,
                    label='mean ± sd' if x == 0 else None)
    ax.set_xticks(range(len(settings)), [_label(s) for s in settings], rotation=30, ha='right', fontsize=8)
    ax.set_ylabel('validation top-1 (%)')
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return fig


def inbox_plot(plt, settings: Sequence[Tuple[str, str, str]], picked: List[List[Dict]], title: str):
    """In-box attention mass against top-1, one point per run with boxes, coloured by setting."""
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for setting, runs in zip(settings, picked):
        points = [(r['localization']['in_box_mass'], r['top1']) for r in runs
                  if r.get('localization') and r['localization'].get('in_box_mass') is not None]
        if points:
            ax.scatter(*zip(*points), s=22, label=_label(setting))
    ax.set_xlabel('attention mass in the part box (best epoch)')
    ax.set_ylabel('validation top-1 (%)')
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return fig
