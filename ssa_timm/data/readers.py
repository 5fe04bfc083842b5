"""Readers for the paper's datasets (CUB-200-2011, Stanford Dogs, Stanford Cars) and ImageFolder.

Each returns a ``LabeledImages`` list of ``(path, label)`` with class names. A missing or
malformed layout raises ``DatasetLayoutError`` naming what was expected; an unreadable image
raises ``CorruptImageError`` naming the file.
"""
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from torch.utils.data import Dataset

from ..errors import UserError
from .images import load_image

__all__ = ['DatasetLayoutError', 'LabeledImages', 'align_classes', 'read_cars', 'read_cub', 'read_dogs',
           'read_image_folder']

CUB_LAYOUT = ('CUB_200_2011/ with images.txt, image_class_labels.txt, train_test_split.txt, classes.txt '
              'and images/<class>/<file>.jpg (bounding_boxes.txt for --crop-bbox)')
DOGS_LAYOUT = 'Stanford Dogs root with train_list.mat, test_list.mat and Images/<synset>-<breed>/<file>.jpg'
CARS_LAYOUT = ('torchvision StanfordCars layout: <root>/stanford_cars/ with devkit/cars_meta.mat, '
               'devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat, cars_train/ and cars_test/')
FOLDER_LAYOUT = 'ImageFolder root with train/<class>/<image> and val/<class>/<image> (or test/)'


class DatasetLayoutError(UserError, ValueError):
    """The dataset folder does not have the expected layout."""


class LabeledImages(Dataset):
    """``(image, label)`` pairs from a list of files, with an optional per-image crop box."""

    def __init__(
            self,
            samples: Sequence[Tuple[str, int]],
            classes: Sequence[str],
            boxes: Optional[Sequence[Tuple[float, float, float, float]]] = None,
    ) -> None:
        self.samples = list(samples)
        self.classes = list(classes)
        self.targets = [label for _, label in self.samples]
        self.boxes = boxes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        img = load_image(path)
        if self.boxes is not None:
            x, y, w, h = self.boxes[index]
            img = img.crop((int(x), int(y), int(x + w), int(y + h)))
        return img, label


def _require(paths: Sequence[Path], layout: str) -> None:
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise DatasetLayoutError(f'missing {", ".join(missing)}; expected {layout}')


def _read_table(path: Path, columns: int, layout: str) -> List[List[str]]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=columns - 1)
        if len(parts) != columns:
            raise DatasetLayoutError(f'{path}:{n}: expected {columns} fields, got {line!r}; expected {layout}')
        rows.append(parts)
    return rows


def read_cub(root: str, split: str, crop_bbox: bool = False) -> LabeledImages:
    """CUB-200-2011 with its official train/test split (``train_test_split.txt``: 1 = train)."""
    base = Path(root)
    if (base / 'CUB_200_2011').is_dir():
        base = base / 'CUB_200_2011'
    files = {n: base / f'{n}.txt' for n in ('images', 'image_class_labels', 'train_test_split', 'classes')}
    if crop_bbox:
        files['bounding_boxes'] = base / 'bounding_boxes.txt'
    _require(list(files.values()) + [base / 'images'], CUB_LAYOUT)
    images = dict(_read_table(files['images'], 2, CUB_LAYOUT))
    labels = dict(_read_table(files['image_class_labels'], 2, CUB_LAYOUT))
    is_train = dict(_read_table(files['train_test_split'], 2, CUB_LAYOUT))
    classes = [name.split('.', 1)[-1] for _, name in _read_table(files['classes'], 2, CUB_LAYOUT)]
    for table, name in ((labels, 'image_class_labels.txt'), (is_train, 'train_test_split.txt')):
        if set(table) != set(images):
            odd = sorted(set(table) ^ set(images), key=lambda k: int(k) if k.isdigit() else 0)[:5]
            raise DatasetLayoutError(f'{name} does not match images.txt: image ids {odd} are in one and not the other')
    boxes_by_id = {}
    if crop_bbox:
        boxes = _read_table(files['bounding_boxes'], 2, CUB_LAYOUT)
        boxes_by_id = {i: tuple(float(v) for v in rest.split()) for i, rest in boxes}
    want = '1' if split == 'train' else '0'
    ids = [i for i in images if is_train[i].strip() == want]
    samples = []
    for i in ids:
        label = int(labels[i]) - 1
        if not 0 <= label < len(classes):
            raise DatasetLayoutError(f'image id {i} has class {label + 1}, classes.txt lists {len(classes)}')
        samples.append((str(base / 'images' / images[i]), label))
    _require([Path(p) for p, _ in samples[:1]], CUB_LAYOUT)
    return LabeledImages(samples, classes, [boxes_by_id[i] for i in ids] if crop_bbox else None)


def _loadmat(path: Path, keys: Sequence[str], layout: str) -> dict:
    from scipy.io import loadmat
    try:
        mat = loadmat(str(path))
    except Exception as e:  # scipy raises several types for a bad file
        raise DatasetLayoutError(f'cannot read {path}: {e}; expected {layout}') from e
    missing = [k for k in keys if k not in mat]
    if missing:
        raise DatasetLayoutError(f'{path} lacks {missing}; expected {layout}')
    return mat


def read_dogs(root: str, split: str) -> LabeledImages:
    """Stanford Dogs from ``train_list.mat`` / ``test_list.mat`` (1-based labels, paths under Images/)."""
    base = Path(root)
    mat_path = base / ('train_list.mat' if split == 'train' else 'test_list.mat')
    _require([mat_path, base / 'Images'], DOGS_LAYOUT)
    mat = _loadmat(mat_path, ('file_list', 'labels'), DOGS_LAYOUT)
    files = [str(f[0][0]) for f in mat['file_list']]
    labels = [int(v) - 1 for v in mat['labels'].ravel()]
    if len(files) != len(labels):
        raise DatasetLayoutError(f'{mat_path}: {len(files)} files but {len(labels)} labels')
    folder_of = {}
    for f, label in zip(files, labels):
        folder = f.split('/')[0]
        if folder_of.setdefault(label, folder) != folder:
            raise DatasetLayoutError(f'{mat_path}: label {label + 1} is used for both {folder_of[label]} and {folder}')
    classes = [folder_of[i].split('-', 1)[-1] if i in folder_of else f'class_{i}'
               for i in range(max(labels, default=-1) + 1)]
    return LabeledImages([(str(base / 'Images' / f), label) for f, label in zip(files, labels)], classes)


def read_cars(root: str, split: str) -> LabeledImages:
    """Stanford Cars through torchvision's ``StanfordCars`` reader (its devkit layout)."""
    from torchvision.datasets import StanfordCars
    try:
        ds = StanfordCars(root, split='train' if split == 'train' else 'test', download=False)
    except (RuntimeError, FileNotFoundError, KeyError, ValueError) as e:
        raise DatasetLayoutError(f'cannot read Stanford Cars under {root}: {e}; expected {CARS_LAYOUT}') from e
    return LabeledImages([(path, int(label)) for path, label in ds._samples], ds.classes)


def read_image_folder(root: str, split: str) -> LabeledImages:
    """``root/train`` for training; ``root/val`` (or ``root/test``) for evaluation."""
    from torchvision.datasets import ImageFolder
    base = Path(root)
    names = ['train'] if split == 'train' else ['val', 'test']
    folder = next((base / n for n in names if (base / n).is_dir()), None)
    if folder is None:
        raise DatasetLayoutError(f'no {" or ".join(str(base / n) for n in names)}; expected {FOLDER_LAYOUT}')
    try:
        ds = ImageFolder(str(folder), loader=lambda p: p)
    except (FileNotFoundError, RuntimeError) as e:
        raise DatasetLayoutError(f'{folder}: {e}; expected {FOLDER_LAYOUT}') from e
    return LabeledImages(ds.samples, ds.classes)



def align_classes(dataset: LabeledImages, classes: Sequence[str], split: str,
                  classes_of: str = 'the training split') -> LabeledImages:
    """Relabel ``dataset`` to the index of each class name in ``classes`` (the training split's), so
    every split of a run shares one class list.

    A class with images in ``dataset`` but not in ``classes`` raises ``DatasetLayoutError`` naming
    it; classes without images in ``dataset`` are listed in its ``missing_classes``. ``classes_of``
    says where ``classes`` come from, for the message.
    """
    index = {name: i for i, name in enumerate(classes)}
    used = sorted({dataset.classes[label] for label in dataset.targets})
    unknown = [name for name in used if name not in index]
    if unknown:
        raise DatasetLayoutError(f'the {split} split has class(es) {unknown[:10]} that {classes_of} lacks '
                                 f'({len(classes)} classes); a model trained on them cannot predict them')
    aligned = LabeledImages([(path, index[dataset.classes[label]]) for path, label in dataset.samples], classes,
                            dataset.boxes)
    aligned.missing_classes = [name for name in classes if name not in set(used)]
    return aligned
