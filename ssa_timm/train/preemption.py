"""Stopping a run cleanly when a scheduler preempts it.

SIGTERM (what SLURM, Kubernetes and most schedulers send before they kill a job), SIGINT (Ctrl-C),
SIGUSR1 (SLURM's ``--signal=USR1@<seconds>``) and SIGHUP (a closed terminal, a dropped ``ssh``) ask
the run to stop at the next optimizer step: it writes a mid-epoch checkpoint that resumes exactly,
releases its lock and exits with status 128 + the signal number (143, 130, 138, 129), as a shell
reports a process the signal ended. A second signal aborts at once (the same status, one ``error:``
line); the same signal arriving again within ``DUPLICATE_SECONDS`` counts once (a scheduler that
signals every process of a job, and a launcher that forwards the signal too, deliver it several
times).

With several processes, the one that received the signal tells the others: every ``CHECK_EVERY``
optimizer steps (the same steps on every process) and at each epoch's end the processes reduce one
flag, so no other step waits for the host. Under ``ssa-timm-launch`` (``ssa_timm.launch``) a process
registers for the wrapper's signals once its handler is in place, and exits 0 after telling the
wrapper its status.
"""
import signal
import time
from types import FrameType
from typing import Optional

import torch

from ..errors import UserError
from ..launch import job_exit_status, register_worker

__all__ = ['CHECK_EVERY', 'DUPLICATE_SECONDS', 'STOP_SIGNALS', 'RunAborted', 'StopRequest']

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)
# ignored by the user's shell (nohup, a background job), they stay ignored; SIGTERM and SIGUSR1 are always
# caught (a launcher that ignores SIGUSR1 passes that on to its workers, which must still checkpoint on it)
_KEPT_IGNORED = (signal.SIGHUP, signal.SIGINT)
CHECK_EVERY = 10
DUPLICATE_SECONDS = 1.0


class RunAborted(UserError):
    """A second stop signal arrived before the run could stop at a step boundary."""

    def __init__(self, signum: int) -> None:
        super().__init__(f'{signal.Signals(signum).name} again: aborted at once, without a checkpoint of the '
                         'current step (the last complete checkpoint is kept)')
        self.signum = signum
        self.exit_code = 128 + signum

    def __reduce__(self):
        return RunAborted, (self.signum,)


class StopRequest:
    """Catches ``STOP_SIGNALS`` while the ``with`` block runs (in the main thread only).

    ``requested(accelerator, step)`` tells, identically on every process, whether any process got one.

    Args:
        check_every: With several processes, the optimizer steps between two agreements.
        until_exit: The process ends with the ``with`` block (a script's run): once stopping, stop signals
            stay ignored after it, instead of their previous handlers coming back.
    """

    def __init__(self, check_every: int = CHECK_EVERY, until_exit: bool = False) -> None:
        self.signum: Optional[int] = None
        self.check_every = check_every
        self.until_exit = until_exit
        self._first_at = 0.0
        self._previous = {}

    def __enter__(self) -> 'StopRequest':
        try:
            for signum in STOP_SIGNALS:
                if signum in _KEPT_IGNORED and signal.getsignal(signum) == signal.SIG_IGN:
                    continue  # nohup's SIGHUP, a background job's SIGINT: the user asked the run to go on
                self._previous[signum] = signal.signal(signum, self._handle)
        except ValueError:  # not the main thread: signals stay as they are
            self._previous.clear()
            return self
        register_worker()  # only now may ssa-timm-launch forward its stop signals here
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            # a process that ends with the run ignores stop signals once it stops: a late one (after the
            # checkpoint, during the exit) must not kill it by the signal's default action
            stopping = self.until_exit and (self.signum is not None or exc[0] is not None)
            signal.signal(signum, signal.SIG_IGN if stopping else handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.signum is None:
            self.signum, self._first_at = signum, time.monotonic()
        elif signum != self.signum or time.monotonic() - self._first_at > DUPLICATE_SECONDS:
            raise RunAborted(signum)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ''

    def exit_status(self) -> int:
        """The status to exit with after a stop: 128 + the signal number, as a shell reports a process the
        signal ended (0 under ``ssa-timm-launch``, which is told the status and exits with it itself)."""
        return job_exit_status(128 + (self.signum or 0), stop=True)

    def requested(self, accelerator, step: Optional[int] = None) -> bool:
        """Whether a stop signal reached this process or, with several, any process. With several, the
        processes agree (one reduced flag, read on the host) only when ``step`` is None (an epoch's end)
        or a multiple of ``check_every``; at other steps the answer is False everywhere."""
        if accelerator.num_processes == 1:
            return self.signum is not None
        if step is not None and step % self.check_every:
            return False
        flag = torch.tensor(float(self.signum or 0), device=accelerator.device)
        signum = int(accelerator.reduce(flag, reduction='max').item())
        if signum and self.signum is None:  # another process's signal: the same, should it arrive here too
            self.signum, self._first_at = signum, time.monotonic()
        return bool(signum)
