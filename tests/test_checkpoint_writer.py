"""CheckpointWriter: training goes on while a checkpoint is written, and what is written is the state at save time."""
import time

import pytest
import torch

from yolo.checkpoint import CheckpointError, CheckpointWriter
from weights import assert_same_weights

WRITE_DELAY = 1.5  # seconds each write waits before its first byte


@pytest.fixture
def slow_writes(monkeypatch):
    """torch.save sleeps before serialising: the state is read only after the training thread has moved on."""
    save = torch.save

    def slow_save(*args, **kwargs):
        time.sleep(WRITE_DELAY)
        save(*args, **kwargs)
    monkeypatch.setattr(torch, "save", slow_save)


def trained_model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64), torch.nn.Linear(64, 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_step(model, optimizer)
    return model, optimizer


def train_step(model, optimizer):
    optimizer.zero_grad()
    model(torch.randn(16, 64)).square().mean().backward()
    optimizer.step()


def test_save_returns_at_once_and_writes_the_state_of_that_moment(slow_writes, tmp_path):
    model, optimizer = trained_model_and_optimizer()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 1}
    at_save = {"model": {name: value.clone() for name, value in model.state_dict().items()},
               "momentum": [optimizer.state[parameter]["momentum_buffer"].clone() for parameter in model.parameters()]}
    path = tmp_path / "last.pt"
    writer = CheckpointWriter()

    started = time.monotonic()
    writer.save(state, path)
    assert time.monotonic() - started < WRITE_DELAY / 3
    train_step(model, optimizer)  # in place, while the write is pending: weights, momentum, BatchNorm statistics
    assert not torch.equal(model[0].weight, at_save["model"]["0.weight"])
    assert not path.exists()

    writer.wait()
    assert time.monotonic() - started >= WRITE_DELAY
    saved = torch.load(path, weights_only=True)
    assert saved["epoch"] == 1
    assert_same_weights(saved["model"], at_save["model"])
    for index, momentum in enumerate(at_save["momentum"]):
        assert torch.equal(saved["optimizer"]["state"][index]["momentum_buffer"], momentum), index
    assert not path.with_name("last.pt.tmp").exists()


@pytest.mark.parametrize("raised_by", ["wait", "save"])
def test_a_failed_background_write_is_raised_by_the_next_call_and_keeps_the_old_file(tmp_path, raised_by):
    path = tmp_path / "last.pt"
    writer = CheckpointWriter()
    writer.save({"step": 1}, path)
    writer.wait()
    (tmp_path / "last.pt.tmp").symlink_to("/dev/full")  # every write there fails with ENOSPC

    writer.save({"step": 2, "weights": torch.zeros(100_000)}, path)
    with pytest.raises(CheckpointError, match=r"disk full while saving .*last.pt \(.*still holds its previous"):
        writer.wait() if raised_by == "wait" else writer.save({"step": 3}, path)
    assert not (tmp_path / "last.pt.tmp").exists()
    assert torch.load(path, weights_only=True) == {"step": 1}
    writer.wait()  # the error is raised once; the writer goes on
    writer.save({"step": 4}, path)
    writer.wait()
    assert torch.load(path, weights_only=True) == {"step": 4}
