"""Visualise what SSANet looks at (paper Figs. 1 and 4): Grad-CAM on the SSA-aggregated map H and
the SSA layer's own attention, overlaid on each image.

    python recipes/visualize.py --model runs/builtin/best images/ --output-dir vis/
    python recipes/visualize.py --model runs/abl/no_attention/best --model runs/abl/no_alpha/best ... \\
        --output-dir fig4/ img.jpg

Per image and model it writes ``<stem>_gradcam.png``, ``<stem>_attention.png`` (the attention of
the most attended position, and the mean attention over all query positions) and ``<stem>.npz``
with the raw maps. Given several models it also draws ``grid.png`` in the layout of the paper's
Fig. 4: the input, then one Grad-CAM column per model (with the zoom box of a ``zoom`` model).
Grad-CAM comes from the ``grad-cam`` package; for ``no_attention`` models it targets the body's last
feature map F. Images are read by the library's one loader; an unreadable image, or one over the pixel
limit (PIL.Image.MAX_IMAGE_PIXELS), is skipped with a warning naming it. ``--output-dir`` may not be,
or lie inside, a model's folder.

timm's own attention tool reads the same map: ``timm.utils.AttentionExtract(model)`` finds the node
``head.attn.softmax``, S of shape ``(B, N, N)`` (row j = query position j, N = H * W), equal to
``model.head.attn.forward_with_attention(model.forward_body(x))[1]``, when the plain attention path runs:
build the model with ``fused_attn=False`` (or with timm's fused attention off, ``TIMM_FUSED_ATTN=0``). The
default eval path is fused (``scaled_dot_product_attention``), which has no softmax node to find:

    model = timm.create_model('local-dir:runs/builtin/best', pretrained=True, fused_attn=False).eval()
    maps = timm.utils.AttentionExtract(model)(x)['head.attn.softmax']
"""
import argparse
import sys
from pathlib import Path
from typing import Dict, List

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from pytorch_grad_cam.utils.image import show_cam_on_image  # noqa: E402

from ssa_timm import SSANet  # noqa: E402
from ssa_timm.attention_maps import attention_maps, draw_box, grad_cam, upsample  # noqa: E402
from ssa_timm.cli import HelpFormatter, add_img_size_arg, deprecated_alias  # noqa: E402
from ssa_timm.data import CorruptImageError, find_images, load_image, model_transform  # noqa: E402
from ssa_timm.errors import UserError, exit_on_user_error  # noqa: E402
from ssa_timm.hub import label_names, load_model, model_folder  # noqa: E402
from ssa_timm.output_paths import check_output_path  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument('inputs', nargs='+', help='image files, folders or glob patterns')
    p.add_argument('--model', action='append', required=True,
                   help='a model spec; repeat it for several models (Fig. 4: --model A --model B ...)')
    p.add_argument('--labels', help="the grid's column titles, one per --model, comma separated (default: each "
                   "model's aggregation and options)")
    add_img_size_arg(p, "default: the first model's input size")
    p.add_argument('--output-dir', default='vis', help='the figures go here')
    deprecated_alias(p, '--out-dir', '--output-dir')
    p.add_argument('--debug', action='store_true', help='show the traceback of user errors')
    return p.parse_args(argv)


def check_inputs(args: argparse.Namespace) -> Path:
    """The output folder, after checking the arguments before any model is loaded: image inputs that
    are no model folders (several models take one ``--model`` each), ``--img-size`` within the limit,
    ``--output-dir`` writable and outside every model folder."""
    for item in args.inputs:
        if model_folder(item) is not None and (Path(item) / 'config.json').is_file():
            raise UserError(f'{item} is a model folder, given as an image input; give each model its own --model')
    if args.labels and len(args.labels.split(',')) != len(args.model):
        raise UserError(f'--labels names {len(args.labels.split(","))} column(s) for {len(args.model)} --model(s)')
    folders = [f for f in (model_folder(spec) for spec in args.model) if f is not None]
    return check_output_path(args.output_dir, '--output-dir', model_folders=folders, is_folder=True)


def read_image(path: Path):
    """The image, or None (with a warning naming it) when it cannot be read or is too large."""
    try:
        return load_image(str(path))
    except CorruptImageError as e:
        print(f'warning: skipping {e}', file=sys.stderr)
        return None


def model_label(model: SSANet) -> str:
    """The aggregation, and the attention options a model was built with (``qk_norm``, ``scale_attn``)."""
    attn = model.head.attn
    options = [] if attn is None else [name for name, on in (('qk_norm', attn.qk_norm), ('scale_attn', attn.scale != 1))
                                       if on]
    return ' + '.join([model.aggregation, *options, *(['zoom'] if model.zoom else [])])


def save_overlays(rgb: np.ndarray, maps: Dict[str, np.ndarray], title: str, path: Path) -> None:
    fig, axes = plt.subplots(1, len(maps) + 1, figsize=(3 * (len(maps) + 1), 3.2))
    axes[0].imshow(rgb)
    axes[0].set_title(title, fontsize=8)
    for ax, (name, heat) in zip(axes[1:], maps.items()):
        ax.imshow(show_cam_on_image(rgb, heat, use_rgb=True))
        ax.set_title(name, fontsize=8)
    for ax in axes:
        ax.axis('off')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def visualize(args: argparse.Namespace) -> List[Path]:
    out = check_inputs(args)
    paths = find_images(args.inputs)
    models = [load_model(spec).eval() for spec in args.model]
    transform, size = model_transform(models[0], args.img_size)
    written: List[Path] = []
    grid_rows = []
    for path in paths:
        image = read_image(path)
        if image is None:
            continue
        rgb = np.asarray(image.resize((size, size)), dtype=np.float32) / 255
        x = transform(image).unsqueeze(0)
        row = [rgb]
        for k, model in enumerate(models):
            stem = f'{path.stem}_m{k}' if len(models) > 1 else path.stem
            with torch.no_grad():  # one body pass gives the prediction and the attention's input
                body_map = model.forward_body(x)
                zoomed = model.forward_with_zoom_box(x) if model.zoom else None  # both passes, as predict.py
                logits = zoomed[0] if zoomed else model.forward_head(model.forward_ssa(body_map))
                pred = int(logits.argmax(-1))
            names = label_names(model)
            title = f'{model_label(model)}: {names[pred] if names else pred}'
            gradcam = grad_cam(model, x, pred)
            arrays = dict(gradcam=gradcam)
            shown = rgb
            if zoomed:  # the zoom box, drawn on the input of every figure of this model
                arrays['zoom_box'] = zoomed[1][0].numpy()
                shown = draw_box((rgb * 255).astype(np.uint8), arrays['zoom_box']).astype(np.float32) / 255
            overlays = {'Grad-CAM': gradcam}
            if model.head.attn is not None:
                arrays.update(attention_maps(model, body_map))
                overlays['attention of the most attended position'] = upsample(arrays['attention_top'], (size, size))
                overlays['mean attention over queries'] = upsample(arrays['attention_mean'], (size, size))
                save_overlays(shown, {k: v for k, v in overlays.items() if k != 'Grad-CAM'}, title,
                              out / f'{stem}_attention.png')
                written.append(out / f'{stem}_attention.png')
            save_overlays(shown, {'Grad-CAM': gradcam}, title, out / f'{stem}_gradcam.png')
            np.savez(out / f'{stem}.npz', **arrays)
            written += [out / f'{stem}_gradcam.png', out / f'{stem}.npz']
            cell = show_cam_on_image(rgb, gradcam, use_rgb=True)
            row.append(draw_box(cell, arrays['zoom_box']) if zoomed else cell)
        grid_rows.append(row)
    if not grid_rows:
        raise UserError(f'none of the {len(paths)} image file(s) could be read')
    if len(models) > 1:
        titles = args.labels.split(',') if args.labels else [model_label(m) for m in models]
        written.append(draw_grid(grid_rows, ['input', *titles], out / 'grid.png'))
    return written


def draw_grid(rows: List[List[np.ndarray]], columns: List[str], path: Path) -> Path:
    """Paper Fig. 4 layout: one row per image, the input then one Grad-CAM column per model (a zoom model's
    with its zoom box)."""
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(2 * len(columns), 2 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            axes[r, c].imshow(img)
            axes[r, c].axis('off')
            if r == 0:
                axes[r, c].set_title(columns[c], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None) -> List[Path]:
    written = visualize(parse_args(argv))
    print('\n'.join(str(p) for p in written))
    return written


if __name__ == '__main__':
    exit_on_user_error(main)
