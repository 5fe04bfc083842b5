"""Argument types the recipes share: numbers checked at parse time, so a bad value is an argparse
error (exit status 2) that names the flag before any data or model is loaded."""
import argparse
from typing import Callable

__all__ = ['at_least', 'fraction', 'non_negative_float', 'positive_float']


def at_least(minimum: int) -> Callable[[str], int]:
    """An ``int`` argument type that refuses values below ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'expected an integer, got {text!r}') from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f'must be at least {minimum}, got {value}')
        return value
    parse.__name__ = f'integer >= {minimum}'
    return parse


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a number, got {text!r}') from None
    if value != value or value in (float('inf'), float('-inf')):
        raise argparse.ArgumentTypeError(f'expected a finite number, got {text!r}')
    return value


def positive_float(text: str) -> float:
    """A finite ``float`` > 0."""
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f'must be > 0, got {value}')
    return value


def non_negative_float(text: str) -> float:
    """A finite ``float`` >= 0."""
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f'must be >= 0, got {value}')
    return value


def fraction(text: str) -> float:
    """A ``float`` in [0, 1)."""
    value = _float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f'must be in [0, 1), got {value}')
    return value
