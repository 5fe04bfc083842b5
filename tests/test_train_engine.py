"""ssa_timm.train's run settings and checkpoint store on their own: what each derived record holds,
the defaults that depend on the dataset, and which checkpoints the store keeps and picks."""
import dataclasses
import json

import pytest
import torch
from accelerate import Accelerator

from ssa_timm.errors import CheckpointError, DamagedCheckpoint, IdentityMismatch
from ssa_timm.processes import run_on_main
from ssa_timm.train import CheckpointStore, RunConfig
from ssa_timm.train.config import BUILTIN_DEFAULTS, PAPER_DEFAULTS


def test_defaults_depend_on_the_dataset():
    builtin = RunConfig.from_mapping({})
    expected = tuple(BUILTIN_DEFAULTS[k] for k in ('model', 'img_size', 'opt'))
    assert (builtin.model, builtin.img_size, builtin.opt) == expected
    assert builtin.pretrained is False and builtin.body_feature_index == 2  # ResNet-18 read after layer2
    cub = RunConfig.from_mapping({'dataset': 'cub', 'unknown_flag': 1})
    assert (cub.model, cub.img_size, cub.weight_decay) == tuple(PAPER_DEFAULTS[k] for k in ('model', 'img_size',
                                                                                           'weight_decay'))
    assert cub.pretrained is True and cub.body_feature_index is None
    assert RunConfig.from_mapping({'pretrained_path': 'body.safetensors'}).pretrained is True


@pytest.mark.parametrize('field,value', [('img_size', 96), ('pretrained_path', 'other.safetensors'), ('seed', 3),
                                         ('model', 'ssanet_resnet34_plus'), ('body_feature_index', 1),
                                         ('data_dir', '/elsewhere')])
def test_the_feature_cache_key_changes_with_what_the_maps_depend_on(field, value):
    config = RunConfig.from_mapping({'pretrained_path': 'body.safetensors', 'data_dir': '/data'})
    other = dataclasses.replace(config, **{field: value})
    assert config.feature_cache_key('train') != other.feature_cache_key('train')
    assert config.feature_cache_key('train') != config.feature_cache_key('val')
    assert config.feature_cache_key('train') == dataclasses.replace(config, lr=0.5).feature_cache_key('train')


@pytest.mark.parametrize('field,value', [('qk_norm', True), ('qk_norm', False), ('sagan_qk', True), ('loss', 'ce'),
                                         ('model', 'ssanet_resnet18_no_alpha'), ('output_dir', 'elsewhere')])
def test_runs_that_differ_only_after_the_body_share_one_feature_cache(field, value):
    """A grid's runs of one seed: other aggregation, attention, loss or run folder, the same body maps."""
    config = RunConfig.from_mapping({'pretrained_path': 'body.safetensors', 'data_dir': '/data'})
    assert config.feature_cache_key('train') == dataclasses.replace(config, **{field: value}).feature_cache_key('train')


def test_identity_and_export_notes_derive_from_the_config(tmp_path):
    config = RunConfig.from_mapping({'initial_checkpoint': str(tmp_path / 'best'), 'qk_norm': True, 'epochs': 3})
    identity = config.identity(['a', 'b'], 10, 4, 2)
    assert identity['classes'] == ['a', 'b'] and identity['num_processes'] == 2 and identity['epochs'] == 3
    assert identity['model_args'] == {'qk_norm': True, 'body_feature_index': 2}
    assert identity['initial_checkpoint'] == str((tmp_path / 'best').resolve()) and identity['img_size'] == 64
    notes = config.export_notes(epoch=1, ema=True)
    assert notes['epoch'] == 1 and notes['ema'] and notes['initial_checkpoint'] == identity['initial_checkpoint']
    json.dumps(identity), json.dumps(config.trackers_config())  # stored as JSON


def test_the_store_keeps_the_newest_and_refuses_another_run(tmp_path):
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    store = CheckpointStore(tmp_path, accelerator, keep=2, on_main=lambda work: run_on_main(accelerator, work))
    identity = {'model': 'm', 'epochs': 2, 'lr': 0.1}
    for step in range(3):
        with torch.no_grad():
            model.weight.fill_(step)
        store.save(dict(identity=identity, progress={'epoch': step}, scheduler={'timm': {}}))
    assert [p.name for p in store.folders()] == ['checkpoint_2', 'checkpoint_1']
    assert store.choose('latest', identity) == (tmp_path / 'checkpoints' / 'checkpoint_2', [])
    assert store.choose('auto', dict(identity, epochs=5))[0].name == 'checkpoint_2'  # the length may grow
    with pytest.raises(IdentityMismatch, match='was saved by a run with lr=0.1; this run has lr=0.2'):
        store.choose('latest', dict(identity, lr=0.2))
    assert CheckpointStore(tmp_path / 'new', accelerator, 2, store.on_main).choose('auto', identity) == (None, [])
    store.load(store.choose('latest', identity)[0])
    assert torch.all(model.weight == 2)


def test_the_store_skips_a_damaged_checkpoint_by_its_type_and_says_so_without_printing(tmp_path, capsys):
    """A damaged newest checkpoint is skipped for 'latest' (reported back, not printed); named directly
    it is refused as DamagedCheckpoint; an identity mismatch is never skipped, even behind a damaged one."""
    accelerator = Accelerator(cpu=True)
    accelerator.prepare(torch.nn.Linear(2, 2))
    store = CheckpointStore(tmp_path, accelerator, keep=3, on_main=lambda work: run_on_main(accelerator, work))
    identity = {'model': 'm', 'epochs': 2, 'lr': 0.1}
    for step in range(2):
        store.save(dict(identity=identity, progress={'epoch': step}, scheduler={'timm': {}}))
    newest = store.folders()[0]
    (newest / 'run_state.json').write_text('{"identity": ')
    chosen, skipped = store.choose('latest', identity)
    assert chosen.name == 'checkpoint_0' and len(skipped) == 1
    assert skipped[0].startswith(f'warning: skipping checkpoint {newest}')
    assert capsys.readouterr().out == ''
    with pytest.raises(DamagedCheckpoint):
        store.choose(str(newest), identity)
    with pytest.raises(IdentityMismatch):
        store.choose('latest', dict(identity, lr=0.3))
    assert issubclass(DamagedCheckpoint, CheckpointError) and issubclass(IdentityMismatch, CheckpointError)
