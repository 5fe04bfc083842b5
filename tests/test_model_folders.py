"""Model folders are untrusted input: config.json validated before anything is built, safetensors only,
the image-size limit; old-style exports keep loading; hf-hub repos from a pre-populated offline cache."""
import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import timm
import torch
from recipe_runs import run_main

import ssa_timm
from ssa_timm.errors import UserError
from ssa_timm.hub import (
    MAX_IMG_SIZE,
    check_img_size,
    export_model,
    fix_config,
    img_size_limit,
    load_model,
    model_folder,
    validate_config,
)

LABELS = ['ant', 'bee', 'cat']
X = torch.linspace(-2, 2, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)


@pytest.fixture(scope='module')
def export(tmp_path_factory) -> Path:
    """A tiny export (timm's test_resnet body, 3 classes, 32 px) written by the library's export path."""
    torch.manual_seed(0)
    model = ssa_timm.create_ssanet('test_resnet', 'plus', num_classes=3, img_size=32)
    return export_model(model, str(tmp_path_factory.mktemp('export') / 'tiny'), LABELS)


def logits(spec: str) -> torch.Tensor:
    with torch.no_grad():
        return load_model(spec).eval()(X)


def edited(export: Path, folder: Path, edit) -> Path:
    """A copy of ``export`` whose config.json ``edit(config)`` changed in place."""
    shutil.copytree(export, folder)
    config = json.loads((folder / 'config.json').read_text())
    edit(config)
    (folder / 'config.json').write_text(json.dumps(config))
    return folder


def old_style(config: dict) -> None:
    """What timm 1.0.31's save_for_hf writes: num_classes and in_chans inside model_args."""
    config['model_args'].update(num_classes=config['num_classes'], in_chans=3)


def test_exports_keep_num_classes_out_of_model_args(export):
    config = json.loads((export / 'config.json').read_text())
    assert config['num_classes'] == 3 and config['label_names'] == LABELS
    assert config['model_args'] == {'body': 'test_resnet', 'aggregation': 'plus', 'img_size': [32, 32],
                                    'qk_norm': True,  # create_ssanet's default over a modern body
                                    'scale_attn': False}
    model = timm.create_model(f'local-dir:{export}', pretrained=True)
    assert model.num_classes == 3 and model.in_chans == 3 and model.pretrained_cfg['label_names'] == LABELS


def test_old_style_exports_load_and_fix_config_rewrites_them(export, tmp_path):
    old = edited(export, tmp_path / 'old', old_style)
    expected = logits(str(export))
    torch.testing.assert_close(logits(str(old)), expected, rtol=0, atol=0)
    assert fix_config(old) is True
    config = json.loads((old / 'config.json').read_text())
    assert 'num_classes' not in config['model_args'] and 'in_chans' not in config['model_args']
    assert config == json.loads((export / 'config.json').read_text())
    assert fix_config(old) is False  # already fixed: left alone
    torch.testing.assert_close(logits(f'local-dir:{old}'), expected, rtol=0, atol=0)
    assert not list(old.glob('.*tmp*'))


def test_fix_config_keeps_in_chans_of_other_channel_counts(tmp_path):
    model = ssa_timm.create_ssanet('test_resnet', 'plus', num_classes=2, img_size=32, in_chans=1)
    folder = export_model(model, str(tmp_path / 'grey'), ['a', 'b'])
    config = json.loads((folder / 'config.json').read_text())
    assert config['model_args']['in_chans'] == 1 and 'num_classes' not in config['model_args']
    assert load_model(str(folder)).in_chans == 1


def set_path(config: dict, dotted: str, value) -> None:
    *parents, last = dotted.split('.')
    for key in parents:
        config = config[key]
    config[last] = value


@pytest.mark.parametrize('field,value,message', [
    ('pretrained_cfg.input_size', [3, 100000, 100000],
     'pretrained_cfg.input_size [100000, 100000] is over the image-size limit of 1024 px'),
    ('pretrained_cfg.test_input_size', [3, 4096, 4096], 'pretrained_cfg.test_input_size [4096, 4096] is over'),
    ('pretrained_cfg.input_size', [3, 'big', 32], 'pretrained_cfg.input_size must be [channels, height, width]'),
    ('model_args.img_size', 5000, 'model_args.img_size 5000 is over the image-size limit of 1024 px'),
    ('model_args.bogus', 1, "model_args has unknown key(s) ['bogus']"),
    ('model_args.num_classes', 7, 'model_args.num_classes 7 differs from num_classes 3'),
    ('model_args.in_chans', 0, 'model_args.in_chans must be an integer >= 1, got 0'),
    ('num_classes', -3, 'num_classes must be an integer >= 1, got -3'),
    ('num_classes', True, 'num_classes must be an integer >= 1, got True'),
    ('label_names', ['ant', 'bee'], '2 label_names for 3 classes (num_classes); the counts must match'),
    ('label_names', 'ant bee cat', 'label_names must be a list of class names'),
    ('architecture', 'ssanet_nosuchbody_plus', "architecture 'ssanet_nosuchbody_plus' is not a registered SSANet"),
    ('architecture', 'resnet18', "describes a 'resnet18' model, not an SSANet"),
    ('model_args', [1, 2], 'model_args must be an object of model arguments'),
])
def test_config_is_validated_before_anything_is_built(export, tmp_path, monkeypatch, field, value, message):
    folder = edited(export, tmp_path / 'bad', lambda c: set_path(c, field, value))
    monkeypatch.setattr(timm, 'create_model', lambda *a, **k: pytest.fail('built before the config was checked'))
    with pytest.raises(UserError) as info:
        load_model(str(folder))
    assert str(info.value).startswith(f'{folder / "config.json"}') and message in str(info.value)


def test_registered_names_fix_their_aggregation(export, tmp_path):
    folder = edited(export, tmp_path / 'reg', lambda c: c.update(architecture='ssanet_resnet18_plus'))
    with pytest.raises(UserError, match=r"model_args has unknown key\(s\) \['aggregation'\]"):
        load_model(str(folder))


def test_classifier_size_is_checked_against_the_weights(export, tmp_path):
    folder = edited(export, tmp_path / 'more', lambda c: c.update(num_classes=5, label_names=list('abcde')))
    with pytest.raises(UserError, match='num_classes 5 does not match model.safetensors, whose head.ssa.fc has 3'):
        load_model(str(folder))


def test_values_the_model_refuses_are_one_line(export, tmp_path):
    folder = edited(export, tmp_path / 'agg', lambda c: c['model_args'].update(aggregation='sideways'))
    with pytest.raises(UserError, match=r'describes a model that cannot be built: aggregation must be one of'):
        load_model(str(folder))


def test_only_safetensors_weights_are_loaded(export, tmp_path, monkeypatch):
    folder = tmp_path / 'pickled'
    folder.mkdir()
    shutil.copy(export / 'config.json', folder)
    torch.save(load_model(str(export)).state_dict(), folder / 'pytorch_model.bin')
    monkeypatch.setattr(torch, 'load', lambda *a, **k: pytest.fail('a pickle was opened'))
    with pytest.raises(UserError, match=r'no model.safetensors: it has pytorch_model.bin \(pickled weights\), only '
                                        'safetensors weights are loaded'):
        load_model(str(folder))


def test_image_size_limit(monkeypatch):
    assert img_size_limit() == MAX_IMG_SIZE == 1024
    assert check_img_size(1024, '--img-size') == 1024 and check_img_size([448, 1024], 'x') == [448, 1024]
    for bad, message in ((1025, '--img-size 1025 is over the image-size limit of 1024 px'),
                         (0, 'must be positive integer image sides'), ([32, 'a'], 'must be positive integer')):
        with pytest.raises(UserError, match=message):
            check_img_size(bad, '--img-size')
    monkeypatch.setenv('SSA_TIMM_MAX_IMG_SIZE', '4096')
    assert img_size_limit() == 4096 and check_img_size(4000, '--img-size') == 4000
    monkeypatch.setenv('SSA_TIMM_MAX_IMG_SIZE', 'lots')
    with pytest.raises(UserError, match="SSA_TIMM_MAX_IMG_SIZE='lots' is not a positive integer"):
        img_size_limit()


@pytest.mark.parametrize('name,extra', [('train', []), ('predict', ['x.png']), ('evaluate', ['--cpu']),
                                        ('export', ['--torchscript', 'm.pt']), ('visualize', ['x.png']), ('demo', []),
                                        ('benchmark', [])])
def test_every_recipe_refuses_a_bad_img_size_at_parse_time(name, extra, capsys, tmp_path, monkeypatch):
    """One definition of --img-size (ssa_timm.cli): argparse's exit status 2 and one error line, before anything
    is loaded, in every recipe that has the flag."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'x.png').write_bytes(b'')
    for bad, message in (('4000', 'image side 4000 is over the image-size limit of 1024 px (ssa_timm.hub.MAX_IMG_SIZE; '
                                  'set SSA_TIMM_MAX_IMG_SIZE to allow larger images)'),
                         ('0', 'must be at least 1, got 0'), ('big', "expected an integer, got 'big'")):
        assert run_main(name, '--model', 'ssanet_test_resnet_plus', '--img-size', bad, *extra) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if ': error: ' in line]
        assert len(errors) == 1 and errors[0].endswith(f': error: argument --img-size: {message}'), err
        assert 'Traceback' not in err and list(tmp_path.iterdir()) == [tmp_path / 'x.png']


@pytest.mark.parametrize('name,extra', [('predict', []), ('evaluate', ['--cpu', '--workers', '0'])])
def test_label_count_mismatch_is_one_line_in_the_recipes(export, tmp_path, capsys, name, extra):
    folder = edited(export, tmp_path / 'labels', lambda c: c.update(label_names=['ant', 'bee']))
    image = tmp_path / 'x.png'
    torch.manual_seed(0)
    from PIL import Image
    Image.new('RGB', (8, 8)).save(image)
    argv = ['--model', str(folder), *([str(image)] if name == 'predict' else []), *extra]
    assert run_main(name, *argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f'error: {folder / "config.json"}: 2 label_names for 3 classes (num_classes); the counts must match']


def hub_cache(root: Path, repo: str, files: dict) -> Path:
    """A Hugging Face cache holding ``files`` ({name: source path}) of ``repo`` at main."""
    base = root / f'models--{repo.replace("/", "--")}'
    snapshot = base / 'snapshots' / ('0' * 40)
    snapshot.mkdir(parents=True)
    (base / 'refs').mkdir()
    (base / 'refs' / 'main').write_text('0' * 40)
    for name, source in files.items():
        shutil.copy(source, snapshot / name)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path / 'hub'))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    return tmp_path / 'hub'


def test_hub_repos_are_validated_too(export, tmp_path, offline_cache):
    hub_cache(offline_cache, 'someone/tiny', {'config.json': export / 'config.json',
                                              'model.safetensors': export / 'model.safetensors'})
    torch.testing.assert_close(logits('hf-hub:someone/tiny'), logits(str(export)), rtol=0, atol=0)

    bad = edited(export, tmp_path / 'huge', lambda c: set_path(c, 'pretrained_cfg.input_size', [3, 100000, 100000]))
    snapshot = hub_cache(offline_cache, 'someone/huge', {'config.json': bad / 'config.json',
                                                         'model.safetensors': bad / 'model.safetensors'})
    with pytest.raises(UserError, match=r'input_size \[100000, 100000\] is over the image-size limit') as info:
        load_model('hf-hub:someone/huge')
    assert str(info.value).startswith(str(snapshot / 'config.json'))

    torch.save({}, tmp_path / 'pytorch_model.bin')
    hub_cache(offline_cache, 'someone/pickled', {'config.json': export / 'config.json',
                                                 'pytorch_model.bin': tmp_path / 'pytorch_model.bin'})
    with pytest.raises(UserError, match='hf-hub:someone/pickled has no model.safetensors: only safetensors weights'):
        load_model('hf-hub:someone/pickled')


def test_model_folder_of_a_spec(export):
    assert model_folder(str(export)) == export and model_folder(f'local-dir:{export}') == export
    assert model_folder('hf-hub:someone/tiny') is None and model_folder('ssanet_vgg16_plus') is None
    assert validate_config(json.loads((export / 'config.json').read_text()), 'x')['num_classes'] == 3


PAPER_EXPORT = Path(__file__).parent / 'fixtures' / 'export_v0_6_paper_attention'


def without_attention_args(config: dict) -> None:
    """The oldest format: exports written before they recorded the attention options."""
    del config['model_args']['qk_norm'], config['model_args']['scale_attn']


def test_an_export_from_before_qk_norm_became_the_default_keeps_the_paper_attention(tmp_path, offline_cache):
    """An ``ssanet_resnet18_plus`` exported while every name computed the paper's attention (its README says
    how it was made) loads with that attention and gives the outputs it gave then, whether its config.json
    records ``qk_norm: false`` or nothing at all, from a folder or from the Hub."""
    from safetensors.torch import load_file
    reference = load_file(str(PAPER_EXPORT / 'reference.safetensors'))
    oldest = edited(PAPER_EXPORT, tmp_path / 'oldest', without_attention_args)
    assert 'qk_norm' not in json.loads((oldest / 'config.json').read_text())['model_args']
    hub_cache(offline_cache, 'someone/paper', {name: oldest / name for name in ('config.json', 'model.safetensors')})
    for spec in (str(PAPER_EXPORT), f'local-dir:{PAPER_EXPORT}', str(oldest), 'hf-hub:someone/paper'):
        model = load_model(spec).eval()
        assert model.pretrained_cfg['architecture'] == 'ssanet_resnet18_plus'
        attn = model.head.attn
        assert (attn.qk_norm, attn.scale_attn, attn.logit_scale) == (False, False, None), spec
        with torch.no_grad():
            torch.testing.assert_close(model(reference['input']), reference['logits'], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(model.forward_per_head(reference['input'])['ssa'], reference['ssa'],
                                       rtol=1e-5, atol=1e-6)
    assert timm.create_model('ssanet_resnet18_plus', num_classes=3, device='meta').head.attn.qk_norm  # today's
