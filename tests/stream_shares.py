"""Run under ``accelerate launch`` with several processes: read timm streams (hfids/, wds/) the way
``recipes/train.py`` does and write, per process, which sample ids it got in which batch.

    accelerate launch --num_processes 2 tests/stream_shares.py <hf folder> <hf cache> <wds folder> <out dir>

Each image's id is in its pixels (red + 256 * green), so the ids survive the loader workers.
"""
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from ssa_timm.data import TransformedStream, build_dataset
from ssa_timm.data.streams import batches_on_every_process

BATCH = 4


def image_id(img) -> torch.Tensor:
    red, green, _ = img.getpixel((0, 0))
    return torch.tensor([[float(red + 256 * green)]])  # (1, 1): the loader's random flip leaves it as it is


def shares(accelerator: Accelerator, spec: str, data_dir, workers: int, training: bool, group: int) -> list:
    """The ids of every batch this process trains (or validates) on in epoch 1."""
    split = 'train' if training else 'validation'
    images = build_dataset(spec, split, data_dir, seed=5, is_training=training)
    data = TransformedStream(images, image_id, flip_seed=5 if training else None)
    data.set_epoch(1)
    loader = DataLoader(data, batch_size=BATCH, num_workers=workers, drop_last=training)
    batches = batches_on_every_process(loader, accelerator, group) if training else loader
    return [[int(i) for i in inputs.flatten().tolist()] for inputs, _ in batches]


def main(hf: str, cache: str, wds: str, out: str) -> None:
    accelerator = Accelerator(cpu=True)
    found = {}
    for spec, data_dir in ((f'hfids/{hf}', cache), (f'wds/{wds}', None)):
        for workers in (0, 2):
            for training, group in ((True, 1), (True, 4), (False, 1)):
                key = f'{spec.split("/")[0]} workers={workers} training={training} group={group}'
                found[key] = shares(accelerator, spec, data_dir, workers, training, group)
    # processes whose loaders end at different batches stop together
    uneven = [torch.zeros(1, 1)] * (5 if accelerator.process_index == 0 else 3)
    found['uneven'] = len(list(batches_on_every_process(uneven, accelerator)))
    Path(out, f'rank{accelerator.process_index}.json').write_text(json.dumps(found))
    accelerator.end_training()


if __name__ == '__main__':
    main(*sys.argv[1:])
