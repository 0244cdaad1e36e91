"""Helpers of the exact-resume tests: a run's final weights, and bitwise equality of two state dicts."""
from pathlib import Path

import torch


def final_weights(out_dir):
    return torch.load(Path(out_dir) / "last.pt", weights_only=True)["model"]


def assert_same_weights(first, second):
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
