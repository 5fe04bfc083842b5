"""Shared test setup: the fixtures module is importable, tests never reach the network."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault('HF_HUB_OFFLINE', '1')
