"""What a training run writes besides its checkpoints, and how several processes agree on it.

The run owns ``--output-dir``: it is claimed (writable, locked, holding no other run unless resumed
or replaced) before any data or model is loaded; ``metrics.jsonl`` gets one line per epoch and
``best/`` the best model in timm's ``save_for_hf`` layout, written through a temporary sibling.
Work that only the main process does goes through ``run_on_main``, so an error there stops every
process instead of leaving the others waiting at the next barrier.
"""
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import torch

from ..errors import RunFolderNotShared, UserError
from ..hub import export_model
from ..output_paths import atomic_dir
from ..processes import from_main, run_on_main
from ..run_dir import RunFolder

__all__ = ['claim_output_dir', 'epoch_record', 'epoch_summary', 'export_best', 'tracker_values', 'write_epoch']


@contextmanager
def claim_output_dir(output_dir: Path, accelerator, resume: Optional[str] = None,
                     overwrite: bool = False) -> Iterator[RunFolder]:
    """Own ``output_dir`` for the block (``RunFolder.claim`` on the main process) and check that every
    process, on every machine, sees that same folder; the lock is released when the block ends,
    however it ends.

    Raises:
        RunFolderNotShared: A process does not see the main process's lock in ``output_dir`` (machines
            without a shared filesystem), on every process.
    """
    folder = RunFolder(output_dir)
    run_on_main(accelerator, lambda: folder.claim(resume, overwrite))
    try:
        _check_shared(folder, accelerator)
        yield folder
    finally:
        folder.release()  # a no-op on the processes that hold no lock


def _check_shared(folder: RunFolder, accelerator) -> None:
    """Every process reads the lock the main process wrote, before any training (see ``RunFolderNotShared``)."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import gather_object
    token = from_main(accelerator, folder.lock.token)
    owner = folder.lock.owner()
    seen = (owner or {}).get('token') == token
    blind = [(rank, host) for rank, (ok, host) in enumerate(gather_object([(seen, socket.gethostname())])) if not ok]
    if blind:
        ranks = ', '.join(f'process {rank} on {host}' for rank, host in blind[:4])
        raise RunFolderNotShared(
            f'--output-dir {folder.path} is not the same folder on every machine ({ranks} cannot see the run '
            'the main process claimed there); several machines need an --output-dir on a filesystem they all '
            'share (NFS, Lustre, ...): checkpoints, best/, metrics.jsonl and the lock live there')


def export_best(model: torch.nn.Module, folder: RunFolder, classes: Sequence[str], report: Dict[str, Any],
                notes: Dict[str, Any]) -> None:
    """Export ``model`` to ``best/`` of the run folder through a temporary sibling, its report and training
    notes in ``config.json``; a failed write (a full disk) leaves the previous ``best/`` and no temporary copy."""
    best = folder.path / 'best'
    try:
        with atomic_dir(best) as tmp:
            export_model(model, str(tmp), classes, extra_config={'metrics': report, 'training': notes})
            folder.fence()
    except OSError as e:
        raise UserError(f'cannot write the best model to {best}: {e.strerror or e}') from e


def epoch_record(epoch: int, progress, optimizer, report: Dict) -> Dict[str, Any]:
    """The ``metrics.jsonl`` line of an epoch that ``progress`` has just finished (before the schedule
    steps: ``lr`` is the heads' rate of this epoch)."""
    return dict(epoch=epoch, step=progress.global_step, train_loss=progress.loss_sum / max(1, progress.loss_count),
                lr=max(group['lr'] for group in optimizer.param_groups),
                images_per_s=progress.images / max(progress.seconds, 1e-9), val=report)


def write_epoch(folder: RunFolder, record: Dict[str, Any], best: Tuple[float, torch.nn.Module, Dict, bool],
                best_so_far: float, classes: Sequence[str], config) -> None:
    """Export ``best`` (``(top-1, model, report, is the EMA)``) when it beats ``best_so_far``, then add
    the epoch's metrics line: a resume drops the lines of the epochs it redoes, so the line goes
    before the epoch's checkpoint."""
    top1, model, report, is_ema = best
    if top1 > best_so_far:
        export_best(model, folder, classes, report, config.export_notes(record['epoch'], is_ema))
    folder.append_metrics(record)


def epoch_summary(record: Dict[str, Any]) -> str:
    """One printed line for an epoch: loss, top-1 of the output and each head, the attention's state and,
    on the scene task, where it looks (in-box attention mass beside uniform's, pointing game hit rates)."""
    report = record['val']
    heads = ', '.join(f'{k} {v["top1"]:.1f}%' for k, v in report['heads'].items())
    text = (f'epoch {record["epoch"]}: loss {record["train_loss"]:.4f}, '
            f'val top-1 {report["output"]["top1"]:.1f}% ({heads})')
    attention = report.get('attention')
    if attention and attention['alpha'] is not None:
        temperature = f', temperature {attention["temperature"]:.1f}' if attention.get('temperature') else ''
        text += (f'; attention ({attention.get("kind", "paper")}{temperature}): alpha {attention["alpha"]:+.3f}, row '
                 f'entropy {attention["entropy_ratio"]:.2f} of uniform, row max {attention["row_max"]:.2f}')
    where = report.get('localization')
    if where and where['images']:
        mass = where['in_box_mass']
        text += ('; localisation: ' + (f'in-box attention {mass:.2f} (uniform {where["box_share"]:.2f}), ' if
                                       mass is not None else '') + f'pointing Grad-CAM {where["pointing_cam"]:.2f}' +
                 (f', attention {where["pointing_attention"]:.2f}' if mass is not None else '') +
                 (f'; zoom box IoU {where["zoom_iou"]:.2f}, hit {where["zoom_hit"]:.2f}'
                  if where.get('zoom_iou') is not None else '') +
                 (f'; Grad-CAM box IoU {where["cam_box_iou"]:.2f}, hit {where["cam_box_hit"]:.2f}'
                  if where.get('cam_box_iou') is not None else ''))
    return text


def tracker_values(record: Dict[str, Any], top1: float) -> Dict[str, float]:
    """What an epoch logs to accelerate's trackers."""
    attention = record['val'].get('attention') or {}
    return {'train_loss': record['train_loss'], 'val_top1': top1, 'lr': record['lr'],
            **{f'attention/{k}': v for k, v in attention.items() if isinstance(v, (int, float))}}
