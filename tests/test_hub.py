"""Publishing: push_to_hub dry runs, --fix-config, offline refusal, model cards (top-k only below the class
count), and a real upload -> download round trip against a local Hub server (slow tier: fresh processes,
huggingface_hub's own client pointed at the server with HF_ENDPOINT)."""
import importlib.util
import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import timm
import torch
from recipe_runs import ROOT, recipe, run_main, run_python, run_recipe
from huggingface_hub import ModelCard
from hub_server import serve
from safetensors import safe_open

import ssa_timm
from ssa_timm.hub import export_model
from ssa_timm.metrics import classification_report

LOGITS = """
import json, sys, torch, timm, ssa_timm
model = timm.create_model(sys.argv[1], pretrained=True).eval()
x = torch.linspace(-2, 2, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)
with torch.no_grad():
    print(json.dumps(dict(logits=model(x).tolist(), labels=model.pretrained_cfg['label_names'])))
"""
TRANSFORMERS_LOGITS = """
import json, sys, torch, ssa_timm
from transformers import AutoModelForImageClassification
model = AutoModelForImageClassification.from_pretrained(sys.argv[1]).eval()
x = torch.linspace(-2, 2, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)
with torch.no_grad():
    print(json.dumps(dict(logits=model(pixel_values=x).logits.tolist(),
                          labels=[model.config.id2label[i] for i in range(model.config.num_labels)])))
"""


def measured_export(folder: Path, num_classes: int) -> Path:
    """An export with a validation report measured on random images, as train.py writes one."""
    torch.manual_seed(num_classes)
    model = ssa_timm.create_ssanet('test_resnet', 'plus', num_classes=num_classes, img_size=32).eval()
    with torch.no_grad():
        report = classification_report(model.forward_per_head(torch.randn(12, 3, 32, 32)),
                                       torch.arange(12) % num_classes)
    labels = [f'class_{i}' for i in range(num_classes)]
    return export_model(model, str(folder), labels,
                        extra_config={'metrics': report, 'training': {'dataset': 'builtin', 'pretrained': False}})


@pytest.fixture(scope='module')
def export(tmp_path_factory) -> Path:
    return measured_export(tmp_path_factory.mktemp('exports') / 'ten', 10)


@pytest.fixture(scope='module')
def export3(tmp_path_factory) -> Path:
    return measured_export(tmp_path_factory.mktemp('exports') / 'three', 3)


def old_style(export: Path, folder: Path) -> Path:
    """``export`` as timm 1.0.31's save_for_hf writes it: num_classes and in_chans inside model_args."""
    shutil.copytree(export, folder)
    config = json.loads((folder / 'config.json').read_text())
    config['model_args'].update(num_classes=config['num_classes'], in_chans=3)
    (folder / 'config.json').write_text(json.dumps(config))
    return folder


def test_dry_run_folder_contents(export, tmp_path):
    out = tmp_path / 'dry'
    assert run_main('push_to_hub', '--checkpoint', str(export), '--repo-id', 'someone/ssanet-tiny',
                    '--dry-run', str(out)) == 0
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'ssanet' and config['num_classes'] == 10
    assert config['model_args'] == {'body': 'test_resnet', 'aggregation': 'plus', 'img_size': [32, 32],
                                    'qk_norm': True,  # cosine attention, create_ssanet's default
                                    'scale_attn': False}  # the attention it computes, recorded
    assert config['label_names'] == [f'class_{i}' for i in range(10)]
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
    # the attention it was trained with, and no advice to build the other one: these weights need theirs
    assert '- **Attention:** cosine attention, `qk_norm=True`' in card.text and 'pass `qk_norm' not in card.text
    assert f"| mean of heads (model output) | {measured['top1']:.2f} | {measured['top5']:.2f} |" in card.text
    assert "pipeline('image-classification', model='someone/ssanet-tiny')" in card.text  # the transformers way
    assert "AutoModelForImageClassification.from_pretrained('someone/ssanet-tiny')" in card.text


def test_card_reports_top5_only_above_five_classes(export3, tmp_path):
    out = tmp_path / 'dry3'
    assert run_main('push_to_hub', '--checkpoint', str(export3), '--repo-id', 'someone/three', '--dry-run',
                    str(out)) == 0
    card = ModelCard.load(out / 'README.md')
    assert [r.metric_name for r in card.data.eval_results] == ['top-1 accuracy']
    measured = json.loads((export3 / 'config.json').read_text())['metrics']['output']
    assert f"| mean of heads (model output) | {measured['top1']:.2f} |\n" in card.text
    assert '| head | top-1 |\n|---|---|\n' in card.text  # no top-5 column
    assert 'top-5 is not reported for 3 classes' in card.text and 'topk(3)' in card.text


def test_dry_run_of_an_old_export_uploads_a_transformers_config(export, tmp_path):
    old = old_style(export, tmp_path / 'old')
    assert run_main('push_to_hub', '--checkpoint', str(old), '--repo-id', 'a/b', '--dry-run', str(tmp_path / 'o')) == 0
    assert 'num_classes' not in json.loads((tmp_path / 'o' / 'config.json').read_text())['model_args']
    assert 'num_classes' in json.loads((old / 'config.json').read_text())['model_args']  # the checkpoint untouched


def test_fix_config_flag_rewrites_the_checkpoint_in_place(export, tmp_path, capsys):
    old = old_style(export, tmp_path / 'old')
    assert run_main('push_to_hub', '--checkpoint', str(old), '--fix-config') == 0
    assert capsys.readouterr().out.strip() == f'{old / "config.json"}: rewritten; it loads in timm and transformers'
    assert json.loads((old / 'config.json').read_text()) == json.loads((export / 'config.json').read_text())
    assert run_main('push_to_hub', '--checkpoint', str(old), '--fix-config') == 0
    assert 'already loads in timm and transformers, left as it is' in capsys.readouterr().out
    assert run_main('push_to_hub', '--checkpoint', str(old)) == 2
    assert '--repo-id is required (unless only --fix-config is given)' in capsys.readouterr().err


def test_push_offline_is_one_line_before_any_work(export, monkeypatch, capsys):
    push = recipe('push_to_hub')
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(push, 'build_folder', lambda *a: pytest.fail('the folder was built'))
    assert run_main('push_to_hub', '--checkpoint', str(export), '--repo-id', 'someone/x') == 1
    assert capsys.readouterr().err.strip() == (
        'error: cannot push to someone/x: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it, or write the '
        'folder that would be uploaded with --dry-run OUT')


def test_push_hub_errors_are_one_line(export, monkeypatch, capsys):
    from huggingface_hub.errors import OfflineModeIsEnabled
    push = recipe('push_to_hub')
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', False)

    def create_repo(*args, **kwargs):
        raise OfflineModeIsEnabled('Cannot reach https://huggingface.co/api/repos/create: offline mode is enabled.')
    monkeypatch.setattr(push, 'create_repo', create_repo)
    assert run_main('push_to_hub', '--checkpoint', str(export), '--repo-id', 'someone/x') == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: cannot push to someone/x: HF_HUB_OFFLINE is set') and '\n' not in err


@pytest.mark.parametrize('remove,message', [
    ('model.safetensors', 'has no weights'), ('config.json', 'has no config'), ('label_names', 'has no label_names'),
])
def test_push_refuses_incomplete_checkpoints(export, tmp_path, capsys, remove, message):
    broken = shutil.copytree(export, tmp_path / 'broken')
    if remove == 'label_names':
        config = json.loads((broken / 'config.json').read_text())
        del config['label_names']
        (broken / 'config.json').write_text(json.dumps(config))
    else:
        (broken / remove).unlink()
    assert run_main('push_to_hub', '--checkpoint', str(broken), '--repo-id', 'a/b', '--dry-run',
                    str(tmp_path / 'out')) == 1
    assert message in capsys.readouterr().err


def test_push_dry_run_may_not_write_into_the_checkpoint(export, capsys):
    assert run_main('push_to_hub', '--checkpoint', str(export), '--repo-id', 'a/b', '--dry-run',
                    str(export / 'upload')) == 1
    assert f'--dry-run {export / "upload"} is inside the model folder {export}' in capsys.readouterr().err
    assert not (export / 'upload').exists()


@pytest.mark.parametrize('repo_id', ['no-namespace', 'a/b/c', 'bad name/x', 'org/--double'])
def test_push_refuses_invalid_repo_ids(export, tmp_path, capsys, repo_id):
    assert run_main('push_to_hub', '--checkpoint', str(export), '--repo-id', repo_id, '--dry-run',
                    str(tmp_path)) == 2  # argparse's status for a bad argument
    err = capsys.readouterr().err
    assert 'argument --repo-id:' in err and ('is not a valid Hub repo id' in err or "must be 'ORG/NAME'" in err)


@pytest.mark.slow
def test_push_then_load_in_fresh_processes(export, tmp_path):
    """Upload old-style, load back in timm and in transformers in fresh processes: same logits and labels."""
    old = old_style(export, tmp_path / 'old')
    server, endpoint, state = serve()
    try:
        env = dict(HF_ENDPOINT=endpoint, HF_HUB_OFFLINE='0', HF_TOKEN='hf_local_test_token',
                   HF_HUB_CACHE=str(tmp_path / 'cache'), HF_HUB_DISABLE_XET='1')
        run_recipe('push_to_hub.py', '--checkpoint', str(old), '--repo-id', 'someone/ssanet-tiny', env=env)
        run_recipe('push_to_hub.py', '--checkpoint', str(old), '--repo-id', 'someone/ssanet-tiny',
                   '--revision', 'v1', env=env)  # a second push to a new branch of the existing repo
        repo = state.repos['someone/ssanet-tiny']
        assert set(repo.commits[repo.branches['main']]) >= {'config.json', 'model.safetensors', 'README.md'}
        assert 'v1' in repo.branches

        local = json.loads(run_python('-c', LOGITS, f'local-dir:{old}').stdout.strip().splitlines()[-1])
        pushed = json.loads(run_python('-c', LOGITS, 'hf-hub:someone/ssanet-tiny', env=env).stdout.splitlines()[-1])
        assert pushed == local  # identical logits and label names
        assert pushed['labels'][3] == 'class_3'
        assert ('GET', '/someone/ssanet-tiny/resolve/main/model.safetensors') in state.requests
        hf = json.loads(run_python('-c', TRANSFORMERS_LOGITS, 'someone/ssanet-tiny', env=env).stdout.splitlines()[-1])
        assert hf['labels'] == local['labels']
        torch.testing.assert_close(torch.tensor(hf['logits']), torch.tensor(local['logits']), rtol=0, atol=1e-6)
    finally:
        server.shutdown()
    # the server is gone: the cached snapshot alone serves the model offline
    offline = json.loads(run_python('-c', LOGITS, 'hf-hub:someone/ssanet-tiny',
                                    env=dict(env, HF_HUB_OFFLINE='1')).stdout.splitlines()[-1])
    assert offline == local


def test_model_cards_are_rendered_and_valid():
    spec = importlib.util.spec_from_file_location('model_cards_render', ROOT / 'model_cards' / 'render.py')
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    assert render.main(['--check']) == 0
    cards = sorted((ROOT / 'model_cards').glob('ssanet_*.md'))
    assert len(cards) == 37  # the 25 paper names and the 12 curated ones
    for path in cards:
        card = ModelCard.load(path)
        assert card.data.library_name == 'timm' and 'ssa_timm' in card.data.tags
        assert card.data.base_model.startswith('timm/') and card.data.license
        assert card.data.eval_results is None  # ImageNet-body tags: nothing measured, nothing claimed
        assert 'import ssa_timm' in card.text and path.stem in card.text
        assert "pipeline('image-classification'" in card.text  # the transformers way, once fine-tuned


def test_exported_preprocessing_is_the_recipes(export):
    """The export's data config, made into a transform by timm as the model cards say, squashes
    a non-square image exactly as the recipes do (no center crop)."""
    import numpy as np
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    from ssa_timm.data import model_transform

    model = timm.create_model(f'local-dir:{export}', pretrained=True)
    config = timm.data.resolve_data_config(model=model)
    assert config['crop_mode'] == 'squash' and config['crop_pct'] == 1.0
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 70, 3), dtype=np.uint8))
    recipe_transform, size = model_transform(model)
    from_card = timm.data.create_transform(**config)(image)
    assert torch.equal(recipe_transform(image), from_card)
    squashed = TF.resize(image, [size, size], interpolation=InterpolationMode(config['interpolation']))
    expected = TF.normalize(TF.to_tensor(squashed), config['mean'], config['std'])
    torch.testing.assert_close(from_card, expected)
