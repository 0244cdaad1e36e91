"""The training recipe's optimizer (SPEC section 5); the schedule lives beside its settings in train.py."""
import torch
from torch import nn


OPTIMIZERS = ("sgd", "adamw")


def build_optimizer(model: nn.Module, name: str, lr: float, momentum: float, weight_decay: float,
                    fused: bool = False) -> torch.optim.Optimizer:
    """SGD (the paper's) or AdamW, with weight decay on convolution and linear weights only.

    BatchNorm parameters and biases are not decayed. The decay is the configured value exactly: the loss
    is a mean over images, so it needs no rescaling by the batch size (the seed divided it by 64).
    AdamW (decoupled decay, betas (momentum, 0.999)) trains from scratch much faster on small problems.
    `fused` (for CUDA) updates every parameter in one kernel launch and can skip a step on the device: see
    `yolo.engine.train_one_epoch`. Without it PyTorch picks its default (foreach) implementation.
    """
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim > 1 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "sgd":
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum, fused=fused or None)
    elif name == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999), fused=fused or None)
    else:
        raise ValueError(f"Unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}.")
    start_momentum(optimizer)
    return optimizer


def start_momentum(optimizer: torch.optim.Optimizer) -> None:
    """Give every SGD parameter without one a momentum buffer of zeros.

    PyTorch's fused SGD creates missing buffers with `empty_like` and, when `found_inf` tells it to skip
    the step (a non-finite loss, or the GradScaler's routine first-step overflow in fp16), returns before
    writing them but keeps them: the next step would move the weights by uninitialised memory. With zeros
    in place no step is a first step, and the first real one computes 0.9 * 0 + grad = grad, exactly what
    stock SGD starts from.
    """
    if not isinstance(optimizer, torch.optim.SGD):
        return
    for group in optimizer.param_groups:
        if group["momentum"] == 0:
            continue
        for parameter in group["params"]:
            state = optimizer.state[parameter]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(parameter)  # in the parameter's layout


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """A saved optimizer state, run the way this optimizer was built (fused or not) rather than the way the
    saving run's device ran it: `load_state_dict` brings the saved groups' `fused` flags (a CPU run's: None)."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        group["fused"] = optimizer.defaults["fused"]
    start_momentum(optimizer)


def set_learning_rate(optimizer: torch.optim.Optimizer, value: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = value


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer.step()` honours a `found_inf` tensor (1.0: skip this update) without a host read.

    Read from the parameter groups, which `step()` follows: a loaded state dict brings its own `fused` flags.
    """
    return all(group.get("fused") for group in optimizer.param_groups)
