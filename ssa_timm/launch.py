"""``ssa-timm-launch``: ``accelerate launch`` as a scheduler's job step that stops cleanly.

Usage: ``ssa-timm-launch [accelerate launch options] recipes/train.py [train.py options]`` (or
``python -m ssa_timm.launch ...``); every argument goes to ``accelerate launch`` unchanged.

Why a wrapper: ``accelerate launch`` hands its workers to torch's elastic agent, which starts each in
a session of its own and owns their signal handling. A stop signal there ends badly for a scheduler
that requeues on ``128 + signal``: SIGUSR1 (SLURM's ``--signal``) kills the launcher at once and leaves
the workers running without it; a worker that stops on a signal is reported as a failed child (exit
1 and a traceback). The wrapper owns the signals instead:

* it starts ``accelerate launch --quiet`` in a session of its own (a signal to the wrapper's process
  group reaches only the wrapper), ignoring SIGUSR1 (a scheduler that signals every process of the job
  would otherwise kill it at once), and arranges for it to be stopped should the wrapper die;
* the workers receive SIGTERM should their launcher die (``attach_worker``), and register with the
  wrapper (``register_worker``, through the folder named by ``SSA_TIMM_LAUNCH_DIR``) once their stop
  handler is in place (``ssa_timm.train.StopRequest`` registers them), so a forwarded signal never
  finds a worker without one;
* SIGTERM, SIGINT, SIGUSR1 and SIGHUP to the wrapper go to every registered worker: the workers stop at
  a step boundary with a checkpoint (``ssa_timm.train.preemption``; the same signal arriving again
  within a second, as when a scheduler signals every process and the wrapper forwards it too, counts
  once); before any worker has registered, the launcher is stopped with SIGTERM;
* a signal sent to one worker directly stops every worker the same way (they agree at a step);
* a worker that ends on a stop or an error tells the wrapper its exit status and its ``error:`` line
  (``job_exit_status``) and exits 0, so the launcher ends quietly (no failure report); the wrapper prints
  each distinct line once for the job. Should other workers still run ``ERROR_GRACE_SECONDS`` after a
  worker ended on an error (stuck in a collective with it), they and the launcher are killed;
* the wrapper waits for every registered worker to end, then exits with the status its workers reported
  (``128 + the signal`` after a stop), or with the launcher's status (a crash is not hidden);
* a helper process removes the wrapper's temporary folder should the wrapper itself be killed.
"""
import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .run_dir import process_start_time

__all__ = ['ERROR_GRACE_SECONDS', 'FORWARDED_SIGNALS', 'LAUNCH_DIR_ENV', 'attach_worker', 'die_with_parent',
           'job_exit_status', 'main', 'register_worker', 'run_launcher']

LAUNCH_DIR_ENV = 'SSA_TIMM_LAUNCH_DIR'
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)
ERROR_GRACE_SECONDS = 20.0
_EXIT = 'exit-'
_PR_SET_PDEATHSIG = 1
# the temporary folder's keeper: removes it once the wrapper is gone, however it ended (its stdin closes);
# deaf to the job's stop signals, which a scheduler may send to every process
_KEEPER = ('import shutil, signal, sys\n'
           'for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP): signal.signal(s, signal.SIG_IGN)\n'
           'sys.stdin.buffer.read()\n'
           'shutil.rmtree(sys.argv[1], ignore_errors=True)\n')


def _launch_dir() -> Optional[Path]:
    folder = os.environ.get(LAUNCH_DIR_ENV)
    return Path(folder) if folder and Path(folder).is_dir() else None


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Ask Linux to send ``signum`` to this process when its parent ends (no-op elsewhere)."""
    if not sys.platform.startswith('linux'):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def attach_worker() -> None:
    """Call first thing in a training process: under a launcher (torchrun, ``accelerate launch``), ask for
    SIGTERM when the launcher dies (and send it now if it already has). A no-op in a process of its own."""
    if 'TORCHELASTIC_RUN_ID' in os.environ:  # a worker of torchrun / accelerate launch
        parent = os.getppid()
        die_with_parent(signal.SIGTERM)
        if os.getppid() != parent or parent == 1:  # the launcher ended before the request was in place
            os.kill(os.getpid(), signal.SIGTERM)


def register_worker() -> None:
    """Under the wrapper, register this process to receive its stop signals; call once the process handles
    them (``StopRequest`` does). A no-op elsewhere."""
    folder = _launch_dir()
    if folder is not None:
        tmp = folder / f'.worker-{os.getpid()}'
        try:
            tmp.write_text(f'{os.getpid()} {process_start_time(os.getpid()) or ""}')
            os.replace(tmp, folder / f'worker-{os.getpid()}')  # whole, or not there
        except OSError:  # the wrapper is gone with its folder: nothing to register with
            pass


def job_exit_status(status: int, line: str = '', stop: bool = False) -> int:
    """The status a worker ending with ``status`` exits with. Under the wrapper: 0, after telling it
    ``status`` and the ``error:`` ``line`` to print once for the job (``stop``: a clean stop, with its
    checkpoint); elsewhere ``status`` itself (the caller prints its own line)."""
    folder = _launch_dir()
    if folder is None:
        return status
    try:
        tmp = folder / f'.{_EXIT}{os.getpid()}'
        tmp.write_text(json.dumps({'status': status, 'line': line, 'stop': stop}))
        os.replace(tmp, folder / f'{_EXIT}{os.getpid()}')
    except OSError:  # the wrapper is gone: report the status the usual way
        return status
    return 0


def _exit_records(folder: Path) -> List[Dict]:
    """What the workers that ended on a stop or an error reported, oldest first."""
    records = []
    for path in sorted(folder.glob(f'{_EXIT}*'), key=lambda p: p.stat().st_mtime):
        try:
            records.append(dict(json.loads(path.read_text()), pid=int(path.name[len(_EXIT):])))
        except (OSError, ValueError):
            continue
    return records


def _workers(folder: Path) -> List[int]:
    """The registered workers that still run (a pid reused by another process is not one of them)."""
    alive = []
    for path in folder.glob('worker-*'):
        try:
            pid, _, started = path.read_text().partition(' ')
            os.kill(int(pid), 0)
        except (OSError, ValueError):
            continue
        if not started or started == process_start_time(int(pid)):
            alive.append(int(pid))
    return alive


def _forward(folder: Path, launcher: subprocess.Popen, signum: int) -> bool:
    """Send ``signum`` to every worker; with none registered yet, stop the launcher (returns True then)."""
    workers = _workers(folder)
    for pid in workers:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
    if workers or launcher.poll() is not None:
        return False
    os.killpg(launcher.pid, signal.SIGTERM)  # no worker trains yet: nothing to checkpoint
    return True


def _start_launcher() -> None:
    """``preexec_fn`` of the launcher: stopped when the wrapper dies; deaf to SIGUSR1 (its workers hear it)."""
    die_with_parent(signal.SIGTERM)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def run_launcher(accelerate_args: Sequence[str], worker_grace: float = 600.0) -> int:
    """Run ``accelerate launch accelerate_args`` under the wrapper (see the module doc); its exit status.

    Args:
        accelerate_args: ``accelerate launch``'s arguments, the training script and its arguments.
        worker_grace: Seconds to wait for registered workers still writing after the launcher ended.
    """
    with tempfile.TemporaryDirectory(prefix='ssa-timm-launch-') as tmp:
        folder = Path(tmp)
        keeper = subprocess.Popen([sys.executable, '-c', _KEEPER, tmp], stdin=subprocess.PIPE, start_new_session=True)
        env = {**os.environ, LAUNCH_DIR_ENV: str(folder)}
        launcher = subprocess.Popen([sys.executable, '-m', 'accelerate.commands.launch', '--quiet', *accelerate_args],
                                    env=env, start_new_session=True, preexec_fn=_start_launcher)
        stopped_launcher: List[int] = []

        def forward(signum: int, frame) -> None:
            if _forward(folder, launcher, signum):
                stopped_launcher.append(signum)
        previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS  # nohup's SIGHUP stays ignored
                    if s != signal.SIGHUP or signal.getsignal(s) != signal.SIG_IGN}
        try:
            status = _wait(folder, launcher)
            end = time.monotonic() + worker_grace
            while _workers(folder) and time.monotonic() < end:  # workers a dead launcher left writing
                time.sleep(0.2)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        records = _exit_records(folder)
    keeper.stdin.close()
    keeper.wait()
    for line in dict.fromkeys(r['line'] for r in records if r['line']):  # each distinct line once
        print(line, file=sys.stderr, flush=True)
    if records:  # an error (a full disk, a lost lock, a second signal) before a clean stop: no requeue of a failure
        return ([r for r in records if not r['stop']] or records)[0]['status']
    if stopped_launcher:
        return 128 + stopped_launcher[0]
    return status


def _wait(folder: Path, launcher: subprocess.Popen) -> int:
    """The launcher's exit status; should workers still run ``ERROR_GRACE_SECONDS`` after a worker reported
    an error (not a clean stop), the launcher and they are killed (they would wait for it forever)."""
    error_at = None
    while launcher.poll() is None:
        if error_at is None and any(not r['stop'] for r in _exit_records(folder)):
            error_at = time.monotonic()
        if error_at is not None and time.monotonic() - error_at > ERROR_GRACE_SECONDS:
            for kill, pid in ((os.killpg, launcher.pid), *((os.kill, w) for w in _workers(folder))):
                try:
                    kill(pid, signal.SIGKILL)  # the launcher first: killed, it reports nothing
                except ProcessLookupError:
                    pass
            error_at = float('inf')
        time.sleep(0.2)
    return launcher.returncode


def main(argv: Optional[Sequence[str]] = None) -> None:
    """The ``ssa-timm-launch`` command."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ('-h', '--help'):
        print(__doc__.strip())
        raise SystemExit(0 if args else 2)
    raise SystemExit(run_launcher(args))


if __name__ == '__main__':
    main()
