"""Errors a user can fix (a path, a layout, an argument, a mismatched or damaged file), and the
recipes' way of reporting them: one ``error: <message>`` line and a non-zero exit, no traceback.

Callers tell errors apart by their type, never by their text: each kind of failure a caller reacts
to has its class here.
"""
import sys
from typing import Any, Callable, NoReturn

__all__ = [
    'CheckpointError', 'DamagedCheckpoint', 'IdentityMismatch', 'LockLost', 'RunFolderInUse', 'RunFolderNotShared',
    'UserError', 'WeightsMismatch', 'exit_on_user_error', 'one_line',
]

# OSErrors about a path are the user's to fix as well
_PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


class UserError(Exception):
    """Something the user can fix; the recipes print its message as one line, without a traceback.

    ``exit_code`` is the status the recipe exits with (1 unless a subclass says otherwise).
    """
    exit_code = 1


class CheckpointError(UserError):
    """A checkpoint that cannot be used: missing, damaged, or saved by another run."""


class DamagedCheckpoint(CheckpointError):
    """A checkpoint whose files are incomplete, truncated or not what the recipe writes; ``--resume
    latest`` skips it for an older one."""


class IdentityMismatch(CheckpointError):
    """A checkpoint saved by a run with another identity (model, data, classes, settings); never skipped."""


class RunFolderInUse(UserError):
    """The run folder is locked by another live run."""


class LockLost(UserError):
    """This run's lock on its folder was taken over (it was paused past the lock's stale time, or its
    host's clock ran behind); it stops before writing anything more."""


class RunFolderNotShared(UserError):
    """The processes of a run (on several machines) do not all see the same run folder."""


class WeightsMismatch(UserError):
    """Starting weights (a body file, an export) that do not fit the model being built; ``details``
    names the first missing, unexpected and differently shaped keys."""
    details = ''


def one_line(message: Any) -> str:
    """The message with its whitespace (newlines included) collapsed to single spaces."""
    return ' '.join(str(message).split())


def exit_on_user_error(main: Callable[[], Any]) -> Any:
    """Run ``main()``; a ``UserError`` (or an OSError about a path) prints ``error: <message>`` and
    exits with its ``exit_code`` (1 for most). ``--debug`` on the command line re-raises it with its
    traceback.

    Args:
        main: The recipe's entry point, called without arguments (it parses ``sys.argv``).
    """
    try:
        return main()
    except (UserError, *_PATH_ERRORS) as e:
        if '--debug' in sys.argv[1:]:
            raise
        _exit(e)


def _exit(error: BaseException) -> NoReturn:
    """Print the error's line and exit with its status; under ``ssa-timm-launch`` the wrapper is told both
    and prints the line once for the job (each worker exits 0, so the launcher reports no failure)."""
    from .launch import job_exit_status  # the launcher module needs this one
    _leave_process_group()
    status = getattr(error, 'exit_code', 1)
    line = f'error: {one_line(error)}'
    exit_status = job_exit_status(status, line)
    if exit_status == status:
        print(line, file=sys.stderr, flush=True)
    raise SystemExit(exit_status)


def _leave_process_group() -> None:
    """Tear down this process's torch.distributed group before exiting on an error: a gloo group left alive
    at interpreter exit can abort the process ("terminate called without an active exception", SIGABRT),
    which a launcher reports as a crash instead of the error."""
    dist = sys.modules.get('torch.distributed')
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # a group already broken by the error: exiting is all that is left
        pass
