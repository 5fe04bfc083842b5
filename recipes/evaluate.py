"""Evaluate an SSANet: top-1/top-5 of the SSA head, the FE head and the model output (their mean),
per-class accuracy, the confusion matrix and the attention diagnostics, written as JSON. Runs on one
or many processes (``gather_for_metrics``). With ground-truth part boxes (``--boxes FILE``, or the built-in
scene task's own) also where the model looks: the attention's in-box mass beside uniform attention's and
the pointing game of Grad-CAM and of the most attended position (``ssa_timm.localization``).

    python recipes/evaluate.py --model runs/builtin/best
    python recipes/evaluate.py --model runs/builtin/best --tta flip       # also with mirrored images
    python recipes/evaluate.py --model runs/cub/best --dataset cub --data-dir /data/CUB_200_2011 \
        --boxes /data/CUB_200_2011/bounding_boxes.txt                   # the paper's Fig. 1 claim, measured
    accelerate launch recipes/evaluate.py --model hf-hub:someone/ssanet_vgg16_plus.cub_448 \\
        --dataset cub --data-dir /data/CUB_200_2011 --output cub_eval.json

The validation labels follow the model's class names (``label_names`` of an export): a class the
model does not know is an error, classes without validation images are reported. ``--output`` is
checked before the work: writable, not inside the model's folder; a failed write is one line.
"""
import argparse
import json
import os
from pathlib import Path
from typing import Dict, List, Optional

from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ssa_timm.cli import HelpFormatter, add_dataset_args, add_img_size_arg, at_least
from ssa_timm.data import (
    DATASET_DEFAULTS, Transformed, TransformedStream, build_dataset, dataset_options, first_images, model_transform)
from ssa_timm.data.streams import is_stream
from ssa_timm.diagnostics import probe_attention
from ssa_timm.errors import UserError, exit_on_user_error
from ssa_timm.hub import label_names, load_model, model_folder
from ssa_timm.localization import ImageBoxes, dataset_boxes, localization_report, read_boxes
from ssa_timm.metrics import evaluate_heads
from ssa_timm.output_paths import check_output_path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument('--model', required=True, help='export folder, local-dir:PATH or hf-hub:ORG/NAME')
    p.add_argument('--seed', type=at_least(0), default=DATASET_DEFAULTS['seed'],
                   help='builtin: the seed the dataset was generated with')
    p.add_argument('--boxes', metavar='FILE', help="ground-truth part boxes, for the localisation metrics: CUB's "
                   'bounding_boxes.txt (with images.txt beside it), or a CSV of path,x,y,w,h rows in pixels of the '
                   "image as shown, EXIF orientation applied (paths relative to the CSV's folder); read and checked "
                   'before anything is evaluated')
    add_img_size_arg(p)
    p.add_argument('--batch-size', type=at_least(1), default=32, help='per process')
    p.add_argument('--workers', type=at_least(0), default=2)
    p.add_argument('--tta', choices=('none', 'flip'), default='none',
                   help='also report with mirrored images averaged in')
    p.add_argument('--mixed-precision', choices=('no', 'fp16', 'bf16'), default=None)
    p.add_argument('--output', default=None, help='JSON report (default: print only)')
    p.add_argument('--cpu', action='store_true')
    p.add_argument('--debug', action='store_true', help='show the traceback of user errors')
    add_dataset_args(p, training=False)
    args = p.parse_args(argv)
    if args.boxes and args.crop_bbox:
        p.error('--boxes are boxes of the whole images: they cannot be used with --crop-bbox')
    return args


def validation_images(args: argparse.Namespace, model):
    """The validation split, labelled by the model's class names (when the export has them)."""
    names = label_names(model)
    images = build_dataset(args.dataset, classes=names, classes_of=f'the model {args.model}',
                           **dataset_options(args, training=False))
    if model.num_classes != len(images.classes):
        raise UserError(f'{args.model} predicts {model.num_classes} classes, the {args.dataset} '
                        f'validation set has {len(images.classes)}')
    if len(images) == 0:
        raise UserError(f'the {args.dataset} validation split has no images')
    return images


def boxes_of(args: argparse.Namespace, images) -> Optional[Dict[int, ImageBoxes]]:
    """The ground-truth boxes (``--boxes``, or the dataset's own), read and checked before any image is
    evaluated; None when there are none."""
    if args.boxes:
        if is_stream(images):
            raise UserError('--boxes matches images by path: it needs a dataset of image files, not a stream')
        return read_boxes(args.boxes, images)
    return dataset_boxes(images) or None


def write_report(path: Path, report: Dict) -> None:
    """``report`` as JSON at ``path``, through a temporary sibling and a rename; a failed write is a
    ``UserError`` naming the file and leaves no temporary file."""
    tmp = path.with_name(f'.{path.name}.tmp-{os.getpid()}')
    try:
        tmp.write_text(json.dumps(report, indent=1))
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f'cannot write --output {path}: {e.strerror or e}') from e
    finally:
        tmp.unlink(missing_ok=True)


def localization_lines(where: Dict) -> List[str]:
    """The printed lines of the localisation metrics: a warning for images whose box covers the whole map."""
    lines = []
    if where['whole_map']:
        h, w = where['map_height'], where['map_width']
        lines.append(f'warning: on the {h} x {w} body map the box covers every cell for {where["whole_map"]} '
                     f'image(s): where the model looks cannot be told apart there, so they are left out of the '
                     'localisation figures (a larger --img-size gives a finer map)')
    if not where['images']:
        return lines
    text = f'localisation ({where["images"]} images with boxes): '
    if where['in_box_mass'] is not None:
        text += (f'attention in the box {where["in_box_mass"]:.3f} (uniform attention: {where["box_share"]:.3f}); '
                 f'pointing game: Grad-CAM {where["pointing_cam"]:.3f}, most attended position '
                 f'{where["pointing_attention"]:.3f}')
    else:
        text += f'pointing game: Grad-CAM {where["pointing_cam"]:.3f} (box share {where["box_share"]:.3f})'
    for key, name in (('zoom', 'zoom box'), ('cam_box', 'Grad-CAM box')):
        if where.get(f'{key}_iou') is not None:
            text += f'; {name}: IoU {where[f"{key}_iou"]:.3f}, holds the part\'s centre {where[f"{key}_hit"]:.3f}'
    return [*lines, text]


def main(argv=None) -> Dict:
    args = parse_args(argv)
    folder = model_folder(args.model)
    output = check_output_path(args.output, '--output', model_folders=[folder] if folder else [])
    accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision)
    model = load_model(args.model)
    images = validation_images(args, model)
    boxes = boxes_of(args, images)
    if images.missing_classes:
        accelerator.print(f'note: no validation images of {len(images.missing_classes)} class(es): '
                          f'{images.missing_classes[:10]}')
    transform, img_size = model_transform(model, args.img_size)
    streamed = is_stream(images)  # each process reads its own share: the loader is not prepared
    data = TransformedStream(images, transform) if streamed else Transformed(images, transform)
    loader = DataLoader(data, batch_size=args.batch_size, num_workers=args.workers)
    model = accelerator.prepare(model)
    if not streamed:
        loader = accelerator.prepare(loader)
    net = accelerator.unwrap_model(model).eval()

    batches = tqdm(loader, disable=not accelerator.is_local_main_process)
    report = evaluate_heads(net.forward_per_head, batches, accelerator, per_class=True, tta_flip=args.tta == 'flip',
                            per_process=streamed)
    if net.head.attn is not None:
        probe = first_images(data, 32).to(accelerator.device)
        report['attention'] = probe_attention(net, probe, accelerator.autocast())
    where = None
    if boxes:
        where = localization_report(net, data, boxes, batch_size=args.batch_size, accelerator=accelerator,
                                    autocast=accelerator.autocast)
        report['localization'] = where
    report.update(model=args.model, dataset=args.dataset, img_size=img_size, classes=list(images.classes),
                  missing_classes=images.missing_classes)
    summary = ', '.join(f'{k} top-1 {v["top1"]:.2f}%' for k, v in report['heads'].items())
    accelerator.print(f'{args.model} on {args.dataset} ({report["count"]} images): top-1 '
                      f'{report["output"]["top1"]:.2f}%, top-5 {report["output"]["top5"]:.2f}% ({summary})' +
                      (f'; with flips: top-1 {report["tta"]["output"]["top1"]:.2f}%' if 'tta' in report else ''))
    if where is not None:
        accelerator.print('\n'.join(localization_lines(where)))
    failed = None
    if output and accelerator.is_main_process:
        try:
            write_report(output, report)
        except UserError as e:  # raised once every process has reached the end
            failed = e
    accelerator.wait_for_everyone()
    accelerator.end_training()  # tears the process group down before exit
    if failed is not None:
        raise failed
    return report


if __name__ == '__main__':
    exit_on_user_error(main)
