"""yolo.optim: the parameter groups, the optimizers' settings, and the momentum buffers made ahead of the first step."""
import pytest
import torch
from torch import nn

from yolo.optim import build_optimizer, set_learning_rate, start_momentum


def small_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    model[0].bias.requires_grad_(False)  # a frozen parameter is left out of the optimizer
    return model


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_weights_are_decayed_and_biases_and_batchnorm_are_not(name):
    model = small_model()
    optimizer = build_optimizer(model, name, 0.1, 0.9, 5e-4)
    decay, no_decay = optimizer.param_groups
    assert [id(p) for p in decay["params"]] == [id(model[0].weight), id(model[3].weight)]
    assert [id(p) for p in no_decay["params"]] == [id(model[1].weight), id(model[1].bias), id(model[3].bias)]
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (5e-4, 0.0)


@pytest.mark.parametrize("name, kind", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_the_settings_reach_the_optimizer(name, kind):
    optimizer = build_optimizer(small_model(), name, 0.02, 0.8, 1e-3)
    assert type(optimizer) is kind
    for group in optimizer.param_groups:
        assert group["lr"] == 0.02 and group["fused"] is None  # not fused unless asked: PyTorch's default
        if name == "sgd":
            assert group["momentum"] == 0.8
        else:
            assert group["betas"] == (0.8, 0.999)
    assert all(group["fused"] for group in build_optimizer(small_model(), name, 0.02, 0.8, 1e-3,
                                                           fused=True).param_groups)


def test_an_unknown_optimizer_is_named_with_the_choices():
    with pytest.raises(ValueError) as raised:
        build_optimizer(small_model(), "adam", 0.1, 0.9, 0.0)
    assert str(raised.value) == "Unknown optimizer 'adam'; choose one of sgd, adamw."


def test_sgd_starts_with_zero_momentum_buffers_and_keeps_existing_ones():
    model = small_model()
    optimizer = build_optimizer(model, "sgd", 0.1, 0.9, 0.0)
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    for parameter in trained:
        buffer = optimizer.state[parameter]["momentum_buffer"]
        assert torch.equal(buffer, torch.zeros_like(parameter)) and buffer.shape == parameter.shape
    assert model[0].bias not in optimizer.state
    existing = optimizer.state[trained[0]]["momentum_buffer"]
    existing.fill_(3.0)
    start_momentum(optimizer)
    assert optimizer.state[trained[0]]["momentum_buffer"] is existing and existing.eq(3.0).all()


def test_no_buffers_without_momentum_or_for_adamw():
    for name, momentum in (("sgd", 0.0), ("adamw", 0.9)):
        optimizer = build_optimizer(small_model(), name, 0.1, momentum, 0.0)
        assert not optimizer.state, name


def test_set_learning_rate_sets_every_group():
    optimizer = build_optimizer(small_model(), "sgd", 0.1, 0.9, 5e-4)
    set_learning_rate(optimizer, 0.003)
    assert [group["lr"] for group in optimizer.param_groups] == [0.003, 0.003]


def test_each_group_with_momentum_gets_buffers():
    first, second = nn.Linear(2, 2), nn.Linear(2, 2)
    optimizer = torch.optim.SGD([{"params": first.parameters(), "momentum": 0.0},
                                 {"params": second.parameters()}], lr=0.1, momentum=0.9)
    start_momentum(optimizer)
    assert set(optimizer.state) == set(second.parameters())
    channels_last = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(channels_last, "sgd", 0.1, 0.9, 0.0)
    assert optimizer.state[channels_last.weight]["momentum_buffer"].is_contiguous(memory_format=torch.channels_last)
