"""End-to-end runs of recipes/train.py and recipes/evaluate.py on the built-in dataset (CPU)."""
import json
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.models import save_for_hf

import ssa_timm  # noqa: F401  (registers the models for local-dir: loading)
from fixtures import ROOT, TINY_TRAIN, TRAINED_RUN, TWO_CPU_PROCESSES, make_image_folder, run_recipe

VAL_SIZE = 50


def metrics(out: Path) -> list:
    return [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]


def latest_weights(out: Path) -> dict:
    ckpt = max((out / 'checkpoints').glob('checkpoint_*'), key=lambda p: int(p.name.split('_')[-1]))
    return load_file(ckpt / 'model.safetensors')


@pytest.fixture
def trained(trained_run) -> Path:
    return trained_run


def test_two_process_cpu_run(tmp_path):
    proc = run_recipe('train.py', '--cpu', *TINY_TRAIN, '--epochs', '1', '--output-dir', str(tmp_path), launcher=TWO_CPU_PROCESSES)
    assert 'process 0/2 on cpu' in proc.stdout and 'process 1/2 on cpu' in proc.stdout
    lines = metrics(tmp_path)
    assert len(lines) == 1 and lines[0]['val']['count'] == VAL_SIZE  # gathered without the padding duplicates
    assert 0 <= lines[0]['val']['attention']['entropy_ratio'] <= 1
    assert lines[0]['step'] == 80 // (8 * 2)
    assert (tmp_path / 'checkpoints' / 'checkpoint_0' / 'model.safetensors').is_file()
    assert json.loads((tmp_path / 'best' / 'config.json').read_text())['label_names'][0] == 'glyph_00'


def test_run_writes_metrics_checkpoints_and_export(trained):
    lines = metrics(trained)
    assert [m['epoch'] for m in lines] == [0, 1]
    val = lines[0]['val']
    assert set(val['heads']) == {'ssa', 'fe'} and val['count'] == VAL_SIZE and 'top1' in val['output']
    assert all(m['images_per_s'] > 0 and m['lr'] > 0 for m in lines)
    assert sorted(p.name for p in (trained / 'checkpoints').iterdir()) == ['checkpoint_0', 'checkpoint_1']
    state = json.loads((trained / 'checkpoints' / 'checkpoint_1' / 'run_state.json').read_text())
    assert state['progress']['epoch'] == 2 and state['identity']['classes'][0] == 'glyph_00'
    assert state['identity']['train_samples'] == 80 and state['identity']['model_args'] == {'qk_norm': True}
    assert not list((trained / 'checkpoints' / 'checkpoint_1').glob('custom_checkpoint_*'))  # no pickled state
    model = timm.create_model(f'local-dir:{trained / "best"}', pretrained=True)
    assert model.pretrained_cfg['input_size'] == (3, 32, 32) and model.num_classes == 10


def test_attention_diagnostics_in_every_epoch(trained):
    for line in metrics(trained):
        attention = line['val']['attention']
        assert attention['positions'] == 1  # test_resnet at 32 px: a 1 x 1 map
        assert {'alpha', 'entropy', 'entropy_ratio', 'row_max', 'logit_std'} <= set(attention)
        assert attention['row_max'] == pytest.approx(1.0)  # one position: every row attends to it


def test_resume_reaches_the_uninterrupted_weights_and_metrics(trained, tmp_path):
    stopped = run_recipe('train.py', *TRAINED_RUN, '--max-steps', '13', '--output-dir', str(tmp_path))
    assert len(metrics(tmp_path)) == 1  # stopped in the second epoch, before its evaluation
    assert 'best val top-1' in stopped.stdout
    resumed = run_recipe('train.py', *TRAINED_RUN, '--resume', 'latest', '--output-dir', str(tmp_path))
    assert 'resumed from' in resumed.stdout and 'step 13' in resumed.stdout
    expected, got = latest_weights(trained), latest_weights(tmp_path)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    uninterrupted, interrupted = metrics(trained)[-1], metrics(tmp_path)[-1]
    assert interrupted['val'] == uninterrupted['val']
    # the resumed epoch's loss covers the whole epoch, the steps before the kill included
    assert interrupted['train_loss'] == pytest.approx(uninterrupted['train_loss'], rel=1e-5)


def test_cached_features_match_uncached_frozen_run(tmp_path):
    frozen = [*TINY_TRAIN, '--epochs', '2', '--freeze-backbone']
    run_recipe('train.py', *frozen, '--output-dir', str(tmp_path / 'plain'))
    run_recipe('train.py', *frozen, '--cache-features', '--output-dir', str(tmp_path / 'cached'))
    plain, cached = metrics(tmp_path / 'plain'), metrics(tmp_path / 'cached')
    for a, b in zip(plain, cached):
        assert b['train_loss'] == pytest.approx(a['train_loss'], rel=1e-4)
        for head in ('ssa', 'fe'):
            assert b['val']['heads'][head]['top1'] == pytest.approx(a['val']['heads'][head]['top1'])
        assert b['val']['output']['top1'] == pytest.approx(a['val']['output']['top1'])
        assert b['val']['attention']['alpha'] == pytest.approx(a['val']['attention']['alpha'], abs=1e-6)
    cache = tmp_path / 'cached' / 'feature_cache'
    assert len(list(cache.glob('train-*.json'))) == 1 and len(list(cache.glob('val-*.json'))) == 1


def test_resume_refuses_a_checkpoint_of_another_model(trained, tmp_path):
    ckpt = trained / 'checkpoints' / 'checkpoint_0'
    other = [a if a != 'ssanet_test_resnet_plus' else 'ssanet_test_resnet_multiply' for a in TRAINED_RUN]
    proc = run_recipe('train.py', *other, '--resume', str(ckpt), '--output-dir', str(tmp_path), check=False)
    assert proc.returncode == 1
    assert ("was saved by a run with model='ssanet_test_resnet_plus'; this run has "
            "model='ssanet_test_resnet_multiply'") in proc.stderr
    proc = run_recipe('train.py', *TINY_TRAIN, '--resume', 'latest', '--output-dir', str(tmp_path), check=False)
    assert proc.returncode == 1 and 'no checkpoint under' in proc.stderr


def test_bad_dataset_and_flags(tmp_path):
    proc = run_recipe('train.py', *TINY_TRAIN, '--dataset', 'cub', '--data-dir', str(tmp_path), check=False)
    assert proc.returncode != 0 and 'images.txt' in proc.stderr
    proc = run_recipe('train.py', *TINY_TRAIN, '--cache-features', check=False)
    assert proc.returncode != 0 and '--cache-features needs --freeze-backbone' in proc.stderr
    proc = run_recipe('train.py', *TINY_TRAIN, '--qk-norm', '--scale-attn', check=False)
    assert proc.returncode == 2 and '--qk-norm and --scale-attn exclude each other' in proc.stderr


def test_evaluate_reports_heads_per_class_and_confusion(trained, tmp_path):
    out = tmp_path / 'eval.json'
    run_recipe('evaluate.py', '--model', str(trained / 'best'), '--builtin-val-per-class', '5', '--workers', '0',
        '--tta', 'flip', '--output', str(out))
    report = json.loads(out.read_text())
    assert report['count'] == VAL_SIZE and report['img_size'] == 32
    best = json.loads((trained / 'best' / 'config.json').read_text())['metrics']
    entries = [(report['heads'][h], best['heads'][h]) for h in ('ssa', 'fe')] + [(report['output'], best['output'])]
    for got, exported in entries:
        assert got['top1'] == pytest.approx(exported['top1'])  # the export is the best epoch's model
        confusion = torch.tensor(got['confusion_matrix'])
        assert confusion.shape == (10, 10) and confusion.sum() == VAL_SIZE
        assert got['top1'] == pytest.approx(confusion.diag().sum().item() / VAL_SIZE * 100)
    assert len(report['output']['per_class_top1']) == 10
    assert set(report['tta']) == {'heads', 'output'} and 0 <= report['tta']['output']['top1'] <= 100
    assert report['attention']['alpha'] == pytest.approx(best['attention']['alpha'], abs=1e-6)


def test_evaluate_two_processes_gathers_every_image(trained, tmp_path):
    out = tmp_path / 'eval.json'
    run_recipe('evaluate.py', '--cpu', '--model', str(trained / 'best'), '--builtin-val-per-class', '5', '--workers', '0',
        '--batch-size', '8', '--output', str(out), launcher=TWO_CPU_PROCESSES)
    assert json.loads(out.read_text())['count'] == VAL_SIZE


def test_evaluate_refuses_other_architectures_and_class_counts(trained, tmp_path):
    save_for_hf(timm.create_model('test_resnet', num_classes=10), str(tmp_path / 'resnet'), safe_serialization=True)
    proc = run_recipe('evaluate.py', '--model', str(tmp_path / 'resnet'), '--workers', '0', check=False)
    assert proc.returncode == 1 and "config.json describes a 'test_resnet' model, not an SSANet" in proc.stderr
    proc = run_recipe('evaluate.py', '--model', str(tmp_path), '--workers', '0', check=False)
    assert proc.returncode != 0 and 'has no config.json' in proc.stderr
    proc = run_recipe('evaluate.py', '--model', str(trained / 'best'), '--dataset', 'imagefolder', '--data-dir',
               str(make_image_folder(tmp_path / 'folder')), '--workers', '0', check=False)
    assert proc.returncode == 1 and "the val split has class(es) ['cat', 'dog'] that the model" in proc.stderr



def test_ablation_writes_tables_2_and_3_and_reuses_finished_runs(tmp_path):
    small = [a for a in TINY_TRAIN if a not in ('--model', 'ssanet_test_resnet_plus')]
    args = ['--body', 'test_resnet', '--seeds', '0', '--variants', 'no_attention,plus', '--output-dir', str(tmp_path),
            '--epochs', '1', *small]  # three runs: a Table 2 pair and the plus row of Table 3
    run_recipe('ablation.py', *args)
    result = json.loads((tmp_path / 'ablation.json').read_text())
    assert sorted((r['variant'], r['loss']) for r in result['runs']) == [('no_attention', 'ad'), ('plus', 'ad'),
                                                                          ('plus', 'ce')]
    for r in result['runs']:
        best = json.loads((tmp_path / f'{r["variant"]}_{r["loss"]}_seed0' / 'best' / 'config.json').read_text())
        assert r['top1'] == best['metrics']['output']['top1']
        assert (r['attention'] is None) == (r['variant'] == 'no_attention')
    table = (tmp_path / 'ablation.md').read_text()
    assert '| plus |' in table and '| no_attention |' in table and '87.1 -> 88.4' in table
    assert 'row entropy / uniform' in table and '| alpha |' not in table
    again = run_recipe('ablation.py', *args)
    assert 'process 0/1' not in again.stdout  # every run was finished: nothing retrained
    assert (tmp_path / 'ablation.md').read_text() == table



def test_ablation_configs_cover_tables_and_remedies():
    sys.path.insert(0, str(ROOT / 'recipes'))
    import ablation
    args, _ = ablation.parse_args(['--losses', 'ad,ce', '--remedies', 'qk-norm'])
    configs = ablation.configs(args)
    assert [c for c in configs if c[1] == 'ad' and not c[2]] == [(v, 'ad', '') for v in ablation.PAPER_TABLE2_CUB]
    assert [c[0] for c in configs if c[1] == 'ce' and not c[2]] == list(ablation.PAPER_TABLE3_CUB)
    assert [c for c in configs if c[2]] == [('plus', 'ad', 'qk-norm'), ('plus', 'ce', 'qk-norm')]
    with pytest.raises(SystemExit):
        ablation.parse_args(['--remedies', 'no-such-flag'])
