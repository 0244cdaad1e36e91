"""Shared fixtures: a tiny synthetic VOC-layout dataset, generated once per test session."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The data/ scripts are plain scripts, not a package: make them importable as modules.
sys.path.insert(0, str(ROOT / "data"))

import make_synthetic  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """VOC-layout folder with 16 train / 8 val synthetic images and classes.txt. Read-only: do not modify."""
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic.generate(root, train=16, val=8, seed=0)
    return root
