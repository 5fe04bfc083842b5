"""Checkpoints of a training run, in the spirit of timm's ``CheckpointSaver``.

``<output-dir>/checkpoints/checkpoint_N`` holds accelerate's state (model, optimizer, sampler, RNG),
the EMA weights when there are any, and ``run_state.json``: the run's identity, its ``Progress`` and
the scheduler's state, as JSON (no pickles). A checkpoint is written into a temporary sibling and
renamed into place, so a folder named ``checkpoint_N`` is always complete; the oldest beyond
``keep`` are renamed out of the way, then deleted. A write that fails (a full disk) or is aborted (a
second stop signal) removes its temporary folder and leaves the earlier checkpoints as they were.

The store only stores: the run folder's lifecycle (lock, set-aside runs, metrics) is
``ssa_timm.run_dir.RunFolder``'s, and the store never prints: what it skipped is returned.
"""
import json
import shutil
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError, DamagedCheckpoint, IdentityMismatch, one_line
from ..processes import from_main
from .config import RESUMABLE_CHANGES, identity_changes, upgraded_identity
from .optim import load_scheduler_state

__all__ = ['CheckpointStore', 'Progress', 'STATE_FILE', 'recorded_model_args', 'resume_run']

STATE_FILE = 'run_state.json'
EMA_FILE = 'ema.safetensors'


@dataclass
class Progress:
    """Where the run is; saved in every checkpoint's ``run_state.json``."""
    epoch: int = 0  # epochs fully done
    step_in_epoch: int = 0  # optimizer steps done in the current, unfinished epoch
    global_step: int = 0
    best_top1: float = -1.0
    # sums over the current epoch's steps so far, all processes: the epoch's metrics survive a resume
    loss_sum: float = 0.0
    loss_count: int = 0
    images: int = 0
    seconds: float = 0.0

    def start_epoch(self, epoch: int) -> None:
        """Mark ``epoch`` as the one in progress, with empty sums."""
        self.epoch, self.step_in_epoch = epoch, 0
        self.loss_sum, self.loss_count, self.images, self.seconds = 0.0, 0, 0, 0.0

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> 'Progress':
        progress = cls(**values)
        if not all(isinstance(getattr(progress, f.name), (int, float)) for f in fields(cls)):
            raise TypeError('progress fields of the wrong type')
        return progress


def checkpoint_index(folder: Path) -> int:
    """N of a ``checkpoint_N`` folder (-1 for other names)."""
    suffix = folder.name.rpartition('_')[2]
    return int(suffix) if folder.name.startswith('checkpoint_') and suffix.isdigit() else -1


class CheckpointStore:
    """The checkpoints of one run folder.

    Args:
        output_dir: The run's folder; checkpoints go to ``<output_dir>/checkpoints``.
        accelerator: The run's ``accelerate.Accelerator`` (every process calls ``save`` and ``load``).
        keep: How many of the newest checkpoints to keep.
        on_main: Runs a function on the main process and raises its error on every process
            (``ssa_timm.processes.run_on_main``).
        owner: A suffix for temporary names, the same on every process of this run and unique to it.
        fence: Called on the main process before a checkpoint is put in place (``RunFolder.fence``).
    """

    def __init__(self, output_dir: Path, accelerator, keep: int, on_main: Callable[[Callable[[], Any]], None],
                 owner: str = 'run', fence: Callable[[], None] = lambda: None) -> None:
        self.folder = Path(output_dir) / 'checkpoints'
        self.accelerator = accelerator
        self.keep = keep
        self.on_main = on_main
        self.owner = owner
        self.fence = fence

    def folders(self) -> List[Path]:
        """The complete ``checkpoint_N`` folders, newest first."""
        found = [p for p in self.folder.glob('checkpoint_*') if checkpoint_index(p) >= 0]
        return sorted(found, key=checkpoint_index, reverse=True)

    def save(self, state: Dict[str, Any], ema: Optional[torch.nn.Module] = None) -> Path:
        """Write the next ``checkpoint_N``: accelerate's state, ``ema``'s weights and ``state`` as JSON."""
        existing = self.folders()
        # the main process's listing decides for all (another machine's view of a shared folder may lag)
        index = from_main(self.accelerator, checkpoint_index(existing[0]) + 1 if existing else 0)
        final = self.folder / f'checkpoint_{index}'
        tmp = self.folder / f'.{final.name}.tmp-{self.owner}'
        self.on_main(self.fence)  # a run that lost its folder writes nothing more
        try:
            failed = None
            try:
                self.accelerator.save_state(str(tmp))
            except OSError as e:  # a full disk on any process: every process stops below
                failed = e
            self._agree_or_raise(failed, tmp)
            self.on_main(lambda: self._complete(tmp, final, state, ema))
        except BaseException:  # a write error, a second stop signal (RunAborted), a lost lock
            if self.accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.accelerator.wait_for_everyone()
        return final

    def _agree_or_raise(self, error: Optional[OSError], tmp: Path) -> None:
        from accelerate.utils import gather_object
        message = _write_error(tmp, error) if error else None
        if self.accelerator.num_processes > 1:
            messages = [m for m in gather_object([message]) if m]
            message = from_main(self.accelerator, messages[0] if messages else None)
        if message:
            self.on_main(self.fence)  # a write that failed because another run took the folder over
            if self.accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(message)

    def _complete(self, tmp: Path, final: Path, state: Dict[str, Any], ema: Optional[torch.nn.Module]) -> None:
        try:
            if ema is not None:
                save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(tmp / EMA_FILE))
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(_write_error(tmp, e)) from e
        self.fence()
        try:
            tmp.rename(final)
        except OSError as e:  # a checkpoint of that name appeared (another owner's), a full disk
            shutil.rmtree(tmp, ignore_errors=True)
            self.fence()
            raise CheckpointError(_write_error(tmp, e)) from e
        for old in self.folders()[self.keep:]:
            doomed = old.with_name(f'.{old.name}.del')  # out of the checkpoint names first, then deleted
            old.rename(doomed)
            shutil.rmtree(doomed)

    def read(self, folder: Path, identity: Dict[str, Any]) -> Dict[str, Any]:
        """``run_state.json`` of ``folder``, after checking that the checkpoint is complete, its files
        readable (headers and archive directories, without loading tensors) and that it was saved
        by a run with this ``identity`` (``RESUMABLE_CHANGES`` may differ)."""
        state_path = folder / STATE_FILE
        if not state_path.is_file():
            raise DamagedCheckpoint(f'{folder} is not a checkpoint of this recipe (no {STATE_FILE})')
        try:
            state = json.loads(state_path.read_text())
            saved = upgraded_identity(state['identity'])
            Progress.from_dict(state['progress'])
            if not isinstance(state['scheduler'], dict) or 'timm' not in state['scheduler']:
                raise TypeError('no timm scheduler state')
        except (ValueError, KeyError, TypeError) as e:
            raise DamagedCheckpoint(f'{state_path} is damaged ({type(e).__name__}: {e})') from e
        for key in identity_changes(saved, identity):
            if key in RESUMABLE_CHANGES:
                continue
            shown = (lambda v: f'{len(v)} classes') if key == 'classes' else repr
            raise IdentityMismatch(f'checkpoint {folder} was saved by a run with {key}={shown(saved.get(key))}; this '
                                  f'run has {key}={shown(identity[key])}')
        _check_files(folder)
        return state

    def choose(self, resume: str, identity: Dict[str, Any],
               end_of_epoch_only: bool = False) -> Tuple[Optional[Path], List[str]]:
        """The checkpoint ``resume`` names, checked (``read``), and what was skipped on the way: for a
        folder, that folder; for 'latest' the newest good one, damaged ones skipped (an identity
        mismatch is never skipped); for 'auto' the same, or None when there is none.

        Raises:
            IdentityMismatch: A checkpoint of another run.
            CheckpointError: None to resume from ('latest'), or the one named is unusable.
        """
        candidates = self.folders() if resume in ('latest', 'auto') else [Path(resume)]
        if not candidates and resume == 'latest':
            raise CheckpointError(f'--resume latest: no checkpoint under {self.folder}')
        skipped: List[str] = []
        for folder in candidates:
            if not folder.is_dir():
                raise CheckpointError(f'--resume {folder}: not a checkpoint folder')
            try:
                self._check_resumable(folder, identity, end_of_epoch_only)
            except DamagedCheckpoint as e:
                if resume not in ('latest', 'auto'):
                    raise
                skipped.append(f'warning: skipping checkpoint {folder}: {e}')
                continue
            return folder, skipped
        if candidates:
            raise CheckpointError(f'--resume {resume}: every checkpoint under {self.folder} is damaged')
        return None, skipped

    def _check_resumable(self, folder: Path, identity: Dict[str, Any], end_of_epoch_only: bool) -> None:
        state = self.read(folder, identity)
        if end_of_epoch_only and state['progress']['step_in_epoch']:
            raise CheckpointError(f'{folder} was saved in the middle of epoch {state["progress"]["epoch"]}; a streamed '
                                  'dataset resumes only from a checkpoint saved at the end of an epoch')

    def load(self, folder: Path, ema: Optional[torch.nn.Module] = None,
             model: Optional[torch.nn.Module] = None) -> Dict[str, Any]:
        """Load ``folder`` into the prepared objects (and ``ema``; a checkpoint without EMA weights
        starts it from ``model``); returns its ``run_state.json``."""
        state = json.loads((folder / STATE_FILE).read_text())
        self.accelerator.load_state(str(folder))
        if ema is not None:
            ema.load_state_dict(load_file(str(folder / EMA_FILE)) if (folder / EMA_FILE).is_file()
                                else model.state_dict())
        return state


def _write_error(tmp: Path, error: OSError) -> str:
    """The one line for a checkpoint that could not be written (a full disk, a read-only folder)."""
    return f'cannot write the checkpoint {tmp}: {error.strerror or error}; the earlier checkpoints are kept'


def _check_files(folder: Path) -> None:
    """Refuse truncated or damaged weight, optimizer and scaler files by their headers (a safetensors
    header that does not fit the file, a torch archive whose directory or checksums fail), and pickled
    custom objects, which this recipe never saves and accelerate would unpickle."""
    for path in sorted(folder.glob('custom_checkpoint_*')):
        raise DamagedCheckpoint(f'{path} is not a file this recipe writes (accelerate would unpickle it); refused')
    for path in sorted(folder.glob('*.safetensors')):
        try:
            with safe_open(str(path), framework='pt') as f:
                f.keys()
        except Exception as e:  # safetensors raises its own error types for a damaged file
            raise DamagedCheckpoint(f'{path} is damaged or truncated ({one_line(e)})') from e
    for path in sorted([*folder.glob('optimizer*.bin'), *folder.glob('scaler*.pt')]):
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
            if bad is not None:
                raise zipfile.BadZipFile(f'member {bad} fails its checksum')
        except (zipfile.BadZipFile, OSError) as e:
            raise DamagedCheckpoint(f'{path} is damaged or truncated ({one_line(e)})') from e



def recorded_model_args(run_dir: Path, resume: Optional[str]) -> Optional[Dict[str, Any]]:
    """The model arguments recorded by the checkpoint ``resume`` continues: the named folder, else the
    newest readable one under ``run_dir/checkpoints``; None when there is none (the store then reports
    what it finds). Read before the model is built, so a resumed run builds the model it saved."""
    if not resume:
        return None
    folder = Path(run_dir) / 'checkpoints'
    candidates = ([Path(resume)] if resume not in ('latest', 'auto') else
                  sorted((p for p in folder.glob('checkpoint_*') if checkpoint_index(p) >= 0), key=checkpoint_index,
                         reverse=True))
    for candidate in candidates:
        try:
            return dict(json.loads((candidate / STATE_FILE).read_text())['identity']['model_args'])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def resume_run(store: CheckpointStore, resume: str, identity: Dict[str, Any], scheduler, ema=None, model=None,
               end_of_epoch_only: bool = False) -> Tuple[Progress, List[str]]:
    """Load the checkpoint ``resume`` names (``CheckpointStore.choose``) on every process: the main
    process picks and checks it (a refusal is raised on every process), every process loads it.

    The schedule continues at the resumed epoch (``load_scheduler_state``; a larger ``epochs`` than the
    checkpoint's run planned re-plans an epoch-based schedule). Returns the progress (a fresh one for
    'auto' without a checkpoint) and the lines to show: the skipped checkpoints and what was resumed.
    """
    chosen: List[Any] = [None, []]

    def pick() -> None:
        folder, skipped = store.choose(resume, identity, end_of_epoch_only)
        chosen[:] = [str(folder) if folder else None, skipped]
    store.on_main(pick)
    path, lines = from_main(store.accelerator, chosen)
    if path is None:
        return Progress(), [*lines, f'--resume {resume}: no checkpoint yet, a fresh run']
    folder = Path(path)
    state = store.load(folder, ema, model)
    progress = Progress.from_dict(state['progress'])
    load_scheduler_state(scheduler, state['scheduler'], progress.epoch)
    message = f'resumed from {folder}: epoch {progress.epoch}, step {progress.global_step}'
    planned, epochs = state['identity'].get('epochs'), identity['epochs']
    if planned != epochs:
        continues = ('its schedule continues' if 'torch' in state['scheduler'] else
                     f'the schedule is re-planned for {epochs} epochs, as timm\'s train.py does')
        message += f'; epochs {planned} -> {epochs}: {continues}'
    return progress, [*lines, message]
