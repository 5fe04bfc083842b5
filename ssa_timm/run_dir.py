"""The run folder's lifecycle, in one place: claimed before any data or model is loaded, locked
against every other run, its old run set aside by ``--overwrite`` and dropped once the new run has a
checkpoint, its ``metrics.jsonl`` appended to and trimmed on resume, and every write fenced.

A folder holds a run when it has ``checkpoints/``, ``best/`` or ``metrics.jsonl``. A new run refuses
such a folder unless it resumes it or is told to overwrite it.

The lock (``<folder>/.lock``, JSON) names its owner: pid, host (name, boot id, pid namespace), the
process's start time, the SLURM job and restart count when there is one, a random owner token and a
generation that grows with each takeover. Its modification time is a heartbeat, refreshed every
``HEARTBEAT_SECONDS``. A lock is taken over only when its owner is surely gone:

* on this host (same name, boot and pid namespace), when its process no longer runs (a live process
  is never taken over, however old its heartbeat: a paused job, a suspended laptop, a stopped process);
* when it is an earlier run of this SLURM job (same job id, another restart count: a requeued job
  whose node died; SLURM requeues a job only once its processes are gone);
* from another host, when its heartbeat is older than ``STALE_AFTER_SECONDS`` (a run killed on another
  machine of a cluster, then requeued here). The age is read against the folder's own filesystem
  clock (a file touched there now), so clock skew between machines of a shared filesystem does not
  make a live lock look stale.

A takeover across hosts may hit an owner that was only paused. So the takeover is fenced: the owner
re-reads the lock before every write to the folder (checkpoint, metrics, best model, release) and,
finding another token there, stops with ``LockLost`` without writing; it never deletes the new
owner's lock. Temporary names carry a per-owner suffix, so two owners never write one temporary file.
"""
import json
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional

from .errors import LockLost, RunFolderInUse, UserError
from .output_paths import atomic_write_text, ensure_writable_dir, restore_interrupted

__all__ = ['HEARTBEAT_SECONDS', 'METRICS', 'REPLACED', 'RUN_FILES', 'RunFolder', 'RunLock', 'STALE_AFTER_SECONDS',
           'process_start_time', 'run_files']

RUN_FILES = ('checkpoints', 'best', 'metrics.jsonl')
METRICS = 'metrics.jsonl'
REPLACED = '.replaced'  # --overwrite moves the old run here, deleted once the new run has a checkpoint
LOCK_NAME = '.lock'
HEARTBEAT_SECONDS = 60.0
STALE_AFTER_SECONDS = 300.0


def run_files(path: Path) -> List[str]:
    """The names of the run files (``RUN_FILES``) that ``path`` holds."""
    return [name for name in RUN_FILES if (path / name).exists()]


def process_start_time(pid: int) -> Optional[str]:
    """The start time of process ``pid`` (Linux: ``/proc/<pid>/stat`` field 22), to tell a reused pid from
    the process recorded with it (a lock's owner, a launcher's worker); None where it cannot be read."""
    try:
        stat = Path(f'/proc/{pid}/stat').read_text()
    except OSError:
        return None
    return stat.rpartition(')')[2].split()[19]


def _host_identity() -> Dict[str, Any]:
    """What tells this host (and pid namespace) from another: a container sharing the host name has
    another pid namespace, a rebooted machine another boot id."""
    def read(path: str, link: bool = False) -> Optional[str]:
        try:
            return os.readlink(path) if link else Path(path).read_text().strip()
        except OSError:
            return None
    return {'host': socket.gethostname(), 'boot': read('/proc/sys/kernel/random/boot_id'),
            'pidns': read('/proc/self/ns/pid', link=True)}


def _slurm_run() -> Dict[str, Optional[str]]:
    return {'job': os.environ.get('SLURM_JOB_ID'), 'restart': os.environ.get('SLURM_RESTART_COUNT', '0')}


def _process_alive(pid: int, started: Optional[str]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    now = process_start_time(pid)
    return started is None or now is None or now == started


class RunLock:
    """Exclusive, fenced ownership of a run folder by one process (see the module doc).

    Args:
        folder: The folder to own.
        heartbeat: Seconds between two refreshes of the lock's modification time.
        stale_after: A lock of another host whose heartbeat is older than this many seconds is stale.
    """

    def __init__(self, folder: Path, heartbeat: float = HEARTBEAT_SECONDS,
                 stale_after: float = STALE_AFTER_SECONDS) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.heartbeat = heartbeat
        self.stale_after = stale_after
        self.token = uuid.uuid4().hex
        self.generation = 0
        self.held = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _record(self) -> Dict[str, Any]:
        return {'pid': os.getpid(), **_host_identity(), 'started': process_start_time(os.getpid()), **_slurm_run(),
                'token': self.token, 'generation': self.generation}

    def acquire(self) -> 'RunLock':
        """Take the lock, taking over a stale one (see the module doc).

        Raises:
            RunFolderInUse: Another live run owns the folder.
            UserError: The lock cannot be written.
        """
        tmp = self.path.with_name(f'{LOCK_NAME}.{self.token}')
        try:
            for _ in range(3):
                tmp.write_text(json.dumps(self._record()))
                try:
                    os.link(tmp, self.path)  # atomic: the lock appears with its content, or not at all
                except FileExistsError:
                    if tmp.stat().st_nlink < 2:  # (NFS may report EEXIST for a retried link that worked)
                        self._take_over_if_stale()
                        continue
                self.held = True
                self._start_heartbeat()
                return self
        except OSError as e:
            raise UserError(f'cannot write the lock {self.path}: {e.strerror or e}') from e
        finally:
            tmp.unlink(missing_ok=True)
        raise RunFolderInUse(f'could not take the lock {self.path}: other runs keep taking it')

    def _take_over_if_stale(self) -> None:
        """Move a stale lock out of the way (raise ``RunFolderInUse`` for a live one). The lock is renamed
        aside, then checked to be the one judged stale; a racing run's fresh lock is put back."""
        owner = self.owner()
        self._refuse_live_owner(owner, _age(self.path) if owner else 0.0)
        aside = self.path.with_name(f'{LOCK_NAME}.stale-{self.token}')
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another run moved it first
        moved = _read_lock(aside)
        if owner is not None and (moved or {}).get('token') != owner.get('token'):
            try:
                os.link(aside, self.path)  # not the stale lock: a racing run's fresh one, back in place
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)
        self.generation = int((owner or {}).get('generation', 0)) + 1

    def _refuse_live_owner(self, owner: Optional[Dict[str, Any]], age: float) -> None:
        if owner is None:
            return  # unreadable: not a lock this code wrote
        where = f'pid {owner.get("pid")} on {owner.get("host")}'
        slurm = _slurm_run()
        if slurm['job'] and owner.get('job') == slurm['job'] and owner.get('restart') != slurm['restart']:
            return  # an earlier run of this requeued job: SLURM requeues only once its processes are gone
        here = _host_identity()
        if all(owner.get(key) in (value, None) for key, value in here.items() if value is not None) \
                and owner.get('host') == here['host']:
            if _process_alive(int(owner['pid']), owner.get('started')):
                raise RunFolderInUse(
                    f'{self.path.parent} is in use by another run ({where}, alive; {_heartbeat(age)}); wait '
                    'for it or stop it, or use another --output-dir (a run alive on this host is never taken over)')
            return
        if age <= self.stale_after:
            raise RunFolderInUse(
                f'{self.path.parent} is in use by another run ({where}, {_heartbeat(age)}); wait for it, '
                f'or use another --output-dir (a lock from another host whose heartbeat is older than '
                f'{self.stale_after:.0f} s is taken over)')

    def owner(self) -> Optional[Dict[str, Any]]:
        """The lock's content (None for a missing or unreadable lock)."""
        return _read_lock(self.path)

    def check(self) -> None:
        """Fence a write: raise ``LockLost`` unless this lock is still held by this owner."""
        if not self.held:
            return
        owner = self.owner()
        if owner is None:  # a racing run may have moved it aside for a moment (and puts it back)
            time.sleep(0.2)
            owner = self.owner()
        if (owner or {}).get('token') != self.token:
            taken = (f'by pid {owner.get("pid")} on {owner.get("host")} (generation {owner.get("generation")})'
                     if owner else '(the lock file is gone)')
            self._stop.set()
            raise LockLost(f'the lock on {self.path.parent} was taken over {taken} while this run was paused or '
                           'its heartbeat late; this run stopped without writing more (its last checkpoint stays)')

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name='run-lock-heartbeat', daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            owner = self.owner()
            if owner is not None and owner.get('token') != self.token:
                return  # taken over: the next write stops the run (check)
            try:
                os.utime(self.path)
            except OSError:  # missing for a moment, a full or unmounted disk: the run reports its write errors
                pass

    def release(self) -> None:
        """Stop the heartbeat and remove the lock, if it is still this owner's (a lost lock stays)."""
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.held = False
        aside = self.path.with_name(f'{LOCK_NAME}.release-{self.token}')
        try:
            os.rename(self.path, aside)  # out of the way first: never unlink a lock another run just wrote
        except OSError:
            return
        moved = _read_lock(aside)
        if (moved or {}).get('token') != self.token:
            try:
                os.link(aside, self.path)  # another owner's: back in place
            except OSError:
                pass
        aside.unlink(missing_ok=True)


_PID_RANGE = range(1, 2 ** 31)  # a process id (pid_t): 0, negative or huge ones name no process


def _read_lock(path: Path) -> Optional[Dict[str, Any]]:
    """A lock's content; None when it is missing, unreadable or names no usable process (not an owner)."""
    try:
        owner = json.loads(path.read_text())
        if isinstance(owner['pid'], bool) or int(owner['pid']) not in _PID_RANGE:
            return None
        return owner
    except (OSError, ValueError, KeyError, TypeError, OverflowError):
        return None


def _heartbeat(age: float) -> str:
    """The heartbeat's age in words; a lock touched by a clock ahead of this filesystem's is 'in the future'."""
    return f'heartbeat {age:.0f} s ago' if age >= -0.5 else f'heartbeat {-age:.0f} s in the future (a clock ahead)'


def _age(path: Path) -> float:
    """Seconds since ``path`` was modified, by its filesystem's clock: the modification time of a file
    touched there now (on NFS the server's clock), else this machine's clock."""
    now = time.time()
    probe = path.with_name(f'{LOCK_NAME}.clock-{uuid.uuid4().hex[:8]}')
    try:
        probe.touch()
        now = probe.stat().st_mtime
    except OSError:
        pass
    finally:
        probe.unlink(missing_ok=True)
    try:
        return now - path.stat().st_mtime
    except FileNotFoundError:  # gone since it was read: nothing left to wait for
        return float('inf')


class RunFolder:
    """A training run's folder, from claim to release (see the module doc).

    Args:
        path: The folder (``--output-dir``).
        lock: Its lock (default: ``RunLock(path)``).
    """

    def __init__(self, path: Path, lock: Optional[RunLock] = None) -> None:
        self.path = Path(path)
        self.lock = lock or RunLock(self.path)

    def claim(self, resume: Optional[str] = None, overwrite: bool = False) -> None:
        """Own the folder: writable, locked, repaired after a kill, holding no other run unless
        ``resume`` or ``overwrite`` (which sets the old run aside until ``drop_replaced``).

        Raises:
            RunFolderInUse: Another live run owns it.
            UserError: Not writable, or it holds a run and neither ``resume`` nor ``overwrite`` is given.
        """
        ensure_writable_dir(self.path, '--output-dir')
        self.lock.acquire()
        try:
            for name in ('best', 'checkpoints'):
                restore_interrupted(self.path / name)
            self._drop_leftovers()
            found = run_files(self.path)
            if found and not (resume or overwrite):
                raise UserError(f'--output-dir {self.path} already holds a run ({", ".join(found)}); pass --resume '
                                'latest to continue it, --overwrite to replace it, or another --output-dir')
            if overwrite:
                self._set_aside()
        except BaseException:
            self.lock.release()
            raise

    def _drop_leftovers(self) -> None:
        """Temporary files of earlier owners killed mid-write (checkpoints, metrics)."""
        for pattern in ('checkpoints/.checkpoint_*.tmp*', 'checkpoints/.checkpoint_*.del', f'.{METRICS}.tmp-*'):
            for leftover in self.path.glob(pattern):
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)

    def _set_aside(self) -> None:
        """Move the run's files into ``.replaced`` (the feature cache stays: it is keyed by its inputs)."""
        aside = self.path / REPLACED
        shutil.rmtree(aside, ignore_errors=True)
        aside.mkdir()
        for name in RUN_FILES:
            if (self.path / name).exists():
                (self.path / name).rename(aside / name)

    def fence(self) -> None:
        """Raise ``LockLost`` if another run took the folder over; called before every write."""
        self.lock.check()

    def drop_replaced(self) -> None:
        """Delete the run ``--overwrite`` set aside (once the new run has a checkpoint)."""
        shutil.rmtree(self.path / REPLACED, ignore_errors=True)

    def append_metrics(self, line: Dict[str, Any]) -> None:
        """Add one epoch's line to ``metrics.jsonl``."""
        self.fence()
        try:
            with (self.path / METRICS).open('a') as f:
                f.write(json.dumps(line) + '\n')
        except OSError as e:
            raise UserError(f'cannot write {self.path / METRICS}: {e.strerror or e}') from e

    def keep_metrics_before(self, epoch: int) -> None:
        """Keep the ``metrics.jsonl`` lines of the epochs before ``epoch`` (a resume redoes the others;
        a line cut short by a kill is dropped)."""
        path = self.path / METRICS
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
        self.fence()
        atomic_write_text(path, ''.join(f'{text}\n' for text in kept))

    def release(self) -> None:
        """Give the folder up (the lock is removed only if it is still this run's)."""
        self.lock.release()
