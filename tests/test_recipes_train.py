"""recipes/train.py and recipes/evaluate.py end to end, in this process through their ``main(argv)``, on
the built-in dataset: what a run writes, the attention it learns on a 4 x 4 map, exact resume, longer
resume, ``--resume auto``, starting weights, cached features, evaluation."""
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.models import save_for_hf

import ssa_timm
from dataset_layouts import make_image_folder
from recipe_runs import TINY_POSITIONS, TINY_TRAIN, TRAINED_RUN, run_main
from run_outputs import assert_same_weights, latest_weights, metrics
from ssa_timm.data import BuiltinFineGrained, Transformed, model_transform
from ssa_timm.errors import UserError
from ssa_timm.train import build_scheduler
from ssa_timm.train.config import RunConfig

VAL_SIZE = 50


def train(*argv: str) -> int:
    return run_main('train', *argv)


def test_run_writes_metrics_checkpoints_and_export(trained_run):
    lines = metrics(trained_run)
    assert [m['epoch'] for m in lines] == [0, 1]
    val = lines[0]['val']
    assert set(val['heads']) == {'ssa', 'fe'} and val['count'] == VAL_SIZE and 'top1' in val['output']
    assert all(m['images_per_s'] > 0 and m['lr'] > 0 for m in lines)
    assert sorted(p.name for p in (trained_run / 'checkpoints').iterdir()) == ['checkpoint_0', 'checkpoint_1']
    state = json.loads((trained_run / 'checkpoints' / 'checkpoint_1' / 'run_state.json').read_text())
    assert state['progress']['epoch'] == 2 and state['identity']['classes'][0] == 'glyph_00'
    assert state['identity']['train_samples'] == 80
    assert state['identity']['model_args'] == {'qk_norm': True, 'scale_attn': False, 'body_feature_index': 2}
    assert not list((trained_run / 'checkpoints' / 'checkpoint_1').glob('custom_checkpoint_*'))  # no pickled state
    model = timm.create_model(f'local-dir:{trained_run / "best"}', pretrained=True)
    assert tuple(model.pretrained_cfg['input_size']) == (3, 32, 32) and model.num_classes == 10
    best = max(lines, key=lambda m: m['val']['output']['top1'])  # the first best epoch is exported
    config = json.loads((trained_run / 'best' / 'config.json').read_text())
    assert config['training']['epoch'] == best['epoch'] and config['metrics'] == best['val']


def test_exported_attention_reads_the_map_and_is_not_one_hot(trained_run):
    model = timm.create_model(f'local-dir:{trained_run / "best"}', pretrained=True).eval()
    transform, _ = model_transform(model)
    images = Transformed(BuiltinFineGrained('val', samples_per_class=1), transform)
    x = torch.stack([images[i][0] for i in range(len(images))])
    with torch.no_grad():
        _, attention = model.head.attn.forward_with_attention(model.forward_body(x))
    assert attention.shape == (10, TINY_POSITIONS, TINY_POSITIONS)
    torch.testing.assert_close(attention.sum(-1), torch.ones(10, TINY_POSITIONS))
    assert attention.amax(-1).mean() < 0.9  # rows spread over the map, not collapsed to one position
    assert (attention.amax(-1) - attention.amin(-1)).mean() > 1e-3  # and not uniform either
    diagnostics = metrics(trained_run)[-1]['val']['attention']
    assert diagnostics['positions'] == TINY_POSITIONS and 0 < diagnostics['entropy_ratio'] < 1


def test_resume_reaches_the_uninterrupted_weights_and_metrics(trained_run, tmp_path, capsys):
    assert train(*TRAINED_RUN, '--max-steps', '13', '--output-dir', str(tmp_path)) == 0
    assert len(metrics(tmp_path)) == 1  # stopped in the second epoch, before its evaluation
    capsys.readouterr()
    assert train(*TRAINED_RUN, '--resume', 'latest', '--output-dir', str(tmp_path)) == 0
    assert 'resumed from' in capsys.readouterr().out
    assert_same_weights(latest_weights(tmp_path), latest_weights(trained_run))
    uninterrupted, interrupted = metrics(trained_run)[-1], metrics(tmp_path)[-1]
    assert interrupted['val'] == uninterrupted['val']
    # the resumed epoch's loss covers the whole epoch, the steps before the stop included
    assert interrupted['train_loss'] == pytest.approx(uninterrupted['train_loss'], rel=1e-5)


@pytest.mark.parametrize('sched', ['plateau', 'step', 'cosine'])
def test_a_finished_run_resumed_with_more_epochs_trains_them(tmp_path, sched, capsys):
    flags = [*TINY_TRAIN, '--sched', sched, '--decay-epochs', '1', '--lr', '0.01', '--output-dir', str(tmp_path)]
    assert train(*flags, '--epochs', '2') == 0
    capsys.readouterr()
    assert train(*flags, '--epochs', '4', '--resume', 'latest') == 0
    out = capsys.readouterr().out
    assert 'epochs 2 -> 4' in out and ('continues' if sched == 'plateau' else 're-planned for 4 epochs') in out
    lines = metrics(tmp_path)
    assert [m['epoch'] for m in lines] == [0, 1, 2, 3]
    lrs = [m['lr'] for m in lines]
    if sched == 'plateau':
        assert lrs == pytest.approx([0.01] * 4)  # patience 2: no decay yet in these few epochs
        return
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    scheduler = build_scheduler(optimizer, RunConfig(sched=sched, epochs=4, decay_epochs=1, lr=0.01))
    expected = []
    for epoch in range(4):
        expected.append(optimizer.param_groups[0]['lr'])
        scheduler.step(epoch + 1)
    assert lrs[2:] == pytest.approx(expected[2:])  # timm's schedule of the new length from the resumed epoch on
    if sched == 'step':
        assert lrs == pytest.approx([0.01, 0.001, 0.0001, 0.00001])


def test_resume_auto_starts_fresh_then_resumes(tmp_path, capsys):
    flags = [*TINY_TRAIN, '--epochs', '1', '--resume', 'auto', '--output-dir', str(tmp_path)]
    assert train(*flags) == 0
    assert 'no checkpoint yet, a fresh run' in capsys.readouterr().out
    assert train(*flags) == 0  # a requeued finished run: nothing left to train
    assert 'resumed from' in capsys.readouterr().out and len(metrics(tmp_path)) == 1


def body_file(tmp_path: Path, name: str, **kwargs) -> Path:
    torch.manual_seed(1)
    body = timm.create_model(name, **kwargs)
    path = tmp_path / f'{name}.safetensors'
    save_file({k: v.contiguous() for k, v in body.state_dict().items()}, str(path))
    return path


def test_pretrained_path_loads_the_body_file_into_a_frozen_body(tmp_path):
    weights = body_file(tmp_path, 'test_resnet')
    out = tmp_path / 'run'
    assert train(*TINY_TRAIN, '--epochs', '1', '--freeze-body', '--pretrained-path', str(weights),
                 '--output-dir', str(out)) == 0
    exported, saved = load_file(out / 'best' / 'model.safetensors'), load_file(weights)
    body = {k[len('body.'):]: v for k, v in exported.items() if k.startswith('body.')}
    assert body and all(torch.equal(v, saved[k]) for k, v in body.items())  # layers after layer2 are pruned
    config = json.loads((out / 'best' / 'config.json').read_text())
    assert config['training']['pretrained_path'] == str(weights.resolve())
    state = json.loads((out / 'checkpoints' / 'checkpoint_0' / 'run_state.json').read_text())
    assert state['identity']['pretrained_path'] == str(weights.resolve())


def test_pretrained_path_through_the_body_filter_and_a_file_that_does_not_fit(tmp_path, capsys):
    from ssa_timm.train import build_model
    weights = body_file(tmp_path, 'test_vit')  # its own grid; the model reads 64 px: pos_embed is resampled
    config = RunConfig.from_mapping(dict(model='ssanet_test_vit_plus', img_size=64, pretrained_path=str(weights)))
    model = build_model(config, 3)
    saved = load_file(weights)
    assert model.body.pos_embed.shape != saved['pos_embed'].shape
    torch.testing.assert_close(model.body.blocks[0].attn.qkv.weight, saved['blocks.0.attn.qkv.weight'])
    other = body_file(tmp_path, 'resnet18')
    assert train(*TINY_TRAIN, '--pretrained-path', str(other), '--output-dir', str(tmp_path / 'run')) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f'error: body weights {other} do not fit the body')


def test_initial_checkpoint_loads_a_whole_ssanet(trained_run, tmp_path):
    from ssa_timm.train import build_model, load_initial_checkpoint
    config = RunConfig.from_mapping(dict(zip(['model', 'img_size', 'body_feature_index', 'qk_norm'],
                                             ['ssanet_test_resnet_plus', 32, 2, True])))
    exported = load_file(trained_run / 'best' / 'model.safetensors')
    same = build_model(config, 10)
    assert load_initial_checkpoint(same, trained_run / 'best') == []
    assert all(torch.equal(same.state_dict()[k], v) for k, v in exported.items())  # the heads too: 10 classes
    fewer = build_model(config, 3)
    notes = load_initial_checkpoint(fewer, trained_run / 'best')
    assert len(notes) == 1 and 'has 10 classes and this run 3' in notes[0] and 'start fresh' in notes[0]
    fewer = fewer.state_dict()
    for key, value in exported.items():
        if key.startswith(('head.ssa.fc.', 'head.fe.fc.')):
            assert fewer[key].shape[0] == 3  # new classifiers for 3 classes
        else:
            assert torch.equal(fewer[key], value), key
    one_head = RunConfig.from_mapping(dict(model='ssanet_test_resnet_no_attention', img_size=32, body_feature_index=2))
    with pytest.raises(UserError, match='do not fit .* unexpected'):  # a plus export is not a no_attention model
        load_initial_checkpoint(build_model(one_head, 3), trained_run / 'best')


def test_deterministic_runs_print_identical_metrics(tmp_path):
    flags = [*TINY_TRAIN, '--epochs', '2', '--deterministic', '--workers', '2']
    for name in ('a', 'b'):
        assert train(*flags, '--output-dir', str(tmp_path / name)) == 0
    timeless = lambda out: [{k: v for k, v in m.items() if k != 'images_per_s'} for m in metrics(out)]  # noqa: E731
    assert timeless(tmp_path / 'a') == timeless(tmp_path / 'b')
    assert torch.are_deterministic_algorithms_enabled() and torch.get_num_threads() == 1


def test_builtin_families_share_no_glyph_and_are_recorded(tmp_path):
    base = BuiltinFineGrained('train', samples_per_class=1)
    other = BuiltinFineGrained('train', samples_per_class=1, family=1)
    assert not set(base.classes) & set(other.classes)
    glyphs = [g for d in (base, other) for g in (*d.class_glyphs, *d.distractor_glyphs)]
    assert min((a != b).sum() for i, a in enumerate(glyphs) for b in glyphs[i + 1:]) >= 4
    assert train(*TINY_TRAIN, '--epochs', '1', '--builtin-family', '1', '--output-dir', str(tmp_path)) == 0
    config = json.loads((tmp_path / 'best' / 'config.json').read_text())
    assert config['label_names'][0] == 'glyph_14'
    state = json.loads((tmp_path / 'checkpoints' / 'checkpoint_0' / 'run_state.json').read_text())
    assert state['identity']['builtin_family'] == 1


def test_cached_features_match_uncached_frozen_run(tmp_path):
    frozen = [*TINY_TRAIN, '--epochs', '2', '--freeze-body']
    assert train(*frozen, '--output-dir', str(tmp_path / 'plain')) == 0
    assert train(*frozen, '--cache-features', '--output-dir', str(tmp_path / 'cached')) == 0
    plain, cached = metrics(tmp_path / 'plain'), metrics(tmp_path / 'cached')
    for a, b in zip(plain, cached):
        assert b['train_loss'] == pytest.approx(a['train_loss'], rel=1e-4)
        for head in ('ssa', 'fe'):
            assert b['val']['heads'][head]['top1'] == pytest.approx(a['val']['heads'][head]['top1'])
        assert b['val']['output']['top1'] == pytest.approx(a['val']['output']['top1'])
        assert b['val']['attention']['alpha'] == pytest.approx(a['val']['attention']['alpha'], abs=1e-6)
        assert b['val']['attention']['entropy'] == pytest.approx(a['val']['attention']['entropy'], rel=1e-4)
    cache = tmp_path / 'cached' / 'feature_cache'
    assert len(list(cache.glob('train-*.json'))) == 1 and len(list(cache.glob('val-*.json'))) == 1


def test_resume_refuses_a_checkpoint_of_another_model(trained_run, tmp_path, capsys):
    ckpt = trained_run / 'checkpoints' / 'checkpoint_0'
    other = [a if a != 'ssanet_test_resnet_plus' else 'ssanet_test_resnet_multiply' for a in TRAINED_RUN]
    assert train(*other, '--resume', str(ckpt), '--output-dir', str(tmp_path)) == 1
    assert ("was saved by a run with model='ssanet_test_resnet_plus'; this run has "
            "model='ssanet_test_resnet_multiply'") in capsys.readouterr().err
    assert train(*TINY_TRAIN, '--resume', 'latest', '--output-dir', str(tmp_path / 'empty')) == 1
    assert 'no checkpoint under' in capsys.readouterr().err


def test_bad_dataset_and_flags(tmp_path, capsys):
    assert train(*TINY_TRAIN, '--dataset', 'cub', '--data-dir', str(tmp_path), '--output-dir', str(tmp_path / 'o')) == 1
    assert 'images.txt' in capsys.readouterr().err
    assert train(*TINY_TRAIN, '--cache-features') == 2
    assert '--cache-features needs --freeze-body' in capsys.readouterr().err
    assert train(*TINY_TRAIN, '--qk-norm', '--scale-attn') == 2
    assert '--qk-norm and --scale-attn exclude each other' in capsys.readouterr().err


def evaluate(*argv: str) -> int:
    return run_main('evaluate', *argv)


def test_evaluate_reports_heads_per_class_and_confusion(trained_run, tmp_path):
    out = tmp_path / 'eval.json'
    assert evaluate('--model', str(trained_run / 'best'), '--builtin-val-per-class', '5', '--workers', '0',
                    '--tta', 'flip', '--output', str(out)) == 0
    report = json.loads(out.read_text())
    assert report['count'] == VAL_SIZE and report['img_size'] == 32
    best = json.loads((trained_run / 'best' / 'config.json').read_text())['metrics']
    entries = [(report['heads'][h], best['heads'][h]) for h in ('ssa', 'fe')] + [(report['output'], best['output'])]
    for got, exported in entries:
        assert got['top1'] == pytest.approx(exported['top1'])  # the export is the best epoch's model
        confusion = torch.tensor(got['confusion_matrix'])
        assert confusion.shape == (10, 10) and confusion.sum() == VAL_SIZE
        assert got['top1'] == pytest.approx(confusion.diag().sum().item() / VAL_SIZE * 100)
    assert len(report['output']['per_class_top1']) == 10
    assert set(report['tta']) == {'heads', 'output'} and 0 <= report['tta']['output']['top1'] <= 100
    assert report['attention']['alpha'] == pytest.approx(best['attention']['alpha'], abs=1e-6)
    assert report['attention']['entropy'] == pytest.approx(best['attention']['entropy'], rel=1e-4)


def test_evaluate_refuses_other_architectures_and_class_counts(trained_run, tmp_path, capsys):
    save_for_hf(timm.create_model('test_resnet', num_classes=10), str(tmp_path / 'resnet'), safe_serialization=True)
    assert evaluate('--model', str(tmp_path / 'resnet'), '--workers', '0') == 1
    assert "config.json describes a 'test_resnet' model, not an SSANet" in capsys.readouterr().err
    assert evaluate('--model', str(tmp_path), '--workers', '0') != 0
    assert 'has no config.json' in capsys.readouterr().err
    assert evaluate('--model', str(trained_run / 'best'), '--dataset', 'imagefolder', '--data-dir',
                    str(make_image_folder(tmp_path / 'folder')), '--workers', '0') == 1
    assert "the val split has class(es) ['cat', 'dog'] that the model" in capsys.readouterr().err


assert ssa_timm  # registers the models for local-dir: loading



def test_resuming_a_cosine_attention_run_with_another_attention_is_one_line(tmp_path, capsys):
    out = tmp_path / 'run'
    assert train(*TINY_TRAIN, '--epochs', '1', '--output-dir', str(out)) == 0  # qk_norm: the generic body's default
    capsys.readouterr()
    assert train(*TINY_TRAIN, '--epochs', '2', '--output-dir', str(out), '--resume', 'latest', '--scale-attn') == 1
    err = capsys.readouterr().err
    assert 'Traceback' not in err and err.count('error: ') == 1 and "'qk_norm': True" in err, err[-2000:]
    assert train(*TINY_TRAIN, '--epochs', '2', '--output-dir', str(out), '--resume', 'latest') == 0  # its own attention
