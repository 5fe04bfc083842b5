"""Output paths every recipe writes: checked before the expensive work (writable, not an input,
not inside a model folder), and written so that a kill at any moment leaves the previous complete copy
(``atomic_write_text``, ``atomic_dir``)."""
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

from .errors import UserError

__all__ = ['atomic_dir', 'atomic_write_text', 'check_output_file', 'check_output_path', 'ensure_writable_dir',
           'restore_interrupted', 'unique_suffix']


def unique_suffix() -> str:
    """A temporary-name suffix no other process (on any host) uses at the same time."""
    return f'{os.getpid()}-{uuid.uuid4().hex[:8]}'


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
    tmp = final.parent / f'.{final.name}.tmp-{unique_suffix()}'
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
    tmp = path.with_name(f'.{path.name}.tmp-{unique_suffix()}')
    tmp.write_text(text)
    os.replace(tmp, path)
