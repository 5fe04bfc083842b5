"""Predict the top-k classes of images with an SSANet, batched, on CPU or GPU.

    python recipes/predict.py --model runs/builtin/best photos/*.jpg more_photos/
    python recipes/predict.py --model runs/builtin/best photos/ --format jsonl --output p.jsonl
    python recipes/predict.py --model hf-hub:someone/ssanet_vgg16_plus.cub_448 bird.jpg --format json --output p.json

Inputs are files, folders (searched recursively for images) or glob patterns, read by the library's
one image loader (EXIF orientation applied, 16-bit and transparent images converted correctly).
Unreadable images and images over the pixel limit (PIL.Image.MAX_IMAGE_PIXELS, a possible
decompression bomb) are skipped with a warning that names them, and listed again at the end; when
no image could be read at all the run fails.

Results stream as they come with ``--format table``, ``jsonl`` (one JSON object per image) and
``csv`` (one row per image and rank): memory stays bounded and an interrupted run leaves a file of
whole records. ``--format json`` writes one JSON list at the end, atomically. ``--output`` is checked
before the model is loaded: it may not be an input, nor lie inside the model's folder.
"""
import argparse
import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from ssa_timm.cli import at_least, torch_device
from ssa_timm.data import IMAGE_SUFFIXES, CorruptImageError, find_images, load_image, model_transform
from ssa_timm.errors import UserError, exit_on_user_error
from ssa_timm.hub import check_img_size, label_names, load_model, model_folder
from ssa_timm.run_dir import check_output_path

FORMATS = ('table', 'jsonl', 'csv', 'json')


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('inputs', nargs='+', help='image files, folders or glob patterns')
    p.add_argument('--model', required=True, help='model name, export folder, local-dir:PATH or hf-hub:ORG/NAME')
    p.add_argument('--top-k', type=at_least(1), default=5, help='classes per image (at most the model has)')
    p.add_argument('--batch-size', type=at_least(1), default=16)
    p.add_argument('--img-size', type=at_least(1), default=None,
                   help="default: the model's input size; at most ssa_timm.hub.img_size_limit() (1024 px)")
    p.add_argument('--device', type=torch_device, default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--format', choices=FORMATS, default='table',
                   help='table, jsonl and csv stream as results come; json is written at the end')
    p.add_argument('--output', default=None, help='write here instead of stdout')
    p.add_argument('--debug', action='store_true', help='show the traceback of user errors')
    return p.parse_args(argv)


class ResultWriter:
    """Writes prediction records to ``path`` (stdout when None) in ``fmt``: table, jsonl and csv a
    record at a time, flushed, so an interrupted run leaves whole records; json as one list at the end,
    through a temporary sibling and a rename. A failed write raises ``UserError`` naming the file and
    removes what was written."""

    def __init__(self, path: Optional[Path], fmt: str) -> None:
        self.path, self.fmt = path, fmt
        self.records: List[Dict] = []  # json only
        self.count = 0
        self._file = None

    def _stream(self):
        if self._file is None:
            self._file = sys.stdout if self.path is None else open(self.path, 'w', newline='')
            if self.fmt == 'csv':
                self._file.write('image,rank,label,index,prob\r\n')
        return self._file

    def write(self, record: Dict) -> None:
        self.count += 1
        if self.fmt == 'json':
            self.records.append(record)
            return
        self._guarded(lambda: self._emit(record))

    def _emit(self, record: Dict) -> None:
        f = self._stream()
        f.write(render(record, self.fmt))
        f.flush()

    def close(self) -> None:
        if self.fmt == 'json':
            self._guarded(self._write_json)
        elif self._file is not None and self._file is not sys.stdout:
            self._guarded(self._file.close)

    def abort(self) -> None:
        """Close a started stream (its whole records stay); a json list is not written."""
        if self._file is not None and self._file is not sys.stdout:
            self._file.close()

    def _write_json(self) -> None:
        text = json.dumps(self.records, indent=1) + '\n'
        if self.path is None:
            sys.stdout.write(text)
            return
        tmp = self.path.with_name(f'.{self.path.name}.tmp-{os.getpid()}')
        try:
            tmp.write_text(text)
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)

    def _guarded(self, action) -> None:
        try:
            action()
        except OSError as e:
            if self.path is None:
                raise
            if self._file is not None:
                self._file.close()
                self.path.unlink(missing_ok=True)  # a record may be cut short: keep no broken file
            raise UserError(f'cannot write --output {self.path}: {e.strerror or e}') from e


def render(record: Dict, fmt: str) -> str:
    """One image's record as text: a jsonl line, csv rows (one per rank) or table lines."""
    if fmt == 'jsonl':
        return json.dumps(record) + '\n'
    if fmt == 'csv':
        buf = io.StringIO()
        writer = csv.writer(buf)
        for rank, t in enumerate(record['top'], 1):
            writer.writerow([record['image'], rank, t['label'], t['index'], f'{t["prob"]:.6f}'])
        return buf.getvalue()
    lines = [record['image']]
    lines += [f'  {rank}. {t["label"]:<30} {t["prob"] * 100:6.2f}%' for rank, t in enumerate(record['top'], 1)]
    return '\n'.join(lines) + '\n'


def load_batches(paths: Sequence[Path], transform, batch_size: int,
                 skipped: List[str]) -> Iterator[Tuple[List[Path], torch.Tensor]]:
    """Batches of transformed images; an unreadable or too large image is skipped with a warning."""
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


def predictions(model, names: Sequence[str], batches, k: int, device: str) -> Iterator[Dict]:
    """One record per image: its path and top-``k`` classes (label, index, probability)."""
    with torch.no_grad():
        for batch_paths, images in batches:
            probs = model(images.to(device)).float().softmax(-1)
            top = probs.topk(k, dim=-1)
            for path, p, i in zip(batch_paths, top.values.tolist(), top.indices.tolist()):
                yield dict(image=str(path), top=[dict(label=names[c], index=c, prob=v) for v, c in zip(p, i)])


def predict(args: argparse.Namespace, paths: Sequence[Path], writer: ResultWriter) -> List[str]:
    """Predict every image of ``paths`` into ``writer``; returns the skipped files."""
    model = load_model(args.model).to(args.device).eval()
    names = label_names(model) or [str(i) for i in range(model.num_classes)]
    transform, _ = model_transform(model, args.img_size)
    k = min(args.top_k, model.num_classes)
    if args.top_k > model.num_classes:
        print(f'note: --top-k {args.top_k} is more than the {model.num_classes} classes of {args.model}; '
              f'showing {k}', file=sys.stderr)
    skipped: List[str] = []
    for record in predictions(model, names, load_batches(paths, transform, args.batch_size, skipped), k, args.device):
        writer.write(record)
    if not writer.count:
        raise UserError(f'none of the {len(paths)} image file(s) could be read: {", ".join(skipped[:5])}')
    return skipped


def main(argv=None) -> Dict:
    args = parse_args(argv)
    if args.img_size is not None:
        check_img_size(args.img_size, '--img-size')
    paths = find_images(args.inputs)
    if not paths:
        raise UserError(f'no images found in {", ".join(args.inputs)} (looked for {", ".join(sorted(IMAGE_SUFFIXES))})')
    folder = model_folder(args.model)
    output = check_output_path(args.output, '--output', inputs=paths, model_folders=[folder] if folder else [])
    writer = ResultWriter(output, args.format)
    try:
        skipped = predict(args, paths, writer)
    except KeyboardInterrupt:
        writer.abort()
        where = f'; {output} holds their results' if output and args.format != 'json' else ''
        print(f'interrupted after {writer.count} image(s){where}', file=sys.stderr)
        raise SystemExit(130)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    if skipped:
        print(f'skipped {len(skipped)} unreadable image(s): {", ".join(skipped)}', file=sys.stderr)
    return dict(count=writer.count, skipped=skipped, output=str(output) if output else None)


if __name__ == '__main__':
    exit_on_user_error(main)
