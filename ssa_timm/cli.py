"""The arguments the recipes share, defined once: their types (numbers and sizes checked at parse
time, so a bad value is an argparse error, exit status 2, that names the flag before any data or model
is loaded), the shared flags themselves, and deprecated flag names kept for one release."""
import argparse
import sys
from typing import Any, Callable, List, Optional

import torch

from .data import BUILTIN_TASKS, DATASET_DEFAULTS, DATASETS, TIMM_PREFIXES, is_timm_spec
from .errors import UserError

__all__ = ['HelpFormatter', 'add_dataset_args', 'add_img_size_arg', 'add_timm_dataset_args', 'at_least',
           'deprecated_alias', 'finite_float', 'fraction', 'image_side', 'non_negative_float', 'positive_float',
           'comma_separated', 'dataset_name', 'torch_device', 'trackers']

REMOVED_IN = '0.7'


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The recipes' help: the module docstring as written, and each flag's default from its definition
    (unset defaults, None or False, are not shown: the help text says what happens then)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default == '':
            return action.help
        return super()._get_help_string(action)


def image_side(text: str) -> int:
    """An ``--img-size``: an integer from 1 to the image-size limit (``ssa_timm.hub.img_size_limit``)."""
    from .hub import check_img_size
    value = at_least(1)(text)
    try:
        return check_img_size(value, 'image side')
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_img_size_arg(p, default_help: str = "default: the model's own input size",
                     default: Optional[int] = None) -> None:
    """``--img-size`` (parsed by ``image_side``: exit status 2 for a bad value) on a parser or a group."""
    p.add_argument('--img-size', type=image_side, default=default, metavar='PX',
                   help=f'square input side in pixels, at most the image-size limit; {default_help}')


def deprecated_alias(p, old: str, new: str, **kwargs: Any) -> None:
    """Accept ``old`` as a deprecated name of the flag ``new`` (already added): it sets ``new``'s value
    and prints one warning line naming the replacement and the release that removes ``old``. Both names
    on one command line are refused (argparse's exit status 2): which one counts would be a guess."""
    given = f'_given_{new}'

    def refuse_both(parser: argparse.ArgumentParser, namespace: argparse.Namespace, flag: str) -> None:
        if getattr(namespace, given, None) not in (None, flag):
            parser.error(f'{old} is the deprecated name of {new}: give {new} alone')
        setattr(namespace, given, flag)

    class Alias(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            refuse_both(parser, namespace, old)
            print(f'warning: {old} is deprecated and goes away in {REMOVED_IN}; use {new}', file=sys.stderr)
            setattr(namespace, self.dest, True if self.nargs == 0 else values)

    replacement = p._option_string_actions[new]  # argparse has no public hook on an added action

    class Replacement(type(replacement)):
        def __call__(self, parser, namespace, values, option_string=None):
            refuse_both(parser, namespace, new)
            super().__call__(parser, namespace, values, option_string)
    replacement.__class__ = Replacement
    p.add_argument(old, dest=replacement.dest, action=Alias, help=argparse.SUPPRESS, default=argparse.SUPPRESS,
                   **kwargs)


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


def comma_separated(item: Callable[[str], Any]) -> Callable[[str], List[Any]]:
    """An argument type for a non-empty comma separated list, each item parsed by ``item``."""
    def parse(text: str) -> List[Any]:
        items = [part.strip() for part in text.split(',')]
        if not all(items):
            raise argparse.ArgumentTypeError(f'expected a comma separated list without empty items, got {text!r}')
        return [item(part) for part in items]
    parse.__name__ = f'comma separated {getattr(item, "__name__", "values")}'
    return parse


def dataset_name(text: str) -> str:
    """A ``--dataset`` value: one of ``ssa_timm.data.DATASETS`` or a timm spec (``hfds/...``, ``hfids/...``,
    ``wds/...``)."""
    if text in DATASETS or is_timm_spec(text):
        return text
    raise argparse.ArgumentTypeError(f'expected one of {", ".join(DATASETS)} or a timm dataset spec '
                                     f'({", ".join(p + "..." for p in TIMM_PREFIXES[:3])}), got {text!r}')


def torch_device(text: str) -> str:
    """A torch device this machine has: 'cpu', 'cuda', 'cuda:1', 'mps', ..."""
    try:
        device = torch.device(text)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(f'expected a torch device such as cpu or cuda:0, got {text!r}') from e
    if device.type == 'cuda':
        count = torch.cuda.device_count()
        if not torch.cuda.is_available() or (device.index or 0) >= count:
            raise argparse.ArgumentTypeError(f'{text}: this machine has {count} CUDA device(s)')
    elif device.type == 'mps' and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f'{text}: MPS is not available on this machine')
    return text


def trackers(text: str) -> List[str]:
    """Comma separated accelerate trackers ('tensorboard', 'wandb', ..., 'all') whose packages are installed
    (accelerate would otherwise drop a missing one with only a debug log line)."""
    import accelerate.utils
    from accelerate.utils import LoggerType
    known = [t.value for t in LoggerType]
    names = [name.strip() for name in text.split(',') if name.strip()]
    for name in names:
        if name not in known:
            raise argparse.ArgumentTypeError(
                f'{name!r} is not an accelerate tracker; expected one of {", ".join(known)}')
        available = getattr(accelerate.utils, f'is_{name}_available', None)
        if available is not None and not available():
            raise argparse.ArgumentTypeError(f'{name}: its package is not installed (pip install {name})')
    return names


def finite_float(text: str) -> float:
    """A finite ``float`` (not NaN or infinite)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a number, got {text!r}') from None
    if value != value or value in (float('inf'), float('-inf')):
        raise argparse.ArgumentTypeError(f'expected a finite number, got {text!r}')
    return value


def positive_float(text: str) -> float:
    """A finite ``float`` > 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f'must be > 0, got {value}')
    return value


def non_negative_float(text: str) -> float:
    """A finite ``float`` >= 0."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f'must be >= 0, got {value}')
    return value


def fraction(text: str) -> float:
    """A ``float`` in [0, 1)."""
    value = finite_float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f'must be in [0, 1), got {value}')
    return value


def add_dataset_args(p: argparse.ArgumentParser, training: bool) -> None:
    """The dataset flags (defaults from ``ssa_timm.data.DATASET_DEFAULTS``) in a 'Data' group, then timm's
    dataset-spec flags; ``training``: the training split's flags too (else the validation split's only)."""
    d = DATASET_DEFAULTS
    g = p.add_argument_group('Data')
    g.add_argument('--dataset', default=d['dataset'], type=dataset_name,
                   help='builtin, cub, dogs, cars, imagefolder, or a timm spec: hfds/..., hfids/..., wds/...')
    g.add_argument('--data-dir', default=d['data_dir'], help='the dataset folder (not for builtin)')
    g.add_argument('--crop-bbox', action='store_true', help='CUB: crop images to bounding_boxes.txt')
    if training:
        g.add_argument('--builtin-train-per-class', type=at_least(1), default=d['builtin_train_per_class'],
                       help='builtin: training images per class')
    g.add_argument('--builtin-val-per-class', type=at_least(1), default=d['builtin_val_per_class'],
                   help='builtin: validation images per class')
    g.add_argument('--builtin-family', type=at_least(0), default=d['builtin_family'],
                   help='builtin: glyph family (families share no glyph; 1 pretrains a body for 0)')
    g.add_argument('--builtin-task', choices=BUILTIN_TASKS, default=d['builtin_task'],
                   help='builtin: glyph, or scene: a 64 px textured canvas where the class is one small framed part '
                   'among distractors, with ground-truth boxes and localisation metrics')
    g.add_argument('--builtin-part-cell', type=at_least(1), default=d['builtin_part_cell'], metavar='PX',
                   help='builtin scene: the glyph cell of every part in px (default: 2-3 px); 1 makes the parts '
                   "small against the body map's cells, where looking closer (--zoom) matters")
    g.add_argument('--builtin-oracle-crop', action='store_true',
                   help="builtin scene: show each image cropped at its deciding part's box, widened as the zoom "
                   'widens its box: the ceiling of a zoom whose box is always right')
    add_timm_dataset_args(p, training)


def add_timm_dataset_args(p: argparse.ArgumentParser, training: bool = True) -> None:
    """timm's dataset flags (its train.py's names), for ``--dataset hfds/...``, ``hfids/...``, ``wds/...``."""
    d = DATASET_DEFAULTS
    g = p.add_argument_group('timm dataset specs (--dataset hfds/<hub id or folder>, hfids/..., wds/<folder>)')
    if training:
        g.add_argument('--train-split', default=d['train_split'], help='the training split')
    g.add_argument('--val-split', default=d['val_split'], help='the validation split')
    g.add_argument('--class-map', default=d['class_map'], help='timm class map file: class names in label order')
    g.add_argument('--input-key', default=d['input_key'], help='image column / WebDataset extension')
    g.add_argument('--target-key', default=d['target_key'], help='label column / WebDataset field')
    if training:
        g.add_argument('--train-num-samples', type=at_least(1), default=d['train_num_samples'],
                       help='streamed training samples per epoch')
    g.add_argument('--val-num-samples', type=at_least(1), default=d['val_num_samples'],
                   help='streamed validation samples')
    g.add_argument('--dataset-download', action='store_true', help='hfids: prepare the dataset in the cache first')
