"""Pretrain a detector's backbone as an image classifier (the paper's first stage), on one device or many.

    python pretrain.py --backbone=darknet --data_dir=/data/imagenet --out_dir=runs/pretrain_darknet
    torchrun --nproc_per_node=4 pretrain.py --backbone=darknet --data_dir=/data/imagenet
    python train.py --backbone=darknet --pretrained=false --backbone_weights=runs/pretrain_darknet/last.pt

data_dir holds train/ and val/, one folder of images per class (ImageNet's usual layout). The recipe is
the standard ImageNet one: SGD with momentum, random resized crops and flips at image_size (the paper's
224), a cosine (or step) schedule; top-1 / top-5 are measured on val/ resized to 256 and centre-cropped
to 224. Every constant below can be overridden as --name=value. A rerun of the same command continues
from out_dir/last.pt; SIGINT or SIGTERM saves the current step and exits.
"""
import bisect
import math
import random
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import Subset, default_collate

from yolo.checkpoint import CheckpointError, CheckpointWriter, git_commit, load_checkpoint
from yolo.classification import BackboneClassifier, classification_loss, evaluate_classifier, image_folders
from yolo.config import at_least, between, constants, format_config, one_of, resolve_config, writable_folder
from yolo.device import DTYPES, resolve_device
from yolo.distributed import barrier, cleanup, is_main_process
from yolo.engine import NonFiniteLossError, train_one_epoch
from yolo.model import BACKBONES
from yolo.optim import load_optimizer_state
from yolo.plots import plot_classification_curve
from yolo.run import (StopRequest, announce_epochs, exit_for_stop, find_checkpoint, finished_already,
                      load_scaler_state, mark_finished, refuse_other_settings, save_epoch, say, start_process,
                      start_run_folder, stop_if_requested, training_parts, training_wrapper)
from yolo.sampling import GlobalBatchSampler, SeededSamples
from yolo.transforms import DevicePrefetcher, build_loader, check_num_workers, num_loader_workers

# --- model
backbone = "darknet"           # darknet | fast | resnet18 | resnet50 | mobilenet_v2, trained from scratch
image_size = 224               # training and evaluation crop side in pixels (the paper's pretraining size)
# --- data
data_dir = "data/imagenet"     # ImageFolder layout: train/ and val/, one folder of images per class in each
num_workers = "auto"           # loading processes per training process: auto (its share of the cores, less one) | N
# --- recipe (standard ImageNet: SGD, random resized crop + flip, cosine schedule)
epochs = 90                    # total epochs
batch_size = 256               # images per optimizer step, summed over processes and accumulation
micro_batch_size = 64          # images per process and forward pass; BatchNorm normalises over these
lr = 0.1                       # learning rate at the start of the schedule (for batch_size 256)
schedule = "cosine"            # cosine: lr x (1 + cos(pi x epoch / epochs)) / 2 | step: x lr_gamma at lr_milestones
lr_milestones = (30, 60, 80)   # epochs at which the step schedule multiplies the learning rate by lr_gamma
lr_gamma = 0.1                 # step schedule's factor at each milestone
momentum = 0.9                 # SGD momentum
weight_decay = 1e-4            # L2 weight decay on convolution and linear weights
label_smoothing = 0.0          # cross-entropy label smoothing: 0 (none) to below 1; 0.1 is common
# --- run
out_dir = "runs/pretrain_darknet"  # last.pt, log.csv, config.json, training_curve.png
resume = "auto"                # auto: continue from out_dir/last.pt if present | never | path to a checkpoint
seed = 0                       # initialisation, data order and augmentation
device = "auto"                # auto (cuda if available) | cpu | cuda
dtype = "auto"                 # autocast: auto (CUDA: bf16 where native, else fp16; CPU: fp32) | fp32 | bf16 | fp16
compile = False                # torch.compile the model
log_every = 20                 # CUDA: the host reads the loss, stop requests and non-finite checks every N steps or 2 s
eval_every = 1                 # validate every N epochs and after the last; 0: only after the last

SCHEDULES = ("cosine", "step")
RULES = {"device": resolve_device, "backbone": one_of(*BACKBONES), "image_size": at_least(32),
         "num_workers": check_num_workers, "epochs": at_least(1), "batch_size": at_least(1),
         "micro_batch_size": at_least(1), "lr": at_least(0.0), "schedule": one_of(*SCHEDULES),
         "lr_milestones": at_least(0), "lr_gamma": at_least(0.0), "momentum": between(0.0, 1.0),
         "weight_decay": at_least(0.0), "label_smoothing": between(0.0, 0.999), "seed": at_least(0),
         "dtype": one_of("auto", *DTYPES), "log_every": at_least(1), "eval_every": at_least(0),
         "out_dir": writable_folder}
LOG_COLUMNS = ("epoch", "lr", "train_loss", "val_loss", "val_top1", "val_top5", "images_per_s", "seconds")


def learning_rate(epoch: float, config: dict) -> float:
    """The schedule at a fractional epoch; past the planned end, cosine stays at 0 and step at its last value."""
    if config["schedule"] == "cosine":
        return config["lr"] * (1 + math.cos(math.pi * min(epoch / config["epochs"], 1.0))) / 2
    return config["lr"] * config["lr_gamma"] ** bisect.bisect_right(sorted(config["lr_milestones"]), epoch)


def main(config: dict) -> None:
    device, dtype, rank, local_rank, world_size = start_process(config)
    out_dir = Path(config["out_dir"])
    say(f"pretrain.py on {world_size} process(es), device {device}, dtype {str(dtype).removeprefix('torch.')}\n"
        f"{format_config(config)}")

    random.seed(config["seed"])
    torch.manual_seed(config["seed"])
    train_set, val_set = image_folders(config["data_dir"], config["image_size"])
    class_names = train_set.classes
    # `task` marks the checkpoint as a classifier's, which train.py's backbone_weights requires.
    run_config = {**config, "task": "classification", "num_classes": len(class_names)}
    sampler = GlobalBatchSampler(len(train_set), config["batch_size"], config["micro_batch_size"], rank, world_size,
                                 config["seed"])
    loading = {"num_workers": num_loader_workers(config["num_workers"]), "collate_fn": default_collate,
               "image_bytes": 3 * config["image_size"] ** 2 * torch.float32.itemsize, "start_workers": True}
    # Every worker forked before any thread starts (see build_loader's start_workers): the validation loader's
    # first, without pinned memory.
    val_loader = build_loader(Subset(val_set, range(rank, len(val_set), world_size)), config["micro_batch_size"],
                              shuffle=False, pin_memory=False, **loading)
    train_loader = DevicePrefetcher(build_loader(SeededSamples(train_set), config["micro_batch_size"], shuffle=False,
                                                 sampler=sampler, pin_memory=device.type == "cuda", **loading), device)

    model = BackboneClassifier(config["backbone"], len(class_names)).to(device, memory_format=torch.channels_last)
    optimizer, scaler = training_parts(model, "sgd", config, device, dtype)
    start_epoch, start_step = 0, 0

    checkpoint_path = find_checkpoint(config, out_dir)
    if checkpoint_path is not None:
        try:
            checkpoint = load_checkpoint(checkpoint_path, map_location=device)
        except CheckpointError as error:
            sys.exit(f"error: {error}")
        refuse_other_settings(checkpoint_path, checkpoint["config"], run_config, constants(globals()),
                              schedule_follows_epochs=config["schedule"] != "step")
        model.load_state_dict(checkpoint["model"])
        load_optimizer_state(optimizer, checkpoint["optimizer"])
        load_scaler_state(scaler, checkpoint["scaler"], checkpoint["config"].get("dtype"))
        start_epoch, start_step = checkpoint["epoch"], checkpoint["step"]
        torch.set_rng_state(checkpoint["rng"]["torch"].cpu())
        random.setstate(checkpoint["rng"]["python"])
        say(f"resumed from {checkpoint_path}: epoch {start_epoch + 1}, step {start_step}")
    if finished_already(out_dir, start_epoch, config["epochs"]):
        return
    start_run_folder(out_dir, run_config, start_epoch, LOG_COLUMNS)
    train_model = training_wrapper(model, device, local_rank, config["compile"])

    def checkpoint_state(epoch: int, step: int) -> dict:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "epoch": epoch, "step": step, "config": run_config, "class_names": list(class_names),
                "git_commit": git_commit(), "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}

    stop = StopRequest()
    writer = CheckpointWriter()
    forward_loss = partial(classification_loss, label_smoothing=config["label_smoothing"], device=device,
                           dtype=dtype)
    announce_epochs(start_epoch, config["epochs"], sampler)
    for epoch in range(start_epoch, config["epochs"]):
        sampler.set_epoch(epoch, start_step)
        started = time.perf_counter()
        try:
            stats = train_one_epoch(
                train_model, train_loader, optimizer, scaler, forward_loss=forward_loss, term_names=("cross_entropy",),
                epoch=epoch, start_step=start_step, accumulation=sampler.accumulation, device=device,
                stop_requested=stop, lr_at=lambda step: learning_rate(epoch + step / sampler.steps_per_epoch, config),
                read_every=config["log_every"] if device.type == "cuda" else 1)
        except NonFiniteLossError as error:
            writer.wait()
            cleanup()
            sys.exit(f"error: {error}")
        if stats["stopped"]:
            if is_main_process():
                writer.save(checkpoint_state(epoch, stats["steps"]), out_dir / "last.pt")
            exit_for_stop(stop, writer, f"saved {out_dir / 'last.pt'} at epoch {epoch + 1}, step {stats['steps']}: "
                                        f"rerun the same command to resume")
        start_step = 0
        seconds = time.perf_counter() - started
        row = {"epoch": epoch + 1, "lr": f"{optimizer.param_groups[0]['lr']:.6g}",
               "train_loss": f"{stats['terms']['cross_entropy'] / stats['images']:.6f}",
               "images_per_s": f"{stats['images'] / seconds:.2f}", "seconds": f"{seconds:.1f}",
               "val_loss": "", "val_top1": "", "val_top5": ""}
        last_epoch = epoch + 1 == config["epochs"]
        if last_epoch or (config["eval_every"] > 0 and (epoch + 1) % config["eval_every"] == 0):
            validation = evaluate_classifier(model, val_loader, device=device, dtype=dtype)
            row.update({"val_loss": f"{validation['loss']:.6f}", "val_top1": f"{validation['top1']:.6f}",
                        "val_top5": f"{validation['top5']:.6f}"})
        save_epoch(writer, out_dir, row, LOG_COLUMNS, checkpoint_state(epoch + 1, 0), plot_classification_curve)
        say(" | ".join(f"{key} {row[key]}" for key in LOG_COLUMNS if row[key] != ""))
        barrier()
        stop_if_requested(stop, writer, device, out_dir, epoch, last_epoch)
    writer.wait()
    if is_main_process():
        mark_finished(out_dir, config["epochs"])
    say(f"finished: {out_dir / 'last.pt'} holds the pretrained backbone; pass it to train.py as "
        f"--backbone_weights={out_dir / 'last.pt'} --pretrained=false")
    cleanup()


if __name__ == "__main__":
    try:
        main(resolve_config(globals(), rules=RULES))
    except (ValueError, FileNotFoundError, CheckpointError) as error:  # bad settings, data or disk
        sys.exit(f"error: {error}")
