"""Pretrained bodies load from a real HF cache layout, offline, in a fresh process."""
import json
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from recipe_runs import run_python

COMMIT = 'a' * 40


def write_hub_cache(cache: Path, repo_id: str, state_dict: dict) -> None:
    """Write ``models--org--name/refs/main`` + ``snapshots/<sha>/model.safetensors``, as the Hub client does."""
    repo_dir = cache / f'models--{repo_id.replace("/", "--")}'
    snapshot = repo_dir / 'snapshots' / COMMIT
    snapshot.mkdir(parents=True)
    (repo_dir / 'refs').mkdir()
    (repo_dir / 'refs' / 'main').write_text(COMMIT)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, snapshot / 'model.safetensors',
              metadata={'format': 'pt'})


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
    body_ok = all(torch.equal(sd['body.' + k], v) for k, v in ref.items()
                  if 'body.' + k in sd and k != '{first_conv}.weight')
    print(json.dumps(dict(
        body_ok=body_ok,
        n_body=sum(1 for k in sd if k.startswith('body.')),
        n_loaded=sum(1 for k in ref if 'body.' + k in sd),
        first_conv=list(sd['body.{first_conv}.weight'].shape),
        first_conv_sum=torch.allclose(sd['body.{first_conv}.weight'][:, 0], ref['{first_conv}.weight'].sum(1)),
        out=list(model.eval()(torch.randn(2, model.in_chans, 96, 96)).shape),
        alpha=float(model.head.attn.alpha),
    )))
"""


def test_registered_name_loads_imagenet_body_offline(tmp_path):
    body = timm.create_model('densenet121')
    write_hub_cache(tmp_path, 'timm/densenet121.tv_in1k', body.state_dict())
    build = "timm.create_model('ssanet_densenet121_plus', pretrained=True, num_classes=200, in_chans=1)"
    code = CHECK.format(repo='timm/densenet121.tv_in1k', build=build, first_conv='features.conv0')
    result = run_offline(tmp_path, code)
    assert result['body_ok'] and result['n_loaded'] == result['n_body']
    assert result['first_conv'] == [64, 1, 7, 7] and result['first_conv_sum']  # in_chans=1 adapted by timm
    assert result['out'] == [2, 200] and result['alpha'] == 0.0


@pytest.mark.parametrize('build', [
    "ssa_timm.create_ssanet('resnet18', 'plus', pretrained=True, num_classes=7, in_chans=1)",
    # what timm's train.py builds from --model ssanet --model-kwargs body=resnet18 --pretrained
    "timm.create_model('ssanet', pretrained=True, body='resnet18', num_classes=7, in_chans=1)",
])
def test_builder_body_loads_its_default_tag_offline(tmp_path, build):
    write_hub_cache(tmp_path, 'timm/resnet18.a1_in1k', timm.create_model('resnet18').state_dict())
    result = run_offline(tmp_path, CHECK.format(repo='timm/resnet18.a1_in1k', build=build, first_conv='conv1'))
    assert result['body_ok'] and result['n_loaded'] == result['n_body'] and result['out'] == [2, 7]


def test_checkpoint_of_another_body_is_refused(tmp_path):
    write_hub_cache(tmp_path, 'timm/densenet121.tv_in1k', timm.create_model('resnet18').state_dict())
    code = "import timm, ssa_timm; timm.create_model('ssanet_densenet121_plus', pretrained=True)"
    proc = run_python('-c', code, env=dict(HF_HUB_CACHE=str(tmp_path), HF_HUB_OFFLINE='1'), check=False)
    assert proc.returncode != 0
    assert "do not fit the DenseNet body" in proc.stderr and "densenet121.tv_in1k" in proc.stderr


def test_body_checkpoint_file_overlay_goes_through_the_body_filter(tmp_path):
    """A bare body checkpoint given as a file (timm's ``pretrained_cfg_overlay``) loads into the body."""
    from ssa_timm.models.ssanet import checkpoint_filter_fn
    model = timm.create_model('ssanet_resnet18_plus', num_classes=5)
    checkpoint = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.body.state_dict().items()}
    checkpoint['fc.weight'] = torch.zeros(1000, 512)  # the bare model's classifier is dropped
    out = checkpoint_filter_fn(checkpoint, model)
    assert set(out) == set(model.state_dict())
    model.load_state_dict(out)
    assert all(torch.equal(model.body.state_dict()[k], v) for k, v in checkpoint.items() if k != 'fc.weight')


def test_checkpoint_keys_of_0_1_are_converted():
    """Checkpoints from before the SSA head module (``attn.*``, ``head_ssa.*``, ``head_fe.*``) load strictly."""
    from ssa_timm.models.ssanet import checkpoint_filter_fn
    model = timm.create_model('ssanet', body='test_resnet', img_size=64, num_classes=3)
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    legacy = {k.replace('head.attn.', 'attn.').replace('head.ssa.', 'head_ssa.').replace('head.fe.', 'head_fe.'): v
              for k, v in state.items()}
    assert {'attn.alpha', 'head_ssa.fc.weight', 'head_fe.fc.weight'} <= set(legacy) and not any(
        k.startswith('head.') for k in legacy)
    converted = checkpoint_filter_fn(legacy, model)
    assert converted.keys() == state.keys()
    model.load_state_dict(converted, strict=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


# the same load through timm itself: what a bare body with these weights holds
BARE = """
    import json, torch, timm, ssa_timm
    model = {build}
    bare = timm.create_model('{body}', pretrained=True, num_classes=0, **{bare_kwargs})
    ours, theirs = model.body.state_dict(), bare.state_dict()
    print(json.dumps(dict(
        equal=all(torch.equal(v, theirs[k]) for k, v in ours.items()),
        n_body=len(ours),
        missing=[k for k in ours if k not in theirs],
        notes=model.pretrained_cfg['notes'][0],
        pos_embed=list(ours['pos_embed'].shape) if 'pos_embed' in ours else None,
    )))
"""


@pytest.mark.parametrize('body,img_size,bare_kwargs,pos_embed', [
    # a 14 x 14 checkpoint resampled by vision_transformer's own checkpoint_filter_fn to a 7 x 7 grid
    ('vit_tiny_patch16_224.augreg_in21k_ft_in1k', 112, dict(img_size=112, dynamic_img_size=True), [1, 50, 192]),
    ('swin_tiny_patch4_window7_224.ms_in1k', 224, {}, None),
])  # CNN bodies: the tests above
def test_pretrained_body_loads_through_its_own_checkpoint_filter_offline(tmp_path, body, img_size, bare_kwargs,
                                                                          pos_embed):
    """The cache holds the body's checkpoint in its real key layout at its own size (classifier
    included); SSANet's body ends up exactly as the bare timm model loads it."""
    arch = body.partition('.')[0]
    torch.manual_seed(0)
    write_hub_cache(tmp_path, f'timm/{body}', timm.create_model(arch).state_dict())
    build = f"ssa_timm.create_ssanet('{body}', 'plus', pretrained=True, num_classes=7, img_size={img_size})"
    result = run_offline(tmp_path, BARE.format(build=build, body=body, bare_kwargs=bare_kwargs))
    assert result['equal'] and not result['missing'] and result['n_body'] > 10
    assert result['notes'].startswith(f'Body weights from timm/{body}')
    assert result['pos_embed'] == pos_embed
