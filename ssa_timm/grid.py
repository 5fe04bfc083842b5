"""Grids of training runs (``recipes/ablation.py``): the runs of a grid, where each one lives, and three
ways to train them: one after the other or several at once on one machine (``run_local``), a part of
them (``shard``: Kubernetes indexed jobs, ``xargs -P``, any scheduler), or one SLURM job array through
submitit (``submit_array``). Whatever ran where, ``collect`` reads the finished runs from their folders.

Each run is ``recipes/train.py`` in its own process, in its own folder under the grid's output folder,
which records the train.py flags it was started with (``grid_run.json``). A finished run is reused, an
unfinished one resumed (``--resume latest``); a folder started with other flags is refused, and
``collect`` names it and leaves it out. Two processes never train one run at once: the run folder's lock
refuses the second. The transfer regime's body is pretrained once, under a lock every run waits on, and
the runs of one seed share one body-map cache (``--cache-dir``: ``ssa_timm.feature_cache``).

A run's numbers depend on its flags, the machine (CPU kernels, GPU model) and its CPU thread count
(``threads``, passed as ``OMP_NUM_THREADS`` when set), not on which other runs share the machine.
"""
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from filelock import FileLock
from tqdm.auto import tqdm

from .errors import UserError
from .output_paths import atomic_write_text

__all__ = ['ATTENTION_OPTIONS', 'Grid', 'GridRun', 'REGIMES', 'RUN_RECORD', 'best_epoch_line', 'collect',
           'grid_configs', 'parse_shard', 'pretrain', 'run_local', 'shard', 'submit_array', 'train_run', 'visible_gpus',
           'wait_for']

# scratch: bodies from scratch; transfer: a body pretrained on family 1, frozen; finetune: the same body, trained
REGIMES = ('scratch', 'transfer', 'finetune')
RUN_RECORD = 'grid_run.json'  # the train.py flags a run folder was started with
PRETRAIN = 'pretrain_family1'


ATTENTION_OPTIONS = ('qk-norm', 'scale-attn', 'sagan-qk')  # without one of them a run takes the paper's attention


@dataclass(frozen=True)
class GridRun:
    """One run of a grid: an aggregation variant, a loss, its options and a seed. ``remedy`` holds the options:
    train.py flags without their dashes, joined by '+' (``'qk-norm'``, ``'qk-norm+zoom'``, ``'alpha-init=1'``;
    '' for none); without one of ``ATTENTION_OPTIONS`` the run takes the paper's attention."""
    variant: str
    loss: str
    remedy: str
    seed: int

    @property
    def name(self) -> str:
        """The run's folder name."""
        return f'{self.variant}{"_" + self.remedy if self.remedy else ""}_{self.loss}_seed{self.seed}'

    def option_flags(self) -> List[str]:
        """train.py's flags of the run's options (``--no-qk-norm`` when none of them names an attention)."""
        options = [o for o in self.remedy.split('+') if o]
        attention = [] if any(o in ATTENTION_OPTIONS for o in options) else ['--no-qk-norm']
        return [*(f'--{o}' for o in options), *attention]


@dataclass(frozen=True)
class Grid:
    """A grid: what it trains (``runs``) and how (``flags``): ``train_script`` (``recipes/train.py``) started
    by ``launcher``, with ``train_args`` for every run."""
    output_dir: Path
    train_script: Path
    body: str
    dataset: str = 'builtin'
    epochs: int = 6
    seeds: Tuple[int, ...] = (0,)
    configs: Tuple[Tuple[str, str, str], ...] = ()  # (variant, loss, options), in table order
    regime: str = 'scratch'
    pretrain_epochs: int = 6
    train_args: Tuple[str, ...] = ()
    launcher: str = sys.executable
    cache_dir: Optional[Path] = None

    def runs(self) -> List[GridRun]:
        """Every run, seed by seed, each seed in table order: the order ``shard`` splits."""
        return [GridRun(v, loss, remedy, seed) for seed in self.seeds for v, loss, remedy in self.configs]

    def folder(self, run: GridRun) -> Path:
        return self.output_dir / run.name

    def flags(self, run: GridRun) -> List[str]:
        """train.py's flags for ``run`` (``--epochs`` and ``--output-dir`` included)."""
        # the grid compares the paper's attention (Tables 2 and 3) with each remedy, whatever the name's default
        flags = [*self.train_args, '--dataset', self.dataset, '--model', f'ssanet_{self.body}_{run.variant}',
                 '--loss', run.loss, '--seed', str(run.seed), *run.option_flags()]
        if self.pretrains:
            flags += ['--pretrained-path', str(self.body_weights)]
        if self.regime == 'transfer':  # frozen: the SSA module and heads train on cached body maps
            flags += ['--freeze-body', '--cache-features', '--cache-dir',
                      str(self.cache_dir or self.output_dir / 'feature_cache')]
        return [*flags, '--epochs', str(self.epochs), '--output-dir', str(self.folder(run))]

    @property
    def pretrains(self) -> bool:
        """Whether the runs start from a body pretrained on family 1: frozen (``transfer``) or fine-tuned
        (``finetune``)."""
        return self.regime in REGIMES[1:]

    @property
    def body_weights(self) -> Path:
        """The transfer regime's pretrained body (``pretrain``)."""
        return self.output_dir / PRETRAIN / 'body.safetensors'

    def pretraining_flags(self) -> List[str]:
        """train.py's flags of the transfer regime's body: family 1 of the built-in task, no attention, seed 0."""
        return [*self.train_args, '--dataset', 'builtin', '--builtin-family', '1', '--model',
                f'ssanet_{self.body}_no_attention', '--seed', '0', '--epochs', str(self.pretrain_epochs),
                '--output-dir', str(self.output_dir / PRETRAIN)]


def grid_configs(variants: Sequence[str], losses: Sequence[str], remedies: Sequence[str],
                 table3: Sequence[str] = ('alpha', 'multiply', 'plus')) -> List[Tuple[str, str, str]]:
    """``(variant, loss, remedy)`` of every setting, in table order: Table 2 (each variant, Self-AD), Table 3
    (CE for the variants of the paper's Table 3) and each remedy on ``plus`` under each loss."""
    settings = [(v, 'ad', '') for v in variants if 'ad' in losses]
    settings += [(v, 'ce', '') for v in variants if v in table3 and 'ce' in losses]
    settings += [('plus', loss, remedy) for remedy in remedies for loss in losses]
    return settings


def shard(runs: Sequence[GridRun], index: int, count: int) -> List[GridRun]:
    """The ``index``-th (1-based) of ``count`` parts of ``runs``: every ``count``-th run from the ``index``-th."""
    return list(runs[index - 1::count])


def parse_shard(text: str) -> Tuple[int, int]:
    """``'K/N'`` as ``(K, N)`` with 1 <= K <= N.

    Raises:
        ValueError: Anything else.
    """
    index, _, count = text.partition('/')
    if not (index.isdigit() and count.isdigit() and 1 <= int(index) <= int(count)):
        raise ValueError(f'expected K/N with 1 <= K <= N (the K-th of N parts), got {text!r}')
    return int(index), int(count)


def best_epoch_line(folder: Path, epochs: int) -> Optional[Dict]:
    """The ``metrics.jsonl`` line of the best epoch of a run that finished ``epochs`` (None otherwise)."""
    metrics = folder / 'metrics.jsonl'
    lines = []
    if metrics.is_file():
        for text in metrics.read_text().splitlines():
            try:
                lines.append(json.loads(text))
            except ValueError:  # a line cut short by a kill: the run is unfinished
                return None
    if not lines or lines[-1].get('epoch') != epochs - 1:
        return None
    return max(lines, key=lambda m: m['val'].get('tta', m['val'])['output']['top1'])


def _recorded_flags(folder: Path) -> Optional[List[str]]:
    """The train.py flags a run folder was started with (None: not started, or a record cut short)."""
    for name in (RUN_RECORD, 'ablation_run.json'):  # 0.6 named the record ablation_run.json
        try:
            return list(json.loads((folder / name).read_text())['train_args'])
        except FileNotFoundError:
            continue
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return None


# train.py under a grid ignores SIGUSR2, which SLURM sends every process of a job before its time limit and
# submitit handles in the task (it stops train.py with SIGTERM, which checkpoints, and requeues)
_IGNORE_USR2 = ('import os, signal, sys; signal.signal(signal.SIGUSR2, signal.SIG_IGN); '
                'os.execvp(sys.argv[1], sys.argv[1:])')


def train_once(grid: Grid, folder: Path, flags: List[str], epochs: int, env: Optional[Dict[str, str]] = None,
               started: Optional[list] = None) -> Dict:
    """The best epoch's metrics line of ``train.py flags`` in ``folder``: trained in a train.py process, or
    reused when finished (an unfinished run is resumed). ``started`` receives the process, for a caller
    that stops it (``submit_array``'s checkpoint).

    Raises:
        UserError: The folder was started with other flags, or training failed.
    """
    recorded = _recorded_flags(folder)
    if recorded is not None and recorded != flags:
        raise UserError(f'{folder} was trained with other train.py flags ({folder / RUN_RECORD}); use another '
                        '--output-dir')
    if best_epoch_line(folder, epochs) is None:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / RUN_RECORD, json.dumps({'train_args': flags}))
        command = [sys.executable, '-c', _IGNORE_USR2, *shlex.split(grid.launcher), str(grid.train_script), *flags,
                   '--resume', 'auto']
        with open(folder / 'train.log', 'a') as log:
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
            if started is not None:
                started.append(process)
            while process.poll() is None:  # not wait(): submitit's checkpoint (a signal handler) waits for it too
                time.sleep(0.5)
            if process.returncode != 0:
                raise UserError(f'training {folder.name} failed (exit {process.returncode}); its output is in '
                                f'{folder / "train.log"}')
    line = best_epoch_line(folder, epochs)
    if line is None:
        raise UserError(f'{folder} has no finished run of {epochs} epochs')
    return line


def pretrain(grid: Grid, env: Optional[Dict[str, str]] = None) -> Path:
    """The transfer regime's body, trained once: the first run to need it trains it while the others wait
    on its lock, then read it."""
    if grid.body_weights.is_file():
        return grid.body_weights
    from .train import save_body_weights
    grid.output_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(grid.output_dir / f'{PRETRAIN}.lock'):
        if not grid.body_weights.is_file():
            folder = grid.output_dir / PRETRAIN
            train_once(grid, folder, grid.pretraining_flags(), grid.pretrain_epochs, env)
            save_body_weights(folder / 'best', grid.body_weights)
    return grid.body_weights


def train_run(grid: Grid, run: GridRun, env: Optional[Dict[str, str]] = None,
              started: Optional[list] = None) -> Dict:
    """Train ``run`` (or reuse / resume it) and return its row: top-1 and heads of its best epoch, with the
    attention diagnostics and localisation of that epoch."""
    if grid.pretrains:
        pretrain(grid, env)
    line = train_once(grid, grid.folder(run), grid.flags(run), grid.epochs, env, started)
    return _row(run, line)


def _row(run: GridRun, line: Dict) -> Dict:
    report = line['val']
    heads = {k: v['top1'] for k, v in report['heads'].items()}
    return dict(variant=run.variant, loss=run.loss, remedy=run.remedy, seed=run.seed, top1=report['output']['top1'],
                heads=heads, attention=report.get('attention'), localization=report.get('localization'),
                epoch=line['epoch'])


def collect(grid: Grid) -> Tuple[List[Dict], List[str], List[str]]:
    """What the grid's folders hold, without training: the rows of the finished runs, the names of the runs
    still missing (not started, unfinished or running) and of the runs started with other flags (left out)."""
    rows, missing, mismatched = [], [], []
    for run in grid.runs():
        folder = grid.folder(run)
        recorded = _recorded_flags(folder)
        if recorded is not None and recorded != grid.flags(run):
            mismatched.append(run.name)
            continue
        line = best_epoch_line(folder, grid.epochs) if recorded is not None else None
        if line is None:
            missing.append(run.name)
        else:
            rows.append(_row(run, line))
    return rows, missing, mismatched


def _slot_env(slot: int, threads: Optional[int], gpus: Sequence[str]) -> Dict[str, str]:
    """A run's environment in parallel slot ``slot``: its CPU thread count (when set) and, with several slots
    and several GPUs, one of the GPUs this process sees."""
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if gpus:
        env['CUDA_VISIBLE_DEVICES'] = gpus[slot % len(gpus)]
    return env


def visible_gpus(count: int) -> List[str]:
    """The ids of the ``count`` GPUs this process sees, as ``CUDA_VISIBLE_DEVICES`` names them."""
    visible = [g for g in os.environ.get('CUDA_VISIBLE_DEVICES', '').split(',') if g.strip()]
    return visible[:count] if visible else [str(i) for i in range(count)]


def run_local(grid: Grid, runs: Sequence[GridRun], jobs: int = 1, threads: Optional[int] = None,
              gpus: int = 0) -> List[Dict]:
    """Train ``runs`` on this machine, ``jobs`` at once, each with ``threads`` CPU threads (default with
    several jobs: the machine's cores shared out; with one, train.py's own) and, with several jobs and
    several GPUs, a GPU of its own; one progress line for the grid (runs done, running, left, and the time
    left). Rows in the order of ``runs``.

    Raises:
        UserError: A run failed (no further run starts; those running finish first).
    """
    if jobs > 1 and not threads:
        threads = max(1, (os.cpu_count() or 1) // jobs)
    pinned = visible_gpus(gpus) if jobs > 1 and gpus > 1 else []
    if grid.pretrains:
        pretrain(grid, _slot_env(0, threads * jobs if threads else None, []))  # before the runs: all need it
    rows: Dict[GridRun, Dict] = {}
    free, running = list(range(jobs)), {}
    bar = tqdm(total=len(runs), desc='grid', unit='run', dynamic_ncols=True)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        pending = list(runs)
        while pending or running:
            while pending and free:
                slot, run = free.pop(0), pending.pop(0)
                running[pool.submit(train_run, grid, run, _slot_env(slot, threads, pinned))] = (slot, run)
            bar.set_postfix_str(f'running {len(running)}, left {len(pending)}')
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in done:
                slot, run = running.pop(future)
                free.append(slot)
                rows[run] = _result(future, pending)
                bar.update(1)
    bar.close()
    return [rows[run] for run in runs]


def _result(future: Future, pending: List[GridRun]) -> Dict:
    """A finished run's row; on its failure no further run starts and the error is raised."""
    try:
        return future.result()
    except UserError:
        pending.clear()
        raise


class _ArrayTask:
    """One task of the SLURM array: trains its run in a train.py process. On preemption or the time limit
    submitit calls ``checkpoint``: train.py is stopped with SIGTERM (it writes a mid-epoch checkpoint) and
    the task is requeued, to resume (``--resume latest``)."""

    def __init__(self, grid: Grid, run: GridRun) -> None:
        self.grid, self.run = grid, run
        self._started: List[subprocess.Popen] = []

    def __call__(self) -> Dict:
        return train_run(self.grid, self.run, started=self._started)

    def checkpoint(self) -> Any:
        from submitit.helpers import DelayedSubmission
        for process in self._started:
            if process.returncode is None:
                try:
                    os.kill(process.pid, signal.SIGTERM)  # train.py writes a mid-epoch checkpoint and exits
                    # the main thread may be inside Popen.poll (its lock held): wait without reaping
                    os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)
                except (ProcessLookupError, ChildProcessError):
                    pass
        return DelayedSubmission(_ArrayTask(self.grid, self.run))

    def __getstate__(self) -> Dict[str, Any]:
        return {'grid': self.grid, 'run': self.run, '_started': []}


def submit_array(grid: Grid, runs: Sequence[GridRun], folder: Path, parameters: Dict[str, Any],
                 cluster: Optional[str] = None) -> List[Any]:
    """Submit ``runs`` as one job array (one task a run) through submitit and return its jobs at once; in the
    transfer regime a job that pretrains the body first, which the array waits for (on SLURM a dependency;
    elsewhere the pretraining's lock).

    Args:
        grid: The grid.
        runs: The runs to train (e.g. those ``collect`` found missing).
        folder: submitit's folder (its logs and pickles).
        parameters: ``executor.update_parameters``'s (``slurm_partition``, ``slurm_array_parallelism``,
            ``timeout_min``, ``gpus_per_node``, ``cpus_per_task``, ...).
        cluster: None for SLURM; 'local' runs the same submission on this machine (submitit's local executor).
    """
    import submitit
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster or 'slurm')
    executor.update_parameters(name=f'grid-{grid.output_dir.name}', **parameters)
    first = []
    if grid.pretrains and not grid.body_weights.is_file():  # one job pretrains, the array waits for it
        first = [executor.submit(pretrain, grid)]
        if (cluster or 'slurm') == 'slurm':
            executor.update_parameters(slurm_additional_parameters={'dependency': f'afterok:{first[0].job_id}'})
    with executor.batch():
        jobs = [executor.submit(_ArrayTask(grid, run)) for run in runs]
    return [*first, *jobs]


def wait_for(jobs: Sequence[Any], poll: float = 1.0) -> None:
    """Block until every submitit job has ended (the tests' and a caller's way to wait for an array)."""
    while not all(job.done() for job in jobs):
        time.sleep(poll)
