"""Publishing: push_to_hub dry run, model cards, and a real upload -> download round trip against a
local Hub server (huggingface_hub's own client, pointed at it with HF_ENDPOINT)."""
import json
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open

from fixtures import ROOT, run_python, run_recipe
from hub_server import serve

LOGITS = """
import json, sys, torch, timm, ssa_timm
model = timm.create_model(sys.argv[1], pretrained=True).eval()
x = torch.linspace(-2, 2, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)
with torch.no_grad():
    print(json.dumps(dict(logits=model(x).tolist(), labels=model.pretrained_cfg['label_names'])))
"""


def logits_of(spec: str, env=None) -> dict:
    return json.loads(run_python('-c', LOGITS, spec, env=env).stdout.strip().splitlines()[-1])


@pytest.fixture
def export(trained_run) -> Path:
    return trained_run / 'best'


def test_dry_run_folder_contents(export, tmp_path):
    out = tmp_path / 'dry'
    run_recipe('push_to_hub.py', '--checkpoint', str(export), '--repo-id', 'someone/ssanet-tiny', '--dry-run', str(out))
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'ssanet' and config['num_classes'] == 10
    assert config['model_args']['body'] == 'test_resnet' and config['model_args']['aggregation'] == 'plus'
    assert config['label_names'] == [f'glyph_{i:02d}' for i in range(10)]
    assert config['pretrained_cfg']['input_size'] == [3, 32, 32]
    with safe_open(out / 'model.safetensors', framework='pt') as f:
        assert f.metadata() == {'format': 'pt'}
        assert 'head.attn.alpha' in f.keys() and 'head.ssa.fc.weight' in f.keys()

    card = ModelCard.load(out / 'README.md')
    data = card.data
    assert data.library_name == 'timm' and data.pipeline_tag == 'image-classification'
    assert {'ssa_timm', 'image-classification'} <= set(data.tags)
    assert data.license and data.datasets == ['builtin']
    assert data.base_model is None  # trained from scratch, so no ImageNet body is claimed
    measured = config['metrics']['output']
    results = {r.metric_name: r.metric_value for r in data.eval_results}
    assert results == {'top-1 accuracy': round(measured['top1'], 2), 'top-5 accuracy': round(measured['top5'], 2)}
    assert 'import ssa_timm' in card.text and "hf-hub:someone/ssanet-tiny" in card.text
    assert f"| mean of heads (model output) | {measured['top1']:.2f} |" in card.text


@pytest.mark.parametrize('remove,message', [
    ('model.safetensors', 'has no weights'), ('config.json', 'has no config'), ('label_names', 'has no label_names'),
])
def test_push_refuses_incomplete_checkpoints(export, tmp_path, remove, message):
    broken = tmp_path / 'broken'
    broken.mkdir()
    for f in export.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    if remove == 'label_names':
        config = json.loads((broken / 'config.json').read_text())
        del config['label_names']
        (broken / 'config.json').write_text(json.dumps(config))
    else:
        (broken / remove).unlink()
    proc = run_recipe('push_to_hub.py', '--checkpoint', str(broken), '--repo-id', 'a/b', '--dry-run',
                  str(tmp_path / 'out'), check=False)
    assert proc.returncode != 0 and message in proc.stderr


@pytest.mark.parametrize('repo_id', ['no-namespace', 'a/b/c', 'bad name/x', 'org/--double'])
def test_push_refuses_invalid_repo_ids(export, tmp_path, repo_id):
    proc = run_recipe('push_to_hub.py', '--checkpoint', str(export), '--repo-id', repo_id, '--dry-run',
                  str(tmp_path), check=False)
    assert proc.returncode != 0
    assert 'is not a valid Hub repo id' in proc.stderr or "must be 'ORG/NAME'" in proc.stderr


def test_push_then_load_in_fresh_processes(export, tmp_path):
    server, endpoint, state = serve()
    try:
        env = dict(HF_ENDPOINT=endpoint, HF_HUB_OFFLINE='0', HF_TOKEN='hf_local_test_token',
                   HF_HUB_CACHE=str(tmp_path / 'cache'), HF_HUB_DISABLE_XET='1')
        run_recipe('push_to_hub.py', '--checkpoint', str(export), '--repo-id', 'someone/ssanet-tiny', env=env)
        run_recipe('push_to_hub.py', '--checkpoint', str(export), '--repo-id', 'someone/ssanet-tiny',
               '--revision', 'v1', env=env)  # a second push to a new branch of the existing repo
        repo = state.repos['someone/ssanet-tiny']
        assert set(repo.commits[repo.branches['main']]) >= {'config.json', 'model.safetensors', 'README.md'}
        assert 'v1' in repo.branches

        local = logits_of(f'local-dir:{export}')
        pushed = logits_of('hf-hub:someone/ssanet-tiny', env=env)
        assert pushed == local  # identical logits and label names
        assert pushed['labels'][3] == 'glyph_03'
        assert ('GET', '/someone/ssanet-tiny/resolve/main/model.safetensors') in state.requests
    finally:
        server.shutdown()
    # the server is gone: the cached snapshot alone serves the model offline
    offline = logits_of('hf-hub:someone/ssanet-tiny', env=dict(env, HF_HUB_OFFLINE='1'))
    assert offline == local


def test_model_cards_are_rendered_and_valid():
    run_python('model_cards/render.py', '--check')
    cards = sorted((ROOT / 'model_cards').glob('ssanet_*.md'))
    assert len(cards) == 37  # the 25 paper names and the 12 curated ones
    for path in cards:
        card = ModelCard.load(path)
        assert card.data.library_name == 'timm' and 'ssa_timm' in card.data.tags
        assert card.data.base_model.startswith('timm/') and card.data.license
        assert card.data.eval_results is None  # ImageNet-body tags: nothing measured, nothing claimed
        assert 'import ssa_timm' in card.text and path.stem in card.text


def test_exported_preprocessing_is_the_recipes(export):
    """The export's data config, made into a transform by timm as the model cards say, squashes
    a non-square image exactly as the recipes do (no center crop)."""
    import numpy as np
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    from ssa_timm.data import model_transform

    import ssa_timm  # noqa: F401  (registers the models)
    model = timm.create_model(f'local-dir:{export}', pretrained=True)
    config = timm.data.resolve_data_config(model=model)
    assert config['crop_mode'] == 'squash' and config['crop_pct'] == 1.0
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 70, 3), dtype=np.uint8))
    recipe, size = model_transform(model)
    from_card = timm.data.create_transform(**config)(image)
    assert torch.equal(recipe(image), from_card)
    squashed = TF.resize(image, [size, size], interpolation=InterpolationMode(config['interpolation']))
    expected = TF.normalize(TF.to_tensor(squashed), config['mean'], config['std'])
    torch.testing.assert_close(from_card, expected)
