"""The frozen-body feature cache: what it holds, and when it is reused or rebuilt."""
import pytest
import torch
from accelerate import Accelerator
from torch.utils.data import TensorDataset

from ssa_timm import create_ssanet
from ssa_timm.feature_cache import CachedFeatures, build_feature_cache


def counting(model):
    """Count the images that go through the model's body."""
    calls = []
    forward_body = model.forward_body

    def counted(x):
        calls.append(len(x))
        return forward_body(x)
    model.forward_body = counted
    return calls


@pytest.fixture(scope='module')
def token_model():
    torch.manual_seed(0)
    return create_ssanet('test_vit', 'plus', num_classes=3, img_size=64).eval()


def build(model, path, meta, images=None):
    images = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(0)) if images is None else images
    return build_feature_cache(model, TensorDataset(images, torch.arange(5)), path, True, Accelerator(cpu=True),
                               meta=meta, batch_size=2)


def test_feature_cache_of_a_token_body_holds_its_grid_maps(token_model, tmp_path):
    images = torch.randn(5, 3, 64, 64)
    path = build(token_model, tmp_path / 'train.npy', {'model': 'test_vit'}, images)
    cached = CachedFeatures(path, range(5))
    with torch.no_grad():
        expected = token_model.forward_body(images)
    assert expected.shape[2:] == (4, 4)
    for i in range(5):
        torch.testing.assert_close(cached[i][0], expected[i], atol=1e-5, rtol=1e-5)


def test_cache_is_reused_only_for_the_same_settings(tmp_path):
    model = create_ssanet('test_vit', 'plus', num_classes=3, img_size=64).eval()
    calls = counting(model)
    # tuples, as train.py writes them (they come back from JSON as lists)
    meta = {'model': 'test_vit', 'img_size': (64, 64), 'dataset': 'builtin', 'builtin': (5, 1), 'split': 'train'}
    path = tmp_path / 'train.npy'
    build(model, path, meta)
    first = len(calls)
    assert first > 0
    build(model, path, dict(meta))  # same settings: read back, the body is not called
    assert len(calls) == first
    for changed in ({'img_size': (32, 32)}, {'dataset': 'imagefolder'}, {'model': 'test_resnet'}, {'split': 'val'}):
        build(model, path, {**meta, **changed})
        assert len(calls) > first, changed
        first = len(calls)
    build(model, path, meta)
    first = len(calls)
    with torch.no_grad():  # other body weights (e.g. other pretrained tags): other maps
        next(model.body.parameters()).add_(1.0)
    build(model, path, meta)
    assert len(calls) > first
    # a build killed before its marker was written is never used
    built = build(model, path, meta)
    first = len(calls)
    built.with_suffix('.json').unlink()
    build(model, path, meta)
    assert len(calls) > first
    build(model, path, {**meta, 'img_size': (32, 32)})  # settings get their own files: both stay usable
    first = len(calls)
    build(model, path, meta)
    assert len(calls) == first


BUILD_ONCE = """
import sys, time
from pathlib import Path
import torch
from accelerate import Accelerator
from torch.utils.data import TensorDataset
import ssa_timm.feature_cache as cache
from ssa_timm import create_ssanet

fill = cache._fill
def slow_fill(*args, **kwargs):  # a build that takes a while: the other process asks for the key meanwhile
    print('built', flush=True)
    time.sleep(1)
    fill(*args, **kwargs)
cache._fill = slow_fill
torch.manual_seed(0)
model = create_ssanet('test_resnet', 'plus', num_classes=3, img_size=32, body_feature_index=2).eval()
images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.05)
path = cache.build_feature_cache(model, TensorDataset(images, torch.arange(6)), Path(sys.argv[1]) / 'train.npy',
                                 True, Accelerator(cpu=True), meta={'key': 'shared'}, batch_size=2)
print('path', path, flush=True)
"""


def test_two_processes_that_need_one_missing_key_build_it_once(tmp_path):
    """Two runs of a grid start together on one cache folder: one builds, the other waits and reads it."""
    import subprocess
    import sys
    go = tmp_path / 'go'
    procs = [subprocess.Popen([sys.executable, '-c', BUILD_ONCE, str(tmp_path / 'cache'), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    go.touch()
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    assert sum(out.count('built') for out, _ in outputs) == 1, outputs
    paths = {line for out, _ in outputs for line in out.splitlines() if line.startswith('path ')}
    assert len(paths) == 1 and len(list((tmp_path / 'cache').glob('*.npy'))) == 1
