"""Shared test setup: the fixtures module is importable, tests never reach the network, and one
trained run (``trained_run``) serves every test that needs a trained model."""
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault('HF_HUB_OFFLINE', '1')

from fixtures import TRAINED_RUN, run_recipe  # noqa: E402


@pytest.fixture(scope='session')
def trained_run(tmp_path_factory) -> Path:
    """Output folder of ``train.py`` with ``TRAINED_RUN`` (2 epochs, cosine attention): checkpoints,
    ``metrics.jsonl`` and the ``best/`` export. Tests must not change it."""
    out = tmp_path_factory.mktemp('trained_run')
    run_recipe('train.py', *TRAINED_RUN, '--output-dir', str(out))
    return out
