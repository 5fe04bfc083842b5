"""Fault injection: every way a realistic user breaks a run (issue 10's table), against the real
recipes in subprocesses. Each try ends with the correct result or one ``error: ...`` line and a
non-zero exit, never a traceback, and leaves every file of an earlier run as it was. Kill tests
send SIGKILL to a real training process while it writes a checkpoint or its best export, then
resume and compare with the uninterrupted run."""
import hashlib
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fixtures import ROOT, TINY_TRAIN, TRAINED_RUN, run_python, run_recipe, write_image
from ssa_timm import SelfADLoss
from ssa_timm.data import DatasetLayoutError, build_dataset
from ssa_timm.run_dir import atomic_dir, restore_interrupted

# Runs train.py with SelfADLoss returning NaN from its argv[1]-th call on: a run whose loss diverges.
NAN_FROM_STEP = """
import runpy, sys
import ssa_timm.loss
first, script = int(sys.argv[1]), sys.argv[2]
forward, calls = ssa_timm.loss.SelfADLoss.forward, []
def diverging(self, logits, target):
    calls.append(1)
    loss = forward(self, logits, target)
    return loss * float('nan') if len(calls) >= first else loss
ssa_timm.loss.SelfADLoss.forward = diverging
sys.argv = sys.argv[2:]
runpy.run_path(script, run_name='__main__')
"""

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


def files_of(folder: Path) -> dict:
    """Relative path -> SHA-256 of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob('*')) if p.is_file()}


def copy_run(trained_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / 'run'
    shutil.copytree(trained_run, out)
    return out


def assert_user_error(proc: subprocess.CompletedProcess, message: str, code: int = 1) -> None:
    """Exit ``code``, ``message`` on stderr, no traceback; recipe errors as one ``error:`` line."""
    assert proc.returncode == code, proc.stdout[-1500:] + proc.stderr[-3000:]
    assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    if code == 1:
        assert lines[-1].startswith('error: ') and message in lines[-1], proc.stderr[-3000:]
    else:
        assert message in proc.stderr, proc.stderr[-3000:]


def train(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return run_recipe('train.py', *args, check=False, **kwargs)


def latest_weights(out: Path) -> dict:
    newest = max((out / 'checkpoints').glob('checkpoint_*'), key=lambda p: int(p.name.split('_')[-1]))
    return load_file(newest / 'model.safetensors')


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


# rows 1, 2: one class list per run

def folder_dataset(root: Path, train_classes, val_classes) -> Path:
    n = 0
    for split, classes in (('train', train_classes), ('val', val_classes)):
        for c in classes:
            for k in range(4):
                n += 1
                write_image(root / split / c / f'{k}.png', n)
    return root


def test_validation_classes_follow_the_training_classes(tmp_path):
    root = folder_dataset(tmp_path / 'data', ('a', 'b', 'c'), ('a', 'c'))
    train_set = build_dataset('imagefolder', 'train', str(root))
    val = build_dataset('imagefolder', 'val', str(root), classes=train_set.classes)
    assert val.classes == ['a', 'b', 'c'] and sorted(set(val.targets)) == [0, 2]  # 'c' keeps index 2, not 1
    assert val.missing_classes == ['b']
    extra = folder_dataset(tmp_path / 'extra', ('a', 'b'), ('a', 'b', 'x'))
    with pytest.raises(DatasetLayoutError, match=r"class\(es\) \['x'\] that the training split lacks"):
        build_dataset('imagefolder', 'val', str(extra), classes=['a', 'b'])


def test_run_reports_missing_and_refuses_unknown_validation_classes(tmp_path):
    args = ['--dataset', 'imagefolder', '--model', 'ssanet_test_resnet_plus', '--no-pretrained', '--img-size', '32',
            '--batch-size', '4', '--workers', '0', '--epochs', '1']
    root = folder_dataset(tmp_path / 'missing', ('a', 'b', 'c'), ('a', 'c'))
    proc = train(*args, '--data-dir', str(root), '--output-dir', str(tmp_path / 'ok'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no images of 1 training class(es): ['b']" in proc.stdout
    report = json.loads((tmp_path / 'ok' / 'metrics.jsonl').read_text())['val']
    assert report['count'] == 8
    root = folder_dataset(tmp_path / 'extra', ('a', 'b'), ('a', 'b', 'x'))
    proc = train(*args, '--data-dir', str(root), '--output-dir', str(tmp_path / 'refused'))
    assert_user_error(proc, "the val split has class(es) ['x'] that the training split lacks")
    assert not (tmp_path / 'refused' / 'metrics.jsonl').exists()


# rows 3, 4, 5: output folders are owned

def test_existing_run_is_refused_unless_resumed_or_overwritten(trained_run, tmp_path):
    out = copy_run(trained_run, tmp_path)
    before = files_of(out)
    proc = train(*TRAINED_RUN, '--output-dir', str(out))
    assert_user_error(proc, f'--output-dir {out} already holds a run (checkpoints, best, metrics.jsonl)')
    assert 'process 0/1' not in proc.stdout  # refused before loading data or model
    assert files_of(out) == before
    proc = train(*TINY_TRAIN, '--epochs', '1', '--overwrite', '--output-dir', str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (out / 'checkpoints').iterdir()) == ['checkpoint_0']
    assert not (out / '.replaced').exists()  # the old run, set aside, went with the new run's first checkpoint
    assert len((out / 'metrics.jsonl').read_text().splitlines()) == 1


def test_a_folder_in_use_is_refused_and_a_stale_lock_taken_over(tmp_path):
    out = tmp_path / 'run'
    out.mkdir()
    (out / '.lock').write_text(json.dumps({'pid': os.getpid(), 'host': socket.gethostname()}))
    proc = train(*TINY_TRAIN, '--epochs', '1', '--output-dir', str(out))
    assert_user_error(proc, f'{out} is in use by another run (pid {os.getpid()}')
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
    (out / '.lock').write_text(json.dumps({'pid': int(dead.stdout), 'host': socket.gethostname()}))
    proc = train(*TINY_TRAIN, '--epochs', '1', '--output-dir', str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (out / '.lock').exists()  # released at the end


def test_two_concurrent_runs_into_one_folder(tmp_path):
    out = tmp_path / 'run'
    command = [sys.executable, str(ROOT / 'recipes' / 'train.py'), *TINY_TRAIN, '--epochs', '1', '--output-dir', str(out)]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    procs = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 1], results
    refused = next(err for code, _, err in results if code == 1)
    # refused while the other runs, or (if it started late on a busy machine) because the other's run is there
    assert ('is in use by another run' in refused or 'already holds a run' in refused) and 'Traceback' not in refused
    assert len((out / 'metrics.jsonl').read_text().splitlines()) == 1


def test_output_dir_that_is_a_file(tmp_path):
    target = tmp_path / 'file'
    target.write_text('keep me')
    proc = train(*TINY_TRAIN, '--output-dir', str(target))
    assert_user_error(proc, f'--output-dir {target} is a file, not a folder')
    assert 'process 0/1' not in proc.stdout and target.read_text() == 'keep me'


# rows 6, 7, 8: checkpoints

def test_resume_on_other_data_is_refused_naming_the_field(trained_run, tmp_path):
    out = copy_run(trained_run, tmp_path)
    before = files_of(out)
    other = [*TRAINED_RUN, '--builtin-train-per-class', '9']
    proc = train(*other, '--resume', 'latest', '--output-dir', str(out))
    assert_user_error(proc, 'was saved by a run with train_samples=80; this run has train_samples=90')
    proc = train(*TRAINED_RUN, '--lr', '0.01', '--resume', 'latest', '--output-dir', str(out))
    assert_user_error(proc, 'was saved by a run with lr=0.001; this run has lr=0.01')  # its optimizer state would win
    assert files_of(out) == before


@pytest.mark.parametrize('damaged', ['model.safetensors', 'optimizer.bin', 'run_state.json'])
def test_resume_latest_skips_a_damaged_newest_checkpoint(trained_run, tmp_path, damaged):
    out = copy_run(trained_run, tmp_path)
    path = out / 'checkpoints' / 'checkpoint_1' / damaged
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    proc = train(*TRAINED_RUN, '--resume', str(path.parent), '--output-dir', str(out))
    assert_user_error(proc, f'{path} is damaged')
    if damaged != 'model.safetensors':
        return  # the fallback below is the same for every damaged file: run it once
    proc = train(*TRAINED_RUN, '--resume', 'latest', '--output-dir', str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f'warning: skipping checkpoint {path.parent}: {path} is damaged' in proc.stdout
    assert 'resumed from' in proc.stdout and 'checkpoint_0' in proc.stdout
    assert_same_weights(latest_weights(out), latest_weights(trained_run))  # epoch 1 again, to the same weights


def kill_during_write(marker: str, out: Path, *args: str) -> None:
    killed = run_python('-c', KILL_DURING_WRITE, marker, str(ROOT / 'recipes' / 'train.py'), *TRAINED_RUN, *args,
                        '--output-dir', str(out), check=False)
    assert killed.returncode == -9, killed.stderr[-3000:]  # the marker was reached


def test_sigkill_while_writing_a_checkpoint_then_resume(trained_run, tmp_path):
    out = tmp_path / 'run'
    kill_during_write('.checkpoint_1.tmp', out)  # at the end of epoch 1, its export already written
    assert sorted(p.name for p in (out / 'checkpoints').iterdir() if not p.name.startswith('.')) == ['checkpoint_0']
    assert list((out / 'checkpoints').glob('.checkpoint_1.tmp/model.safetensors'))  # the partial one
    resumed = train(*TRAINED_RUN, '--resume', 'latest', '--output-dir', str(out))
    assert resumed.returncode == 0 and 'checkpoint_0' in resumed.stdout, resumed.stderr[-3000:]
    assert_same_weights(latest_weights(out), latest_weights(trained_run))
    assert [json.loads(x)['epoch'] for x in (out / 'metrics.jsonl').read_text().splitlines()] == [0, 1]
    assert not list(out.rglob('.*.tmp*')) and not (out / '.lock').exists()


def test_sigkill_while_exporting_best_then_resume(trained_run, tmp_path):
    out = tmp_path / 'run'
    train(*TRAINED_RUN, '--max-steps', '5', '--output-dir', str(out))  # a mid-epoch checkpoint, no export yet
    kill_during_write('.best.tmp', out, '--resume', 'latest')  # the end of epoch 0: killed inside the export
    assert not (out / 'best').exists() and list(out.glob('.best.tmp-*'))
    resumed = train(*TRAINED_RUN, '--resume', 'latest', '--output-dir', str(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(latest_weights(out), latest_weights(trained_run))
    assert_same_weights(load_file(out / 'best' / 'model.safetensors'), load_file(trained_run / 'best' / 'model.safetensors'))
    assert not list(out.glob('.best.*'))


def test_replacing_an_export_keeps_a_complete_one_at_every_moment(tmp_path):
    """atomic_dir: a failure while writing leaves the old folder; a kill between its two renames is
    repaired by restore_interrupted."""
    final = tmp_path / 'best'
    final.mkdir()
    (final / 'weights').write_text('old')
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / 'weights').write_text('half')
            raise RuntimeError('killed')
    assert (final / 'weights').read_text() == 'old' and sorted(p.name for p in tmp_path.iterdir()) == ['best']
    final.rename(tmp_path / '.best.old')  # the state after the first rename of a replacement
    restore_interrupted(final)
    assert (final / 'weights').read_text() == 'old'
    with atomic_dir(final) as tmp:
        (tmp / 'weights').write_text('new')
    assert (final / 'weights').read_text() == 'new' and sorted(p.name for p in tmp_path.iterdir()) == ['best']


def test_resume_runs_no_code_from_a_checkpoint_folder(trained_run, tmp_path):
    out = copy_run(trained_run, tmp_path)
    marker = tmp_path / 'code_ran'

    class Payload:
        def __reduce__(self):
            return open, (str(marker), 'w')

    for name in ('random_states_0.pkl', 'custom_checkpoint_0.pkl'):
        (out / 'checkpoints' / 'checkpoint_0' / name).write_bytes(pickle.dumps(Payload()))
    train(*TRAINED_RUN, '--resume', str(out / 'checkpoints' / 'checkpoint_0'), '--output-dir', str(out))
    assert not marker.exists()


# rows 9, 10, 11: arguments are checked at parse time

@pytest.mark.parametrize('flag,value', [('--batch-size', '0'), ('--epochs', '0'), ('--workers', '-1'),
                                        ('--grad-accum', '0'), ('--img-size', '0'), ('--lr', '-1'), ('--lr', 'nan')])
def test_train_arguments_checked_at_parse_time(flag, value, capsys):
    sys.path.insert(0, str(ROOT / 'recipes'))
    import train as recipe
    with pytest.raises(SystemExit) as exit_info:
        recipe.parse_args([*TINY_TRAIN, flag, value])
    assert exit_info.value.code == 2 and f'argument {flag}:' in capsys.readouterr().err


def test_trackers_devices_and_body_index_checked_at_parse_time(monkeypatch, capsys):
    import accelerate.utils
    sys.path.insert(0, str(ROOT / 'recipes'))
    import predict
    import train as recipe

    def refused(parse, argv, message):
        with pytest.raises(SystemExit) as exit_info:
            parse(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err

    refused(recipe.parse_args, [*TINY_TRAIN, '--log-with', 'nosuch'], "'nosuch' is not an accelerate tracker")
    monkeypatch.setattr(accelerate.utils, 'is_wandb_available', lambda: False)
    refused(recipe.parse_args, [*TINY_TRAIN, '--log-with', 'wandb'], 'wandb: its package is not installed')
    monkeypatch.setattr(accelerate.utils, 'is_wandb_available', lambda: True)
    assert recipe.parse_args([*TINY_TRAIN, '--log-with', 'wandb']).log_with == ['wandb']
    refused(recipe.parse_args, [*TINY_TRAIN, '--body-feature-index', '9'], 'body_feature_index must be in [-5, 5)')
    refused(predict.parse_args, ['x.jpg', '--model', 'm', '--device', 'cuda:64'], 'CUDA device(s)')
    refused(predict.parse_args, ['x.jpg', '--model', 'm', '--device', 'gpu0'], 'expected a torch device')


def test_parse_errors_are_one_line_without_traceback(tmp_path):
    assert_user_error(train(*TINY_TRAIN, '--batch-size', '0', '--output-dir', str(tmp_path)),
                      'argument --batch-size: must be at least 2', code=2)


def test_train_image_size_below_the_body_minimum(tmp_path):
    proc = train('--model', 'ssanet_vit_small_patch16_384_plus', '--img-size', '8', '--output-dir', str(tmp_path))
    assert_user_error(proc, 'cannot read a 8x8 px input', code=2)


# rows 11, 12, 13: predict and export

@pytest.fixture
def image(tmp_path) -> Path:
    write_image(tmp_path / 'image.png', 0)
    return tmp_path / 'image.png'


@pytest.mark.parametrize('top_k', ['0', '-2'])
def test_predict_top_k_checked(trained_run, image, top_k):
    proc = run_recipe('predict.py', '--model', str(trained_run / 'best'), str(image), '--top-k', top_k, check=False)
    assert_user_error(proc, 'argument --top-k: must be at least 1', code=2)


def test_predict_with_no_readable_image(trained_run, tmp_path):
    (tmp_path / 'bad').mkdir()
    (tmp_path / 'bad' / 'a.jpg').write_bytes(b'not an image')
    proc = run_recipe('predict.py', '--model', str(trained_run / 'best'), str(tmp_path / 'bad'), check=False)
    assert_user_error(proc, 'none of the 1 image file(s) could be read')
    (tmp_path / 'empty').mkdir()
    proc = run_recipe('predict.py', '--model', str(trained_run / 'best'), str(tmp_path / 'empty'), check=False)
    assert_user_error(proc, 'no images found in')


def test_export_writes_into_a_new_folder_and_checks_paths_first(trained_run, tmp_path):
    target = tmp_path / 'missing_dir' / 'm.onnx'
    proc = run_recipe('export.py', '--model', str(trained_run / 'best'), '--onnx', str(target), check=False)
    assert proc.returncode == 0 and target.stat().st_size > 0, proc.stderr[-3000:]
    (tmp_path / 'a_file').write_text('')
    proc = run_recipe('export.py', '--model', str(trained_run / 'best'), '--torchscript',
                      str(tmp_path / 'a_file' / 'm.pt'), check=False)
    assert_user_error(proc, f'folder of the --torchscript {tmp_path / "a_file"} is a file, not a folder')


# rows 14, 15: damaged exports and missing downloads name the file

@pytest.mark.parametrize('damage,message', [
    ('truncate', 'model.safetensors is damaged or truncated'),
    ('bad_json', 'config.json is not valid JSON'),
    ('other_architecture', "config.json describes a 'resnet18' model, not an SSANet"),
])
def test_damaged_export_names_the_file(trained_run, tmp_path, image, damage, message):
    export = tmp_path / 'export'
    shutil.copytree(trained_run / 'best', export)
    if damage == 'truncate':
        weights = export / 'model.safetensors'
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == 'bad_json':
        (export / 'config.json').write_text('{"architecture": ')
    else:
        config = json.loads((export / 'config.json').read_text())
        (export / 'config.json').write_text(json.dumps(dict(config, architecture='resnet18')))
    recipes = [('predict.py', [str(image)])] + ([('evaluate.py', ['--workers', '0'])] if damage == 'truncate' else [])
    for recipe, extra in recipes:  # the same loader serves every recipe
        proc = run_recipe(recipe, '--model', f'local-dir:{export}', *extra, check=False)
        assert_user_error(proc, message)
        assert str(export) in proc.stderr


def test_offline_without_cached_weights_names_the_repo(tmp_path, image):
    env = {'HF_HUB_OFFLINE': '1', 'HF_HOME': str(tmp_path / 'empty_cache')}
    proc = run_recipe('predict.py', '--model', 'hf-hub:someone/not-cached', str(image), env=env, check=False)
    assert_user_error(proc, 'config.json of someone/not-cached is not in the Hugging Face cache and HF_HUB_OFFLINE is set')
    proc = train('--model', 'ssanet_resnet18_plus', '--pretrained', '--epochs', '1', '--builtin-train-per-class', '1',
                 '--builtin-val-per-class', '1', '--output-dir', str(tmp_path / 'run'), env=env)
    assert_user_error(proc, 'of timm/resnet18.a1_in1k is not in the Hugging Face cache and HF_HUB_OFFLINE is set')


# row 16: non-finite training

@pytest.mark.parametrize('kwargs', [dict(temperature=float('nan')), dict(temperature=0.0), dict(gamma=-5.0),
                                    dict(gamma=float('inf'))])
def test_self_ad_loss_refuses_bad_settings(kwargs):
    with pytest.raises(ValueError):
        SelfADLoss(**kwargs)


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(trained_run, tmp_path):
    out = tmp_path / 'run'
    train(*TRAINED_RUN, '--max-steps', '10', '--output-dir', str(out))  # epoch 0 and its checkpoint
    epoch0 = json.loads((out / 'metrics.jsonl').read_text())
    uninterrupted = json.loads((trained_run / 'metrics.jsonl').read_text().splitlines()[0])
    assert epoch0['train_loss'] == pytest.approx(uninterrupted['train_loss'], rel=1e-5)  # stopped at the epoch's end
    before = files_of(out)
    proc = run_python('-c', NAN_FROM_STEP, '3', str(ROOT / 'recipes' / 'train.py'), *TRAINED_RUN, '--resume', 'latest',
                      '--output-dir', str(out), check=False)
    assert_user_error(proc, 'the training loss became NaN or infinite at epoch 1, step 13')  # 3rd step of epoch 1
    assert files_of(out) == before  # no checkpoint, export or metrics line of the diverged epoch
