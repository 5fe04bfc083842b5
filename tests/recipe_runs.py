"""Running the recipes in tests: in this process through their ``main(argv)`` (``run_main``), or in a
fresh process (``run_recipe``, ``run_python``), and the tiny training settings the tests share."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType


ROOT = Path(__file__).resolve().parents[1]
# A train.py configuration that runs in seconds: timm's test_resnet body at 32 px read after its layer2
# (stride 8), so the attention works on a 4 x 4 map (16 positions); 80 + 50 images.
TINY_TRAIN = ['--model', 'ssanet_test_resnet_plus', '--img-size', '32', '--body-feature-index', '2',
              '--builtin-train-per-class', '8', '--builtin-val-per-class', '5', '--batch-size', '8', '--workers', '0']
TINY_POSITIONS = 16
# The session's shared trained run (conftest.trained_run): two epochs, cosine attention (--qk-norm), so
# the exports it feeds check that option too.
TRAINED_RUN = [*TINY_TRAIN, '--epochs', '2', '--qk-norm']
TWO_CPU_PROCESSES = (sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
                     '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no',
                     '--main_process_port', '0')


def run_python(*args: str, env=None, check: bool = True, launcher=(sys.executable,)) -> subprocess.CompletedProcess:
    """Run ``launcher *args`` from the repository root in a fresh process; fail with its output."""
    proc = subprocess.run([*launcher, *args], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env=dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1', **(env or {})))
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def run_recipe(script: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    """Run ``recipes/<script>`` with ``args`` (see ``run_python``)."""
    return run_python(str(ROOT / 'recipes' / script), *args, **kwargs)


def recipe(name: str) -> ModuleType:
    """``recipes/<name>.py`` imported as a module (once per process), for in-process calls of its ``main(argv)``."""
    module_name = f'recipe_{name}'
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, ROOT / 'recipes' / f'{name}.py')
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def run_main(name: str, *argv: str) -> int:
    """Call ``recipes/<name>.py``'s ``main(argv)`` in this process as its ``__main__`` does: 0, argparse's
    exit status (2), or 1 for a user error, whose ``error: ...`` line goes to stderr (read it with capsys)."""
    from ssa_timm.errors import exit_on_user_error
    module = recipe(name)
    try:
        exit_on_user_error(lambda: module.main(list(argv)))
    except SystemExit as e:
        return e.code
    return 0
