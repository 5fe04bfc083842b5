"""Shared test setup: the helper modules are importable, tests never reach the network, every test
starts from a fresh accelerate state, and one trained run (``trained_run``) serves every test that
needs a trained model: trained once per test session, whichever xdist worker asks first."""
import os
import sys
from pathlib import Path

import pytest
from filelock import FileLock

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault('HF_HUB_OFFLINE', '1')
# One intra-op thread, with or without xdist: the recipe processes the tests start run with
# OMP_NUM_THREADS=1 (recipe_runs.run_python), and CPU kernels split their sums by thread count, so an
# in-process run (the shared trained run) and a subprocess run reach equal weights only at equal counts.
import torch  # noqa: E402
torch.set_num_threads(1)

from recipe_runs import TRAINED_RUN, run_main  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps its state in process-wide singletons: reset them after each test, as its own
    test suite does, so in-process recipe runs do not inherit each other's settings; torch's
    deterministic mode and thread count (which ``--deterministic`` sets) are put back too."""
    import torch
    threads = torch.get_num_threads()
    yield
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    torch.use_deterministic_algorithms(False)  # --deterministic sets both for the whole process
    torch.set_num_threads(threads)


@pytest.fixture(scope='session')
def trained_run(tmp_path_factory) -> Path:
    """Output folder of ``train.py`` with ``TRAINED_RUN`` (2 epochs, cosine attention on a 4 x 4 map):
    checkpoints, ``metrics.jsonl`` and the ``best/`` export. Tests must not change it."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get('PYTEST_XDIST_WORKER'):  # the xdist workers' common parent folder
        shared = shared.parent
    out, done = shared / 'trained_run', shared / 'trained_run.done'
    with FileLock(str(shared / 'trained_run.lock')):
        if not done.is_file():
            assert run_main('train', *TRAINED_RUN, '--output-dir', str(out)) == 0
            done.touch()
    return out
