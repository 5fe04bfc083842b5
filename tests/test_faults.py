"""Fault injection, in this process: every way a realistic user breaks a training run. Each try ends
with the correct result or one ``error: ...`` line and a non-zero exit, and leaves every file of an
earlier run as it was. Stop signals, full disks and stale locks are injected here; the faults that
need a real process boundary (SIGKILL during a write, concurrent runs, tracebacks on the terminal)
are in tests/e2e/test_processes.py."""
import errno
import hashlib
import json
import os
import pickle
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest
from PIL import Image
import torch

from dataset_layouts import write_image
from recipe_runs import TINY_TRAIN, TRAINED_RUN, run_main
from run_outputs import assert_same_weights, latest_weights
from ssa_timm import SelfADLoss
from ssa_timm.data import DatasetLayoutError, build_dataset
from ssa_timm.output_paths import atomic_dir, restore_interrupted
from ssa_timm.run_dir import RunLock
from ssa_timm.train import preemption


def files_of(folder: Path) -> dict:
    """Relative path -> SHA-256 of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob('*')) if p.is_file()}


def copy_run(trained_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / 'run'
    shutil.copytree(trained_run, out)
    return out


def train(*argv: str) -> int:
    return run_main('train', *argv)


def one_error_line(capsys, message: str) -> str:
    """The single ``error:`` line on stderr, which must hold ``message``."""
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith('error: ')]
    assert len(lines) == 1 and message in lines[0] and 'Traceback' not in err, err[-3000:]
    return lines[0]


def no_leftovers(out: Path) -> None:
    assert not list(out.rglob('.*.tmp*')) and not (out / '.lock').exists() and not list(out.glob('.lock.*'))


# one class list per run

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


def test_run_reports_missing_and_refuses_unknown_validation_classes(tmp_path, capsys):
    args = ['--dataset', 'imagefolder', '--model', 'ssanet_test_resnet_plus', '--no-pretrained', '--img-size', '32',
            '--batch-size', '4', '--workers', '0', '--epochs', '1']
    root = folder_dataset(tmp_path / 'missing', ('a', 'b', 'c'), ('a', 'c'))
    assert train(*args, '--data-dir', str(root), '--output-dir', str(tmp_path / 'ok')) == 0
    assert "no images of 1 training class(es): ['b']" in capsys.readouterr().out
    report = json.loads((tmp_path / 'ok' / 'metrics.jsonl').read_text())['val']
    assert report['count'] == 8
    root = folder_dataset(tmp_path / 'extra', ('a', 'b'), ('a', 'b', 'x'))
    assert train(*args, '--data-dir', str(root), '--output-dir', str(tmp_path / 'refused')) == 1
    one_error_line(capsys, "the val split has class(es) ['x'] that the training split lacks")
    assert not (tmp_path / 'refused' / 'metrics.jsonl').exists()


# output folders are owned

def test_existing_run_is_refused_unless_resumed_or_overwritten(trained_run, tmp_path, capsys):
    out = copy_run(trained_run, tmp_path)
    before = files_of(out)
    assert train(*TRAINED_RUN, '--output-dir', str(out)) == 1
    one_error_line(capsys, f'--output-dir {out} already holds a run (checkpoints, best, metrics.jsonl)')
    assert files_of(out) == before
    assert train(*TINY_TRAIN, '--epochs', '1', '--overwrite', '--output-dir', str(out)) == 0
    assert sorted(p.name for p in (out / 'checkpoints').iterdir()) == ['checkpoint_0']
    assert not (out / '.replaced').exists()  # the old run, set aside, went with the new run's first checkpoint
    assert len((out / 'metrics.jsonl').read_text().splitlines()) == 1


def test_output_dir_that_is_a_file(tmp_path, capsys):
    target = tmp_path / 'file'
    target.write_text('keep me')
    assert train(*TINY_TRAIN, '--output-dir', str(target)) == 1
    one_error_line(capsys, f'--output-dir {target} is a file, not a folder')
    assert 'process 0/1' not in capsys.readouterr().out and target.read_text() == 'keep me'


def lock_of(out: Path, pid: int, host: str, age: float = 0.0) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    lock = out / '.lock'
    lock.write_text(json.dumps({'pid': pid, 'host': host}))
    os.utime(lock, (time.time() - age, time.time() - age))
    return lock


def test_live_locks_are_refused_and_stale_ones_taken_over(tmp_path, capsys):
    out = tmp_path / 'run'
    lock_of(out, os.getpid(), socket.gethostname())
    assert train(*TINY_TRAIN, '--epochs', '1', '--output-dir', str(out)) == 1
    one_error_line(capsys, f'{out} is in use by another run (pid {os.getpid()}')
    lock_of(out, 1, 'another-host', age=10)  # a live run on another machine of the cluster
    assert train(*TINY_TRAIN, '--epochs', '1', '--output-dir', str(out)) == 1
    one_error_line(capsys, 'is in use by another run (pid 1 on another-host, heartbeat 10 s ago)')
    lock_of(out, 1, 'another-host', age=301)  # killed there: its heartbeat stopped 5 minutes ago
    assert train(*TINY_TRAIN, '--epochs', '1', '--output-dir', str(out)) == 0
    assert not (out / '.lock').exists()  # released at the end
    lock_of(out, 2 ** 22 + 7, socket.gethostname())  # a pid above Linux's pid_max: its process is gone
    assert train(*TINY_TRAIN, '--epochs', '2', '--resume', 'latest', '--output-dir', str(out)) == 0


def test_the_heartbeat_keeps_a_lock_fresh(tmp_path):
    lock = RunLock(tmp_path, heartbeat=0.05).acquire()
    os.utime(lock.path, (time.time() - 1000, time.time() - 1000))
    time.sleep(0.3)
    assert time.time() - lock.path.stat().st_mtime < 1  # touched again by the heartbeat thread
    lock.release()
    assert not lock.path.exists()


# checkpoints

def test_resume_on_other_data_is_refused_naming_the_field(trained_run, tmp_path, capsys):
    out = copy_run(trained_run, tmp_path)
    before = files_of(out)
    assert train(*TRAINED_RUN, '--builtin-train-per-class', '9', '--resume', 'latest', '--output-dir', str(out)) == 1
    one_error_line(capsys, 'was saved by a run with train_samples=80; this run has train_samples=90')
    assert train(*TRAINED_RUN, '--lr', '0.01', '--resume', 'latest', '--output-dir', str(out)) == 1
    one_error_line(capsys, 'was saved by a run with lr=0.001; this run has lr=0.01')  # its optimizer state would win
    assert files_of(out) == before


@pytest.mark.parametrize('damaged', ['model.safetensors', 'optimizer.bin', 'run_state.json'])
def test_resume_latest_skips_a_damaged_newest_checkpoint(trained_run, tmp_path, damaged, capsys):
    out = copy_run(trained_run, tmp_path)
    path = out / 'checkpoints' / 'checkpoint_1' / damaged
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    assert train(*TRAINED_RUN, '--resume', str(path.parent), '--output-dir', str(out)) == 1
    one_error_line(capsys, f'{path} is damaged')
    assert train(*TRAINED_RUN, '--resume', 'latest', '--output-dir', str(out)) == 0
    printed = capsys.readouterr().out
    assert f'warning: skipping checkpoint {path.parent}: {path} is damaged' in printed
    assert 'resumed from' in printed and 'checkpoint_0' in printed
    assert_same_weights(latest_weights(out), latest_weights(trained_run))  # epoch 1 again, to the same weights


def test_resume_runs_no_code_from_a_checkpoint_folder(trained_run, tmp_path, capsys):
    out = copy_run(trained_run, tmp_path)
    marker = tmp_path / 'code_ran'

    class Payload:
        def __reduce__(self):
            return open, (str(marker), 'w')

    folder = out / 'checkpoints' / 'checkpoint_0'
    (folder / 'custom_checkpoint_0.pkl').write_bytes(pickle.dumps(Payload()))
    assert train(*TRAINED_RUN, '--resume', str(folder), '--output-dir', str(out)) == 1
    one_error_line(capsys, 'custom_checkpoint_0.pkl is not a file this recipe writes')
    assert not marker.exists()
    (folder / 'custom_checkpoint_0.pkl').unlink()
    (folder / 'random_states_0.pkl').write_bytes(pickle.dumps(Payload()))
    train(*TRAINED_RUN, '--resume', str(folder), '--output-dir', str(out))  # accelerate reads it weights-only
    assert not marker.exists()


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


# arguments are checked at parse time

@pytest.mark.parametrize('flag,value', [('--batch-size', '0'), ('--epochs', '0'), ('--workers', '-1'),
                                        ('--grad-accum', '0'), ('--img-size', '0'), ('--lr', '-1'), ('--lr', 'nan')])
def test_train_arguments_checked_at_parse_time(flag, value, capsys):
    assert train(*TINY_TRAIN, flag, value) == 2
    assert f'argument {flag}:' in capsys.readouterr().err


def test_trackers_and_body_index_checked_at_parse_time(monkeypatch, capsys):
    import accelerate.utils

    def refused(argv, message):
        assert train(*TINY_TRAIN, *argv) == 2
        assert message in capsys.readouterr().err

    refused(['--log-with', 'nosuch'], "'nosuch' is not an accelerate tracker")
    monkeypatch.setattr(accelerate.utils, 'is_wandb_available', lambda: False)
    refused(['--log-with', 'wandb'], 'wandb: its package is not installed')
    refused(['--body-feature-index', '9'], 'body_feature_index must be in [-5, 5)')
    refused(['--model', 'ssanet_vit_small_patch16_384_plus', '--img-size', '8'], 'cannot read a 8x8 px input')
    refused(['--img-size', '4000'], '--img-size')  # bounded like a model folder's input size


# a loss that diverges

@pytest.mark.parametrize('kwargs', [dict(temperature=float('nan')), dict(temperature=0.0), dict(gamma=-5.0),
                                    dict(gamma=float('inf'))])
def test_self_ad_loss_refuses_bad_settings(kwargs):
    with pytest.raises(ValueError):
        SelfADLoss(**kwargs)


def diverge_from_call(monkeypatch, first: int) -> None:
    forward, calls = SelfADLoss.forward, []

    def diverging(self, logits, target):
        calls.append(1)
        loss = forward(self, logits, target)
        return loss * float('nan') if len(calls) >= first else loss
    monkeypatch.setattr(SelfADLoss, 'forward', diverging)


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(trained_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / 'run'
    assert train(*TRAINED_RUN, '--max-steps', '10', '--output-dir', str(out)) == 0  # epoch 0 and its checkpoint
    epoch0 = json.loads((out / 'metrics.jsonl').read_text())
    uninterrupted = json.loads((trained_run / 'metrics.jsonl').read_text().splitlines()[0])
    assert epoch0['train_loss'] == pytest.approx(uninterrupted['train_loss'], rel=1e-5)  # stopped at the epoch's end
    before = files_of(out)
    capsys.readouterr()
    diverge_from_call(monkeypatch, 3)
    assert train(*TRAINED_RUN, '--resume', 'latest', '--output-dir', str(out)) == 1
    one_error_line(capsys, 'the training loss became NaN or infinite at epoch 1, step 13')  # 3rd step of epoch 1
    assert files_of(out) == before  # no checkpoint, export or metrics line of the diverged epoch


# preemption: a stop signal ends the run at a step with a checkpoint that resumes exactly

def signal_at_call(monkeypatch, call: int, *signums: int) -> None:
    """Send ``signums`` to this process during the ``call``-th loss computation (as a scheduler would)."""
    forward, calls = SelfADLoss.forward, []

    def signalled(self, logits, target):
        calls.append(1)
        if len(calls) == call:
            for signum in signums:
                os.kill(os.getpid(), signum)
        return forward(self, logits, target)
    monkeypatch.setattr(SelfADLoss, 'forward', signalled)


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_a_stop_signal_checkpoints_mid_epoch_and_the_resume_is_exact(trained_run, tmp_path, monkeypatch, capsys,
                                                                     signum):
    out = tmp_path / 'run'
    signal_at_call(monkeypatch, 14, signum)
    assert train(*TRAINED_RUN, '--output-dir', str(out)) == 128 + signum
    printed = capsys.readouterr().out
    name = signal.Signals(signum).name
    assert f'stopped by {name} at epoch 1, step 14: checkpoint {out / "checkpoints" / "checkpoint_1"}' in printed
    state = json.loads((out / 'checkpoints' / 'checkpoint_1' / 'run_state.json').read_text())
    assert state['progress']['step_in_epoch'] == 4
    no_leftovers(out)
    monkeypatch.undo()
    assert train(*TRAINED_RUN, '--resume', 'auto', '--output-dir', str(out)) == 0
    assert_same_weights(latest_weights(out), latest_weights(trained_run))
    assert metrics_lines(out) == metrics_lines(trained_run)


def metrics_lines(out: Path) -> list:
    """Epoch, step, training loss and top-1 of each line; the loss to 1e-5 relative, since an interrupted
    epoch sums its losses in two parts (on-device float32 sums, carried over the checkpoint)."""
    lines = [json.loads(x) for x in (out / 'metrics.jsonl').read_text().splitlines()]
    return [(m['epoch'], m['step'], pytest.approx(m['train_loss'], rel=1e-5), m['val']['output']['top1'])
            for m in lines]


def test_the_same_signal_delivered_twice_at_once_stops_once_with_a_checkpoint(tmp_path, monkeypatch, capsys):
    """A scheduler signalling every process of a job and a launcher forwarding it: one request, not an abort."""
    out = tmp_path / 'run'
    signal_at_call(monkeypatch, 3, signal.SIGUSR1, signal.SIGUSR1)
    assert train(*TINY_TRAIN, '--output-dir', str(out)) == 128 + signal.SIGUSR1
    assert 'stopped by SIGUSR1 at epoch 0, step 3' in capsys.readouterr().out
    assert (out / 'checkpoints' / 'checkpoint_0').is_dir()


def test_a_second_signal_aborts_at_once(tmp_path, monkeypatch, capsys):
    out = tmp_path / 'run'
    monkeypatch.setattr(preemption, 'DUPLICATE_SECONDS', 0.0)  # the second one is no copy of the first
    signal_at_call(monkeypatch, 3, signal.SIGTERM, signal.SIGTERM)
    assert train(*TINY_TRAIN, '--output-dir', str(out)) == 128 + signal.SIGTERM
    one_error_line(capsys, 'SIGTERM again: aborted at once')
    assert not (out / '.lock').exists()


# full disks: one line naming the path, no temporary files, earlier checkpoints kept, the lock released

def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize('writer', ['checkpoint', 'best', 'metrics', 'lock', 'feature_cache'])
def test_a_full_disk_is_one_line_and_the_run_resumes_later(trained_run, tmp_path, monkeypatch, capsys, writer):
    import accelerate
    from ssa_timm.train import outputs
    out = tmp_path / 'run'
    flags = [*TRAINED_RUN, '--output-dir', str(out)] + (['--freeze-body', '--cache-features']
                                                          if writer == 'feature_cache' else [])
    # epoch 0 is safe on disk; for the export, only a mid-epoch checkpoint (the first export always happens)
    assert train(*flags, '--max-steps', '5' if writer == 'best' else '10') == 0
    before = files_of(out)
    target = {'checkpoint': (accelerate.Accelerator, 'save_state'), 'best': (outputs, 'export_model'),
              'metrics': (Path, 'open'), 'lock': (Path, 'write_text'),
              'feature_cache': (__import__('numpy').lib.format, 'open_memmap')}[writer]
    if writer == 'feature_cache':
        shutil.rmtree(out / 'feature_cache')
        before = files_of(out)
    monkeypatch.setattr(*target, no_space)
    assert train(*flags, '--resume', 'latest') == 1
    monkeypatch.undo()
    line = one_error_line(capsys, 'No space left on device')
    assert str(out) in line
    no_leftovers(out)
    def kept(name: str) -> bool:  # the cache's lock files stay, as the Hugging Face cache's do
        return name != 'metrics.jsonl' and not name.startswith('feature_cache/.locks/')
    assert {k: v for k, v in files_of(out).items() if kept(k)} == {k: v for k, v in before.items() if kept(k)}
    assert train(*flags, '--resume', 'latest') == 0  # space freed: it goes on from the last good checkpoint
    if writer != 'feature_cache':
        assert_same_weights(latest_weights(out), latest_weights(trained_run))


# predict, evaluate and export: arguments, unreadable inputs, damaged exports

@pytest.fixture
def image(tmp_path) -> Path:
    write_image(tmp_path / 'image.png', 0)
    return tmp_path / 'image.png'


@pytest.mark.parametrize('top_k', ['0', '-2'])
def test_predict_top_k_checked(trained_run, image, top_k, capsys):
    assert run_main('predict', '--model', str(trained_run / 'best'), str(image), '--top-k', top_k) == 2
    assert 'argument --top-k: must be at least 1' in capsys.readouterr().err


def test_predict_with_no_readable_image(trained_run, tmp_path, capsys):
    (tmp_path / 'bad').mkdir()
    (tmp_path / 'bad' / 'a.jpg').write_bytes(b'not an image')
    assert run_main('predict', '--model', str(trained_run / 'best'), str(tmp_path / 'bad')) == 1
    one_error_line(capsys, 'none of the 1 image file(s) could be read')
    (tmp_path / 'empty').mkdir()
    assert run_main('predict', '--model', str(trained_run / 'best'), str(tmp_path / 'empty')) == 1
    one_error_line(capsys, 'no images found in')


def test_export_writes_into_a_new_folder_and_checks_paths_first(trained_run, tmp_path, capsys):
    target = tmp_path / 'missing_dir' / 'm.pt'
    assert run_main('export', '--model', str(trained_run / 'best'), '--torchscript', str(target)) == 0
    assert target.stat().st_size > 0
    (tmp_path / 'a_file').write_text('')
    inside_a_file = str(tmp_path / 'a_file' / 'm.pt')
    assert run_main('export', '--model', str(trained_run / 'best'), '--torchscript', inside_a_file) == 1
    one_error_line(capsys, f'{tmp_path / "a_file"} is a file, not a folder')


@pytest.mark.parametrize('damage,message', [
    ('truncate', 'model.safetensors is damaged or truncated'),
    ('bad_json', 'config.json is not valid JSON'),
    ('other_architecture', "config.json describes a 'resnet18' model, not an SSANet"),
])
def test_damaged_export_names_the_file(trained_run, tmp_path, image, damage, message, capsys):
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
    recipes = [('predict', [str(image)])] + ([('evaluate', ['--workers', '0'])] if damage == 'truncate' else [])
    for name, extra in recipes:  # the same loader serves every recipe
        assert run_main(name, '--model', f'local-dir:{export}', *extra) == 1
        assert str(export) in one_error_line(capsys, message)


# starting weights and the other flags of 0.5, as a hostile user gives them

@pytest.mark.parametrize('flag,value,message', [
    ('--pretrained-path', 'missing.safetensors', 'body weights {v}: no such file'),
    ('--pretrained-path', 'folder', 'body weights {v} is a folder; expected a weights file'),
    ('--pretrained-path', 'junk.safetensors', 'body weights {v} are damaged or not a weights file'),
    ('--pretrained-path', 'junk.pth', 'body weights {v} are damaged or not a weights file'),
    ('--pretrained-path', 'code.pth', 'body weights {v} are damaged or not a weights file'),
    ('--pretrained-path', 'photo.png', 'body weights {v} are damaged or not a weights file; expected a .safetensors'),
    ('--initial-checkpoint', 'missing', 'initial checkpoint {v}: expected an export folder with model.safetensors'),
    ('--initial-checkpoint', 'folder', 'initial checkpoint {v}: expected an export folder with model.safetensors'),
    ('--initial-checkpoint', 'junk.safetensors', 'is damaged or not a safetensors file'),
])
def test_bad_starting_weights_are_one_line(tmp_path, capsys, flag, value, message):
    (tmp_path / 'folder').mkdir()
    (tmp_path / 'junk.safetensors').write_bytes(b'not weights')
    (tmp_path / 'junk.pth').write_bytes(b'not weights')
    marker = tmp_path / 'code_ran'

    class Payload:
        def __reduce__(self):
            return open, (str(marker), 'w')
    torch.save({'conv1.weight': Payload()}, tmp_path / 'code.pth')
    Image.new('RGB', (8, 8)).save(tmp_path / 'photo.png')
    path = tmp_path / value
    assert train(*TINY_TRAIN, flag, str(path), '--output-dir', str(tmp_path / 'run')) == 1
    line = one_error_line(capsys, message.format(v=path))
    assert 'weights_only' not in line  # torch's advice to unpickle: a command line cannot, and it would run code
    assert not marker.exists() and not (tmp_path / 'run' / '.lock').exists()


@pytest.mark.parametrize('argv,message', [
    (['--builtin-family', '-1'], 'argument --builtin-family: must be at least 0'),
    (['--resume', 'auto', '--overwrite'], '--resume continues the run in --output-dir, --overwrite replaces it'),
])
def test_new_flags_checked_at_parse_time(argv, message, capsys):
    assert train(*TINY_TRAIN, *argv) == 2
    assert message in capsys.readouterr().err
