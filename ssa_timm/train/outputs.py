"""What a training run writes besides its checkpoints, and how several processes agree on it.

The run owns ``--output-dir``: it is claimed (writable, locked, holding no other run unless resumed
or replaced) before any data or model is loaded; ``metrics.jsonl`` gets one line per epoch and
``best/`` the best model in timm's ``save_for_hf`` layout, written through a temporary sibling.
Work that only the main process does goes through ``run_on_main``, so an error there stops every
process instead of leaving the others waiting at the next barrier.
"""
import json
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Sequence, Tuple

import torch
from accelerate.utils import broadcast_object_list

from ..errors import UserError
from ..hub import export_model
from ..run_dir import RunLock, atomic_dir, atomic_write_text, ensure_writable_dir, restore_interrupted, run_files

__all__ = ['REPLACED', 'append_metrics', 'claim_output_dir', 'drop_replaced_run', 'epoch_record', 'epoch_summary',
           'export_best', 'keep_metrics_before', 'run_on_main', 'tracker_values', 'write_epoch']

REPLACED = '.replaced'  # --overwrite moves the old run here, deleted once the new run has a checkpoint
METRICS = 'metrics.jsonl'


def run_on_main(accelerator, work: Callable[[], Any]) -> None:
    """Run ``work()`` on the main process; its error, if any, is raised on every process as a
    ``UserError`` (one process alone re-raises it as it is)."""
    error = None
    if accelerator.is_main_process:
        try:
            work()
        except Exception as e:  # re-raised below, on every process
            if accelerator.num_processes == 1:
                raise
            error = str(e) if isinstance(e, UserError) else f'the main process failed: {type(e).__name__}: {e}'
    if accelerator.num_processes > 1:
        error = broadcast_object_list([error])[0]
    if error:
        raise UserError(error)


@contextmanager
def claim_output_dir(output_dir: Path, accelerator, resume: str = None, overwrite: bool = False) -> Iterator[RunLock]:
    """Own ``output_dir`` for the block: a writable folder, locked against another run (with a
    heartbeat), holding no other run unless ``resume`` or ``overwrite`` (which sets the old run aside
    until the new one's first checkpoint). The lock is released when the block ends, however it ends."""
    lock = RunLock(output_dir)

    def claim() -> None:
        ensure_writable_dir(output_dir, '--output-dir')
        lock.acquire()
        try:
            for name in ('best', 'checkpoints'):
                restore_interrupted(output_dir / name)
            found = run_files(output_dir)
            if found and not (resume or overwrite):
                raise UserError(f'--output-dir {output_dir} already holds a run ({", ".join(found)}); pass --resume '
                                'latest to continue it, --overwrite to replace it, or another --output-dir')
            if overwrite:
                _set_aside_run(output_dir)
        except BaseException:
            lock.release()
            raise
    run_on_main(accelerator, claim)
    try:
        yield lock
    finally:
        lock.release()


def _set_aside_run(out: Path) -> None:
    """Move a run's files into ``<out>/.replaced`` (the feature cache stays: it is keyed by its inputs)."""
    aside = out / REPLACED
    shutil.rmtree(aside, ignore_errors=True)
    aside.mkdir()
    for name in ('best', 'checkpoints', METRICS):
        if (out / name).exists():
            (out / name).rename(aside / name)


def drop_replaced_run(out: Path) -> None:
    """Delete the run ``--overwrite`` set aside (called once the new run has a checkpoint)."""
    shutil.rmtree(out / REPLACED, ignore_errors=True)


def export_best(model: torch.nn.Module, out: Path, classes: Sequence[str], img_size: int,
                report: Dict[str, Any], notes: Dict[str, Any]) -> None:
    """Export ``model`` to ``<out>/best`` through a temporary sibling, its report and training notes
    in ``config.json``; a failed write (a full disk) leaves the previous ``best/`` and no temporary copy."""
    try:
        with atomic_dir(out / 'best') as tmp:
            export_model(model, str(tmp), classes, img_size, extra_config={'metrics': report, 'training': notes})
    except OSError as e:
        raise UserError(f'cannot write the best model to {out / "best"}: {e.strerror or e}') from e


def append_metrics(out: Path, line: Dict[str, Any]) -> None:
    """Add one epoch's line to ``<out>/metrics.jsonl``."""
    try:
        with (out / METRICS).open('a') as f:
            f.write(json.dumps(line) + '\n')
    except OSError as e:
        raise UserError(f'cannot write {out / METRICS}: {e.strerror or e}') from e


def keep_metrics_before(out: Path, epoch: int) -> None:
    """Keep the ``metrics.jsonl`` lines of the epochs before ``epoch`` (a resume redoes the others;
    a line cut short by a kill is dropped)."""
    path = out / METRICS
    if not path.is_file():
        return
    kept = []
    for text in path.read_text().splitlines():
        try:
            line = json.loads(text)
        except ValueError:
            continue
        if isinstance(line, dict) and isinstance(line.get('epoch'), int) and line['epoch'] < epoch:
            kept.append(text)
    atomic_write_text(path, ''.join(f'{text}\n' for text in kept))


def epoch_record(epoch: int, progress, optimizer, report: Dict) -> Dict[str, Any]:
    """The ``metrics.jsonl`` line of an epoch that ``progress`` has just finished (before the schedule
    steps: ``lr`` is the heads' rate of this epoch)."""
    return dict(epoch=epoch, step=progress.global_step, train_loss=progress.loss_sum / max(1, progress.loss_count),
                lr=max(group['lr'] for group in optimizer.param_groups),
                images_per_s=progress.images / max(progress.seconds, 1e-9), val=report)


def write_epoch(out: Path, record: Dict[str, Any], best: Tuple[float, torch.nn.Module, Dict, bool], best_so_far: float,
                classes: Sequence[str], config) -> None:
    """Export ``best`` (``(top-1, model, report, is the EMA)``) when it beats ``best_so_far``, then add
    the epoch's metrics line: a resume drops the lines of the epochs it redoes, so the line goes
    before the epoch's checkpoint."""
    top1, model, report, is_ema = best
    if top1 > best_so_far:
        export_best(model, out, classes, config.img_size, report, config.export_notes(record['epoch'], is_ema))
    append_metrics(out, record)


def epoch_summary(record: Dict[str, Any]) -> str:
    """One printed line for an epoch: loss, top-1 of the output and each head, the attention's state."""
    report = record['val']
    heads = ', '.join(f'{k} {v["top1"]:.1f}%' for k, v in report['heads'].items())
    text = (f'epoch {record["epoch"]}: loss {record["train_loss"]:.4f}, '
            f'val top-1 {report["output"]["top1"]:.1f}% ({heads})')
    attention = report.get('attention')
    if attention and attention['alpha'] is not None:
        text += (f'; attention: alpha {attention["alpha"]:+.3f}, row entropy {attention["entropy_ratio"]:.2f} of '
                 f'uniform, row max {attention["row_max"]:.2f}')
    return text


def tracker_values(record: Dict[str, Any], top1: float) -> Dict[str, float]:
    """What an epoch logs to accelerate's trackers."""
    attention = record['val'].get('attention') or {}
    return {'train_loss': record['train_loss'], 'val_top1': top1, 'lr': record['lr'],
            **{f'attention/{k}': v for k, v in attention.items() if v is not None}}
