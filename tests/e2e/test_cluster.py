"""The slow tier, cluster paths: two CPU worker processes under ``ssa-timm-launch`` stopped by a signal
to the wrapper, to its process group, to one worker or to every process of the job at once (every
worker checkpointed, exit 128 + the signal, no traceback, no worker left); the docs' SLURM script run
as written with a stand-in ``scontrol``; a run paused on one host and taken over from another
(separate UTS namespace); and two machines without a shared disk (separate mount namespace)."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest

from recipe_runs import ROOT, TINY_TRAIN
from run_outputs import metrics

pytestmark = pytest.mark.slow

LAUNCH = ['--multi_gpu', '--num_processes', '2', '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend',
          'no', '--main_process_port', '0']
# 125 steps an epoch: a run is still training when the tests signal it, 2 s after its start
LONG_TRAIN = [*TINY_TRAIN, '--builtin-train-per-class', '200', '--epochs', '2', '--cpu']
ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')


def processes_naming(text: str) -> List[int]:
    """Pids of the live processes whose command line holds ``text``."""
    found = []
    for entry in Path('/proc').iterdir():
        try:
            if entry.name.isdigit() and text in (entry / 'cmdline').read_bytes().replace(b'\0', b' ').decode():
                if (entry / 'stat').read_text().rpartition(')')[2].split()[0] != 'Z':
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def workers_of(out: Path) -> List[int]:
    """The train.py worker processes of the run in ``out`` (not the wrapper, not the launcher)."""
    launchers = ('accelerate.commands.launch', 'ssa_timm.launch', 'ssa-timm-launch')
    workers = []
    for pid in processes_naming(str(out)):
        try:
            command = Path(f'/proc/{pid}/cmdline').read_text()
        except OSError:
            continue
        if 'recipes/train.py' in command and not any(name in command for name in launchers):
            workers.append(pid)
    return workers


def wait_for(predicate, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, 'timed out'
        time.sleep(0.2)


def start_wrapped(out: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, '-m', 'ssa_timm.launch', *LAUNCH, str(ROOT / 'recipes' / 'train.py'), *LONG_TRAIN,
               '--output-dir', str(out), *extra]
    # a session of its own, as a scheduler's job step: the test can signal its process group
    return subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


# the group gets SIGHUP: what a closed terminal or a dropped ssh sends the foreground process group
@pytest.mark.parametrize('target,signum', [('wrapper', signal.SIGUSR1), ('group', signal.SIGHUP),
                                           ('worker', signal.SIGTERM), ('every', signal.SIGUSR1),
                                           ('every', signal.SIGTERM)])
def test_a_stop_signal_checkpoints_every_worker_and_the_job_exits_128_plus_it(tmp_path, target, signum):
    out = tmp_path / 'run'
    proc = start_wrapped(out)
    wait_for(lambda: len(workers_of(out)) == 2 and (out / '.lock').is_file())
    time.sleep(2)  # training, past the claim and the data
    if target == 'wrapper':
        proc.send_signal(signum)
    elif target == 'group':  # what a scheduler signalling the job step's process group does
        os.killpg(proc.pid, signum)
    elif target == 'worker':
        os.kill(workers_of(out)[-1], signum)
    else:  # every process of the job, as slurmstepd does (--signal without B:, the time limit, scancel)
        for pid in processes_naming(str(out)):
            os.kill(pid, signum)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, stdout[-2000:] + stderr[-3000:]
    assert 'Traceback' not in stderr and 'ChildFailedError' not in stderr, stderr[-3000:]
    assert len(re.findall(rf'stopped by {signal.Signals(signum).name} at epoch \d, step \d+', stdout)) == 1, stdout
    assert workers_of(out) == [], 'a worker outlived the launcher'
    newest = max((out / 'checkpoints').glob('checkpoint_*'), key=lambda p: int(p.name.rpartition('_')[2]))
    assert {'random_states_0.pkl', 'random_states_1.pkl', 'run_state.json'} <= {p.name for p in newest.iterdir()}
    assert not (out / '.lock').exists() and not list((out / 'checkpoints').glob('.*'))


def slurm_script(tmp_path: Path) -> Path:
    """The SLURM script of docs/training.md, as written."""
    text = (ROOT / 'docs' / 'training.md').read_text()
    block = text.split('<!-- --8<-- [start:slurm] -->')[1].split('<!-- --8<-- [end:slurm] -->')[0]
    script = tmp_path / 'job.sbatch'
    script.write_text(block.split('```bash\n')[1].split('```')[0])
    return script


def test_the_docs_slurm_script_checkpoints_requeues_and_resumes(tmp_path):
    """SIGUSR1 to the batch shell (``--signal=B:USR1@90``): every worker checkpoints, the script sees 138 and
    calls ``scontrol requeue``; the requeued job (the same script again) resumes and finishes."""
    bin_dir, out = tmp_path / 'bin', tmp_path / 'run'
    bin_dir.mkdir()
    (bin_dir / 'scontrol').write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    (bin_dir / 'scontrol').chmod(0o755)
    env = dict(ENV, PATH=f'{bin_dir}:{Path(sys.executable).parent}:{os.environ["PATH"]}', SLURM_JOB_ID='4242',
               LAUNCH_ARGS=' '.join(LAUNCH), TRAIN_ARGS=' '.join(LONG_TRAIN), OUTPUT_DIR=str(out))
    script = slurm_script(tmp_path)
    job = subprocess.Popen(['bash', str(script)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(workers_of(out)) == 2 and (out / '.lock').is_file())
    time.sleep(2)
    job.send_signal(signal.SIGUSR1)
    stdout, stderr = job.communicate(timeout=300)
    assert job.returncode == 138 and 'Traceback' not in stderr, stdout[-2000:] + stderr[-3000:]
    assert (tmp_path / 'scontrol.log').read_text().split() == ['requeue', '4242']
    assert workers_of(out) == []
    requeued = subprocess.run(['bash', str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert requeued.returncode == 0, requeued.stdout[-2000:] + requeued.stderr[-3000:]
    assert 'resumed from' in requeued.stdout and [m['epoch'] for m in metrics(out)] == [0, 1]
    assert (tmp_path / 'scontrol.log').read_text().split() == ['requeue', '4242']  # not again


def needs_namespaces(kind: str) -> None:
    probe = subprocess.run(['unshare', kind, 'true'], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f'unshare {kind} is not permitted here ({probe.stderr.decode().strip()[:200]})')


def test_a_paused_run_taken_over_from_another_host_stops_at_its_next_write(tmp_path):
    """Run A is paused (SIGSTOP) and its heartbeat is old; run B on another host (its own UTS namespace, so
    another host name) takes the folder over and resumes it. A, continued, stops with one line before its
    next write; B finishes unharmed: each epoch once in metrics.jsonl, its lock released."""
    needs_namespaces('--uts')
    out = tmp_path / 'run'
    train = [sys.executable, str(ROOT / 'recipes' / 'train.py'), *LONG_TRAIN, '--builtin-train-per-class', '80',
             '--checkpoint-steps', '5', '--output-dir', str(out), '--resume', 'auto']
    first = subprocess.Popen(train, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: any((out / 'checkpoints').glob('checkpoint_*')), timeout=120)
    first.send_signal(signal.SIGSTOP)
    owner = json.loads((out / '.lock').read_text())
    os.utime(out / '.lock', (time.time() - 3600, time.time() - 3600))  # its heartbeat stopped an hour ago
    second_host = ['unshare', '--uts', 'sh', '-c', 'hostname other-node && exec "$@"', 'sh', *train]
    second = subprocess.Popen(second_host, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    wait_for(lambda: json.loads((out / '.lock').read_text() or '{}').get('host') == 'other-node')
    taken = json.loads((out / '.lock').read_text())
    assert taken['generation'] == owner['generation'] + 1 and taken['token'] != owner['token']
    first.send_signal(signal.SIGCONT)
    _, first_err = first.communicate(timeout=300)
    assert first.returncode == 1, first_err[-3000:]
    last = first_err.strip().splitlines()[-1]
    assert last.startswith(f'error: the lock on {out} was taken over by pid {taken["pid"]} on other-node '
                           f'(generation {taken["generation"]})') and 'Traceback' not in first_err, first_err[-3000:]
    second_out, second_err = second.communicate(timeout=600)
    assert second.returncode == 0, second_out[-2000:] + second_err[-3000:]
    assert [m['epoch'] for m in metrics(out)] == [0, 1]
    assert not (out / '.lock').exists() and not list((out / 'checkpoints').glob('.*'))
    assert socket.gethostname() != 'other-node'


def test_two_machines_without_a_shared_disk_refuse_at_start(tmp_path):
    """Machine 1 runs in its own mount namespace with an empty tmpfs over the run's parent folder: its
    --output-dir is another folder than machine 0's. Every process stops before training with one line."""
    needs_namespaces('--mount')
    shared = tmp_path / 'shared'
    shared.mkdir()
    out = shared / 'run'
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    launch = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_machines', '2',
              '--num_processes', '2', '--main_process_ip', '127.0.0.1', '--main_process_port', str(port),
              '--mixed_precision', 'no', '--dynamo_backend', 'no']
    train = [str(ROOT / 'recipes' / 'train.py'), *TINY_TRAIN, '--epochs', '1', '--cpu', '--output-dir', str(out)]
    machine0 = subprocess.Popen([*launch, '--machine_rank', '0', *train], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    own_disk = ['unshare', '--mount', '--propagation', 'private', 'sh', '-c',
                f'mount -t tmpfs tmpfs {shared} && exec "$@"', 'sh', *launch, '--machine_rank', '1', *train]
    machine1 = subprocess.Popen(own_disk, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = [(p.wait(timeout=300), *p.communicate()) for p in (machine0, machine1)]
    for code, stdout, stderr in results:
        assert code == 1, stdout[-2000:] + stderr[-3000:]
        errors = [line for line in stderr.splitlines() if line.startswith('error: ')]
        assert len(errors) == 1 and f'--output-dir {out} is not the same folder on every machine' in errors[0]
        assert 'need an --output-dir on a filesystem they all share' in errors[0]
        assert 'training batches' not in stdout
    assert not (out / 'checkpoints').exists() and not (out / '.lock').exists()


def launch_dir_of(pid: int) -> Path:
    """The wrapper's temporary folder, as its worker ``pid`` was told it."""
    environ = Path(f'/proc/{pid}/environ').read_bytes().split(b'\0')
    return Path(next(v for v in environ if v.startswith(b'SSA_TIMM_LAUNCH_DIR=')).decode().partition('=')[2])


def one_job_line(stderr: str, text: str) -> None:
    """Exactly one ``error:`` line, holding ``text``, and no traceback or launcher failure report."""
    errors = [line for line in stderr.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1 and text in errors[0], stderr[-3000:]
    assert 'Traceback' not in stderr and 'ChildFailedError' not in stderr and 'Root Cause' not in stderr, stderr[-3000:]


# slow steps (a ResNet-18 to layer2 at 64 px, 48 images a step, one thread): 10 steps take seconds
SLOW_STEPS = ['--model', 'ssanet_resnet18_plus', '--img-size', '64', '--batch-size', '48',
              '--builtin-val-per-class', '2']


def test_a_second_stop_signal_before_the_agreement_is_one_line_and_128_plus_it(tmp_path):
    """Ring 4 row 4: SIGTERM, then SIGTERM again 1.6 s later, while the workers are between two agreements."""
    out = tmp_path / 'run'
    proc = start_wrapped(out, *SLOW_STEPS, '--checkpoint-steps', '10')
    # a checkpoint at step 10 was written just after an agreement: the next is 10 slow steps away
    wait_for(lambda: any((out / 'checkpoints').glob('checkpoint_*')))
    proc.send_signal(signal.SIGTERM)
    time.sleep(1.6)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stdout[-2000:] + stderr[-3000:]
    one_job_line(stderr, 'SIGTERM again: aborted at once')
    assert workers_of(out) == []


def test_a_stop_signal_as_soon_as_a_worker_registered_checkpoints(tmp_path):
    """Ring 4 row 5: the wrapper's SIGTERM reaches a worker the moment it registers (its handler is in place by
    then): 128 + the signal, one stop line, no failure report."""
    out = tmp_path / 'run'
    proc = start_wrapped(out)
    wait_for(lambda: len(workers_of(out)) == 2)
    folder = launch_dir_of(workers_of(out)[0])
    wait_for(lambda: any(folder.glob('worker-*')), timeout=120)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stdout[-2000:] + stderr[-3000:]
    assert 'Traceback' not in stderr and 'ChildFailedError' not in stderr, stderr[-3000:]
    assert len(re.findall(r'stopped by SIGTERM at epoch 0, step \d+', stdout)) == 1, stdout
    assert workers_of(out) == [] and not (out / '.lock').exists()


def test_a_user_error_of_a_two_process_job_is_one_line(tmp_path):
    """Ring 4 row 9: the folder already holds a run: one ``error:`` line for the job, its status, no report."""
    out = tmp_path / 'run'
    out.mkdir()
    (out / 'metrics.jsonl').write_text('{"epoch": 0}\n')
    proc = start_wrapped(out)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stdout[-2000:] + stderr[-3000:]
    one_job_line(stderr, f'--output-dir {out} already holds a run')
    assert workers_of(out) == []


def test_a_killed_wrapper_leaves_no_worker_and_no_temporary_folder(tmp_path):
    """Ring 4 row 12: SIGKILL to the wrapper: the workers stop (their launcher dies with the wrapper) and the
    wrapper's temporary folder is removed by its keeper."""
    out = tmp_path / 'run'
    proc = start_wrapped(out)
    wait_for(lambda: len(workers_of(out)) == 2 and (out / '.lock').is_file())
    folder = launch_dir_of(workers_of(out)[0])
    assert folder.is_dir() and folder.name.startswith('ssa-timm-launch-')
    proc.kill()
    proc.communicate(timeout=60)
    wait_for(lambda: workers_of(out) == [] and not folder.exists(), timeout=300)
