"""The training and evaluation loops, shared by train.py and evaluate.py."""
from contextlib import nullcontext
from time import monotonic

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from yolo.data import ImageDecodeError
from yolo.distributed import all_reduce_sum, gather_to_main, is_main_process
from yolo.inference import Detector
from yolo.loss import yolo_loss_terms
from yolo.metrics import evaluate_detections
from yolo.optim import set_learning_rate, skips_on_device
from yolo.photometric import model_input

LOSS_TERMS = ("coord", "obj", "noobj", "cls")
# tqdm's monitor thread would run beside the loader workers forked later (a fork while a thread holds a lock
# can hang the child); the bars refresh as they advance without it.
tqdm.monitor_interval = 0
LOG_PROGRESS_EVERY_S = 60  # where no terminal shows tqdm's bar (a log file), a progress line this often
# Where the host reads every few steps (a GPU): the longest wait, in seconds, between two reads of the stop request,
# so that a stop lands within seconds of its signal however long the steps take (torchrun and SLURM allow 30 s).
READ_EVERY_S = 2.0


class NonFiniteLossError(RuntimeError):
    pass


def autocast_context(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def ground_truth_array(annotation: dict) -> np.ndarray:
    """An annotation as the metrics' (M, 6) array: VOC pixel x1, y1, x2, y2, class id, difficult."""
    return np.concatenate([annotation["boxes"].astype(np.float64), annotation["labels"][:, None],
                           annotation["difficult"][:, None]], axis=1)


def detection_loss(model: nn.Module, batch, *, loss_weights: dict, device: torch.device,
                   dtype: torch.dtype) -> tuple[dict, int]:
    """The paper's loss terms (means over the images) of one detection micro-batch, and its number of images.

    `batch` is a yolo.transforms.DetectionBatch: its uint8 images become the model's input on the device,
    colour-jittered by their own factors.
    """
    images = model_input(batch.images, device, batch.colour_factors)
    with autocast_context(device, dtype):
        predictions = model(images)
    return yolo_loss_terms(predictions, batch.grids.to(device, non_blocking=True), **loss_weights), len(images)


def train_one_epoch(model: nn.Module, loader, optimizer, scaler, *, forward_loss, term_names: tuple[str, ...],
                    epoch: int, start_step: int, accumulation: int, lr_at, device: torch.device, stop_requested,
                    read_every: int = 1, clock=monotonic) -> dict:
    """Train from optimizer step `start_step` to the end of `epoch`, or until `stop_requested()`.

    `forward_loss(model, batch)` gives a micro-batch's loss terms (named `term_names`, means over its images)
    and its number of images: `detection_loss` for the detector, a classification loss for pretraining.
    `lr_at(step)` gives the learning rate of each optimizer step. Returns the per-image loss terms summed
    over all processes, the number of images, the optimizer steps done and whether the epoch was cut short.

    The host reads what the device computed (the loss shown, the non-finite flag, and the stop request,
    agreed by all processes so that they stop after the same step) only at read points: after the first
    optimizer step, then every `read_every` steps or as many as take READ_EVERY_S by `clock` (seconds) at the
    pace of the last ones, whichever is fewer (at least one), and at the end of the epoch. In between, a GPU
    runs steps back to back while the CPU queues the next ones. No update is applied from a step whose loss was NaN or infinite, nor from any
    step after it: a fused optimizer skips them on the device, the GradScaler (fp16) skips them because
    the loop makes a gradient non-finite, and any other optimizer is checked on the host before each step.
    The loop then raises NonFiniteLossError naming that step at the next read.
    """
    model.train()
    sums = torch.zeros(len(term_names) + 1, dtype=torch.float64, device=device)  # terms x images, then images
    step, stopped = start_step, False
    steps_between_reads, last_read_step, last_read_time = 1, start_step, clock()
    one_batch = torch.ones((), dtype=torch.float64, device=device)  # made once: a copy from the host would wait
    step_is_finite = torch.ones((), device=device)
    first_non_finite_step = torch.full((), -1, dtype=torch.long, device=device)
    check_on_host = not skips_on_device(optimizer) and not scaler.is_enabled()
    progress = tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, dynamic_ncols=True,
                    disable=None if is_main_process() else True)
    log_lines = progress.disable and is_main_process()
    last_line = monotonic()
    for index, batch in enumerate(progress):
        if batch is None:
            raise ImageDecodeError("every image of a micro-batch was skipped as unreadable (see the warnings "
                                   "above); a training step needs at least one")
        micro_step = index % accumulation
        if micro_step == 0:
            set_learning_rate(optimizer, lr_at(step))
        last_micro_step = micro_step == accumulation - 1
        # Gradients are averaged across processes only on the micro-batch that completes the step.
        sync_context = nullcontext() if last_micro_step or not hasattr(model, "no_sync") else model.no_sync()
        with sync_context:
            terms, batch_size = forward_loss(model, batch)
            loss = sum(terms.values())
            scaler.scale(loss / accumulation).backward()
        step_is_finite = step_is_finite * torch.isfinite(loss)
        sums += torch.stack([*(terms[name].detach().double() for name in term_names), one_batch]) * batch_size
        if not last_micro_step:
            continue
        # The same on every process, so that all of them skip (or apply) the same updates.
        non_finite = all_reduce_sum(1.0 - step_is_finite) > 0
        first_non_finite_step = torch.where((first_non_finite_step < 0) & non_finite, step, first_non_finite_step)
        if check_on_host:
            raise_if_non_finite(first_non_finite_step.item(), epoch)
        apply_update(optimizer, scaler, skip=first_non_finite_step >= 0)
        step, step_is_finite = step + 1, torch.ones((), device=device)
        epoch_ends = index + 1 == len(loader)
        if step - last_read_step < steps_between_reads and not epoch_ends:
            continue
        # Stop votes, seconds since the last read and processes, summed over all processes: each gets the same
        # sums, so all of them agree on when they read next.
        read = all_reduce_sum(torch.tensor([float(stop_requested()), clock() - last_read_time, 1.0],
                                           dtype=torch.float64, device=device))
        votes, seconds, processes, non_finite_step, mean_loss = torch.cat(
            [read, first_non_finite_step.to(read.dtype)[None], (sums[:-1].sum() / sums[-1])[None]]).tolist()
        raise_if_non_finite(int(non_finite_step), epoch)
        steps_in_time = READ_EVERY_S * (step - last_read_step) * processes / seconds if seconds > 0 else read_every
        steps_between_reads = max(1, min(read_every, int(steps_in_time)))
        last_read_step, last_read_time = step, clock()
        progress.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        if log_lines and monotonic() - last_line >= LOG_PROGRESS_EVERY_S:
            last_line = monotonic()
            print(f"epoch {epoch + 1}: {index + 1}/{len(loader)} micro-batches, loss {mean_loss:.3f}, "
                  f"lr {optimizer.param_groups[0]['lr']:.2e}", flush=True)
        # A stop on the epoch's last step lets the epoch end normally (the caller saves and exits then).
        if votes > 0 and not epoch_ends:
            stopped = True
            break
    totals = all_reduce_sum(sums)
    images_seen = totals[-1].item()
    return {"terms": {name: totals[i].item() for i, name in enumerate(term_names)}, "images": images_seen,
            "steps": step, "stopped": stopped}


def apply_update(optimizer, scaler, skip: torch.Tensor) -> None:
    """One optimizer step from the accumulated gradients, none where the device-side flag `skip` is set
    (which only a fused optimizer or the GradScaler honour without a host read)."""
    if skips_on_device(optimizer) and not scaler.is_enabled():
        optimizer.found_inf = skip.float()
        optimizer.step()
        del optimizer.found_inf
    else:
        if scaler.is_enabled():
            # A non-finite gradient makes the GradScaler skip the step (it checks them all on the device).
            gradient = next(p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None)
            gradient.add_(torch.where(skip, float("nan"), 0.0).to(gradient.dtype))
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)


def raise_if_non_finite(first_non_finite_step: int, epoch: int) -> None:
    if first_non_finite_step >= 0:
        raise NonFiniteLossError(f"The loss became NaN or infinite at epoch {epoch + 1}, optimizer step "
                                 f"{first_non_finite_step + 1}. No update was applied from that step on and last.pt "
                                 f"still holds the previous epoch; lower lr or check the data, then resume.")


@torch.inference_mode()
def evaluate(detector: Detector, loader, dataset, *, loss_weights: dict, desc: str = "evaluate") -> dict:
    """Loss terms and VOC / COCO metrics of `detector` on `loader` (this process's share of `dataset`).

    The loader's batches are EvalTransform outputs whose target dicts carry `index` (the dataset position)
    and `orig_size`. Metrics are computed on rank 0 from every process's detections; other ranks only
    contribute to the losses.
    """
    device = detector.device
    sums = torch.zeros(len(LOSS_TERMS) + 1, dtype=torch.float64, device=device)
    results = []
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=None if is_main_process() else True):
        if batch is None:  # every image of it was skipped as unreadable
            continue
        predictions, boxes, scores = detector.infer(batch.images)
        terms = yolo_loss_terms(predictions, batch.grids.to(device), **loss_weights)
        sums += torch.stack([*(terms[name].double() for name in LOSS_TERMS), sums.new_tensor(1.0)]) * len(batch.images)
        original_sizes = [target["orig_size"].tolist() for target in batch.targets]
        for target, detection in zip(batch.targets, detector.detections(boxes, scores, original_sizes)):
            results.append((target["index"], detection))
    totals = all_reduce_sum(sums)
    output = {"loss_terms": {name: totals[i].item() / totals[-1].item() for i, name in enumerate(LOSS_TERMS)}}
    output["loss"] = sum(output["loss_terms"].values())
    results = gather_to_main(results)
    if is_main_process():
        results.sort(key=lambda item: item[0])
        indices = [index for index, _ in results]
        detections = [array for _, array in results]
        ground_truths = [ground_truth_array(dataset.annotations[index]) for index in indices]
        output["metrics"] = evaluate_detections(detections, ground_truths, len(dataset.class_names))
        output["indices"], output["detections"], output["ground_truths"] = indices, detections, ground_truths
    return output
