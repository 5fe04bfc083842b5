"""A built-in fine-grained dataset, generated procedurally: no files, no download.

Every image shows the same kind of object (an ellipse of random size, colour and place) on
random clutter. Classes differ only in one small part: a class-specific 4x4 glyph drawn at a
random spot on the object. A distractor glyph, from a set no class uses, sits somewhere else in
the image. Telling classes apart means finding one small region, which is what the SSA module
is for. Images depend only on ``(seed, family, split, index)``.

``family`` picks another set of glyphs, disjoint from every other family's (classes and distractors)
for the same seed: family 1 is a pretraining task for a body that family 0 (the default) then
fine-tunes on, the paper's regime of a body pretrained on other classes of the same domain.
"""
import csv
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..zoom import widen_box, zoom_crop

__all__ = ['BUILTIN_TASKS', 'BuiltinFineGrained', 'BuiltinScene', 'write_image_folder']

_SPLITS = {'train': 0, 'val': 1}
# the built-in tasks: glyph (BuiltinFineGrained, the default) and scene (BuiltinScene)
BUILTIN_TASKS = ('glyph', 'scene')
_GLYPH = 4


def _glyphs(count: int, seed: int) -> np.ndarray:
    """``count`` distinct 4x4 binary glyphs, each at Hamming distance >= 4 from the others."""
    rng = np.random.default_rng([seed, 99])
    chosen: List[np.ndarray] = []
    while len(chosen) < count:
        g = rng.random((_GLYPH, _GLYPH)) < 0.5
        if 5 <= g.sum() <= 11 and all((g != c).sum() >= 4 for c in chosen):
            chosen.append(g)
    return np.stack(chosen)


class BuiltinFineGrained(Dataset):
    """Procedural fine-grained classification dataset returning ``(PIL.Image, label)``.

    Args:
        split: 'train' or 'val'.
        num_classes: Number of classes (each a glyph).
        samples_per_class: Images per class in this split.
        image_size: Side of the generated square images.
        seed: Dataset seed; the same seed gives the same images.
        family: Glyph family; families of one seed share no glyph.
    """

    def __init__(
            self,
            split: str = 'train',
            num_classes: int = 10,
            samples_per_class: int = 100,
            image_size: int = 64,
            seed: int = 0,
            family: int = 0,
    ) -> None:
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {tuple(_SPLITS)}, got {split!r}")
        if image_size < 32:
            raise ValueError(f'image_size must be >= 32 to hold the parts, got {image_size}')
        self.split = split
        self.num_classes = num_classes
        self.samples_per_class = samples_per_class
        self.image_size = image_size
        self.seed = seed
        if family < 0:
            raise ValueError(f'family must be >= 0, got {family}')
        self.family = family
        per_family = num_classes + 4  # the first glyphs of one sequence: family 0 is the same for any family count
        first = family * per_family
        glyphs = _glyphs(first + per_family, seed)[first:]
        self.class_glyphs, self.distractor_glyphs = glyphs[:num_classes], glyphs[num_classes:]
        self.classes = [f'glyph_{first + i:02d}' for i in range(num_classes)]
        self.targets = [i % num_classes for i in range(len(self))]

    def __len__(self) -> int:
        return self.num_classes * self.samples_per_class

    def _draw_glyph(self, img: np.ndarray, glyph: np.ndarray, top: int, left: int, cell: int, color) -> None:
        for r, c in zip(*np.nonzero(glyph)):
            img[top + r * cell:top + (r + 1) * cell, left + c * cell:left + (c + 1) * cell] = color

    def render(self, index: int) -> Tuple[np.ndarray, int]:
        """The ``(H, W, 3)`` uint8 image and label of ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f'index {index} out of range for {len(self)} images')
        label = self.targets[index]
        s = self.image_size
        rng = np.random.default_rng([self.seed, _SPLITS[self.split], index] + ([self.family] if self.family else []))
        img = rng.integers(60, 140, size=(1, 1, 3)) + rng.normal(0, 12, size=(s, s, 3))
        for _ in range(6):  # clutter: random rectangles
            h, w = rng.integers(s // 10, s // 4, size=2)
            y, x = rng.integers(0, s - h), rng.integers(0, s - w)
            img[y:y + h, x:x + w] = rng.integers(0, 255, size=3)

        # the shared object: an ellipse covering a good part of the image
        cy, cx = rng.uniform(0.35, 0.65, size=2) * s
        ry, rx = rng.uniform(0.24, 0.32, size=2) * s
        yy, xx = np.mgrid[:s, :s]
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        img[inside] = rng.integers(90, 170, size=3) + rng.normal(0, 8, size=(int(inside.sum()), 3))

        # the part: the class glyph somewhere on the object, the distractor somewhere else
        cell = max(2, s // 16)
        size = _GLYPH * cell
        part_color = (250, 230, 40)
        top = int(np.clip(cy + rng.uniform(-0.5, 0.5) * ry - size / 2, 0, s - size))
        left = int(np.clip(cx + rng.uniform(-0.5, 0.5) * rx - size / 2, 0, s - size))
        self._draw_glyph(img, self.class_glyphs[label], top, left, cell, part_color)
        distractor = self.distractor_glyphs[rng.integers(len(self.distractor_glyphs))]
        corner_top = int(rng.choice([0, s - size]))
        self._draw_glyph(img, distractor, corner_top, int(rng.integers(0, s - size)), cell, part_color)
        return np.clip(img, 0, 255).astype(np.uint8), label

    def __getitem__(self, index: int) -> Tuple[Image.Image, int]:
        img, label = self.render(index)
        return Image.fromarray(img), label


# ---------------------------------------------------------------------------------------------------------------
# The scene task: find the part first

_SCENE_STREAM = 98  # the scene task's glyphs: another sequence than the glyph task's
_SCENE_DISTRACTORS = (2, 3)  # distractor parts per image: two or three
_FRAME = 2  # frame thickness (px); one pixel of plate separates it from the glyph


def _scene_cells(image_size: int) -> Tuple[int, int]:
    """The ``[low, high)`` range of a scene part's glyph cell (px) on a canvas of ``image_size``:
    2-3 px at 64 px, 3-4 px at 96 px."""
    return max(2, image_size // 32), max(2, image_size // 21) + 1


def _scene_part_side(cell: int) -> int:
    """Side (px) of a scene part: the glyph of ``cell`` px cells, one pixel of plate and the frame around it."""
    return _GLYPH * cell + 2 * (_FRAME + 1)


class BuiltinScene(Dataset):
    """Procedural fine-grained task where the deciding part must be found: ``(PIL.Image, label)``.

    Each image is a canvas of textured, noisy background (a blocky low-frequency pattern, stripes,
    rectangles and pixel noise). The class is decided by one small part at a random position and scale
    (cells of 2 or 3 px on the default 64 px canvas, 3 or 4 px at 96 px): the class's 4x4 glyph inside
    a dark two-pixel frame. Elsewhere sit two or three unframed distractor parts (fewer where the
    canvas has no free spot), glyphs of *other* classes of the same vocabulary, in the same colour, on
    the same kind of plate: global average pooling mixes the true part's evidence with theirs, so a
    model that finds the framed part wins.

    ``part_boxes(index)`` gives the ground-truth box of the deciding part (frame included) as
    ``(x, y, w, h)`` pixels of the generated image, without rendering it. Images depend only on
    ``(seed, family, split, index)``; families of one seed share no glyph (family 1 pretrains a body
    for family 0, as in ``BuiltinFineGrained``).

    ``part_cell=1`` draws every part with 1 px glyph cells (10 px parts, 4 px glyphs): on ResNet-18's
    stride-8 map a glyph then falls in one or two cells on each side, shared with frame, background and
    distractors, so a model can find the part without reading it, the task where looking closer matters
    (``SSANet(zoom=True)``).
    ``oracle_crop`` shows each image cropped at its deciding part's box, widened as the zoom widens its
    box (``ssa_timm.zoom.widen_box``) and resized to the canvas: the ceiling of a zoom whose box is
    always right.

    Args:
        split: 'train' or 'val'.
        num_classes: Number of classes (each a glyph).
        samples_per_class: Images per class in this split.
        image_size: Side of the generated square canvas.
        seed: Dataset seed; the same seed gives the same images.
        family: Glyph family; families of one seed share no glyph.
        part_cell: The glyph cell (px) of every part; default: drawn per part from the canvas's range.
        oracle_crop: Show each image cropped at its deciding part (``oracle_box``).
    """

    def __init__(self, split: str = 'train', num_classes: int = 10, samples_per_class: int = 100,
                 image_size: int = 64, seed: int = 0, family: int = 0, part_cell: Optional[int] = None,
                 oracle_crop: bool = False) -> None:
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {tuple(_SPLITS)}, got {split!r}")
        if image_size < 48:
            raise ValueError(f'image_size must be >= 48 to hold the parts, got {image_size}')
        if family < 0:
            raise ValueError(f'family must be >= 0, got {family}')
        if num_classes < 2:
            raise ValueError(f'num_classes must be >= 2 (distractors come from other classes), got {num_classes}')
        if part_cell is not None and not 1 <= part_cell <= image_size // 16:
            raise ValueError(f'part_cell must be in [1, {image_size // 16}] on a {image_size} px canvas, '
                             f'got {part_cell}')
        self.split, self.num_classes, self.samples_per_class = split, num_classes, samples_per_class
        self.image_size, self.seed, self.family = image_size, seed, family
        self.part_cell, self.oracle_crop = part_cell, oracle_crop
        first = family * num_classes
        self.class_glyphs = _glyphs(first + num_classes, seed * 1000 + _SCENE_STREAM)[first:]
        self.classes = [f'part_{first + i:02d}' for i in range(num_classes)]
        self.targets = [i % num_classes for i in range(len(self))]

    def __len__(self) -> int:
        return self.num_classes * self.samples_per_class

    def _rng(self, index: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _SPLITS[self.split], index, self.family, stream])

    def layout(self, index: int) -> List[Tuple[int, int, int, int, int]]:
        """The parts of ``index`` as ``(glyph, top, left, cell, framed)``: the framed class part first,
        then the distractors; no two parts overlap (a distractor that finds no free spot is left out)."""
        if not 0 <= index < len(self):
            raise IndexError(f'index {index} out of range for {len(self)} images')
        label, s = self.targets[index], self.image_size
        rng = self._rng(index, 1)
        others = [g for g in range(self.num_classes) if g != label]
        count = int(rng.integers(_SCENE_DISTRACTORS[0], _SCENE_DISTRACTORS[1] + 1))
        glyphs = [label] + [int(g) for g in rng.choice(others, size=count, replace=True)]
        parts: List[Tuple[int, int, int, int, int]] = []
        taken: List[Tuple[int, int, int]] = []
        for n, glyph in enumerate(glyphs):
            cell = int(rng.integers(*_scene_cells(s)))  # drawn whatever part_cell: the same positions' stream
            cell = self.part_cell or cell
            side = _scene_part_side(cell)
            for _ in range(50):  # rejection sampling of a free spot; a distractor without one is left out
                top, left = (int(v) for v in rng.integers(0, s - side + 1, size=2))
                if all(top + side + 2 <= t or t + ts + 2 <= top or left + side + 2 <= lf or lf + ts + 2 <= left
                       for t, lf, ts in taken):
                    taken.append((top, left, side))
                    parts.append((glyph, top, left, cell, int(n == 0)))
                    break
        return parts

    def part_boxes(self, index: int) -> List[Tuple[float, float, float, float]]:
        """The boxes ``(x, y, w, h)`` (pixels of the image as the dataset shows it) of the part that decides
        the class."""
        parts = self.layout(index)
        boxes = [(left, top, _scene_part_side(cell), _scene_part_side(cell))
                 for _, top, left, cell, framed in parts if framed]
        if not self.oracle_crop:
            return boxes
        x0, y0, x1, y1 = (float(v) * self.image_size for v in self._oracle_box(parts))
        scale_x, scale_y = self.image_size / (x1 - x0), self.image_size / (y1 - y0)
        return [((x - x0) * scale_x, (y - y0) * scale_y, w * scale_x, h * scale_y) for x, y, w, h in boxes]

    def oracle_box(self, index: int) -> torch.Tensor:
        """The crop ``oracle_crop`` shows: the deciding part's box widened as the zoom widens its box, as
        ``(x0, y0, x1, y1)`` fractions of the generated image."""
        return self._oracle_box(self.layout(index))

    def _oracle_box(self, parts: List[Tuple[int, int, int, int, int]]) -> torch.Tensor:
        """``oracle_box`` of an image's ``layout``."""
        s = self.image_size
        (_, top, left, cell, _), = (part for part in parts if part[-1])
        side = _scene_part_side(cell)
        return widen_box(torch.tensor([[left / s, top / s, (left + side) / s, (top + side) / s]]))[0]

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        s = self.image_size
        blocks = -(-s // 8)
        coarse = rng.integers(60, 190, size=(blocks, blocks, 3)).astype(np.float64)
        img = np.repeat(np.repeat(coarse, 8, axis=0), 8, axis=1)[:s, :s]
        yy, xx = np.mgrid[:s, :s]
        angle, period = rng.uniform(0, np.pi), rng.uniform(4, 12)
        img += 20 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)[..., None]
        for _ in range(3):
            h, w = rng.integers(s // 12, s // 4, size=2)
            y, x = rng.integers(0, s - h), rng.integers(0, s - w)
            img[y:y + h, x:x + w] = rng.integers(0, 255, size=3)
        return img + rng.normal(0, 12, size=(s, s, 3))

    def render(self, index: int) -> Tuple[np.ndarray, int]:
        """The ``(H, W, 3)`` uint8 image and label of ``index``."""
        parts = self.layout(index)
        rng = self._rng(index, 2)
        img = self._background(rng)
        color, frame = rng.integers(200, 256, size=3), rng.integers(0, 60, size=3)
        for glyph, top, left, cell, framed in parts:
            side, inset = _scene_part_side(cell), (_FRAME if framed else 0)
            if framed:
                img[top:top + side, left:left + side] = frame
            img[top + inset:top + side - inset, left + inset:left + side - inset] = rng.integers(60, 140, size=3)
            for r, c in zip(*np.nonzero(self.class_glyphs[glyph])):
                y, x = top + _FRAME + 1 + r * cell, left + _FRAME + 1 + c * cell
                img[y:y + cell, x:x + cell] = color
        img = np.clip(img, 0, 255).astype(np.uint8)
        return (self._oracle_crop(img, parts) if self.oracle_crop else img), self.targets[index]

    def _oracle_crop(self, img: np.ndarray, parts: List[Tuple[int, int, int, int, int]]) -> np.ndarray:
        """``img`` cropped at its ``oracle_box`` and resized to the canvas, as the zoom crops (``zoom_crop``)."""
        image = torch.from_numpy(img).permute(2, 0, 1)[None].float()
        crop = zoom_crop(image, self._oracle_box(parts)[None], (self.image_size, self.image_size))
        return crop[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()

    def __getitem__(self, index: int) -> Tuple[Image.Image, int]:
        img, label = self.render(index)
        return Image.fromarray(img), label


def write_image_folder(dataset: Union[BuiltinFineGrained, BuiltinScene], root: Union[str, Path]) -> Path:
    """Write a built-in split as ``root/<split>/<class>/<index>.png`` (the ImageFolder layout that
    ``--dataset imagefolder`` reads) and, for the scene task, its part boxes as ``root/boxes_<split>.csv``:
    ``path,x,y,w,h`` rows (paths relative to ``root``), the format ``evaluate.py --boxes`` reads.

    Returns:
        The boxes file (scene task) or the split's folder (glyph task).
    """
    root = Path(root)
    scene = isinstance(dataset, BuiltinScene)
    rows = []
    for index in range(len(dataset)):
        image, label = dataset[index]
        relative = Path(dataset.split) / dataset.classes[label] / f'{index:05d}.png'
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / relative)
        if scene:
            rows += [(relative.as_posix(), *box) for box in dataset.part_boxes(index)]
    if not scene:
        return root / dataset.split
    boxes = root / f'boxes_{dataset.split}.csv'
    with boxes.open('w', newline='') as f:
        csv.writer(f).writerows([('path', 'x', 'y', 'w', 'h'), *rows])
    return boxes
