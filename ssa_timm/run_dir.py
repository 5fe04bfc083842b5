"""Output folders a run owns: claimed before any data or model is loaded, locked against a
second concurrent run, and written so that a kill at any moment leaves the previous complete copy.

A folder holds a run when it has ``checkpoints/``, ``best/`` or ``metrics.jsonl``. A new run
refuses such a folder unless it resumes it or is told to overwrite it. ``.lock`` names the process
that owns the folder (pid and host) and carries a heartbeat, its modification time, refreshed every
``HEARTBEAT_SECONDS`` while the run lives. A lock is stale, and taken over, when its process is gone
(same host) or its heartbeat is older than ``STALE_AFTER_SECONDS`` (any host: a run killed on
another machine of a cluster, then requeued here).
"""
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

from .errors import UserError

__all__ = [
    'HEARTBEAT_SECONDS', 'RUN_FILES', 'RunLock', 'STALE_AFTER_SECONDS', 'atomic_dir', 'atomic_write_text',
    'check_output_file', 'ensure_writable_dir', 'check_output_path', 'restore_interrupted', 'run_files',
]

RUN_FILES = ('checkpoints', 'best', 'metrics.jsonl')
LOCK_NAME = '.lock'
HEARTBEAT_SECONDS = 60.0
STALE_AFTER_SECONDS = 300.0


def ensure_writable_dir(path: Path, what: str = 'output folder') -> Path:
    """Create ``path`` (and parents) and check that files can be written there."""
    if path.exists() and not path.is_dir():
        raise UserError(f'{what} {path} is a file, not a folder')
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix='.write-check-'):
            pass
    except OSError as e:
        raise UserError(f'{what} {path} is not writable: {e.strerror or e}') from e
    return path


def check_output_file(path: Optional[str], what: str = 'output file') -> Optional[Path]:
    """Check, before the expensive work, that ``path`` can be written: its folder is created and
    writable, and ``path`` itself is not a folder."""
    if not path:
        return None
    out = Path(path)
    if out.is_dir():
        raise UserError(f'{what} {out} is a folder; give a file name')
    ensure_writable_dir(out.parent if str(out.parent) else Path('.'), f'folder of the {what}')
    return out


def _same_or_inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def check_output_path(
        path: str | None,
        what: str,
        inputs: Sequence[str | Path] = (),
        model_folders: Sequence[str | Path] = (),
        is_folder: bool = False,
) -> Path | None:
    """Check, before the expensive work, that an output neither clobbers an input nor fails late.

    Refused: an output equal to one of ``inputs`` (or the same file under another name), an output
    inside one of ``model_folders`` (a report written over ``config.json`` would break the model), a
    file output that is a folder, and a folder where a written byte does not land (a full disk fails
    here, in one line, not after the work). Nothing is left behind by the check.

    Args:
        path: The output (None: nothing to check).
        what: The flag that names it, for messages (e.g. '--output').
        inputs: Files the command reads.
        model_folders: Model folders the command reads.
        is_folder: ``path`` is an output folder (created) rather than a file.

    Returns:
        ``path`` as a ``Path``, or None.

    Raises:
        UserError: Naming ``what``, the path and the reason.
    """
    if not path:
        return None
    out = Path(path)
    for folder in model_folders:
        if _same_or_inside(out, Path(folder)):
            raise UserError(f'{what} {out} is inside the model folder {folder}; write it elsewhere '
                            "(it would replace or mix with the model's files)")
    for item in inputs:
        item = Path(item)
        if out.resolve() == item.resolve() or (out.exists() and item.exists() and os.path.samefile(out, item)):
            raise UserError(f'{what} {out} is also an input; give another path')
    parent = ensure_writable_dir(out, what) if is_folder else check_output_file(path, what).parent
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix='.write-check-') as probe:
            probe.write(b'\0')
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as e:
        raise UserError(f'{what} {out}: cannot write to {parent}: {e.strerror or e}') from e
    return out


def run_files(path: Path) -> List[str]:
    """The names of the run files (``RUN_FILES``) that ``path`` holds."""
    return [name for name in RUN_FILES if (path / name).exists()]


def restore_interrupted(final: Path) -> None:
    """Finish an ``atomic_dir`` replacement a kill interrupted: bring back ``final`` from its
    ``.old`` copy if ``final`` is missing, and drop leftover temporary copies."""
    old = final.parent / f'.{final.name}.old'
    if old.is_dir() and not final.exists():
        old.rename(final)
    for leftover in final.parent.glob(f'.{final.name}.tmp-*'):
        shutil.rmtree(leftover, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to write into; on success it replaces ``final``.

    A new ``final`` appears with one rename. Replacing an existing one takes two (old aside, new in);
    ``restore_interrupted`` repairs a kill between them. On an exception the temporary copy is
    removed and ``final`` is untouched.
    """
    tmp = final.parent / f'.{final.name}.tmp-{os.getpid()}'
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.parent / f'.{final.name}.old'
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(f'.{path.name}.tmp-{os.getpid()}')
    tmp.write_text(text)
    os.replace(tmp, path)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """Exclusive ownership of an output folder by one process (``<folder>/.lock``, JSON: pid, host),
    kept alive by a heartbeat thread that touches the lock while it is held.

    Args:
        folder: The folder to own.
        heartbeat: Seconds between two refreshes of the lock's modification time.
        stale_after: A lock whose heartbeat is older than this many seconds is stale.
    """

    def __init__(self, folder: Path, heartbeat: float = HEARTBEAT_SECONDS,
                 stale_after: float = STALE_AFTER_SECONDS) -> None:
        self.path = folder / LOCK_NAME
        self.heartbeat = heartbeat
        self.stale_after = stale_after
        self.held = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def acquire(self) -> 'RunLock':
        """Take the lock, taking over a stale one; a live owner raises ``UserError``."""
        me = {'pid': os.getpid(), 'host': socket.gethostname()}
        tmp = self.path.with_name(f'{LOCK_NAME}.{os.getpid()}')
        try:
            tmp.write_text(json.dumps(me))
            for _ in range(2):
                try:
                    os.link(tmp, self.path)  # atomic: the lock appears with its content
                except FileExistsError:
                    self._refuse_live_owner(me['host'])
                    self.path.unlink(missing_ok=True)  # stale: its process is gone or its heartbeat stopped
                    continue
                self.held = True
                self._start_heartbeat()
                return self
        except OSError as e:
            raise UserError(f'cannot write the lock {self.path}: {e.strerror or e}') from e
        finally:
            tmp.unlink(missing_ok=True)
        raise UserError(f'could not take the lock {self.path}')

    def _refuse_live_owner(self, host: str) -> None:
        owner, age = self._owner()
        if owner is None or age > self.stale_after:
            return
        if owner.get('host') == host and not _process_alive(int(owner['pid'])):
            return
        raise UserError(
            f'{self.path.parent} is in use by another run (pid {owner.get("pid")} on {owner.get("host")}, heartbeat '
            f'{age:.0f} s ago); wait for it, or use another --output-dir (a lock whose heartbeat is older than '
            f'{self.stale_after:.0f} s is taken over)')

    def _owner(self) -> Tuple[Optional[dict], float]:
        """The lock's content and the age of its heartbeat (None for an unreadable lock: stale)."""
        try:
            age = time.time() - self.path.stat().st_mtime
            owner = json.loads(self.path.read_text())
            int(owner['pid'])
            return owner, age
        except (OSError, ValueError, KeyError, TypeError):
            return None, 0.0

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name='run-lock-heartbeat', daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                os.utime(self.path)
            except OSError:  # a full or unmounted disk: the run itself reports its write errors
                pass

    def release(self) -> None:
        if self.held:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.path.unlink(missing_ok=True)
            self.held = False
