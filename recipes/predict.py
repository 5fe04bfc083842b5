"""Predict the top-k classes of images with an SSANet, batched, on CPU or GPU.

    python recipes/predict.py --model runs/builtin/best photos/*.jpg more_photos/
    python recipes/predict.py --model hf-hub:someone/ssanet_vgg16_plus.cub_448 bird.jpg --format json --output p.json

Inputs are files, folders (searched recursively for images) or glob patterns. Unreadable images
are skipped with a warning that names them, and listed again at the end.
"""
import argparse
import csv
import glob
import io
import json
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple

import torch

from ssa_timm.data import CorruptImageError, model_transform
from ssa_timm.data.readers import load_rgb
from ssa_timm.hub import label_names, load_model

IMAGE_SUFFIXES = {'.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp'}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('inputs', nargs='+', help='image files, folders or glob patterns')
    p.add_argument('--model', required=True, help='model name, export folder, local-dir:PATH or hf-hub:ORG/NAME')
    p.add_argument('--top-k', type=int, default=5)
    p.add_argument('--batch-size', type=int, default=16)
    p.add_argument('--img-size', type=int, default=None, help="default: the model's input size")
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--format', choices=('table', 'json', 'csv'), default='table')
    p.add_argument('--output', default=None, help='write here instead of stdout')
    return p.parse_args(argv)


def expand_inputs(inputs: Sequence[str]) -> List[Path]:
    """Files, folders (recursive) and globs -> sorted, de-duplicated image paths."""
    paths: List[Path] = []
    for item in inputs:
        matches = [Path(m) for m in sorted(glob.glob(item, recursive=True))] or [Path(item)]
        for match in matches:
            if match.is_dir():
                paths += sorted(p for p in match.rglob('*') if p.suffix.lower() in IMAGE_SUFFIXES)
            elif match.is_file():
                paths.append(match)
            else:
                raise FileNotFoundError(f'no image, folder or glob match for {item!r}')
    return list(dict.fromkeys(paths))


def load_batches(paths: Sequence[Path], transform, batch_size: int, skipped: List[str]) -> Iterator[Tuple[List[Path], torch.Tensor]]:
    batch_paths, batch = [], []
    for path in paths:
        try:
            batch.append(transform(load_rgb(str(path))))
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
    model = load_model(args.model).to(args.device).eval()
    names = label_names(model) or [str(i) for i in range(model.num_classes)]
    transform, _ = model_transform(model, args.img_size)
    results, skipped = [], []
    k = min(args.top_k, model.num_classes)
    with torch.no_grad():
        for paths, images in load_batches(expand_inputs(args.inputs), transform, args.batch_size, skipped):
            probs = model(images.to(args.device)).float().softmax(-1)
            top = probs.topk(k, dim=-1)
            for path, p, i in zip(paths, top.values.tolist(), top.indices.tolist()):
                results.append(dict(image=str(path), top=[dict(label=names[c], index=c, prob=v) for v, c in zip(p, i)]))
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
    results, skipped = predict(args)
    text = render(results, args.format)
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    if skipped:
        print(f'skipped {len(skipped)} unreadable image(s): {", ".join(skipped)}', file=sys.stderr)
    return results, skipped


if __name__ == '__main__':
    main()
