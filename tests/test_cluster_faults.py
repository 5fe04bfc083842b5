"""Cluster faults that need no launcher, in this process (issue 27's table): a paused run's lock is never
taken on its own host and a takeover from another host is fenced; a second signal during a checkpoint
write leaves no temporary checkpoint; several processes agree on a stop without a host sync per step;
starting weights of another body, another map or another class count are told in one line. The rows
that need a real launcher, namespaces or signals to processes are in tests/e2e/test_cluster.py."""
import json
import os
import signal
import subprocess
import sys
import time

import accelerate
import pytest
import timm
import torch
from safetensors.torch import save_file

import ssa_timm
from recipe_runs import TINY_TRAIN, run_main
from ssa_timm.errors import LockLost, RunFolderInUse
from ssa_timm.hub import export_model
from ssa_timm.run_dir import RunFolder, RunLock
from ssa_timm.train import StopRequest, preemption


def train(*argv: str) -> int:
    return run_main('train', *argv)


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith('error: ')]
    assert len(lines) == 1 and 'Traceback' not in err, err[-3000:]
    return lines[0]


HOLD_LOCK = """
import sys, time
from pathlib import Path
from ssa_timm.run_dir import RunLock
RunLock(Path(sys.argv[1])).acquire()
print('held', flush=True)
time.sleep(600)
"""


def test_a_paused_run_on_this_host_is_never_taken_over(tmp_path, capsys):
    """Row 1: the owner lives (stopped, its heartbeat an hour old): a second run with --resume auto is refused."""
    out = tmp_path / 'run'
    out.mkdir()
    owner = subprocess.Popen([sys.executable, '-c', HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == 'held'
        owner.send_signal(signal.SIGSTOP)
        os.utime(out / '.lock', (time.time() - 3600, time.time() - 3600))
        assert train(*TINY_TRAIN, '--epochs', '1', '--resume', 'auto', '--output-dir', str(out)) == 1
        line = error_line(capsys)
        assert f'is in use by another run (pid {owner.pid} on ' in line and 'alive' in line
        assert json.loads((out / '.lock').read_text())['pid'] == owner.pid and not (out / 'checkpoints').exists()
    finally:
        owner.kill()
        owner.wait()


def test_a_takeover_from_another_host_is_fenced(tmp_path):
    """Row 1: owner A (made to look as if on another host, its heartbeat stale) is taken over by B with the
    next generation; A's next write and its release see that, raise LockLost and leave B's lock alone."""
    first = RunFolder(tmp_path, RunLock(tmp_path, heartbeat=3600))
    first.claim()
    record = json.loads(first.lock.path.read_text())
    first.lock.path.write_text(json.dumps(dict(record, host='node-a')))
    os.utime(first.lock.path, (time.time() - 3600, time.time() - 3600))
    second = RunFolder(tmp_path)
    second.claim(resume='auto')
    taken = json.loads(second.lock.path.read_text())
    assert taken['generation'] == record['generation'] + 1 and taken['token'] == second.lock.token
    with pytest.raises(LockLost, match=rf'taken over by pid {os.getpid()} on .* \(generation 1\)'):
        first.append_metrics({'epoch': 0})
    assert not (tmp_path / 'metrics.jsonl').exists()
    first.release()
    assert json.loads(second.lock.path.read_text())['token'] == second.lock.token
    second.append_metrics({'epoch': 0})
    second.release()
    assert not second.lock.path.exists()
    (tmp_path / '.lock').write_text(json.dumps(dict(record, host='node-b')))  # a live run on another host
    with pytest.raises(RunFolderInUse, match=r'in use by another run \(pid \d+ on node-b, heartbeat 0 s ago\)'):
        RunLock(tmp_path).acquire()


def test_a_requeued_slurm_job_takes_its_earlier_runs_lock_at_once(tmp_path, monkeypatch):
    """Its node died (no release, a fresh heartbeat on another host); SLURM requeued the job: same job id,
    next restart count. Another job's fresh lock stays refused."""
    monkeypatch.setenv('SLURM_JOB_ID', '77')
    monkeypatch.setenv('SLURM_RESTART_COUNT', '0')
    dead = RunLock(tmp_path, heartbeat=3600).acquire()
    record = dict(json.loads(dead.path.read_text()), host='node-dead')
    dead.path.write_text(json.dumps(record))
    monkeypatch.setenv('SLURM_RESTART_COUNT', '1')
    requeued = RunLock(tmp_path).acquire()
    assert json.loads(requeued.path.read_text())['generation'] == record['generation'] + 1
    requeued.path.write_text(json.dumps(dict(record, job='78', token='other')))
    monkeypatch.setenv('SLURM_RESTART_COUNT', '2')
    with pytest.raises(RunFolderInUse, match='on node-dead, heartbeat 0 s ago'):
        RunLock(tmp_path).acquire()


def test_a_container_sharing_the_host_name_is_another_host(tmp_path):
    """Same host name, another pid namespace (host networking): its pid says nothing here, its heartbeat does."""
    lock = RunLock(tmp_path, heartbeat=3600).acquire()
    record = json.loads(lock.path.read_text())
    lock.path.write_text(json.dumps(dict(record, pid=2 ** 22 + 7, pidns='pid:[4026531836999]')))
    with pytest.raises(RunFolderInUse, match='heartbeat 0 s ago'):
        RunLock(tmp_path).acquire()
    os.utime(lock.path, (time.time() - 3600, time.time() - 3600))
    assert RunLock(tmp_path).acquire().held


def test_a_second_signal_during_the_checkpoint_write_leaves_no_temporary_checkpoint(tmp_path, monkeypatch, capsys):
    """Row 8: the first signal asks for a checkpoint; the second arrives while it is written."""
    out = tmp_path / 'run'
    monkeypatch.setattr(preemption, 'DUPLICATE_SECONDS', 0.0)
    save_state, calls = accelerate.Accelerator.save_state, []

    def interrupted(self, path, *args, **kwargs):
        result = save_state(self, path, *args, **kwargs)
        calls.append(path)
        if len(calls) == 2:  # the checkpoint the first signal asked for
            os.kill(os.getpid(), signal.SIGTERM)
        return result
    monkeypatch.setattr(accelerate.Accelerator, 'save_state', interrupted)
    forward, losses = ssa_timm.SelfADLoss.forward, []

    def signalled(self, logits, target):
        losses.append(1)
        if len(losses) == 13:
            os.kill(os.getpid(), signal.SIGTERM)
        return forward(self, logits, target)
    monkeypatch.setattr(ssa_timm.SelfADLoss, 'forward', signalled)
    assert train(*TINY_TRAIN, '--epochs', '2', '--output-dir', str(out)) == 128 + signal.SIGTERM
    assert 'SIGTERM again: aborted at once' in error_line(capsys)
    assert '.tmp' in calls[1] and not list((out / 'checkpoints').glob('.*'))
    assert [p.name for p in (out / 'checkpoints').iterdir()] == ['checkpoint_0'] and not (out / '.lock').exists()


class CountingAccelerator:
    """Two processes as ``StopRequest`` sees them: counts the reductions it reads back on the host."""
    num_processes, device = 2, torch.device('cpu')

    def __init__(self) -> None:
        self.reads = 0

    def reduce(self, tensor, reduction):
        self.reads += 1
        return tensor


def test_processes_agree_on_a_stop_every_few_steps_not_at_every_step():
    """Row 10: with several processes one flag is reduced and read every CHECK_EVERY steps and at an epoch's
    end, the same steps on every process; a signal is seen at the next such step."""
    accelerator = CountingAccelerator()
    stop = StopRequest()
    seen = [step for step in range(1, 101) if stop.requested(accelerator, step)]
    assert accelerator.reads == 100 // stop.check_every and seen == [] and stop.check_every >= 5
    stop.signum = signal.SIGUSR1
    assert [step for step in range(101, 121) if stop.requested(accelerator, step)] == [110, 120]
    assert stop.requested(accelerator) and accelerator.reads == 100 // stop.check_every + 3


def tiny_export(tmp_path, name: str, num_classes: int, **kwargs):
    torch.manual_seed(0)
    model = ssa_timm.create_ssanet_by_name(name, num_classes=num_classes, img_size=32, **kwargs)
    return export_model(model, str(tmp_path / name), [f'c{i}' for i in range(num_classes)])


def test_an_initial_checkpoint_of_another_body_or_map_is_one_line(tmp_path, capsys):
    """Row 5: a registered architecture of another body, then the same body read at another feature index."""
    out = tmp_path / 'run'
    other = tiny_export(tmp_path, 'ssanet_resnet18_plus', 10, body_feature_index=2)
    assert train(*TINY_TRAIN, '--epochs', '1', '--initial-checkpoint', str(other), '--output-dir', str(out)) == 1
    assert (f'initial checkpoint {other} is another model than this run\'s (architecture ssanet_resnet18_plus vs '
            "ssanet, the checkpoint's first)") in error_line(capsys)
    generic = tiny_export(tmp_path, 'ssanet_resnet34_plus', 10, body_feature_index=2)  # no registered name
    assert train(*TINY_TRAIN, '--epochs', '1', '--initial-checkpoint', str(generic), '--output-dir', str(out)) == 1
    assert '(body resnet34 vs test_resnet, ' in error_line(capsys)
    deeper = tiny_export(tmp_path, 'ssanet_test_resnet_plus', 10, body_feature_index=3)
    assert train(*TINY_TRAIN, '--epochs', '1', '--initial-checkpoint', str(deeper), '--output-dir', str(out)) == 1
    assert '(body_feature_index 3 vs 2, ' in error_line(capsys)
    (deeper / 'config.json').unlink()  # weights alone: their keys and shapes tell
    assert train(*TINY_TRAIN, '--epochs', '1', '--initial-checkpoint', str(deeper / 'model.safetensors'),
                 '--output-dir', str(out)) == 1
    line = error_line(capsys)
    assert f'initial checkpoint {deeper / "model.safetensors"} do not fit' in line and 'unexpected' in line
    assert 'of another shape' in line and 'head.attn' in line and not (out / 'checkpoints').exists()


def test_body_weights_of_a_deeper_resnet_are_refused_naming_the_keys(tmp_path, capsys):
    """Row 6: ResNet-34 weights into a ResNet-18 body read after layer2 (layer3, layer4 and fc are explained
    by the cut, layer1.2 is not)."""
    torch.manual_seed(0)
    path = tmp_path / 'resnet34.safetensors'
    save_file({k: v.contiguous() for k, v in timm.create_model('resnet34').state_dict().items()}, str(path))
    assert train('--model', 'ssanet_resnet18_plus', *TINY_TRAIN[2:], '--epochs', '1', '--pretrained-path', str(path),
                 '--output-dir', str(tmp_path / 'run')) == 1
    line = error_line(capsys)
    assert line.startswith(f'error: body weights {path} do not fit the body of ssanet_resnet18_plus: keys ')
    assert 'unexpected' in line and 'layer1.2.' in line and 'layer3' not in line and 'fc.' not in line


def test_an_initial_checkpoint_of_another_class_count_says_the_classifiers_start_fresh(tmp_path, capsys):
    """Row 7: a 5-class export into the 10-class built-in run."""
    five = tiny_export(tmp_path, 'ssanet_test_resnet_plus', 5, body_feature_index=2)
    assert train(*TINY_TRAIN, '--epochs', '1', '--initial-checkpoint', str(five),
                 '--output-dir', str(tmp_path / 'run')) == 0
    printed = capsys.readouterr().out
    assert (f'note: initial checkpoint {five / "model.safetensors"} has 5 classes and this run 10: its classifiers '
            '(head.fe.fc, head.ssa.fc) start fresh') in printed


@pytest.mark.parametrize('pid', [10 ** 20, -1, 0, True, '12x'])
def test_a_lock_naming_no_usable_process_is_not_an_owner(tmp_path, pid):
    """Ring 4 row 7: a huge, zero or negative pid names no process: the lock is taken over like an unreadable
    one (no OverflowError, no folder refused forever)."""
    lock = RunLock(tmp_path, heartbeat=3600).acquire()
    record = json.loads(lock.path.read_text())
    lock.held = False  # the recorded owner is gone; its record stays
    lock.path.write_text(json.dumps(dict(record, pid=pid)))
    taken = RunLock(tmp_path, heartbeat=3600).acquire()
    assert json.loads(taken.path.read_text())['token'] == taken.token
    taken.release()


def test_a_heartbeat_from_a_clock_ahead_is_not_a_negative_age(tmp_path):
    """Ring 4 row 12: a lock of another host touched by a clock ahead of this one."""
    lock = RunLock(tmp_path, heartbeat=3600).acquire()
    record = json.loads(lock.path.read_text())
    lock.path.write_text(json.dumps(dict(record, host='node-ahead')))
    os.utime(lock.path, (time.time() + 600, time.time() + 600))
    with pytest.raises(RunFolderInUse, match=r'on node-ahead, heartbeat 600 s in the future \(a clock ahead\)'):
        RunLock(tmp_path).acquire()


def test_a_stop_signal_that_was_ignored_stays_ignored():
    """``nohup`` ignores SIGHUP for the run: a closed terminal must not stop it."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with StopRequest():
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) != signal.SIG_DFL
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_a_script_that_stops_ignores_late_stop_signals_while_it_exits():
    """After the stop's checkpoint the process exits with 128 + the signal; a second signal then must not kill
    it by the signal's default action (a launcher reports that as a failed worker)."""
    saved = {s: signal.getsignal(s) for s in preemption.STOP_SIGNALS}
    try:
        with StopRequest(until_exit=True) as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.signum == signal.SIGTERM
        assert all(signal.getsignal(s) == signal.SIG_IGN for s in preemption.STOP_SIGNALS)
        with StopRequest():  # a run that did not stop (or an in-process caller) gets its handlers back
            pass
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN  # the previous one, restored
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
