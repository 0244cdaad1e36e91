"""The training and evaluation loops, shared by train.py and evaluate.py."""
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from yolo.inference import Detector
from yolo.distributed import all_reduce_sum, gather_to_main, is_main_process
from yolo.loss import yolo_loss_terms
from yolo.metrics import evaluate_detections
from yolo.optim import set_learning_rate
from yolo.photometric import model_input, stacked_colour_factors

LOSS_TERMS = ("coord", "obj", "noobj", "cls")


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


def train_one_epoch(model: nn.Module, loader, optimizer, scaler, *, epoch: int, start_step: int, accumulation: int,
                    lr_at, loss_weights: dict, device: torch.device, dtype: torch.dtype, stop_requested) -> dict:
    """Train from optimizer step `start_step` to the end of `epoch`, or until `stop_requested()`.

    `lr_at(step)` gives the learning rate of each optimizer step. Returns the per-image loss terms summed
    over all processes, the number of images, the optimizer steps done and whether the epoch was cut short.
    The loop stops with NonFiniteLossError before any optimizer step that a NaN or infinite loss would poison.
    """
    model.train()
    sums = torch.zeros(len(LOSS_TERMS) + 1, dtype=torch.float64, device=device)  # terms x images, then images
    step, stopped = start_step, False
    step_is_finite = torch.ones((), device=device)
    progress = tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, dynamic_ncols=True,
                    disable=None if is_main_process() else True)
    for index, (images, targets, target_dicts) in enumerate(progress):
        micro_step = index % accumulation
        if micro_step == 0:
            set_learning_rate(optimizer, lr_at(step))
        images = model_input(images, device, stacked_colour_factors(target_dicts))
        targets = targets.to(device, non_blocking=True)
        last_micro_step = micro_step == accumulation - 1
        # Gradients are averaged across processes only on the micro-batch that completes the step.
        sync_context = nullcontext() if last_micro_step or not hasattr(model, "no_sync") else model.no_sync()
        with sync_context:
            with autocast_context(device, dtype):
                predictions = model(images)
            terms = yolo_loss_terms(predictions, targets, **loss_weights)
            loss = sum(terms.values())
            scaler.scale(loss / accumulation).backward()
        step_is_finite = step_is_finite * torch.isfinite(loss)
        sums += torch.stack([*(terms[name].detach().double() for name in LOSS_TERMS), sums.new_tensor(1.0)]) \
            * len(images)
        if not last_micro_step:
            continue
        flags = all_reduce_sum(torch.stack([1.0 - step_is_finite.float(),
                                            torch.tensor(float(stop_requested()), device=device)]))
        if flags[0] > 0:
            raise NonFiniteLossError(f"The loss became NaN or infinite at epoch {epoch + 1}, optimizer step {step + 1}. "
                                     f"No update was applied and last.pt still holds the previous epoch; lower lr "
                                     f"or check the data, then resume.")
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step, step_is_finite = step + 1, torch.ones((), device=device)
        progress.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        # A stop on the epoch's last step lets the epoch end normally (the caller saves and exits then).
        if flags[1] > 0 and index + 1 < len(loader):
            stopped = True
            break
    totals = all_reduce_sum(sums)
    images_seen = totals[-1].item()
    return {"terms": {name: totals[i].item() for i, name in enumerate(LOSS_TERMS)}, "images": images_seen,
            "steps": step, "stopped": stopped}


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
    for images, targets, target_dicts in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True,
                                              disable=None if is_main_process() else True):
        predictions = detector.predict(images)
        terms = yolo_loss_terms(predictions, targets.to(device), **loss_weights)
        sums += torch.stack([*(terms[name].double() for name in LOSS_TERMS), sums.new_tensor(1.0)]) * len(images)
        original_sizes = [target["orig_size"].tolist() for target in target_dicts]
        for target, detection in zip(target_dicts, detector.detections(predictions, original_sizes)):
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
