"""The slow tier: behaviour whose subject is a process boundary. ``accelerate launch`` with two CPU
processes (gloo), SIGKILL while a checkpoint or an export is written, SIGTERM to a real training
process, two runs racing for one folder, errors that must reach a terminal as one line without a
traceback, a fresh interpreter with an empty Hugging Face cache, and the ablation recipe, which
starts a train.py process per configuration."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from recipe_runs import ROOT, TINY_TRAIN, TRAINED_RUN, TWO_CPU_PROCESSES, run_python, run_recipe
from run_outputs import assert_same_weights, latest_weights, metrics

pytestmark = pytest.mark.slow

# Runs train.py, but SIGKILLs the process right after it writes a safetensors file whose path holds
# argv[1]: a kill in the middle of a checkpoint or an export, with part of its files on disk.
KILL_DURING_WRITE = """
import os, runpy, signal, sys
import safetensors.torch
marker, script = sys.argv[1], sys.argv[2]
save_file = safetensors.torch.save_file
def save_then_die(tensors, filename, *args, **kwargs):
    save_file(tensors, filename, *args, **kwargs)
    if marker in str(filename):
        os.kill(os.getpid(), signal.SIGKILL)
safetensors.torch.save_file = save_then_die
sys.argv = sys.argv[2:]
runpy.run_path(script, run_name='__main__')
"""
ALL_FLAGS = ['--model-ema', '--clip-grad', '1.0', '--channels-last', '--grad-checkpointing', '--tta', 'flip',
             '--sched', 'cosine', '--warmup-epochs', '1', '--body-lr-scale', '0.1', '--layer-decay', '0.8', '--zoom']


def assert_user_error(proc: subprocess.CompletedProcess, message: str, code: int = 1) -> None:
    """Exit ``code``, ``message`` on stderr, no traceback; user errors as one last ``error:`` line."""
    assert proc.returncode == code, proc.stdout[-1500:] + proc.stderr[-3000:]
    assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    if code == 1:
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith('error: ') and message in last, proc.stderr[-3000:]
    else:
        assert message in proc.stderr, proc.stderr[-3000:]


def test_two_process_cpu_run_with_every_flag(tmp_path):
    proc = run_recipe('train.py', '--cpu', *TINY_TRAIN, '--epochs', '2', *ALL_FLAGS, '--output-dir', str(tmp_path),
                      launcher=TWO_CPU_PROCESSES)
    assert 'process 0/2 on cpu' in proc.stdout and 'process 1/2 on cpu' in proc.stdout
    lines = metrics(tmp_path)
    assert len(lines) == 2 and lines[0]['step'] == 80 // (8 * 2)
    for line in lines:
        val = line['val']
        assert val['count'] == 50 and set(val['tta']) == {'heads', 'output'}  # gathered without padding duplicates
        assert set(val['ema']['heads']) == {'ssa', 'fe'} and 0 <= val['attention']['entropy_ratio'] < 1
    assert (tmp_path / 'checkpoints' / 'checkpoint_1' / 'ema.safetensors').is_file()
    config = json.loads((tmp_path / 'best' / 'config.json').read_text())
    assert config['label_names'][0] == 'glyph_00' and config['model_args']['zoom'] is True


def test_two_processes_train_the_zoom_on_a_frozen_body_from_the_cache(tmp_path):
    """The first pass from the shared cache, the crops through the body, each process its share."""
    proc = run_recipe('train.py', '--cpu', *TINY_TRAIN, '--builtin-task', 'scene', '--builtin-part-cell', '1',
                      '--epochs', '1', '--zoom', '--freeze-body', '--cache-features', '--output-dir', str(tmp_path),
                      launcher=TWO_CPU_PROCESSES)
    assert 'process 1/2 on cpu' in proc.stdout
    (line,) = metrics(tmp_path)
    where = line['val']['localization']
    assert line['val']['count'] == 50 and where['images'] == 50 and 0 < where['zoom_iou'] <= 1
    assert len(list((tmp_path / 'feature_cache').glob('train-*.npy'))) == 1


def test_evaluate_two_processes_gathers_every_image(trained_run, tmp_path):
    out = tmp_path / 'eval.json'
    run_recipe('evaluate.py', '--cpu', '--model', str(trained_run / 'best'), '--builtin-val-per-class', '5',
               '--workers', '0', '--batch-size', '8', '--output', str(out), launcher=TWO_CPU_PROCESSES)
    assert json.loads(out.read_text())['count'] == 50


def kill_during_write(marker: str, out: Path, *args: str) -> None:
    killed = run_python('-c', KILL_DURING_WRITE, marker, str(ROOT / 'recipes' / 'train.py'), *TRAINED_RUN, *args,
                        '--output-dir', str(out), check=False)
    assert killed.returncode == -9, killed.stderr[-3000:]  # the marker was reached


def test_sigkill_while_writing_a_checkpoint_then_resume(trained_run, tmp_path):
    out = tmp_path / 'run'
    kill_during_write('.checkpoint_1.tmp', out)  # at the end of epoch 1, its export already written
    assert sorted(p.name for p in (out / 'checkpoints').iterdir() if not p.name.startswith('.')) == ['checkpoint_0']
    assert list((out / 'checkpoints').glob('.checkpoint_1.tmp-*/model.safetensors'))  # the partial one
    resumed = run_recipe('train.py', *TRAINED_RUN, '--resume', 'latest', '--output-dir', str(out))
    assert 'checkpoint_0' in resumed.stdout
    assert_same_weights(latest_weights(out), latest_weights(trained_run))
    assert [m['epoch'] for m in metrics(out)] == [0, 1]
    assert not list(out.rglob('.*.tmp*')) and not (out / '.lock').exists()


def test_sigkill_while_exporting_best_then_resume(trained_run, tmp_path):
    out = tmp_path / 'run'
    run_recipe('train.py', *TRAINED_RUN, '--max-steps', '5', '--output-dir', str(out))  # a mid-epoch checkpoint
    kill_during_write('.best.tmp', out, '--resume', 'latest')  # the end of epoch 0: killed inside the export
    assert not (out / 'best').exists() and list(out.glob('.best.tmp-*'))
    run_recipe('train.py', *TRAINED_RUN, '--resume', 'latest', '--output-dir', str(out))
    assert_same_weights(latest_weights(out), latest_weights(trained_run))
    assert_same_weights(load_file(out / 'best' / 'model.safetensors'),
                        load_file(trained_run / 'best' / 'model.safetensors'))
    assert not list(out.glob('.best.*'))


def test_sigterm_to_a_training_process(tmp_path):
    out = tmp_path / 'run'
    command = [sys.executable, str(ROOT / 'recipes' / 'train.py'), *TINY_TRAIN, '--builtin-train-per-class', '400',
               '--epochs', '1', '--output-dir', str(out)]
    proc = subprocess.Popen(command, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1'),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # training has started
        if 'training batches per epoch' in line:
            break
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM and 'Traceback' not in stderr, stderr[-3000:]
    assert 'stopped by SIGTERM at epoch 0' in stdout and 'continue with --resume latest' in stdout
    state = json.loads((out / 'checkpoints' / 'checkpoint_0' / 'run_state.json').read_text())
    assert 0 < state['progress']['step_in_epoch'] < 500 and not (out / '.lock').exists()


def test_two_concurrent_runs_into_one_folder(tmp_path):
    out = tmp_path / 'run'
    command = [sys.executable, str(ROOT / 'recipes' / 'train.py'), *TINY_TRAIN, '--epochs', '1',
               '--output-dir', str(out)]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    procs = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 1], results
    refused = next(err for code, _, err in results if code == 1)
    # refused while the other runs, or (if it started late on a busy machine) because the other's run is there
    assert ('is in use by another run' in refused or 'already holds a run' in refused) and 'Traceback' not in refused
    assert len(metrics(out)) == 1


def test_errors_reach_the_terminal_as_one_line(tmp_path):
    proc = run_recipe('train.py', *TINY_TRAIN, '--batch-size', '0', '--output-dir', str(tmp_path), check=False)
    assert_user_error(proc, 'argument --batch-size: must be at least 2', code=2)
    (tmp_path / 'file').write_text('')
    proc = run_recipe('train.py', *TINY_TRAIN, '--output-dir', str(tmp_path / 'file'), check=False)
    assert_user_error(proc, 'is a file, not a folder')


def test_offline_without_cached_weights_names_the_repo(tmp_path):
    from dataset_layouts import write_image
    write_image(tmp_path / 'image.png', 0)
    env = {'HF_HUB_OFFLINE': '1', 'HF_HOME': str(tmp_path / 'empty_cache')}
    proc = run_recipe('predict.py', '--model', 'hf-hub:someone/not-cached', str(tmp_path / 'image.png'), env=env,
                      check=False)
    assert_user_error(proc, 'config.json of someone/not-cached is not in the Hugging Face cache and HF_HUB_OFFLINE '
                            'is set')
    proc = run_recipe('train.py', '--model', 'ssanet_resnet18_plus', '--pretrained', '--epochs', '1',
                      '--builtin-train-per-class', '1', '--builtin-val-per-class', '1', '--output-dir',
                      str(tmp_path / 'run'), env=env, check=False)
    assert_user_error(proc, 'of timm/resnet18.a1_in1k is not in the Hugging Face cache and HF_HUB_OFFLINE is set')


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
    logs = {p: p.read_text() for p in tmp_path.glob('*/train.log')}
    assert len(logs) == 3 and all('process 0/1' in text for text in logs.values())  # each run's train.py output
    run_recipe('ablation.py', *args)
    assert {p: p.read_text() for p in tmp_path.glob('*/train.log')} == logs  # every run was finished: none retrained
    assert (tmp_path / 'ablation.md').read_text() == table


def test_ablation_in_the_transfer_regime(tmp_path):
    small = [a for a in TINY_TRAIN if a not in ('--model', 'ssanet_test_resnet_plus')]
    args = ['--regime', 'transfer', '--body', 'test_resnet', '--seeds', '0', '--variants', 'plus',
            '--losses', 'ad', '--remedies', 'qk-norm', '--epochs', '1', '--pretrain-epochs', '1',
            '--output-dir', str(tmp_path), *small]
    run_recipe('ablation.py', *args)
    body = load_file(tmp_path / 'pretrain_family1' / 'body.safetensors')
    pretrained = json.loads((tmp_path / 'pretrain_family1' / 'best' / 'config.json').read_text())
    assert pretrained['label_names'][0] == 'glyph_14'  # pretrained on another glyph family
    for name in ('plus_ad_seed0', 'plus_qk-norm_ad_seed0'):
        export = load_file(tmp_path / name / 'best' / 'model.safetensors')
        frozen = {k[len('body.'):]: v for k, v in export.items() if k.startswith('body.')}
        assert frozen.keys() == body.keys() and all((frozen[k] == body[k]).all() for k in body)
        assert not (tmp_path / name / 'feature_cache').exists()
    # the two runs share one body-map cache per split (their body, data and seed are the same)
    assert len(list((tmp_path / 'feature_cache').glob('*.npy'))) == 2
    result = json.loads((tmp_path / 'ablation.json').read_text())
    assert result['regime'] == 'transfer' and len(result['runs']) == 2
    table = (tmp_path / 'ablation.md').read_text()
    assert 'transfer: frozen body pretrained on glyph family 1' in table and '| plus --qk-norm |' in table
