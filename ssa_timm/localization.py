"""Where the attention looks, measured against ground-truth part boxes (the paper's Fig. 1 claim of
"accurate feature localization", as numbers).

For images with boxes of the part(s) that decide their class:

* **in-box mass**: the share of the attention that query positions put on key positions inside the
  box(es), ``mean_j sum_{i in box} S[j, i]``, averaged over images. Uniform attention scores the
  box's share of positions (``box_share``), reported beside it; attention that looks only at the
  box scores 1.
* **zoom box** (``ssa_timm.zoom``): the box a ``zoom`` model draws from its attention (a model without
  the zoom: the box it would draw, with the zoom's default settings), its IoU with the bounding box of the
  image's true boxes and its hit rate (the box holds the true box's centre); the same for the box drawn the
  same way from the Grad-CAM map (``cam_box_iou``, ``cam_box_hit``), the pointer a zoom could take instead.
* **pointing game** (Zhang et al. 2016, "Top-down Neural Attention by Excitation Backprop"): a hit
  when the maximum of a map falls inside the box, for two maps: the SSA layer's Grad-CAM (on H, on F
  for ``no_attention``; the ground-truth class) and the most attended position (the column mean of
  S, ``attention_maps``' ``attention_mean``).

Positions are the cells of the body map F. A box ``(x, y, w, h)`` in pixels of the original image is
mapped to that grid by scaling each axis on its own, as the squash resize did (``crop_mode='squash'``);
a cell is inside when the box covers any part of it, and the uniform baseline uses the same cells. An
image whose box covers every cell of the map (a map too coarse for it, e.g. 1 x 1) says nothing about
where the model looks: it is counted (``whole_map``) and left out of the figures.

Boxes come from the built-in scene task (``BuiltinScene.part_boxes``), CUB's ``bounding_boxes.txt``
(read with its ``images.txt``) or a CSV file ``path,x,y,w,h`` (one box per row, several rows for
several boxes of an image; a header row naming the columns is allowed; a relative path is relative to
the CSV's folder). Box coordinates are pixels of the image **as shown**: with its EXIF orientation
applied, as ``ssa_timm.data.load_image`` gives it to the model (x to the right, y down, from the
top-left corner of the upright photo).
"""
import csv
import math
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .data.images import shown_size
from .errors import UserError
from .feature_cache import body_maps_of
from .zoom import box_hits, box_iou

__all__ = ['CSV_PATH_HEADERS', 'Box', 'ImageBoxes', 'attention_focus', 'batch_localization', 'box_mask', 'box_share',
           'dataset_boxes', 'grad_cam_grid', 'in_box_mass', 'localization_report', 'pointing_hits', 'read_boxes',
           'scene_localization', 'unit_box']

Box = Tuple[float, float, float, float]  # x, y, w, h in pixels of the original image


class ImageBoxes(NamedTuple):
    """The ground-truth boxes of one image and that image's ``(width, height)`` in pixels."""
    boxes: Sequence[Box]
    image_size: Tuple[int, int]


def box_mask(boxes: Sequence[Box], image_size: Tuple[int, int], grid: Sequence[int]) -> torch.Tensor:
    """The cells of an ``(h, w)`` map that the boxes cover, as a flat ``(h * w,)`` bool tensor.

    Args:
        boxes: ``(x, y, w, h)`` boxes in pixels of the original image.
        image_size: ``(width, height)`` of the original image; it was squashed to the model's square input.
        grid: ``(h, w)`` of the body map.

    Raises:
        ValueError: An empty image size or a box with no area inside the image.
    """
    width, height = image_size
    rows, cols = int(grid[0]), int(grid[1])
    if width <= 0 or height <= 0:
        raise ValueError(f'image size must be positive, got {image_size}')
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for x, y, w, h in boxes:
        x0, y0, x1, y1 = max(x, 0.), max(y, 0.), min(x + w, width), min(y + h, height)
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f'box {(x, y, w, h)} has no area inside a {width} x {height} image')
        c0, c1 = int(x0 * cols / width), math.ceil(x1 * cols / width)
        r0, r1 = int(y0 * rows / height), math.ceil(y1 * rows / height)
        mask[r0:max(r1, r0 + 1), c0:max(c1, c0 + 1)] = True
    return mask.flatten()


def in_box_mass(attention: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per image, the attention mass query positions put inside the box, averaged over the queries.

    Args:
        attention: S, ``(B, N, N)``, row j: query position j, rows summing to 1.
        masks: ``(B, N)`` bool, the positions inside the box.

    Returns:
        ``(B,)``: 1 when all attention is in the box, the box's share of positions for uniform attention.
    """
    return (attention.float() * masks[:, None, :].float()).sum(-1).mean(-1)


def box_share(masks: torch.Tensor) -> torch.Tensor:
    """Per image, the box's share of positions: what uniform attention scores, ``(B,)``."""
    return masks.float().mean(-1)


def pointing_hits(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per image, whether the map's maximum falls inside the box (the pointing game).

    Args:
        maps: ``(B, h, w)`` or ``(B, N)`` maps over the positions.
        masks: ``(B, N)`` bool.

    Returns:
        ``(B,)`` bool.
    """
    top = maps.flatten(1).argmax(-1)
    return masks.gather(1, top[:, None])[:, 0]


def attention_focus(attention: torch.Tensor) -> torch.Tensor:
    """How much each position is attended, averaged over the queries: ``(B, N)`` from S ``(B, N, N)``."""
    return attention.float().mean(1)


def grad_cam_grid(model: torch.nn.Module, body_maps: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Grad-CAM of the ``targets`` classes on the SSA layer's output H (on F for ``no_attention``), at
    the body map's resolution: ``relu(sum_k mean_positions(d logit / d H_k) * H_k)``, the ``grad-cam``
    package's GradCAM before its upsampling, for a batch.

    Args:
        model: An SSANet in eval mode.
        body_maps: F, ``(B, K, h, w)``.
        targets: ``(B,)`` classes whose logit (of the model output, the mean of both heads) is explained.

    Returns:
        ``(B, h, w)``, not normalised.
    """
    head = model.head
    with torch.enable_grad():
        f = body_maps.detach().requires_grad_(True)  # H needs a gradient even when the SSA layer is frozen
        layer = f if head.attn is None else head.attn(f)
        logits = head.forward_head(f if head.attn is None else torch.cat([f, layer], dim=1))
        score = logits.gather(1, targets[:, None]).sum()
        grads, = torch.autograd.grad(score, layer)
    weights = grads.mean((2, 3), keepdim=True)
    return F.relu((weights * layer.detach()).sum(1))


def batch_localization(model: torch.nn.Module, body_maps: torch.Tensor, targets: torch.Tensor,
                       masks: torch.Tensor, truth: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """Per-image localisation of a batch: ``box_share``, ``pointing_cam`` and, for a model with an SSA
    layer, ``in_box_mass`` and ``pointing_attention`` (each ``(B,)``). With ``truth`` (the true boxes,
    ``(B, 4)`` ``(x0, y0, x1, y1)`` fractions of the image) also the boxes the zoom draws from the Grad-CAM
    map (``cam_box_iou``, ``cam_box_hit``) and from the attention (``zoom_iou``, ``zoom_hit``), each
    against the truth."""
    cam = grad_cam_grid(model, body_maps, targets)
    result = {'box_share': box_share(masks), 'pointing_cam': pointing_hits(cam, masks).float()}
    if truth is not None:
        result.update(_box_scores('cam_box', model.zoom_box(cam), truth))
    if model.head.attn is not None:
        with torch.no_grad():
            _, attention = model.head.attn.forward_with_attention(body_maps)
        focus = attention_focus(attention)
        result['in_box_mass'] = in_box_mass(attention, masks)
        result['pointing_attention'] = pointing_hits(focus, masks).float()
        if truth is not None:  # the box the zoom draws from this attention (SSANet.zoom_boxes)
            result.update(_box_scores('zoom', model.zoom_box(focus.reshape(cam.shape)), truth))
    return result


def _box_scores(name: str, boxes: torch.Tensor, truth: torch.Tensor) -> Dict[str, torch.Tensor]:
    truth = truth.to(boxes.device)
    return {f'{name}_iou': box_iou(boxes, truth), f'{name}_hit': box_hits(boxes, truth).float()}


_KEYS = ('box_share', 'pointing_cam', 'in_box_mass', 'pointing_attention', 'zoom_iou', 'zoom_hit', 'cam_box_iou',
         'cam_box_hit')
_ATTENTION_KEYS = ('in_box_mass', 'pointing_attention', 'zoom_iou', 'zoom_hit')


def unit_box(image_boxes: ImageBoxes) -> torch.Tensor:
    """The bounding box of an image's boxes as ``(x0, y0, x1, y1)`` in fractions of the image (clipped)."""
    width, height = image_boxes.image_size
    x0 = min(x for x, _, _, _ in image_boxes.boxes)
    y0 = min(y for _, y, _, _ in image_boxes.boxes)
    x1 = max(x + w for x, _, w, _ in image_boxes.boxes)
    y1 = max(y + h for _, y, _, h in image_boxes.boxes)
    return torch.tensor([x0 / width, y0 / height, x1 / width, y1 / height]).clamp(0, 1)


def localization_report(model: torch.nn.Module, dataset: Dataset, boxes: Mapping[int, ImageBoxes],
                        body_maps: bool = False, batch_size: int = 32, accelerator: Any = None,
                        autocast: Optional[Callable[[], ContextManager]] = None) -> Dict[str, Optional[float]]:
    """The localisation metrics of ``model`` over the images of ``dataset`` that have boxes.

    Args:
        model: An SSANet (switched to eval mode).
        dataset: ``(input, label)`` pairs: transformed images, or body maps F when ``body_maps``.
        boxes: Dataset index -> its ``ImageBoxes``; other images are skipped.
        body_maps: The dataset holds body maps (a feature cache), not images.
        batch_size: Images per forward/backward pass.
        accelerator: With one, each process measures its share and the sums are reduced over processes.
        autocast: Makes the context of each body forward (e.g. ``accelerator.autocast``).

    Returns:
        ``images`` (the count measured), ``whole_map`` (the count left out: their boxes cover every cell of
        the map), ``map_height`` and ``map_width`` (of the body map) and the means of ``box_share``,
        ``pointing_cam``, ``in_box_mass`` and ``pointing_attention``, and of the zoom box's ``zoom_iou`` and
        ``zoom_hit`` (its IoU with the true box, and the rate of boxes holding the true box's centre) and the
        Grad-CAM box's ``cam_box_iou`` and ``cam_box_hit`` (None without an SSA layer where they need one,
        or without measured images).
    """
    model.eval()
    device = next(model.parameters()).device
    indices = sorted(boxes)
    if accelerator is not None:
        indices = indices[accelerator.process_index::accelerator.num_processes]
    sums = torch.zeros(len(_KEYS) + 2, dtype=torch.float64, device=device)
    grid: Tuple[int, ...] = ()
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        inputs, labels = zip(*(dataset[i] for i in chunk))
        x = torch.stack([body_maps_of(item) for item in inputs] if body_maps else list(inputs)).to(device)
        if not body_maps:
            with torch.no_grad(), (autocast or nullcontext)():
                x = model.forward_body(x)
        x, grid = x.float(), tuple(x.shape[-2:])
        masks = torch.stack([box_mask(boxes[i].boxes, boxes[i].image_size, grid) for i in chunk]).to(device)
        told_apart = ~masks.all(-1)  # a box over every cell cannot be told from the rest of the map
        sums[-1] += int((~told_apart).sum())
        if not told_apart.any():
            continue
        targets = torch.as_tensor(labels, device=device)[told_apart]
        truth = torch.stack([unit_box(boxes[i]) for i in chunk]).to(device)[told_apart]
        result = batch_localization(model, x[told_apart], targets, masks[told_apart], truth)
        sums[0] += int(told_apart.sum())
        for n, key in enumerate(_KEYS, 1):
            if key in result:
                sums[n] += result[key].sum().double()
    if accelerator is not None:
        sums = accelerator.reduce(sums, reduction='sum')
    count = int(sums[0])
    has_attention = model.head.attn is not None
    report: Dict[str, Any] = {'images': count, 'whole_map': int(sums[-1]),
                              'map_height': grid[0] if grid else None, 'map_width': grid[1] if grid else None}
    for n, key in enumerate(_KEYS, 1):
        report[key] = float(sums[n]) / count if count and (has_attention or key not in _ATTENTION_KEYS) else None
    return report


def dataset_boxes(dataset: Any, count: Optional[int] = None) -> Dict[int, ImageBoxes]:
    """The boxes a dataset carries itself (the built-in scene task's ``part_boxes``) for its first
    ``count`` images (all by default); empty for a dataset without boxes."""
    if not hasattr(dataset, 'part_boxes'):
        return {}
    size = (dataset.image_size, dataset.image_size)
    return {i: ImageBoxes(dataset.part_boxes(i), size) for i in range(min(count or len(dataset), len(dataset)))}


def scene_localization(model: torch.nn.Module, config: Any, dataset: Dataset, accelerator: Any = None,
                       count: int = 500) -> Dict[str, Optional[float]]:
    """``localization_report`` on the first ``count`` validation images of the built-in scene task that
    ``config`` (a ``RunConfig``) trains on; ``dataset`` is the validation data in its order (transformed
    images, or cached body maps with ``config.cache_features``)."""
    from .data import build_dataset
    scene = build_dataset('builtin', **config.dataset_options(False))
    boxes = dataset_boxes(scene, count)
    return localization_report(model, dataset, boxes, body_maps=config.cache_features, batch_size=config.batch_size,
                               accelerator=accelerator, autocast=accelerator.autocast if accelerator else None)


def read_boxes(path: str, dataset: Any) -> Dict[int, ImageBoxes]:
    """The boxes of a dataset of image files (``dataset.samples``: ``(path, label)`` pairs) from a boxes file,
    read and checked whole (every box against its image) before anything is evaluated.

    Args:
        path: CUB's ``bounding_boxes.txt`` (``<image id> <x> <y> <w> <h>``, with ``images.txt`` beside it
            mapping ids to paths under ``images/``), or a CSV file of ``path,x,y,w,h`` rows (paths
            relative to the CSV's folder, or absolute; a header row whose first column is one of
            ``CSV_PATH_HEADERS`` is allowed; UTF-8, with or without a byte order mark). Coordinates are
            pixels of the image as shown (EXIF orientation applied).
        dataset: The dataset the boxes are for; images are matched by their resolved path.

    Returns:
        Dataset index -> ``ImageBoxes`` (with the image's size as shown) for every image with boxes.

    Raises:
        UserError: A missing or malformed file, a box outside its image, a dataset that is not a list of
            files, or no image matched.
    """
    file = _boxes_file(path)
    samples = getattr(dataset, 'samples', None)
    if samples is None:
        raise UserError(f'--boxes {path}: the dataset is not a list of image files; boxes are matched by path')
    by_path = _read_cub_boxes(file) if _is_cub_boxes(file) else _read_csv_boxes(file)
    found: Dict[int, ImageBoxes] = {}
    for index, (image, _) in enumerate(samples):
        rows = by_path.get(str(Path(image).resolve()))
        if rows:
            size = shown_size(image)
            for box, line in rows:
                _check_inside(box, size, f'{file}, line {line}', image)
            found[index] = ImageBoxes([box for box, _ in rows], size)
    if not found:
        raise UserError(f'--boxes {path}: none of its {len(by_path)} images is in the evaluated dataset '
                        f'(first dataset image: {samples[0][0] if samples else "none"})')
    return found


CSV_PATH_HEADERS = ('path', 'image', 'file', 'filename', 'image_path', 'img')
_EXPECTED = "expected CUB's bounding_boxes.txt (with images.txt beside it) or a CSV of path,x,y,w,h rows"


def _check_inside(box: Box, size: Tuple[int, int], where: str, image: str) -> None:
    x, y, w, h = box
    width, height = size
    if min(x + w, width) <= max(x, 0.) or min(y + h, height) <= max(y, 0.):
        raise UserError(f'{where}: the box x={x:g} y={y:g} w={w:g} h={h:g} lies outside {image}, which is '
                        f'{width} x {height} pixels as shown (EXIF orientation applied); expected a box in '
                        'those pixels')


def _boxes_file(path: str) -> Path:
    file = Path(path)
    if file.is_dir():
        raise UserError(f'--boxes {path} is a folder; {_EXPECTED}')
    if not file.is_file():
        raise UserError(f'--boxes {path}: no such file; {_EXPECTED}')
    return file


def _text(file: Path) -> str:
    """The file's text (UTF-8, a byte order mark dropped)."""
    try:
        return file.read_text(encoding='utf-8-sig')
    except UnicodeDecodeError as e:
        raise UserError(f'{file} is not a UTF-8 text file ({e.reason} at byte {e.start}); {_EXPECTED}') from e


def _is_cub_boxes(file: Path) -> bool:
    """A whitespace-separated ``id x y w h`` file (CUB's ``bounding_boxes.txt``) rather than a CSV: told by
    its first line that is not blank."""
    first = next((line for line in _text(file).splitlines() if line.strip()), '')
    return ',' not in first and len(first.split()) == 5


def _numbers(values: Sequence[str], file: Path, line: int) -> Box:
    try:
        x, y, w, h = (float(v) for v in values)
    except ValueError:
        raise UserError(f'{file}, line {line}: expected the numbers x y w h, got {list(values)}') from None
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        raise UserError(f'{file}, line {line}: a box needs finite numbers and a positive width and height, '
                        f'got x={x} y={y} w={w} h={h}')
    return x, y, w, h


Rows = Dict[str, List[Tuple[Box, int]]]  # resolved image path -> its boxes, each with its line in the file


def _read_cub_boxes(file: Path) -> Rows:
    """CUB's ``bounding_boxes.txt`` as resolved image path -> its box, through ``images.txt`` beside it."""
    images_txt = file.with_name('images.txt')
    if not images_txt.is_file():
        raise UserError(f'{file} is a CUB bounding_boxes.txt (image id x y w h); it needs images.txt beside it, '
                        f'{images_txt} is missing')
    paths = {}
    for n, row in enumerate(_text(images_txt).splitlines(), 1):
        if row.strip():
            parts = row.split(maxsplit=1)
            if len(parts) != 2:
                raise UserError(f'{images_txt}, line {n}: expected "<image id> <path>", got {row!r}')
            paths[parts[0]] = str((file.parent / 'images' / parts[1].strip()).resolve())
    boxes: Rows = defaultdict(list)
    for n, row in enumerate(_text(file).splitlines(), 1):
        if not row.strip():
            continue
        parts = row.split()
        if len(parts) != 5 or parts[0] not in paths:
            raise UserError(f'{file}, line {n}: expected "<image id of images.txt> x y w h", got {row!r}')
        boxes[paths[parts[0]]].append((_numbers(parts[1:], file, n), n))
    return boxes


def _read_csv_boxes(file: Path) -> Rows:
    """A ``path,x,y,w,h`` CSV as resolved image path -> its boxes."""
    boxes: Rows = defaultdict(list)
    first = True
    for n, row in enumerate(csv.reader(_text(file).splitlines()), 1):
        if not any(field.strip() for field in row):
            continue
        if first and row[0].strip().lower() in CSV_PATH_HEADERS:
            first = False
            continue  # the header row
        if len(row) != 5:
            raise UserError(f'{file}, line {n}: expected path,x,y,w,h (5 fields), got {len(row)}: {row}')
        if first:
            _first_row_numbers(row, file, n)
        first = False
        image = Path(row[0].strip())
        image = image if image.is_absolute() else file.parent / image
        boxes[str(image.resolve())].append((_numbers(row[1:], file, n), n))
    return boxes


def _first_row_numbers(row: Sequence[str], file: Path, line: int) -> None:
    """The first row must be a box or a header naming the path column: say both when it is neither."""
    try:
        [float(v) for v in row[1:]]
    except ValueError:
        raise UserError(f'{file}, line {line}: expected the numbers x y w h after the path, or a header row whose '
                        f'first column is one of {", ".join(CSV_PATH_HEADERS)}; got {row}') from None
