"""Image files: decoding as RGB with errors that name the file, and finding images from the
files, folders and glob patterns a user gives on the command line."""
import glob
from pathlib import Path
from typing import List, Sequence

from PIL import Image, UnidentifiedImageError

from ..errors import UserError

__all__ = ['CorruptImageError', 'IMAGE_SUFFIXES', 'find_images', 'load_image']

IMAGE_SUFFIXES = {'.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp'}


class CorruptImageError(UserError, OSError):
    """An image file could not be decoded."""


def load_image(path: str) -> Image.Image:
    """Open an image as RGB, naming the file when it cannot be decoded."""
    try:
        with Image.open(path) as img:
            return img.convert('RGB')
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        raise CorruptImageError(f'cannot read image {path}: {e}') from e


def find_images(inputs: Sequence[str]) -> List[Path]:
    """Files, folders (searched recursively for ``IMAGE_SUFFIXES``) and glob patterns -> sorted,
    de-duplicated paths. An input that matches nothing raises ``UserError`` naming it."""
    paths: List[Path] = []
    for item in inputs:
        matches = [Path(m) for m in sorted(glob.glob(item, recursive=True))] or [Path(item)]
        for match in matches:
            if match.is_dir():
                paths += sorted(p for p in match.rglob('*') if p.suffix.lower() in IMAGE_SUFFIXES)
            elif match.is_file():
                paths.append(match)
            else:
                raise UserError(f'no image, folder or glob match for {item!r}')
    return list(dict.fromkeys(paths))
