"""The training loop's promise of no host synchronisation between its read points, held on the CPU.

A CUDA host wait comes from a handful of ATen ops: a tensor made from Python data (`lift_fresh`, a copy
from pageable host memory), a read of a value (`_local_scalar_dense`: `.item()`, `bool()`, `float()`),
and ops whose output size depends on the data (`nonzero`, `masked_select`, `unique`, ...). Every op the
real training steps dispatch is recorded here, on the CPU, and none of those may appear except at the
loop's read points (the stop request is asked for there, so the recorder knows when one starts).
"""
import traceback
from functools import partial
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from yolo.data import build_dataset
from yolo.engine import LOSS_TERMS, detection_loss, train_one_epoch
from yolo.model import YOLOv1
from yolo.optim import build_optimizer
from yolo.sampling import GlobalBatchSampler, SeededSamples
from yolo.transforms import TrainTransform, build_loader

ROOT = Path(__file__).resolve().parents[1]
aten = torch.ops.aten
# Ops that make the host wait for a CUDA device's queue.
HOST_WAITS = {aten.lift_fresh.default, aten.lift_fresh_copy.default, aten._local_scalar_dense.default,
              aten.nonzero.default, aten.masked_select.default, aten.is_nonzero.default, aten.equal.default,
              aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
              aten.repeat_interleave.Tensor}
IMAGE_SIZE, GRID_SIZE, MICRO_BATCH, ACCUMULATION, STEPS = 64, 2, 2, 2, 3


class HostWaitRecorder(TorchDispatchMode):
    """Records every host-waiting op dispatched outside a read point: a read point runs from the loop's stop
    request (`read_point()`) to the learning rate of the next optimizer step (`learning_rate()`), or to the end
    of the epoch."""

    def __init__(self):
        super().__init__()
        self.reading, self.read_points = False, 0
        self.ops_seen = set()
        self.host_waits = []

    def read_point(self) -> bool:
        self.reading = True
        self.read_points += 1
        return False  # no stop requested

    def learning_rate(self, step: int) -> float:
        self.reading = False
        return 1e-3

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops_seen.add(func)
        if func in HOST_WAITS and not self.reading:
            self.host_waits.append(f"{func} at {project_line()}")
        return func(*args, **(kwargs or {}))


def project_line() -> str:
    """file:line of the innermost caller in the project's own code (not in tests/)."""
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename)
        if path.is_relative_to(ROOT) and not {"tests", "site-packages"} & set(path.parts):
            return f"{path.relative_to(ROOT)}:{frame.lineno} {frame.line}"
    return "outside the project"


@pytest.fixture(scope="module")
def training_batches(synthetic_root):
    """STEPS x ACCUMULATION real micro-batches: TrainTransform's uint8 images with their colour factors,
    through train.py's sampler, seeded samples and collate."""
    dataset = build_dataset("synthetic", synthetic_root, train=True)
    dataset.transforms = TrainTransform(IMAGE_SIZE, GRID_SIZE, len(dataset.class_names))
    sampler = GlobalBatchSampler(len(dataset), MICRO_BATCH * ACCUMULATION, MICRO_BATCH, 0, 1, seed=0)
    sampler.set_epoch(0)
    torch.manual_seed(0)
    batches = list(build_loader(SeededSamples(dataset), MICRO_BATCH, shuffle=False, sampler=sampler, num_workers=0,
                                pin_memory=False, image_bytes=3 * IMAGE_SIZE ** 2))[:STEPS * ACCUMULATION]
    assert len(batches) == STEPS * ACCUMULATION and batches[0].images.dtype == torch.uint8
    assert batches[0].colour_factors.shape == (MICRO_BATCH, 2)
    return batches, len(dataset.class_names)


def record_training(batches, num_classes, *, optimizer_name, dtype, first_step_overflows=False):
    torch.manual_seed(0)
    model = YOLOv1("resnet18", num_classes, GRID_SIZE, image_size=IMAGE_SIZE, head_channels=16, fc_dim=32)
    model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, optimizer_name, 1e-3, 0.9, 5e-4, fused=True)
    # A scale this large overflows fp32 gradients: the GradScaler skips the first step and halves it.
    scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16,
                                  init_scale=2.0 ** 127 if first_step_overflows else 2.0 ** 16)
    cpu = torch.device("cpu")
    recorder = HostWaitRecorder()
    with recorder:
        stats = train_one_epoch(model, batches, optimizer, scaler,
                                forward_loss=partial(detection_loss, loss_weights={"lambda_coord": 5.0,
                                                                                   "lambda_noobj": 0.5},
                                                     device=cpu, dtype=dtype),
                                term_names=LOSS_TERMS, epoch=0, start_step=0, accumulation=ACCUMULATION,
                                lr_at=recorder.learning_rate, device=cpu, stop_requested=recorder.read_point,
                                read_every=STEPS, clock=lambda: 0.0)  # a clock that never moves: fast steps
    return recorder, stats, model, optimizer, scaler


@pytest.mark.parametrize("optimizer_name, dtype", [("sgd", torch.float32), ("sgd", torch.bfloat16),
                                                   ("adamw", torch.bfloat16)])
def test_training_steps_never_wait_for_the_device_between_reads(training_batches, optimizer_name, dtype):
    recorder, stats, _, _, _ = record_training(*training_batches, optimizer_name=optimizer_name, dtype=dtype)
    assert stats["steps"] == STEPS and stats["images"] == STEPS * ACCUMULATION * MICRO_BATCH
    assert recorder.read_points == 2  # after the first step, and at the end of the epoch (the third)
    # The recorder saw the whole step: the jitter, the model, the loss, backward and the fused update.
    assert {aten.clamp_.default, aten.convolution_backward.default} <= recorder.ops_seen
    assert any("fused" in str(op) for op in recorder.ops_seen)
    assert sorted(set(recorder.host_waits)) == []


def test_an_overflowing_first_fp16_step_is_skipped_without_a_host_wait(training_batches):
    recorder, stats, model, optimizer, scaler = record_training(*training_batches, optimizer_name="sgd",
                                                                dtype=torch.float16, first_step_overflows=True)
    assert sorted(set(recorder.host_waits)) == []
    assert scaler.get_scale() < 2.0 ** 127  # the first step overflowed, so the scaler backed off
    assert stats["steps"] == STEPS
    assert all(torch.isfinite(value).all() for value in model.state_dict().values())
    assert all(torch.isfinite(state["momentum_buffer"]).all() for state in optimizer.state.values())
