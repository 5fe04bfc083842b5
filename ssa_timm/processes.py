"""How the processes of a run (``accelerate launch``, one or many machines) agree: work done on the
main process whose error stops every process, and a value the main process decides for all."""
from typing import Any, Callable, TypeVar

from .errors import UserError

__all__ = ['from_main', 'run_on_main']

T = TypeVar('T')


def run_on_main(accelerator, work: Callable[[], Any]) -> None:
    """Run ``work()`` on the main process; its error, if any, is raised on every process as a
    ``UserError`` of the same class when it is one (one process alone re-raises it as it is), so no
    process is left waiting at the next barrier."""
    error = None
    if accelerator.is_main_process:
        try:
            work()
        except Exception as e:  # re-raised below, on every process
            if accelerator.num_processes == 1:
                raise
            error = e if isinstance(e, UserError) else UserError(
                f'the main process failed: {type(e).__name__}: {e}')
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list
        error = broadcast_object_list([error])[0]
    if error:
        raise error


def from_main(accelerator, value: T) -> T:
    """The main process's ``value`` on every process (picklable)."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list
    return broadcast_object_list([value])[0]
