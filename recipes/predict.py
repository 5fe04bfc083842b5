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

On several processes or GPUs, ``accelerate launch`` shares the sorted inputs out (each image once, in
contiguous shares); every process batches its share on its own device (``--batch-size`` per process,
``--workers`` loader processes each) and streams its results into a part file next to ``--output``
(``p.jsonl.part-0-of-4``, ...), which the main process merges, once all are done, into one file in
the order of a one-process run (written atomically; the parts are removed):

    accelerate launch --multi_gpu --num_processes 4 recipes/predict.py --model runs/builtin/best photos/ \\
        --format jsonl --output p.jsonl --batch-size 64 --workers 4      # four GPUs
    accelerate launch --multi_gpu --num_processes 2 --main_process_port 0 recipes/predict.py \\
        --model runs/builtin/best photos/ --device cpu --format csv --output p.csv   # two CPU processes (gloo)

Without ``--output`` a launched run is refused (the parts need a place); ``--format json`` parts are
JSON lines, merged into one JSON list.
"""
import argparse
import csv
import io
import json
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader

from ssa_timm.cli import HelpFormatter, add_img_size_arg, at_least, torch_device
from ssa_timm.data import IMAGE_SUFFIXES, find_images, load_image, model_transform, shown_size
from ssa_timm.errors import UserError, exit_on_user_error
from ssa_timm.hub import label_names, load_model, model_folder
from ssa_timm.prediction import (ImageFiles, collate_images, launched_world_size, merge_json_lines, merge_parts,
                                 part_path, part_paths, process_device, shard)
from ssa_timm.output_paths import check_output_path

FORMATS = ('table', 'jsonl', 'csv', 'json')
# A launched process that is done with its share waits this long for the others at the merge (torch's
# default, 10 minutes for NCCL, would end a large run whose processes finish far apart)
SHARE_WAIT = timedelta(hours=24)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument('inputs', nargs='+', help='image files, folders or glob patterns')
    p.add_argument('--model', required=True, help='model name, export folder, local-dir:PATH or hf-hub:ORG/NAME')
    p.add_argument('--top-k', type=at_least(1), default=5, help='classes per image (at most the model has)')
    p.add_argument('--batch-size', type=at_least(1), default=16, help='images per batch (per process)')
    p.add_argument('--workers', type=at_least(0), default=0,
                   help='image loading processes (per process); 0: load in the predicting process')
    add_img_size_arg(p)
    p.add_argument('--device', type=torch_device, default=None,
                   help='default: cuda when available, else cpu; under accelerate launch each process its own '
                        '(cuda:<local rank>); cpu runs every process on the CPU')
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

    def open(self) -> None:
        """Start the stream now, before any record: a process's part file exists (a CSV one with its
        header) even when none of its images can be read."""
        if self.fmt != 'json':
            self._guarded(self._stream)

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


def load_batches(paths: Sequence[Path], transform, batch_size: int, skipped: List[str],
                 workers: int = 0) -> Iterator[Tuple[List[Path], torch.Tensor]]:
    """Batches of transformed images, read by ``workers`` loader processes (0: here); an unreadable or
    too large image is skipped with a warning."""
    loader = DataLoader(ImageFiles(paths, transform, load_image), batch_size=batch_size, num_workers=workers,
                        collate_fn=collate_images)
    for indices, images, errors in loader:
        for i, message in errors:
            print(f'warning: skipping {message}', file=sys.stderr)
            skipped.append(str(paths[i]))
        if images is not None:
            yield [paths[i] for i in indices], images


def predictions(model, names: Sequence[str], batches, k: int, device: str) -> Iterator[Dict]:
    """One record per image: its path and top-``k`` classes (label, index, probability); for a ``zoom``
    model also its zoom box ``[x0, y0, x1, y1]`` in pixels of the image as shown."""
    with torch.no_grad():
        for batch_paths, images in batches:
            logits, boxes = model.forward_with_zoom_box(images.to(device)) if getattr(model, 'zoom', False) else (
                model(images.to(device)), None)
            top = logits.float().softmax(-1).topk(k, dim=-1)
            for n, (path, p, i) in enumerate(zip(batch_paths, top.values.tolist(), top.indices.tolist())):
                record = dict(image=str(path), top=[dict(label=names[c], index=c, prob=v) for v, c in zip(p, i)])
                if boxes is not None:
                    width, height = shown_size(str(path))
                    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
                    record['zoom_box'] = [round(v, 1) for v in (boxes[n].cpu() * scale).tolist()]
                yield record


def predict(args: argparse.Namespace, paths: Sequence[Path], writer: ResultWriter, notes: bool = True) -> List[str]:
    """Predict every image of ``paths`` into ``writer`` on ``args.device``; returns the skipped files.
    ``notes``: print the note about a clamped ``--top-k`` (one process of many prints it)."""
    model = load_model(args.model).to(args.device).eval()
    names = label_names(model) or [str(i) for i in range(model.num_classes)]
    transform, _ = model_transform(model, args.img_size)
    k = min(args.top_k, model.num_classes)
    if args.top_k > model.num_classes and notes:
        print(f'note: --top-k {args.top_k} is more than the {model.num_classes} classes of {args.model}; '
              f'showing {k}', file=sys.stderr)
    skipped: List[str] = []
    batches = load_batches(paths, transform, args.batch_size, skipped, args.workers)
    for record in predictions(model, names, batches, k, args.device):
        writer.write(record)
    return skipped


def check_any_read(count: int, paths: Sequence[Path], skipped: List[str]) -> None:
    """A run that read none of its images fails, naming the first few."""
    if not count:
        raise UserError(f'none of the {len(paths)} image file(s) could be read: {", ".join(skipped[:5])}')


def interrupted(count: int, where: Optional[Path], fmt: str) -> None:
    """Report a Ctrl-C (its whole records are kept where streamed) and exit with status 130."""
    held = f'; {where} holds their results' if where and fmt != 'json' else ''
    print(f'interrupted after {count} image(s){held}', file=sys.stderr)
    raise SystemExit(130)


def run_one_process(args: argparse.Namespace, paths: Sequence[Path], output: Optional[Path]) -> Dict:
    """Predict ``paths`` into ``output`` (stdout when None) in this process."""
    args.device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    writer = ResultWriter(output, args.format)
    try:
        skipped = predict(args, paths, writer)
        check_any_read(writer.count, paths, skipped)
    except KeyboardInterrupt:
        writer.abort()
        interrupted(writer.count, output, args.format)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    if skipped:
        print(f'skipped {len(skipped)} unreadable image(s): {", ".join(skipped)}', file=sys.stderr)
    return dict(count=writer.count, skipped=skipped, output=str(output) if output else None)


def predict_share(args: argparse.Namespace, paths: Sequence[Path], part: Path, main_process: bool
                  ) -> Tuple[int, List[str]]:
    """Predict this process's ``paths`` into its ``part`` file (JSON lines for ``--format json``);
    returns the image count and the skipped files. On Ctrl-C a streamed part keeps its whole records,
    a json one is removed."""
    writer = ResultWriter(part, 'jsonl' if args.format == 'json' else args.format)
    try:
        writer.open()
        skipped = predict(args, paths, writer, notes=main_process)
    except KeyboardInterrupt:
        writer.abort()
        if args.format == 'json':
            part.unlink(missing_ok=True)
        interrupted(writer.count, part, args.format)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return writer.count, skipped


def merge(args: argparse.Namespace, output: Path, world: int, count: int, paths: Sequence[Path],
          skipped: List[str]) -> None:
    """The main process's end of a launched run: the parts merged into ``output``, or removed when no
    image could be read."""
    parts = part_paths(output, world)
    if not count:
        for part in parts:
            part.unlink(missing_ok=True)
        check_any_read(count, paths, skipped)
    if args.format == 'json':
        merge_json_lines(parts, output)
    else:
        merge_parts(parts, output, header_lines=1 if args.format == 'csv' else 0)


def run_processes(args: argparse.Namespace, paths: Sequence[Path], output: Optional[Path], world: int) -> Dict:
    """Predict ``paths`` over the ``world`` processes of ``accelerate launch``: each its contiguous share
    into its part file next to ``output``, merged by the main process once all are done."""
    if output is None:
        raise UserError(f'give --output when predicting on {world} processes: each process writes its part '
                        'next to it, merged into it at the end')
    from accelerate import PartialState
    from accelerate.utils import gather_object
    state = PartialState(cpu=args.device is not None and torch.device(args.device).type == 'cpu', timeout=SHARE_WAIT)
    args.device = process_device(args.device, state.device)
    rank = state.process_index
    count, skipped = predict_share(args, shard(paths, rank, world), part_path(output, rank, world),
                                   state.is_main_process)
    shares = gather_object([(count, skipped)])  # every process is done with its part
    count, skipped = sum(c for c, _ in shares), [path for _, s in shares for path in s]
    failed = None
    if state.is_main_process:
        try:
            merge(args, output, world, count, paths, skipped)
            print(f'{count} image(s) predicted on {world} processes ({", ".join(str(c) for c, _ in shares)}); '
                  f'merged into {output}', file=sys.stderr)
            if skipped:
                print(f'skipped {len(skipped)} unreadable image(s): {", ".join(skipped)}', file=sys.stderr)
        except UserError as e:  # raised once every process has reached the end
            failed = e
    state.wait_for_everyone()
    state.destroy_process_group()
    if failed is not None:
        raise failed
    return dict(count=count, skipped=skipped, output=str(output))


def main(argv=None) -> Dict:
    args = parse_args(argv)
    paths = find_images(args.inputs)
    if not paths:
        raise UserError(f'no images found in {", ".join(args.inputs)} (looked for {", ".join(sorted(IMAGE_SUFFIXES))})')
    folder = model_folder(args.model)
    output = check_output_path(args.output, '--output', inputs=paths, model_folders=[folder] if folder else [])
    world = launched_world_size()
    if world > 1:
        return run_processes(args, paths, output, world)
    return run_one_process(args, paths, output)


if __name__ == '__main__':
    exit_on_user_error(main)
