"""The arguments the recipes share (ssa_timm.cli): deprecated flag names that still work for one release,
help texts whose defaults come from the definitions, and the model's own input size reaching the
transform and the export without being passed twice."""
import json
import re

import pytest
import torch

import ssa_timm
from recipe_runs import ROOT, recipe
from ssa_timm.data import model_transform
from ssa_timm.hub import export_model
from ssa_timm.train.config import BUILTIN_DEFAULTS, PAPER_DEFAULTS, RunConfig


@pytest.mark.parametrize('name,old,new,argv,dest,value', [
    ('train', '--freeze-backbone', '--freeze-body', [], 'freeze_body', True),
    ('visualize', '--out-dir', '--output-dir', ['x.png', '--model', 'm', '--out-dir', 'figs'], 'output_dir', 'figs'),
    ('benchmark', '--out', '--output', ['--out', 'b.json'], 'output', 'b.json'),
])
def test_old_flag_names_work_for_one_release_with_one_warning_line(name, old, new, argv, dest, value, capsys):
    args = recipe(name).parse_args(argv or [old])
    assert getattr(args, dest) == value
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f'warning: {old} is deprecated and goes away in 0.7; use {new}']
    changelog = (ROOT / 'CHANGELOG.md').read_text().split('\n## [0.6.0]')[1].split('\n## ')[0]  # deprecated in 0.6
    assert f'{old}`' in changelog and f'`{new}`' in changelog and '0.7' in changelog
    recipe(name).parse_args(argv[:-2] + [new, argv[-1]] if argv else [new])
    assert capsys.readouterr().err == ''
    both = [*argv, new, argv[-1]] if argv else [old, new]
    with pytest.raises(SystemExit) as stop:
        recipe(name).parse_args(both)
    assert stop.value.code == 2
    assert f'error: {old} is the deprecated name of {new}: give {new} alone' in capsys.readouterr().err


def test_train_help_derives_every_default_from_its_definition(capsys):
    with pytest.raises(SystemExit):
        recipe('train').parse_args(['--help'])
    out = capsys.readouterr().out
    text = ' '.join(out.split())
    default = RunConfig()
    for flag, value in (('--epochs', default.epochs), ('--batch-size', default.batch_size), ('--lr', default.lr),
                        ('--keep-checkpoints', default.keep_checkpoints), ('--gamma', default.gamma)):
        help_of_flag = re.search(rf'\n  {flag} [A-Z_]+(.*?)(?=\n  -|\n\n)', out, re.S).group(1)
        assert f'(default: {value})' in ' '.join(help_of_flag.split()), flag
    for key in ('opt', 'weight_decay', 'img_size', 'model'):
        assert f'{BUILTIN_DEFAULTS[key]} on builtin, else {PAPER_DEFAULTS[key]}' in text, key
    sections = {part.split(':\n', 1)[0]: part for part in out.split('\n\n')}
    assert '--gamma' in sections['Loss'] and '--gamma' not in sections['Model']
    assert '--seed' not in sections['Run folder, checkpoints and resume']
    assert '--seed' in sections['Reproducibility, devices and logging']


def test_a_model_built_at_another_size_carries_that_size(tmp_path):
    """ssanet_resnet18_plus at the built-in 64 px, read after layer2: its config says 64 px and an 8 x 8 map, so
    the transform and the export take the size from the model."""
    model = ssa_timm.create_ssanet_by_name('ssanet_resnet18_plus', num_classes=3, img_size=64, body_feature_index=2)
    assert model.pretrained_cfg['input_size'] == (3, 64, 64) and model.pretrained_cfg['pool_size'] == (8, 8)
    assert model.forward_features(torch.zeros(1, 3, 64, 64)).shape[-2:] == (8, 8)
    assert model_transform(model)[1] == 64
    config = json.loads((export_model(model, str(tmp_path / 'best'), ['a', 'b', 'c']) / 'config.json').read_text())
    assert config['pretrained_cfg']['input_size'] == [3, 64, 64] and config['architecture'] == 'ssanet_resnet18_plus'
    assert ssa_timm.create_ssanet_by_name('ssanet_resnet18_plus').pretrained_cfg['input_size'] == (3, 448, 448)


@pytest.mark.parametrize('name,argv,message', [
    ('export', ['--model', 'm', '--onnx', 'a.out', '--report', './a.out'], '--torchscript and --report must be'),
    ('push_to_hub', ['--checkpoint', 'c', '--repo-id', 'a/b/c'], "argument --repo-id: 'a/b/c'"),
    ('evaluate', ['--model', 'm', '--boxes', 'b.txt', '--crop-bbox'], 'they cannot be used with --crop-bbox'),
    ('train', ['--resume', 'latest', '--overwrite'], '--resume continues the run'),
    ('train', ['--sagan-qk', '--qk-norm'], 'at --img-size 64: sagan_qk sets the width of A and B'),  # the model's words
])
def test_bad_argument_combinations_are_argparse_errors(name, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        recipe(name).parse_args(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err.strip().splitlines()[-1], err


@pytest.mark.parametrize('name', ['train', 'visualize', 'benchmark', 'evaluate', 'predict', 'export'])
def test_help_shows_no_deprecated_flag_name(name, capsys):
    with pytest.raises(SystemExit):
        recipe(name).parse_args(['--help'])
    out = capsys.readouterr().out
    assert not re.search(r'--out\b(?!put)|--out-dir|--freeze-backbone', out), re.findall(r'.*--out\b.*', out)
