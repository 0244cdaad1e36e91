"""yolo.engine.train_one_epoch on a CPU: reads every few steps, no update from a non-finite loss, agreed stops."""
import copy
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import yolo.engine
from yolo.data import ImageDecodeError
from yolo.engine import (LOSS_TERMS, NonFiniteLossError, apply_update, detection_loss, ground_truth_array,
                         train_one_epoch)
from yolo.optim import build_optimizer, load_optimizer_state, skips_on_device
from yolo.photometric import jitter_colours_
from yolo.run import load_scaler_state, training_parts
from yolo.targets import encode_target
from yolo.transforms import DetectionBatch

GRID, CLASSES, SIDE = 2, 3, 8
LOSS_WEIGHTS = {"lambda_coord": 5.0, "lambda_noobj": 0.5}


class TinyDetector(nn.Module):
    """Images -> (N, S, S, 5B + C) in [0, 1]: the smallest model the loss accepts."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3 * SIDE * SIDE, GRID * GRID * (10 + CLASSES))

    def forward(self, images):
        return torch.sigmoid(self.linear(images.flatten(1))).view(len(images), GRID, GRID, 10 + CLASSES)


def batches(count, poisoned=()):
    """`count` micro-batches of 2 images; those in `poisoned` hold a NaN pixel (a NaN loss)."""
    generator = torch.Generator().manual_seed(0)
    target = encode_target(torch.tensor([[0.1, 0.2, 0.6, 0.7]]), torch.tensor([1]), GRID, CLASSES)
    result = []
    for index in range(count):
        images = torch.rand(2, 3, SIDE, SIDE, generator=generator)
        if index in poisoned:
            images[0, 0, 0, 0] = float("nan")
        result.append(DetectionBatch(images, torch.stack([target, target]), None, []))
    return result


def run(loader, *, fused, dtype=torch.float32, read_every=1, stop=lambda: False):
    torch.manual_seed(0)
    model = TinyDetector()
    optimizer = build_optimizer(model, "sgd", 0.1, 0.9, 5e-4, fused=fused)
    scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16)
    try:
        cpu = torch.device("cpu")
        stats = train_one_epoch(model, loader, optimizer, scaler, epoch=0, start_step=0, accumulation=1,
                                forward_loss=partial(detection_loss, loss_weights=LOSS_WEIGHTS, device=cpu,
                                                     dtype=dtype),
                                term_names=LOSS_TERMS, lr_at=lambda step: 0.1, device=cpu, stop_requested=stop,
                                read_every=read_every)
    except NonFiniteLossError as error:
        return model, str(error)
    return model, stats


def test_an_optimizer_state_saved_unfused_is_not_taken_for_fused():
    """A CPU run's state loaded into a fused optimizer brings its groups' fused=None: step() follows the groups."""
    saved = build_optimizer(TinyDetector(), "sgd", 0.1, 0.9, 0.0, fused=False).state_dict()
    optimizer = build_optimizer(TinyDetector(), "sgd", 0.1, 0.9, 0.0, fused=True)
    optimizer.load_state_dict(saved)
    assert not skips_on_device(optimizer)
    load_optimizer_state(optimizer, saved)  # the project's load runs it fused, as it was built
    assert skips_on_device(optimizer)
    unfused = build_optimizer(TinyDetector(), "sgd", 0.1, 0.9, 0.0, fused=False)
    load_optimizer_state(unfused, optimizer.state_dict())
    assert not skips_on_device(unfused)


@pytest.mark.parametrize("fused, dtype", [(True, torch.float32), (False, torch.float16), (False, torch.float32)])
def test_no_update_is_applied_from_a_non_finite_loss_on(fused, dtype):
    """Steps 2 and 3 of 5 are NaN; with reads every 4 steps the run stops at step 4 having applied step 1 only
    (fused: skipped on the device; fp16: by the GradScaler; otherwise: checked on the host each step), and the
    error names the first of them."""
    assert skips_on_device(build_optimizer(TinyDetector(), "sgd", 0.1, 0.9, 0.0, fused=fused)) == fused
    reference, _ = run(batches(1), fused=fused, dtype=dtype)
    model, message = run(batches(5, poisoned={1, 2}), fused=fused, dtype=dtype, read_every=4)
    assert "NaN or infinite at epoch 1, optimizer step 2" in message and "No update was applied" in message
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_a_stop_request_lands_on_the_next_read():
    reads = []

    def stop_from_the_second_read():
        reads.append(None)
        return len(reads) >= 2

    model, stats = run(batches(7), fused=True, read_every=3, stop=stop_from_the_second_read)
    assert (stats["steps"], stats["stopped"], stats["images"]) == (4, True, 8)  # reads after steps 1 and 4
    _, stats = run(batches(5), fused=True, read_every=1, stop=lambda: True)
    assert (stats["steps"], stats["stopped"]) == (1, True)
    # A request on the epoch's last step lets the epoch finish: the caller saves the epoch's end.
    _, stats = run(batches(1), fused=True, read_every=3, stop=lambda: True)
    assert (stats["steps"], stats["stopped"]) == (1, False)


@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.parametrize("step_seconds, read_steps", [(0.01, [1, 4, 7, 10, 12]), (0.5, [1, 4, 7, 10, 12]),
                                                      (0.6, [1, 4, 7, 10, 12]), (0.7, [1, 3, 5, 7, 9, 11, 12]),
                                                      (3.0, list(range(1, 13)))])
def test_the_host_reads_after_the_first_step_then_every_read_every_steps_or_two_seconds(step_seconds, read_steps,
                                                                                       processes, monkeypatch):
    """On a clock that moves `step_seconds` per step, with read_every=3: fast steps are read every 3, slower ones
    as often as keeps the reads READ_EVERY_S (2 s) apart, steps over 2 s every one. Every process sums the same
    seconds, so each reads the mean (two identical processes: every sum doubled)."""
    assert yolo.engine.READ_EVERY_S == 2.0
    monkeypatch.setattr(yolo.engine, "all_reduce_sum", lambda tensor: tensor * processes)
    now, read_at = [0.0], []

    def forward_loss(model, batch):
        now[0] += step_seconds
        return detection_loss(model, batch, loss_weights=LOSS_WEIGHTS, device=torch.device("cpu"),
                              dtype=torch.float32)

    def stop_requested():
        read_at.append(round(now[0] / step_seconds))
        return False

    model = TinyDetector()
    cpu = torch.device("cpu")
    stats = train_one_epoch(model, batches(12), build_optimizer(model, "sgd", 0.1, 0.9, 0.0, fused=True),
                            torch.amp.GradScaler("cpu", enabled=False), forward_loss=forward_loss,
                            term_names=LOSS_TERMS, epoch=0, start_step=0, accumulation=1, lr_at=lambda step: 0.1,
                            device=cpu, stop_requested=stop_requested, read_every=3, clock=lambda: now[0])
    assert read_at == read_steps and stats["steps"] == 12


def test_reads_every_few_steps_train_exactly_like_reads_every_step():
    every_step, first = run(batches(5), fused=True, read_every=1)
    every_third, second = run(batches(5), fused=True, read_every=3)
    assert first == second
    for name, value in every_step.state_dict().items():
        assert torch.equal(every_third.state_dict()[name], value), name


def test_a_resume_into_another_dtype_keeps_or_starts_the_scaler(capsys):
    fp16_scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    load_scaler_state(fp16_scaler, {}, "bf16")  # bf16 -> fp16: no state was saved
    assert fp16_scaler.get_scale() == 1024.0
    assert "fresh one" in capsys.readouterr().out
    saved = torch.amp.GradScaler("cpu", init_scale=256.0).state_dict()
    load_scaler_state(fp16_scaler, saved, "fp16")
    assert fp16_scaler.get_scale() == 256.0
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    load_scaler_state(disabled, saved, "fp16")  # fp16 -> bf16: the scale is not needed
    assert not disabled.is_enabled()


def stock_sgd(model, lr=0.1, momentum=0.9, weight_decay=5e-4):
    """PyTorch's fused SGD with no help from yolo.optim: the project's parameter groups, no buffers made ahead
    (fused, as the skipping one: its arithmetic differs from the foreach implementation's in the last bit)."""
    reference = build_optimizer(model, "sgd", lr, momentum, weight_decay)
    return torch.optim.SGD([{"params": group["params"], "weight_decay": group["weight_decay"]}
                            for group in reference.param_groups], lr=lr, momentum=momentum, fused=True)


def poisoned_empty_like(original):
    """torch.empty_like whose memory is NaN: what PyTorch leaves uninitialised is then sure to show."""
    def empty_like(tensor, *args, **kwargs):
        return original(tensor, *args, **kwargs).fill_(float("nan"))
    return empty_like


@pytest.mark.parametrize("skipped_step", [0, 1])
@pytest.mark.parametrize("scaled", [False, True], ids=["no_scaler", "grad_scaler"])
@pytest.mark.parametrize("resumed", [False, True], ids=["", "resumed"])
def test_a_skipped_step_touches_nothing_and_the_run_then_equals_stock_sgd(monkeypatch, skipped_step, scaled,
                                                                          resumed):
    """Fused SGD skipping a step on the device (a non-finite loss, or the GradScaler's overflow, routine on
    the first fp16 step) leaves weights and optimizer state as they were; the steps after it are stock
    SGD's steps from the same weights, bitwise, also when the state went through a checkpoint after the skip."""
    monkeypatch.setattr(torch, "empty_like", poisoned_empty_like(torch.empty_like))
    torch.manual_seed(0)
    model, reference_model = TinyDetector(), TinyDetector()
    reference_model.load_state_dict(model.state_dict())
    optimizer = build_optimizer(model, "sgd", 0.1, 0.9, 5e-4, fused=True)
    reference = stock_sgd(reference_model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, enabled=scaled)
    gradients = [[torch.randn_like(p) for p in model.parameters()] for _ in range(3)]
    for step, step_gradients in enumerate(gradients):
        skip = step == skipped_step
        scaler.scale(torch.ones(()))  # as the loop scales its loss before backward
        for parameter, gradient in zip(model.parameters(), step_gradients):
            # The GradScaler's overflow: a non-finite gradient of the scaled loss.
            parameter.grad = gradient * scaler.get_scale() + (float("inf") if skip and scaled else 0.0)
        weights, state = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
        apply_update(optimizer, scaler, skip=torch.tensor(skip and not scaled))
        if skip:
            assert_equal_states(model.state_dict(), weights)
            assert_equal_states(optimizer.state_dict()["state"], state["state"])
            if resumed:
                optimizer = build_optimizer(model, "sgd", 0.1, 0.9, 5e-4, fused=True)
                load_optimizer_state(optimizer, state)
            continue
        for parameter, gradient in zip(reference_model.parameters(), step_gradients):
            parameter.grad = gradient.clone()
        reference.step()
        assert_equal_states(model.state_dict(), reference_model.state_dict())


def test_a_state_saved_before_any_step_resumes_into_a_fused_optimizer_that_skips_cleanly(monkeypatch):
    """A checkpoint from stock SGD before its first step has no momentum buffers: loaded into fused SGD
    whose first step is skipped, it still gives stock SGD's next step."""
    monkeypatch.setattr(torch, "empty_like", poisoned_empty_like(torch.empty_like))
    torch.manual_seed(0)
    model, reference_model = TinyDetector(), TinyDetector()
    reference_model.load_state_dict(model.state_dict())
    reference = stock_sgd(reference_model)
    optimizer = build_optimizer(model, "sgd", 0.1, 0.9, 5e-4, fused=True)
    load_optimizer_state(optimizer, reference.state_dict())
    assert skips_on_device(optimizer)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter)
    apply_update(optimizer, scaler, skip=torch.tensor(True))
    for parameter, reference_parameter in zip(model.parameters(), reference_model.parameters()):
        parameter.grad = torch.randn_like(parameter)
        reference_parameter.grad = parameter.grad.clone()
    apply_update(optimizer, scaler, skip=torch.tensor(False))
    reference.step()
    assert_equal_states(model.state_dict(), reference_model.state_dict())


def assert_equal_states(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for key, value in first.items():
        if isinstance(value, dict):
            assert_equal_states(value, second[key])
        else:
            assert torch.equal(value, second[key]), key


@pytest.mark.parametrize("script", ["train.py", "pretrain.py"])
def test_both_training_scripts_build_their_optimizer_and_scaler_through_training_parts(monkeypatch, script):
    """On CUDA a training run's optimizer is fused (a skipped step costs no host read), cuDNN picks its
    algorithms once, and fp16 alone gets the GradScaler; pretrain.py once built an unfused SGD there."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    config = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
    optimizer, scaler = training_parts(TinyDetector(), "sgd", config, torch.device("cuda"), torch.bfloat16)
    assert skips_on_device(optimizer) and torch.backends.cudnn.benchmark and not scaler.is_enabled()
    optimizer, scaler = training_parts(TinyDetector(), "adamw", config, torch.device("cpu"), torch.float16)
    assert isinstance(optimizer, torch.optim.AdamW) and not skips_on_device(optimizer) and scaler.is_enabled()
    source = (Path(__file__).resolve().parents[1] / script).read_text()
    assert "training_parts(model," in source and "build_optimizer(" not in source


def test_the_colour_jitter_reaches_the_model_in_training():
    """Each training image enters the model with its own exposure and saturation factors applied, exactly as
    jitter_colours_ defines them; without factors (augment=false) it enters as its pixels / 255."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (2, 3, SIDE, SIDE), dtype=torch.uint8, generator=generator)
    factors = torch.tensor([[1.4, 0.7], [0.8, 1.3]])
    target = encode_target(torch.tensor([[0.1, 0.2, 0.6, 0.7]]), torch.tensor([1]), GRID, CLASSES)
    seen = []
    model = TinyDetector()
    model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].clone()))
    for colour_factors in (factors, None):
        train_one_epoch(model, [DetectionBatch(images, torch.stack([target, target]), colour_factors, [])],
                        build_optimizer(model, "sgd", 0.1, 0.9, 0.0), torch.amp.GradScaler("cpu", enabled=False),
                        forward_loss=partial(detection_loss, loss_weights=LOSS_WEIGHTS, device=torch.device("cpu"),
                                             dtype=torch.float32),
                        term_names=LOSS_TERMS, epoch=0, start_step=0, accumulation=1, lr_at=lambda step: 0.0,
                        device=torch.device("cpu"), stop_requested=lambda: False)
    jittered, plain = seen
    assert torch.equal(plain, images.float() / 255)
    assert torch.equal(jittered, jitter_colours_(images.float() / 255, factors))
    assert not torch.allclose(jittered, plain, atol=0.05)


def test_a_non_finite_loss_at_the_very_first_step_is_named_and_nothing_is_applied():
    torch.manual_seed(0)
    initial = TinyDetector().state_dict()
    for fused in (True, False):
        model, message = run(batches(3, poisoned={0}), fused=fused)
        assert "NaN or infinite at epoch 1, optimizer step 1." in message
        for name, value in initial.items():
            assert torch.equal(model.state_dict()[name], value), name
    # Read after 4 steps, the first two NaN: the error still names the first (step 0 is a step like the others).
    _, message = run(batches(5, poisoned={0, 1}), fused=True, read_every=4)
    assert "NaN or infinite at epoch 1, optimizer step 1." in message


def test_accumulated_micro_batches_make_the_step_of_their_whole_batch():
    """Two micro-batches of 2 accumulated, against one micro-batch of their 4 images (no BatchNorm here), with a
    learning rate that changes at every step."""
    def train(loader, accumulation):
        torch.manual_seed(0)
        model = TinyDetector()
        optimizer = build_optimizer(model, "sgd", 0.1, 0.9, 5e-4)
        cpu = torch.device("cpu")
        stats = train_one_epoch(model, loader, optimizer, torch.amp.GradScaler("cpu", enabled=False), epoch=0,
                                start_step=0, accumulation=accumulation, term_names=LOSS_TERMS,
                                forward_loss=partial(detection_loss, loss_weights=LOSS_WEIGHTS, device=cpu,
                                                     dtype=torch.float32),
                                lr_at=lambda step: 0.25 * (step + 2), device=cpu, stop_requested=lambda: False)
        return model, optimizer, stats

    micro = batches(4)
    whole = [DetectionBatch(torch.cat([a.images, b.images]), torch.cat([a.grids, b.grids]), None, [])
             for a, b in zip(micro[::2], micro[1::2])]
    accumulated, optimizer, stats = train(micro, 2)
    reference, reference_optimizer, reference_stats = train(whole, 1)
    assert (stats["steps"], stats["images"]) == (reference_stats["steps"], reference_stats["images"]) == (2, 8)
    assert [group["lr"] for group in optimizer.param_groups] == [0.75, 0.75]
    assert [group["lr"] for group in reference_optimizer.param_groups] == [0.75, 0.75]
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(accumulated.state_dict()[name], value, rtol=1e-5, atol=1e-7, msg=name)
    for name, value in reference_stats["terms"].items():
        assert stats["terms"][name] == pytest.approx(value, rel=1e-6), name


def test_a_micro_batch_of_only_unreadable_images_stops_training_with_the_reason():
    with pytest.raises(ImageDecodeError) as raised:  # the collate function gives None for such a micro-batch
        run([None], fused=False)
    assert str(raised.value) == ("every image of a micro-batch was skipped as unreadable (see the warnings above); a "
                                 "training step needs at least one")


def test_ground_truths_become_the_metrics_rows():
    annotation = {"boxes": np.array([[1, 2, 30, 40], [5, 6, 7, 8]], dtype=np.float32), "labels": np.array([3, 0]),
                  "difficult": np.array([False, True])}
    rows = ground_truth_array(annotation)
    assert rows.dtype == np.float64
    np.testing.assert_array_equal(rows, [[1, 2, 30, 40, 3, 0], [5, 6, 7, 8, 0, 1]])


class RecordedBar:
    """tqdm's stand-in: records how the bar was made and what it was told."""

    made = []

    def __init__(self, iterable, **settings):
        self.iterable, self.settings, self.postfixes = iterable, settings, []
        self.disable = settings["disable"] is True  # as tqdm resolves it for a terminal
        RecordedBar.made.append(self)

    def __iter__(self):
        return iter(self.iterable)

    def set_postfix(self, **values):
        self.postfixes.append(values)


@pytest.mark.parametrize("main_process", [True, False])
def test_the_progress_bar_names_the_epoch_and_shows_the_loss_on_the_main_process_only(monkeypatch, main_process):
    monkeypatch.setattr(yolo.engine, "tqdm", RecordedBar)
    monkeypatch.setattr(yolo.engine, "is_main_process", lambda: main_process)
    RecordedBar.made.clear()
    _, stats = run(batches(2), fused=False, read_every=2)
    (bar,) = RecordedBar.made
    # disable=None: tqdm itself hides the bar where the output is not a terminal.
    assert bar.settings == {"desc": "epoch 1", "leave": False, "dynamic_ncols": True,
                            "disable": None if main_process else True}
    loss = sum(stats["terms"].values()) / stats["images"]
    # Read after the first step, then at the epoch's end.
    assert len(bar.postfixes) == 2 and bar.postfixes[-1] == {"loss": f"{loss:.3f}", "lr": "1.00e-01"}


@pytest.mark.parametrize("main_process", [True, False])
def test_a_log_gets_a_progress_line_a_minute_within_an_epoch(monkeypatch, capsys, main_process):
    """Without a terminal (a log file, as here) tqdm's bar is off: a line every LOG_PROGRESS_EVERY_S seconds (60) of
    a fake clock that moves 20 s per reading says how far the epoch is; from the main process only."""
    from yolo import engine
    readings = iter(range(0, 10_000, 20))
    monkeypatch.setattr(engine, "monotonic", lambda: next(readings))
    monkeypatch.setattr(engine, "is_main_process", lambda: main_process)
    run(batches(6), fused=False)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch 1:")]
    # Readings: 0 at the start, one per step (20, 40, 60: a line, 60 s on), one more for a line printed (80), then
    # 100, 120, 140: a line.
    if not main_process:
        assert lines == []
        return
    assert [line.split(",")[0] for line in lines] == ["epoch 1: 3/6 micro-batches", "epoch 1: 6/6 micro-batches"]
    assert all(", loss " in line and ", lr 1.00e-01" in line for line in lines)


def test_the_loss_weights_reach_the_loss():
    batch, model, cpu = batches(1)[0], TinyDetector(), torch.device("cpu")
    weighted, _ = detection_loss(model, batch, loss_weights=LOSS_WEIGHTS, device=cpu, dtype=torch.float32)
    unweighted, _ = detection_loss(model, batch, loss_weights={"lambda_coord": 1.0, "lambda_noobj": 1.0},
                                   device=cpu, dtype=torch.float32)
    for name, factor in (("coord", 5.0), ("noobj", 0.5), ("obj", 1.0), ("cls", 1.0)):
        torch.testing.assert_close(weighted[name], unweighted[name] * factor)


def test_the_epochs_loss_sums_are_kept_in_float64():
    """A term of 2**24 then one of 1: float32 sums would lose the 1 (2**24 + 1 is not a float32)."""
    values = iter([2.0 ** 24, 1.0])

    def forward_loss(model, batch):
        zero = model(batch.images).sum() * 0  # a loss with a gradient, of the value wanted
        return {name: zero + (next(values) if name == "coord" else 0.0) for name in LOSS_TERMS}, 1

    model = TinyDetector()
    stats = train_one_epoch(model, batches(2), build_optimizer(model, "sgd", 0.1, 0.9, 0.0, fused=False),
                            torch.amp.GradScaler("cpu", enabled=False), forward_loss=forward_loss,
                            term_names=LOSS_TERMS, epoch=0, start_step=0, accumulation=1, lr_at=lambda step: 0.1,
                            device=torch.device("cpu"), stop_requested=lambda: False)
    assert stats["terms"]["coord"] == 2.0 ** 24 + 1 and stats["images"] == 2


def test_gradients_are_synchronised_only_on_the_micro_batch_that_completes_a_step():
    """DistributedDataParallel averages gradients across processes on each backward outside `no_sync()`: the loop
    enters it for every micro-batch but the last of each step. A model with a recording `no_sync` stands in for
    the wrapped one."""
    from contextlib import contextmanager

    class RecordingDetector(TinyDetector):
        def __init__(self):
            super().__init__()
            self.backwards_in_no_sync, self.inside = [], False
            self.linear.weight.register_hook(lambda grad: self.backwards_in_no_sync.append(self.inside))

        @contextmanager
        def no_sync(self):
            self.inside = True
            yield
            self.inside = False

    model = RecordingDetector()
    cpu = torch.device("cpu")
    train_one_epoch(model, batches(6), build_optimizer(model, "sgd", 0.1, 0.9, 0.0, fused=False),
                    torch.amp.GradScaler("cpu", enabled=False), term_names=LOSS_TERMS, epoch=0, start_step=0,
                    accumulation=3, lr_at=lambda step: 0.1, device=cpu, stop_requested=lambda: False,
                    forward_loss=partial(detection_loss, loss_weights=LOSS_WEIGHTS, device=cpu, dtype=torch.float32))
    assert model.backwards_in_no_sync == [True, True, False, True, True, False]
