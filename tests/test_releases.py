"""Releases: the version is one number (package, pyproject.toml, the CHANGELOG's newest release), and a run
folder written by the previous minor release (tests/fixtures/run_v0_5_0, made by 0.5.0's own code) resumes."""
import json
import re
import shutil
import tomllib
from pathlib import Path

import pytest

import ssa_timm
from recipe_runs import run_main
from run_outputs import metrics

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / 'tests' / 'fixtures' / 'run_v0_5_0'
# the command (fixture README) that wrote the fixture, less --epochs and --output-dir
V0_5_0_RUN = ['--body-feature-index', '0', '--builtin-train-per-class', '4', '--builtin-val-per-class', '2',
              '--batch-size', '8', '--workers', '0', '--cpu', '--seed', '0']


def test_the_version_is_the_same_in_the_package_the_project_and_the_changelog():
    project = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']
    releases = re.findall(r'^## \[?(\d+\.\d+\.\d+)\]? - (\d{4}-\d{2}-\d{2}|unreleased)', (ROOT / 'CHANGELOG.md')
                          .read_text(), flags=re.MULTILINE)
    newest, date = releases[0]
    assert ssa_timm.__version__ == project['version'] == newest, (ssa_timm.__version__, project['version'], newest)
    assert date != 'unreleased', f'the CHANGELOG entry of {newest} has no release date'
    assert '### Upgrading from 0.5' in (ROOT / 'CHANGELOG.md').read_text()


def test_a_run_written_by_0_5_0_resumes(tmp_path, capsys):
    """0.5.0 recorded ``freeze_backbone`` where 0.6 records ``freeze_body``: the old record reads in today's
    terms, the run resumes at epoch 1 and trains it as 0.5.0's own resume did (the same loss)."""
    run = tmp_path / 'run'
    shutil.copytree(FIXTURE, run, ignore=shutil.ignore_patterns('README.md'))
    saved = json.loads((run / 'checkpoints' / 'checkpoint_0' / 'run_state.json').read_text())['identity']
    assert saved['freeze_backbone'] is False and 'freeze_body' not in saved
    assert run_main('train', *V0_5_0_RUN, '--epochs', '2', '--output-dir', str(run), '--resume', 'auto') == 0
    out = capsys.readouterr().out
    assert 'resumed from' in out and 'checkpoint_0: epoch 1, step 5' in out, out
    lines = metrics(run)
    assert [line['epoch'] for line in lines] == [0, 1]
    assert lines[1]['train_loss'] == pytest.approx(3.2224, abs=2e-3)  # 0.5.0 resuming this folder itself
    # trained with the paper's attention (0.5's only one): resumed with it, though the name now defaults to qk_norm
    state = json.loads((run / 'checkpoints' / 'checkpoint_1' / 'run_state.json').read_text())
    assert state['identity']['model_args'] == {'body_feature_index': 0, 'qk_norm': False, 'scale_attn': False}
    assert lines[1]['val']['attention']['kind'] == 'paper'


def test_an_export_without_a_recorded_attention_is_fixed_to_the_papers_for_transformers():
    from ssa_timm.hub import fixed_config
    old = {'architecture': 'ssanet_resnet18_plus', 'num_classes': 3, 'model_args': {'num_classes': 3}}
    assert fixed_config(old)['model_args'] == {'qk_norm': False}
    none = {'architecture': 'ssanet_resnet18_no_attention', 'num_classes': 3, 'model_args': {}}
    assert fixed_config(none)['model_args'] == {}
    recorded = {'architecture': 'ssanet_resnet18_plus', 'num_classes': 3, 'model_args': {'qk_norm': True}}
    assert fixed_config(recorded)['model_args'] == {'qk_norm': True}
