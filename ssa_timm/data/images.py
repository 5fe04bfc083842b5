"""Image files: the one loader every path goes through (datasets, predict, visualize, evaluate, the
demo), and finding images from the files, folders and glob patterns a user gives on the command line.

``load_image`` returns the image as a viewer shows it, as 8-bit RGB:

- EXIF orientation applied (a phone photo taken upright is upright);
- every PIL mode converted with the right scaling: 16-bit (``I;16*``) divided by 257; 32-bit
  integer ``I`` kept when its values fit 0..255, divided by 257 when they fit 0..65535 (how PIL
  reads many 16-bit files), else stretched from its min..max; float ``F`` multiplied by 255 when
  in 0..1, kept when in 0..255, else stretched; ``1``, ``L``, ``P``, ``CMYK``, ``YCbCr`` as PIL
  converts them;
- transparency (``RGBA``, ``LA``, ``PA``, ``P`` or ``L`` with a transparent colour) composited
  over ``BACKGROUND`` (white) instead of dropped, which would show whatever colour hides under it;
- decompression bombs refused before decoding: an image with more than ``PIL.Image.MAX_IMAGE_PIXELS``
  pixels (89,478,485 unless changed there; ``None`` lifts the limit) raises ``ImageTooLargeError``.
  Prediction and visualisation skip such a file with a warning naming it; datasets stop with one
  line naming it (a training set with an unreadable image is a set to fix, not to skip silently);
- a damaged or truncated file raises ``CorruptImageError`` naming the file.
"""
import glob
import re
import struct
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import UserError

_EXIF_ORIENTATION = 0x0112  # the EXIF tag ImageOps.exif_transpose reads

__all__ = [
    'BACKGROUND',
    'IMAGE_SUFFIXES',
    'CorruptImageError',
    'ImageTooLargeError',
    'find_images',
    'load_image',
    'shown_size',
    'max_image_pixels',
    'to_rgb',
]

IMAGE_SUFFIXES = {'.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp'}
BACKGROUND = (255, 255, 255)
_ALPHA_MODES = ('RGBA', 'RGBa', 'LA', 'La', 'PA')
_DECODE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, EOFError, struct.error)


def _worker_message(message: str) -> str:
    """The original message of an exception that torch's DataLoader re-raised from a worker.

    torch re-raises a worker's exception as ``type(text)`` where ``text`` holds the worker's whole
    traceback; the message a user needs is its last line (``module.Class: message``).
    """
    if not message.startswith('Caught ') or 'Original Traceback' not in message:
        return message
    last = message.rstrip().splitlines()[-1]
    return last.split(': ', 1)[1] if ': ' in last else last


class CorruptImageError(UserError, OSError):
    """An image file could not be decoded; the message names the file."""

    def __init__(self, message: str) -> None:
        super().__init__(_worker_message(str(message)))


class ImageTooLargeError(CorruptImageError):
    """An image has more pixels than ``max_image_pixels()`` (a possible decompression bomb)."""


def max_image_pixels():
    """The pixel limit of ``load_image``: PIL's ``Image.MAX_IMAGE_PIXELS`` (None: no limit)."""
    return Image.MAX_IMAGE_PIXELS


def _to_uint8(img: Image.Image) -> Image.Image:
    """A single-channel ``I;16*``, ``I`` or ``F`` image as mode ``L``, scaled as the module doc says."""
    a = np.asarray(img).astype(np.float64)
    a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if img.mode.startswith('I;16'):
        a = a / 257
    elif img.mode == 'F' and lo >= 0 and hi <= 1:
        a = a * 255
    elif lo >= 0 and hi <= 255:
        pass
    elif img.mode == 'I' and lo >= 0 and hi <= 65535:
        a = a / 257
    else:  # no known range: stretch what is there
        a = (a - lo) * (255 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), 'L')


def to_rgb(img: Image.Image) -> Image.Image:
    """An opened PIL image as 8-bit RGB as a viewer shows it: EXIF orientation applied, high bit
    depths scaled, transparency composited over ``BACKGROUND`` (see the module doc).

    Raises:
        ValueError: A mode PIL cannot convert to RGB (e.g. ``LAB``).
    """
    img = ImageOps.exif_transpose(img)
    if img.mode.startswith('I') or img.mode == 'F':
        img = _to_uint8(img)
    if img.mode in _ALPHA_MODES or 'transparency' in img.info:
        rgba = img.convert('RGBA')
        background = Image.new('RGBA', rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert('RGB')
    return img if img.mode == 'RGB' else img.convert('RGB')


def _too_large(path: str, pixels: str) -> ImageTooLargeError:
    return ImageTooLargeError(
        f'cannot read image {path}: {pixels} pixels is over the limit of {max_image_pixels():,} '
        '(PIL.Image.MAX_IMAGE_PIXELS; a possible decompression bomb)')


def _check_pixels(img: Image.Image, path: str) -> None:
    limit = max_image_pixels()
    if limit is not None and img.width * img.height > limit:
        raise _too_large(path, f'{img.width} x {img.height} = {img.width * img.height:,}')


def _bomb_pixels(error: Exception) -> str:
    """The pixel count of PIL's own refusal (raised by ``Image.open`` above twice the limit)."""
    found = re.search(r'\((\d+) pixels\)', str(error))
    return f'{int(found.group(1)):,}' if found else 'more than twice that many'


def load_image(path: str) -> Image.Image:
    """Open an image file as 8-bit RGB as a viewer shows it (see the module doc).

    Args:
        path: The image file.

    Raises:
        ImageTooLargeError: More pixels than ``max_image_pixels()``; checked before decoding.
        CorruptImageError: The file cannot be decoded (damaged, truncated, not an image, an
            unsupported mode); the message names the file.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', Image.DecompressionBombWarning)  # _check_pixels decides
            with Image.open(path) as img:
                _check_pixels(img, path)
                img.load()
                return to_rgb(img)
    except Image.DecompressionBombError as e:
        raise _too_large(path, _bomb_pixels(e)) from e
    except ImageTooLargeError:
        raise
    except _DECODE_ERRORS as e:
        raise CorruptImageError(f'cannot read image {path}: {e}') from e  # PIL names a truncated file itself


def shown_size(path: str) -> tuple[int, int]:
    """``(width, height)`` of an image file as ``load_image`` gives it and a viewer shows it, from its header:
    EXIF orientations 5-8 (the ones ``ImageOps.exif_transpose`` turns a quarter) swap the sides.

    Raises:
        CorruptImageError: The file cannot be opened as an image; the message names it.
    """
    try:
        with Image.open(path) as img:
            width, height = img.size
            turned = img.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8)
    except _DECODE_ERRORS as e:
        raise CorruptImageError(f'cannot read image {path}: {e}') from e
    return (height, width) if turned else (width, height)


def find_images(inputs: Sequence[str]) -> list[Path]:
    """Files, folders (searched recursively for ``IMAGE_SUFFIXES``) and glob patterns -> sorted,
    de-duplicated paths. An input that matches nothing raises ``UserError`` naming it."""
    paths: list[Path] = []
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
