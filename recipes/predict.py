"""Predict the top-k classes of images with an SSANet, batched, on CPU or GPU.

    python recipes/predict.py --model runs/builtin/best photos/*.jpg more_photos/
    python recipes/predict.py --model hf-hub:someone/ssanet_vgg16_plus.cub_448 bird.jpg --format json --output p.json

Inputs are files, folders (searched recursively for images) or glob patterns. Unreadable images
are skipped with a warning that names them, and listed again at the end; when no image could be
read at all the run fails.
"""
import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple

import torch

from ssa_timm.cli import at_least, torch_device
from ssa_timm.data import IMAGE_SUFFIXES, CorruptImageError, find_images, load_image, model_transform
from ssa_timm.errors import UserError, exit_on_user_error
from ssa_timm.hub import label_names, load_model
from ssa_timm.run_dir import atomic_write_text, check_output_file


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('inputs', nargs='+', help='image files, folders or glob patterns')
    p.add_argument('--model', required=True, help='model name, export folder, local-dir:PATH or hf-hub:ORG/NAME')
    p.add_argument('--top-k', type=at_least(1), default=5, help='classes per image (at most the model has)')
    p.add_argument('--batch-size', type=at_least(1), default=16)
    p.add_argument('--img-size', type=at_least(1), default=None, help="default: the model's input size")
    p.add_argument('--device', type=torch_device, default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--format', choices=('table', 'json', 'csv'), default='table')
    p.add_argument('--output', default=None, help='write here instead of stdout')
    p.add_argument('--debug', action='store_true', help='show the traceback of user errors')
    return p.parse_args(argv)


def load_batches(paths: Sequence[Path], transform, batch_size: int, skipped: List[str]) -> Iterator[Tuple[List[Path], torch.Tensor]]:
    batch_paths, batch = [], []
    for path in paths:
        try:
            batch.append(transform(load_image(str(path))))
            batch_paths.append(path)
        except CorruptImageError as e:
            print(f'warning: skipping {e}', file=sys.stderr)
            skipped.append(str(path))
        if len(batch) == batch_size:
            yield batch_paths, torch.stack(batch)
            batch_paths, batch = [], []
    if batch:
        yield batch_paths, torch.stack(batch)


def predict(args: argparse.Namespace) -> Tuple[List[Dict], List[str]]:
    paths = find_images(args.inputs)
    if not paths:
        raise UserError(f'no images found in {", ".join(args.inputs)} (looked for {", ".join(sorted(IMAGE_SUFFIXES))})')
    model = load_model(args.model).to(args.device).eval()
    names = label_names(model) or [str(i) for i in range(model.num_classes)]
    transform, _ = model_transform(model, args.img_size)
    results, skipped = [], []
    k = min(args.top_k, model.num_classes)
    with torch.no_grad():
        for batch_paths, images in load_batches(paths, transform, args.batch_size, skipped):
            probs = model(images.to(args.device)).float().softmax(-1)
            top = probs.topk(k, dim=-1)
            for path, p, i in zip(batch_paths, top.values.tolist(), top.indices.tolist()):
                results.append(dict(image=str(path), top=[dict(label=names[c], index=c, prob=v) for v, c in zip(p, i)]))
    if not results:
        raise UserError(f'none of the {len(paths)} image file(s) could be read: {", ".join(skipped[:5])}')
    return results, skipped


def render(results: List[Dict], fmt: str) -> str:
    if fmt == 'json':
        return json.dumps(results, indent=1) + '\n'
    if fmt == 'csv':
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(['image', 'rank', 'label', 'index', 'prob'])
        for r in results:
            for rank, t in enumerate(r['top'], 1):
                writer.writerow([r['image'], rank, t['label'], t['index'], f'{t["prob"]:.6f}'])
        return buf.getvalue()
    lines = []
    for r in results:
        lines.append(r['image'])
        lines += [f'  {rank}. {t["label"]:<30} {t["prob"] * 100:6.2f}%' for rank, t in enumerate(r['top'], 1)]
    return '\n'.join(lines) + '\n'


def main(argv=None) -> Tuple[List[Dict], List[str]]:
    args = parse_args(argv)
    output = check_output_file(args.output, '--output')
    results, skipped = predict(args)
    text = render(results, args.format)
    if output:
        atomic_write_text(output, text)
    else:
        sys.stdout.write(text)
    if skipped:
        print(f'skipped {len(skipped)} unreadable image(s): {", ".join(skipped)}', file=sys.stderr)
    return results, skipped


if __name__ == '__main__':
    exit_on_user_error(main)
