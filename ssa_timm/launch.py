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
* the workers register with it (``attach_worker``, through the folder named by ``SSA_TIMM_LAUNCH_DIR``),
  and receive SIGTERM should their launcher die;
* SIGTERM, SIGINT, SIGUSR1 and SIGHUP to the wrapper go to every registered worker: the workers stop at
  a step boundary with a checkpoint (``ssa_timm.train.preemption``; the same signal arriving again
  within a second, as when a scheduler signals every process and the wrapper forwards it too, counts
  once), tell the wrapper which signal stopped them (``stop_exit_status``) and exit 0, so the launcher
  ends quietly; before any worker has registered, the launcher is stopped with SIGTERM;
* a signal sent to one worker directly stops every worker the same way (they agree at a step);
* the wrapper waits for every registered worker to end, then exits with ``128 + the signal`` that
  stopped the workers, or with the launcher's status (a failure other than a stop is not hidden).
"""
import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence

from .run_dir import process_start_time

__all__ = ['FORWARDED_SIGNALS', 'LAUNCH_DIR_ENV', 'attach_worker', 'die_with_parent', 'main', 'run_launcher',
           'stop_exit_status']

LAUNCH_DIR_ENV = 'SSA_TIMM_LAUNCH_DIR'
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)
_STOPPED = 'stopped'
_PR_SET_PDEATHSIG = 1


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
    SIGTERM when the launcher dies (and send it now if it already has); under the wrapper, register this
    process to receive the wrapper's stop signals. A no-op in a process of its own."""
    if 'TORCHELASTIC_RUN_ID' in os.environ:  # a worker of torchrun / accelerate launch
        parent = os.getppid()
        die_with_parent(signal.SIGTERM)
        if os.getppid() != parent or parent == 1:  # the launcher ended before the request was in place
            os.kill(os.getpid(), signal.SIGTERM)
    folder = _launch_dir()
    if folder is not None:
        tmp = folder / f'.worker-{os.getpid()}'
        tmp.write_text(f'{os.getpid()} {process_start_time(os.getpid()) or ""}')
        os.replace(tmp, folder / f'worker-{os.getpid()}')  # whole, or not there


def stop_exit_status(signum: int) -> int:
    """The exit status of a worker a stop signal ended: 0 under the wrapper, which is told ``signum``
    and exits ``128 + signum`` itself; else ``128 + signum``, as a shell reports a signalled process."""
    folder = _launch_dir()
    try:
        if folder is not None:
            (folder / _STOPPED).write_text(str(signum))
            return 0
    except OSError:  # the wrapper is gone: report the signal the usual way
        pass
    return 128 + signum


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
        env = {**os.environ, LAUNCH_DIR_ENV: str(folder)}
        launcher = subprocess.Popen([sys.executable, '-m', 'accelerate.commands.launch', '--quiet', *accelerate_args],
                                    env=env, start_new_session=True, preexec_fn=_start_launcher)
        stopped_launcher: List[int] = []

        def forward(signum: int, frame) -> None:
            if _forward(folder, launcher, signum):
                stopped_launcher.append(signum)
        previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
        try:
            status = launcher.wait()
            end = time.monotonic() + worker_grace
            while _workers(folder) and time.monotonic() < end:  # workers a dead launcher left writing
                time.sleep(0.2)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        stopped = (folder / _STOPPED).read_text().strip() if (folder / _STOPPED).is_file() else ''
    if stopped.isdigit():
        return 128 + int(stopped)
    if stopped_launcher:
        return 128 + stopped_launcher[0]
    return status


def main(argv: Optional[Sequence[str]] = None) -> None:
    """The ``ssa-timm-launch`` command."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ('-h', '--help'):
        print(__doc__.strip())
        raise SystemExit(0 if args else 2)
    raise SystemExit(run_launcher(args))


if __name__ == '__main__':
    main()
