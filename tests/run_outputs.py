"""Reading what a training run wrote: its ``metrics.jsonl`` lines, the weights of its newest
checkpoint, and comparing two runs' weights."""
import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def metrics(out: Path) -> list:
    """The parsed lines of ``<out>/metrics.jsonl``."""
    return [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]


def latest_weights(out: Path) -> dict:
    """The model weights of the newest ``checkpoint_N`` under ``<out>/checkpoints``."""
    newest = max((out / 'checkpoints').glob('checkpoint_*'), key=lambda p: int(p.name.split('_')[-1]))
    return load_file(newest / 'model.safetensors')


def assert_same_weights(a: dict, b: dict) -> None:
    """The same keys, and every tensor equal up to float32 rounding."""
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
