"""Pretrained bodies load from a real HF cache layout, offline, in a fresh process."""
import json
import textwrap
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

from fixtures import run_python

COMMIT = 'a' * 40


def write_hub_cache(cache: Path, repo_id: str, state_dict: dict) -> None:
    """Write ``models--org--name/refs/main`` + ``snapshots/<sha>/model.safetensors``, as the Hub client does."""
    repo_dir = cache / f'models--{repo_id.replace("/", "--")}'
    snapshot = repo_dir / 'snapshots' / COMMIT
    snapshot.mkdir(parents=True)
    (repo_dir / 'refs').mkdir()
    (repo_dir / 'refs' / 'main').write_text(COMMIT)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, snapshot / 'model.safetensors', metadata={'format': 'pt'})


def run_offline(cache: Path, code: str) -> dict:
    proc = run_python('-c', textwrap.dedent(code), env=dict(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE='1'))
    return json.loads(proc.stdout.strip().splitlines()[-1])


# state dict of the body in timm's real key layout, classifier included
CHECK = """
    import json, torch, timm, ssa_timm
    from safetensors.torch import load_file
    from huggingface_hub import hf_hub_download
    ref = load_file(hf_hub_download('{repo}', 'model.safetensors'))
    model = {build}
    sd = model.state_dict()
    body_ok = all(torch.equal(sd['body.' + k], v) for k, v in ref.items() if 'body.' + k in sd and k != '{first_conv}.weight')
    print(json.dumps(dict(
        body_ok=body_ok,
        n_body=sum(1 for k in sd if k.startswith('body.')),
        n_loaded=sum(1 for k in ref if 'body.' + k in sd),
        first_conv=list(sd['body.{first_conv}.weight'].shape),
        first_conv_sum=torch.allclose(sd['body.{first_conv}.weight'][:, 0], ref['{first_conv}.weight'].sum(1)),
        out=list(model.eval()(torch.randn(2, model.in_chans, 96, 96)).shape),
        alpha=float(model.attn.alpha),
    )))
"""


def test_registered_name_loads_imagenet_body_offline(tmp_path):
    body = timm.create_model('densenet121')
    write_hub_cache(tmp_path, 'timm/densenet121.tv_in1k', body.state_dict())
    build = "timm.create_model('ssanet_densenet121_plus', pretrained=True, num_classes=200, in_chans=1)"
    result = run_offline(tmp_path, CHECK.format(repo='timm/densenet121.tv_in1k', build=build, first_conv='features.conv0'))
    assert result['body_ok'] and result['n_loaded'] == result['n_body']
    assert result['first_conv'] == [64, 1, 7, 7] and result['first_conv_sum']  # in_chans=1 adapted by timm
    assert result['out'] == [2, 200] and result['alpha'] == 0.0


def test_builder_body_loads_its_default_tag_offline(tmp_path):
    write_hub_cache(tmp_path, 'timm/resnet18.a1_in1k', timm.create_model('resnet18').state_dict())
    build = "ssa_timm.create_ssanet('resnet18', 'plus', pretrained=True, num_classes=7, in_chans=1)"
    result = run_offline(tmp_path, CHECK.format(repo='timm/resnet18.a1_in1k', build=build, first_conv='conv1'))
    assert result['body_ok'] and result['n_loaded'] == result['n_body'] and result['out'] == [2, 7]


def test_checkpoint_of_another_body_is_refused(tmp_path):
    write_hub_cache(tmp_path, 'timm/densenet121.tv_in1k', timm.create_model('resnet18').state_dict())
    code = "import timm, ssa_timm; timm.create_model('ssanet_densenet121_plus', pretrained=True)"
    proc = run_python('-c', code, env=dict(HF_HUB_CACHE=str(tmp_path), HF_HUB_OFFLINE='1'), check=False)
    assert proc.returncode != 0
    assert 'do not fit the DenseNet body' in proc.stderr


def test_vgg_torchvision_layout_filter():
    """VGG-16's torchvision-layout keys go through timm's own filter; fc6/fc7/fc8 are dropped."""
    from ssa_timm.models.ssanet import _filter_body_weights
    model = timm.create_model('ssanet_vgg16_plus', num_classes=5)
    features = {k: torch.randn_like(v) for k, v in model.body.state_dict().items()}
    checkpoint = dict(features)
    checkpoint['classifier.0.weight'] = torch.zeros(8, 512 * 7 * 7)  # shrunk fc6, only its key layout matters
    checkpoint['classifier.6.bias'] = torch.zeros(1000)
    out = _filter_body_weights(checkpoint, model)
    assert set(out) == set(model.state_dict())
    model.load_state_dict(out)
    assert all(torch.equal(model.body.state_dict()[k], v) for k, v in features.items())
