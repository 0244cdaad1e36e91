"""CheckpointWriter: training goes on while a checkpoint is written, and what is written is the state at save time."""
import threading

import pytest
import torch

from file_writes import assert_atomic_write, record_file_writes
from yolo.checkpoint import CheckpointError, CheckpointWriter, save_checkpoint
from weights import assert_same_weights

@pytest.fixture
def gated_writes(monkeypatch):
    """torch.save waits until the test opens the gate: a write stays pending while the test changes the state. A
    save() that wrote before returning would wait here itself, and fail after a minute instead of hanging."""
    gate, save = threading.Event(), torch.save

    def gated_save(*args, **kwargs):
        if not gate.wait(timeout=60):
            raise AssertionError("the write waited a minute for the gate: save() must return before it writes")
        save(*args, **kwargs)
    monkeypatch.setattr(torch, "save", gated_save)
    return gate


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


def test_save_returns_at_once_and_writes_the_state_of_that_moment(gated_writes, tmp_path):
    model, optimizer = trained_model_and_optimizer()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 1}
    at_save = {"model": {name: value.clone() for name, value in model.state_dict().items()},
               "momentum": [optimizer.state[parameter]["momentum_buffer"].clone() for parameter in model.parameters()]}
    path = tmp_path / "last.pt"
    writer = CheckpointWriter()

    writer.save(state, path)  # returns with the write still waiting at the gate
    train_step(model, optimizer)  # in place, while the write is pending: weights, momentum, BatchNorm statistics
    assert not torch.equal(model[0].weight, at_save["model"]["0.weight"])
    assert not path.exists()

    gated_writes.set()
    writer.wait()
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


def test_a_checkpoint_is_written_beside_flushed_synced_then_renamed_over_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    events = record_file_writes(monkeypatch, path)
    model, optimizer = trained_model_and_optimizer()
    save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    assert_atomic_write(events, path)
    assert_same_weights(torch.load(path, weights_only=True)["model"], model.state_dict())
