"""What an SSANet looks at, as maps over its input: the SSA layer's attention S and Grad-CAM on the
SSA-aggregated map H (paper Figs. 1 and 4), for ``recipes/visualize.py`` and ``recipes/demo.py``.

    body_map = model.forward_body(x)                  # F, (1, K, h, w)
    maps = attention_maps(model, body_map)           # S (N x N, N = h * w) and two (h, w) views of it
    row = query_attention(maps['attention'], 5, body_map.shape[-2:])   # what position 5 attends
    cam = grad_cam(model, x, target=3)                # Grad-CAM of class 3 on H, at the input's size
    picture = overlay(rgb, upsample(row, rgb.shape[:2]))

Row j of S is the attention of query position j (row-major over the ``h x w`` map) over all positions.
Grad-CAM needs the ``grad-cam`` package (``pip install 'ssa-timm[vis]'``); the rest needs only torch.
"""
from typing import Dict, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw

from .errors import UserError
from .models import SSANet

__all__ = ['attention_maps', 'draw_box', 'grad_cam', 'mark_query', 'overlay', 'query_at', 'query_attention',
           'target_layer', 'upsample']


def target_layer(model: SSANet) -> torch.nn.Module:
    """The module whose output Grad-CAM explains.

    Args:
        model: An SSANet.

    Returns:
        The SSA layer (its output is H), or, for a ``no_attention`` model, the body's last stage (F).
    """
    return model.head.attn if model.head.attn is not None else model.get_submodule(model.feature_info[-1]['module'])


def attention_maps(model: SSANet, body_map: torch.Tensor) -> Dict[str, np.ndarray]:
    """The SSA attention S of the first image of a body map F, and two ``(h, w)`` views of it.

    Args:
        model: An SSANet with an SSA layer (not ``no_attention``).
        body_map: F, ``(B, K, h, w)`` (``model.forward_body(x)``); only its first image is used.

    Returns:
        ``attention``: S, ``(N, N)`` with ``N = h * w``, row j = query position j;
        ``attention_mean``: ``(h, w)``, how much each position is attended, averaged over the queries;
        ``attention_top``: ``(h, w)``, the attention of the most attended position (S's row of it);
        ``top_query``: that position, a 0-d integer array.
    """
    with torch.no_grad():
        _, attn = model.head.attn.forward_with_attention(body_map)
    h, w = body_map.shape[-2:]
    attn = attn[0].float().cpu().numpy()
    mean = attn.mean(0)
    top_query = int(mean.argmax())
    return dict(attention=attn, attention_mean=mean.reshape(h, w),
                attention_top=attn[top_query].reshape(h, w), top_query=np.array(top_query))


def query_attention(attention: np.ndarray, query: int, shape: Sequence[int]) -> np.ndarray:
    """What one query position attends: row ``query`` of S as an ``(h, w)`` map.

    Args:
        attention: S, ``(N, N)`` (``attention_maps(...)['attention']``).
        query: The query position, ``0 <= query < N`` (row-major: ``row * w + column``).
        shape: ``(h, w)`` of the body map, ``h * w == N``.

    Raises:
        ValueError: ``query`` outside ``[0, N)`` or ``shape`` not of N positions.
    """
    h, w = int(shape[0]), int(shape[1])
    n = attention.shape[0]
    if h * w != n:
        raise ValueError(f'a {h} x {w} map has {h * w} positions, the attention {n}')
    if not 0 <= query < n:
        raise ValueError(f'query position {query} is outside 0..{n - 1}')
    return attention[query].reshape(h, w)


def query_at(x: float, y: float, image_size: Tuple[int, int], shape: Sequence[int]) -> int:
    """The map position under pixel ``(x, y)`` of an image the model saw squashed to a square.

    Args:
        x: Column of the pixel, ``0 <= x < width`` (values outside are clamped to the border).
        y: Row of the pixel, ``0 <= y < height``.
        image_size: ``(width, height)`` of the image, as PIL gives it.
        shape: ``(h, w)`` of the body map.

    Returns:
        The query position ``row * w + column``.
    """
    width, height = image_size
    h, w = int(shape[0]), int(shape[1])
    row = min(max(int(y * h / height), 0), h - 1)
    column = min(max(int(x * w / width), 0), w - 1)
    return row * w + column


def upsample(m: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """A map resized bilinearly to ``size`` and scaled to ``[0, 1]`` (min to 0, max to 1).

    Args:
        m: A 2-d map, e.g. ``(h, w)``.
        size: ``(height, width)`` of the result.
    """
    t = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))[None, None]
    up = torch.nn.functional.interpolate(t, size=tuple(size), mode='bilinear', align_corners=False)[0, 0].numpy()
    return (up - up.min()) / (up.max() - up.min() + 1e-12)


def _grad_cam_package():
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.image import show_cam_on_image
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError as e:
        raise UserError(f'Grad-CAM needs the grad-cam package ({e}): pip install "ssa-timm[vis]"') from e
    return GradCAM, show_cam_on_image, ClassifierOutputTarget


def grad_cam(model: SSANet, x: torch.Tensor, target: int) -> np.ndarray:
    """Grad-CAM (the ``grad-cam`` package) of class ``target`` on ``target_layer(model)``: H, or F for
    a ``no_attention`` model. The hooks it sets are removed before it returns.

    Args:
        model: An SSANet in eval mode.
        x: One transformed image, ``(1, C, S, S)``, on the model's device.
        target: The class whose logit is explained.

    Returns:
        ``(S, S)`` in ``[0, 1]``.

    Raises:
        UserError: The ``grad-cam`` package is not installed.
    """
    GradCAM, _, ClassifierOutputTarget = _grad_cam_package()
    with GradCAM(model=model, target_layers=[target_layer(model)]) as cam:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(int(target))])[0]


def overlay(rgb: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """A heat map drawn over an image in the jet colours of Grad-CAM figures (``show_cam_on_image``).

    Args:
        rgb: The image, ``(H, W, 3)`` float in ``[0, 1]``.
        heat: ``(H, W)`` in ``[0, 1]`` (``upsample`` makes one of a map).

    Returns:
        ``(H, W, 3)`` uint8 RGB.
    """
    _, show_cam_on_image, _ = _grad_cam_package()
    return show_cam_on_image(np.asarray(rgb, dtype=np.float32), np.asarray(heat, dtype=np.float32), use_rgb=True)


def mark_query(picture: np.ndarray, query: int, shape: Sequence[int], color=(255, 255, 255)) -> np.ndarray:
    """A copy of ``picture`` with the cell of map position ``query`` outlined.

    Args:
        picture: ``(H, W, 3)`` uint8, the whole image the ``(h, w)`` map covers.
        query: The position, ``row * w + column``.
        shape: ``(h, w)`` of the map.
        color: The outline's RGB colour.
    """
    h, w = int(shape[0]), int(shape[1])
    row, column = divmod(int(query), w)
    if not 0 <= row < h:
        raise ValueError(f'query position {query} is outside a {h} x {w} map')
    height, width = picture.shape[:2]
    box = (column * width / w, row * height / h, (column + 1) * width / w - 1, (row + 1) * height / h - 1)
    image = Image.fromarray(np.ascontiguousarray(picture, dtype=np.uint8))
    ImageDraw.Draw(image).rectangle(box, outline=color, width=max(1, min(height, width) // 128))
    return np.asarray(image)


def draw_box(picture: np.ndarray, box: Sequence[float], color=(255, 220, 0)) -> np.ndarray:
    """A copy of ``picture`` with a box outlined: a zoom model's box (``SSANet.forward_with_zoom_box``).

    Args:
        picture: ``(H, W, 3)`` uint8, the whole image the box's fractions refer to.
        box: ``(x0, y0, x1, y1)`` in fractions of the image's width and height.
        color: The outline's RGB colour.
    """
    height, width = picture.shape[:2]
    x0, y0, x1, y1 = (float(v) for v in box)
    corners = (x0 * width, y0 * height, max(x0 * width, x1 * width - 1), max(y0 * height, y1 * height - 1))
    image = Image.fromarray(np.ascontiguousarray(picture, dtype=np.uint8))
    ImageDraw.Draw(image).rectangle(corners, outline=color, width=max(1, min(height, width) // 96))
    return np.asarray(image)
