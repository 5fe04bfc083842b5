"""The attention-guided zoom: a second look where the SSA attention points.

From the first pass's attention S, each position's attended mass (the column mean of S: how much the
queries look at it) gives a box, drawn as WS-DAN (Hu et al. 2019) crops around its attention maps: the
cells whose mass is at least ``threshold`` times the largest, their bounding box widened by ``margin``
of its size on each side, made at least ``min_size`` of the image on each axis (grown about its centre)
and kept inside the image. The input image is cropped there with ``torchvision.ops.roi_align``
(batched, differentiable, exported to ONNX as ``RoiAlign``) back to the input size, and the same body
and heads classify the crop (``SSANet(zoom=True)``).

Boxes are ``(x0, y0, x1, y1)`` in fractions of the image's width and height (the corners of the cells,
so a box drawn from a whole map is ``(0, 0, 1, 1)``), which any image size maps to pixels.
"""
from typing import Tuple

import torch
from torchvision.ops import roi_align

__all__ = ['ZOOM_MARGIN', 'ZOOM_MIN_SIZE', 'ZOOM_THRESHOLD', 'attention_box', 'box_hits', 'box_iou', 'widen_box',
           'zoom_crop']

# the zoom box's defaults (SSANet's zoom_threshold, zoom_margin, zoom_min_size)
ZOOM_THRESHOLD = 0.5
ZOOM_MARGIN = 0.1
ZOOM_MIN_SIZE = 0.25


def _span(keep: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """First and one-past-last index of the True entries of each row of ``keep`` ``(B, n)`` (one is always True)."""
    n = keep.shape[-1]
    index = torch.arange(n, device=keep.device).expand_as(keep)
    first = torch.where(keep, index, torch.full_like(index, n)).amin(-1)
    last = torch.where(keep, index, torch.full_like(index, -1)).amax(-1) + 1
    return first, last


def attention_box(mass: torch.Tensor, threshold: float = ZOOM_THRESHOLD, margin: float = ZOOM_MARGIN,
                  min_size: float = ZOOM_MIN_SIZE) -> torch.Tensor:
    """The zoom box of each map of attended mass.

    Args:
        mass: ``(B, h, w)`` how much each position is attended (any non-negative scale).
        threshold: Cells with at least this fraction of the map's largest mass are in the box.
        margin: Each side is moved out by this fraction of the box's width (height).
        min_size: The box's width and height are at least this fraction of the image's (at most 1).

    Returns:
        ``(B, 4)`` float boxes ``(x0, y0, x1, y1)`` in fractions of the image, inside ``[0, 1]``.
    """
    rows, cols = mass.shape[-2:]
    keep = mass >= threshold * mass.flatten(1).amax(-1)[:, None, None]
    r0, r1 = _span(keep.any(-1))
    c0, c1 = _span(keep.any(-2))
    return widen_box(torch.stack([c0 / cols, r0 / rows, c1 / cols, r1 / rows], dim=-1), margin, min_size)


def widen_box(boxes: torch.Tensor, margin: float = ZOOM_MARGIN, min_size: float = ZOOM_MIN_SIZE) -> torch.Tensor:
    """Boxes ``(B, 4)`` ``(x0, y0, x1, y1)`` (fractions of the image) as the zoom crops them: each side moved
    out by ``margin`` of the box's size, width and height at least ``min_size`` (grown about the centre),
    shifted inside the image (not shrunk)."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    width = ((x1 - x0) * (1 + 2 * margin)).clamp(min=min(min_size, 1.0), max=1.0)
    height = ((y1 - y0) * (1 + 2 * margin)).clamp(min=min(min_size, 1.0), max=1.0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = torch.minimum((cx - width / 2).clamp(min=0.0), 1 - width)
    top = torch.minimum((cy - height / 2).clamp(min=0.0), 1 - height)
    return torch.stack([left, top, left + width, top + height], dim=-1).float()


def zoom_crop(images: torch.Tensor, boxes: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Crop each image at its box and resize the crop to ``size`` (bilinear, ``roi_align`` with aligned
    pixel centres, 2 x 2 samples a bin).

    Args:
        images: ``(B, C, H, W)``.
        boxes: ``(B, 4)`` boxes ``(x0, y0, x1, y1)`` in fractions of the image.
        size: ``(height, width)`` of the crops.
    """
    height, width = images.shape[-2:]
    scale = torch.tensor([width, height, width, height], dtype=images.dtype, device=images.device)
    index = torch.arange(images.shape[0], dtype=images.dtype, device=images.device)[:, None]
    rois = torch.cat([index, boxes.to(images.dtype) * scale], dim=1)
    return roi_align(images, rois, output_size=size, spatial_scale=1.0, sampling_ratio=2, aligned=True)


def box_iou(boxes: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Intersection over union of matching rows of two ``(B, 4)`` box tensors (same coordinates)."""
    low = torch.maximum(boxes[:, :2], truth[:, :2])
    high = torch.minimum(boxes[:, 2:], truth[:, 2:])
    inter = (high - low).clamp(min=0).prod(-1)
    area = (boxes[:, 2:] - boxes[:, :2]).prod(-1) + (truth[:, 2:] - truth[:, :2]).prod(-1)
    return inter / (area - inter).clamp(min=1e-12)


def box_hits(boxes: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Whether each box holds the centre of the matching true box (its hit rate is the mean)."""
    centre = (truth[:, :2] + truth[:, 2:]) / 2
    return ((boxes[:, :2] <= centre) & (centre <= boxes[:, 2:])).all(-1)
