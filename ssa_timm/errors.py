"""Errors a user can fix (a path, a layout, an argument, a mismatched or damaged file), and the
recipes' way of reporting them: one ``error: <message>`` line and a non-zero exit, no traceback."""
import sys
from typing import Any, Callable, NoReturn

__all__ = ['UserError', 'exit_on_user_error', 'one_line']

# OSErrors about a path are the user's to fix as well
_PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


class UserError(Exception):
    """Something the user can fix; the recipes print its message as one line, without a traceback."""


def one_line(message: Any) -> str:
    """The message with its whitespace (newlines included) collapsed to single spaces."""
    return ' '.join(str(message).split())


def exit_on_user_error(main: Callable[[], Any]) -> Any:
    """Run ``main()``; a ``UserError`` (or an OSError about a path) prints ``error: <message>`` and
    exits with status 1. ``--debug`` on the command line re-raises it with its traceback.

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
    print(f'error: {one_line(error)}', file=sys.stderr, flush=True)
    raise SystemExit(1)
