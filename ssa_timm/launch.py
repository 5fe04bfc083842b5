"""``ssa-timm-launch``: ``accelerate launch`` as a scheduler's job step that stops cleanly.

Usage: ``ssa-timm-launch [accelerate launch options] recipes/train.py [train.py options]`` (or
``python -m ssa_timm.launch ...``); every argument goes to ``accelerate launch`` unchanged.

Why a wrapper: ``accelerate launch`` hands its workers to torch's elastic agent, which starts each in
a session of its own and owns their signal handling. A stop signal there ends badly for a scheduler
that requeues on ``128 + signal``: SIGUSR1 (SLURM's ``--signal``) kills the launcher at once and leaves
the workers running without it; a worker that stops on a signal is reported as a failed child (exit
1 and a traceback). The wrapper owns the signals instead:

* it starts ``accelerate launch`` in a session of its own (a signal to the wrapper's process group
  reaches only the wrapper) and arranges for that launcher to be stopped should the wrapper die;
* the workers register with it (``register_worker``, through the folder named by ``SSA_TIMM_LAUNCH_DIR``);
* SIGTERM, SIGINT, SIGUSR1 and SIGHUP to the wrapper go to every registered worker, once each: the
  workers stop at a step boundary with a checkpoint (``ssa_timm.train.preemption``), tell the wrapper
  which signal stopped them (``stop_exit_status``) and exit 0, so the launcher ends quietly; before any
  worker has registered, the launcher is stopped with SIGTERM;
* a signal sent to one worker directly stops every worker the same way (they agree at a step);
* the wrapper exits with ``128 + the signal`` after every worker has ended, or with the launcher's status.
"""
import ctypes
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence

__all__ = ['FORWARDED_SIGNALS', 'LAUNCH_DIR_ENV', 'main', 'register_worker', 'run_launcher', 'stop_exit_status']

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


def register_worker() -> None:
    """Make this process one the wrapper forwards stop signals to (when it runs under the wrapper)."""
    folder = _launch_dir()
    if folder is not None:
        (folder / f'worker-{os.getpid()}').write_text(str(os.getpid()))


def stop_exit_status(signum: int) -> int:
    """The exit status of a worker a stop signal ended: 0 under the wrapper, which is told ``signum``
    and exits ``128 + signum`` itself; else ``128 + signum``, as a shell reports a signalled process."""
    folder = _launch_dir()
    if folder is None:
        return 128 + signum
    (folder / _STOPPED).write_text(str(signum))
    return 0


def _workers(folder: Path) -> List[int]:
    return [int(p.read_text()) for p in folder.glob('worker-*') if p.read_text().isdigit()]


def _forward(folder: Path, launcher: subprocess.Popen, signum: int) -> None:
    workers = _workers(folder)
    for pid in workers:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
    if not workers and launcher.poll() is None:  # no worker trains yet: nothing to checkpoint
        os.killpg(launcher.pid, signal.SIGTERM)


def run_launcher(accelerate_args: Sequence[str]) -> int:
    """Run ``accelerate launch accelerate_args`` under the wrapper (see the module doc); its exit status."""
    with tempfile.TemporaryDirectory(prefix='ssa-timm-launch-') as tmp:
        folder = Path(tmp)
        env = {**os.environ, LAUNCH_DIR_ENV: str(folder)}
        launcher = subprocess.Popen([sys.executable, '-m', 'accelerate.commands.launch', *accelerate_args], env=env,
                                    start_new_session=True, preexec_fn=die_with_parent)
        received: List[int] = []

        def forward(signum: int, frame) -> None:
            received.append(signum)
            _forward(folder, launcher, signum)
        previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
        try:
            status = launcher.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        stopped = (folder / _STOPPED).read_text().strip() if (folder / _STOPPED).is_file() else ''
    if stopped.isdigit():
        return 128 + int(stopped)
    if received:
        return 128 + received[0]
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
