"""Stopping a run cleanly when a scheduler preempts it.

SIGTERM (what SLURM, Kubernetes and most schedulers send before they kill a job), SIGINT (Ctrl-C)
and SIGUSR1 (SLURM's ``--signal=USR1@<seconds>``) ask the run to stop at the next optimizer step:
it writes a mid-epoch checkpoint that resumes exactly, releases its lock and exits with status
128 + the signal number (143, 130, 138), as a shell reports a process the signal ended. A second
signal aborts at once. With several processes, the one that received the signal tells the others
at the next step (one small all-reduce per step, only when more than one process runs).
"""
import signal
from types import FrameType
from typing import Optional

import torch

from ..errors import UserError

__all__ = ['STOP_SIGNALS', 'RunAborted', 'StopRequest']

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class RunAborted(UserError):
    """A second stop signal arrived before the run could stop at a step boundary."""

    def __init__(self, signum: int) -> None:
        super().__init__(f'{signal.Signals(signum).name} again: aborted at once, without a checkpoint of the '
                         'current step (the last complete checkpoint is kept)')
        self.exit_code = 128 + signum


class StopRequest:
    """Catches ``STOP_SIGNALS`` while the ``with`` block runs (in the main thread only).

    ``requested(accelerator)`` tells, identically on every process, whether any process got one.
    """

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous = {}

    def __enter__(self) -> 'StopRequest':
        try:
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        except ValueError:  # not the main thread: signals stay as they are
            self._previous.clear()
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.signum is not None:
            raise RunAborted(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ''

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process the signal ended."""
        return 128 + (self.signum or 0)

    def requested(self, accelerator) -> bool:
        """Whether a stop signal reached this process or, with several, any process."""
        if accelerator.num_processes == 1:
            return self.signum is not None
        flag = torch.tensor(float(self.signum or 0), device=accelerator.device)
        signum = int(accelerator.reduce(flag, reduction='max').item())
        if signum and self.signum is None:
            self.signum = signum
        return bool(signum)
