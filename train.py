"""Train YOLOv1 with the paper's recipe, on one device or many.

    python train.py --backbone=resnet50 --out_dir=runs/resnet50_voc2012val
    torchrun --nproc_per_node=4 train.py --backbone=resnet50 --out_dir=runs/resnet50_voc2012val

Every constant below can be overridden as --name=value. A rerun of the same command continues from
out_dir/last.pt; SIGINT or SIGTERM saves the current step and exits, and the rerun carries on from there.

On CUDA the loop reads the device's results (shown loss, non-finite check, stop request) after the epoch's first
optimizer step, then every `log_every` steps or 2 seconds, whichever comes first, so a stop lands on the next such
step; on a CPU, where ops run synchronously and a read costs nothing, it reads after every step.
"""
import bisect
import random
import sys
import time
from functools import partial
from pathlib import Path

import torch

from yolo.checkpoint import (ARCHITECTURE_KEYS, CheckpointError, CheckpointWriter, git_commit, load_backbone_weights,
                             load_checkpoint)
from yolo.config import at_least, between, constants, format_config, one_of, resolve_config, writable_folder
from yolo.data import PROTOCOLS, ImageDecodeError, build_dataset, has_test_annotations
from yolo.device import DTYPES, resolve_device
from yolo.distributed import backend, barrier, cleanup, is_main_process
from yolo.engine import LOSS_TERMS, NonFiniteLossError, detection_loss, evaluate, train_one_epoch
from yolo.formats import CLASS_LIST_ADVICE, DATA_FORMATS
from yolo.imagecheck import CACHE_NAME, LEAVE_OUT_OF_SPLIT, require_readable_images
from yolo.inference import Detector
from yolo.model import BACKBONES, PretrainedWeightsError, YOLOv1
from yolo.optim import OPTIMIZERS, load_optimizer_state
from yolo.plots import plot_training_curve
from yolo.run import (StopRequest, announce_epochs, append_log, exit_for_stop, find_checkpoint, finished_already,
                      load_scaler_state, mark_finished, refuse_other_settings, save_epoch, say, start_process,
                      start_run_folder, stop_if_requested, training_parts, training_wrapper)
from yolo.sampling import GlobalBatchSampler, IndexedSamples, SeededSamples
from yolo.transforms import (DevicePrefetcher, EvalTransform, TrainTransform, build_loader, check_num_workers,
                             num_loader_workers, reused_buffer_bytes)

# --- model
backbone = "resnet18"          # resnet18 | resnet50 | mobilenet_v2 | darknet | fast
pretrained = True              # torchvision's ImageNet weights (resnet18, resnet50, mobilenet_v2; darknet, fast: none)
backbone_weights = ""          # a pretrain.py last.pt whose backbone starts this run ("": none; needs pretrained=false)
image_size = 448               # input side in pixels; image_size / 32 must be grid_size or 2 x grid_size
grid_size = 7                  # S, cells per side
num_boxes = 2                  # B, boxes predicted per cell
head_channels = 1024           # width of the head's convolutions (paper: 1024)
fc_dim = 4096                  # width of the hidden fully connected layer (paper: 4096)
zero_init_residual = False     # from scratch: each ResNet block starts as the identity (its last BatchNorm at 0)
# --- data
protocol = "voc2012val"        # voc2012val | voc2007test | voc2012test (the server's) | custom: your own data_dir
data_dir = "data"              # folder holding VOCdevkit/, or (custom) the dataset's folder
data_format = "auto"           # custom: auto (the layout data_dir holds) | voc | coco | yolo, see yolo/formats.py
train_split = "train"          # custom: the split trained on
val_split = "val"              # custom: the split validated on (and evaluated by evaluate.py)
use_difficult = True           # keep objects marked difficult in the training targets (the seed did)
augment = True                 # the paper's augmentation; false: resize only (for overfitting checks)
num_workers = "auto"           # loading processes per training process: auto (its share of the cores, less one) | N
cache_images = False           # decode all train and validation images into RAM once (VOC07+12: ~9 GB per process)
pin_memory = True              # CUDA: page-locked batches, copied to the GPU while it computes
prefetch_factor = 4            # batches each loading process prepares ahead (uint8 448 x 448: 0.6 MB per image)
# --- recipe (SPEC section 5)
epochs = 145                   # total epochs
batch_size = 64                # images per optimizer step, summed over processes and accumulation
micro_batch_size = 16          # images per process and forward pass; BatchNorm normalises over these
optimizer = "sgd"              # sgd (the paper's) | adamw
lr = 1e-2                      # learning rate after warm-up
warmup_lr = 1e-3               # learning rate at the start of the linear warm-up
warmup_epochs = 10.0           # epochs of linear warm-up (fractional epochs allowed)
lr_milestones = (85.0, 115.0)  # epochs at which the learning rate is multiplied by lr_gamma (fractions allowed)
lr_milestones_unit = "epochs"  # epochs | fraction: lr_milestones as fractions of `epochs` (0.6,0.8 follow its length)
lr_gamma = 0.1                 # step factor at each milestone
momentum = 0.9                 # SGD momentum (AdamW: beta1)
weight_decay = 5e-4            # L2 weight decay on convolution and linear weights
lambda_coord = 5.0             # weight of the box-coordinate term
lambda_noobj = 0.5             # weight of the no-object confidence term
# --- run
out_dir = "runs/resnet18_voc2012val"  # last.pt, best.pt, log.csv, config.json, training_curve.png
resume = "auto"                # auto: continue from out_dir/last.pt if present | never | path to a checkpoint
seed = 0                       # model initialisation, data order and augmentation
device = "auto"                # auto (cuda if available) | cpu | cuda
dtype = "auto"                 # autocast: auto (CUDA: bf16 where native, else fp16; CPU: fp32) | fp32 | bf16 | fp16
compile = False                # torch.compile the model for training (one compilation; validation stays eager)
log_every = 20                 # CUDA: most steps between reads of the loss, stop and NaN flags (or 2 s; CPU: 1)
bad_images = "skip"            # an image that fails to decode while training: skip (warned, counted in log.csv) | error
eval_every = 5                 # validate every N epochs and after the last; 0: only after the last


RULES = {"device": resolve_device, "backbone": one_of(*BACKBONES), "image_size": at_least(32),
         "grid_size": at_least(1), "num_boxes": at_least(1), "head_channels": at_least(1), "fc_dim": at_least(1),
         "protocol": one_of(*PROTOCOLS), "num_workers": check_num_workers, "prefetch_factor": at_least(1),
         "data_format": one_of("auto", *DATA_FORMATS),
         "epochs": at_least(1), "batch_size": at_least(1), "micro_batch_size": at_least(1),
         "optimizer": one_of(*OPTIMIZERS), "lr": at_least(0.0), "warmup_lr": at_least(0.0),
         "warmup_epochs": at_least(0.0), "lr_milestones": at_least(0.0),
         "lr_milestones_unit": one_of("epochs", "fraction"), "lr_gamma": at_least(0.0),
         "momentum": between(0.0, 1.0), "weight_decay": at_least(0.0), "lambda_coord": at_least(0.0),
         "lambda_noobj": at_least(0.0), "seed": at_least(0), "dtype": one_of("auto", *DTYPES),
         "eval_every": at_least(0), "bad_images": one_of("skip", "error"), "log_every": at_least(1),
         "out_dir": writable_folder}


def milestone_epochs(config: dict) -> list[float]:
    """The epochs at which the learning rate drops: lr_milestones, or those fractions of the run's epochs."""
    scale = config["epochs"] if config["lr_milestones_unit"] == "fraction" else 1
    return sorted(milestone * scale for milestone in config["lr_milestones"])


def learning_rate(epoch: float, config: dict) -> float:
    """The schedule at a fractional epoch: linear warm-up from warmup_lr to lr, then lr x lr_gamma at each
    milestone. Defined for every epoch >= 0, past the last milestone and the planned end too."""
    if epoch < config["warmup_epochs"]:
        return config["warmup_lr"] + (config["lr"] - config["warmup_lr"]) * epoch / config["warmup_epochs"]
    return config["lr"] * config["lr_gamma"] ** bisect.bisect_right(milestone_epochs(config), epoch)


LOG_COLUMNS = ("epoch", "lr", *LOSS_TERMS, "train_loss", "val_loss", "val_voc07_map", "val_voc12_map",
               "images_per_s", "seconds", "skipped_images")


def unreadable_image_advice(config: dict) -> str:
    if config["bad_images"] == "skip":
        return f"Replace the unreadable files, or {LEAVE_OUT_OF_SPLIT}"
    return "Replace the file, or rerun with --bad_images=skip to go on without it"


def open_datasets(config: dict, out_dir: Path):
    """(training set, validation set or None where the protocol's test annotations stay on the server), with their
    transforms, summarised, their images checked and (cache_images) decoded into RAM."""
    train_set = build_dataset(config["protocol"], config["data_dir"], train=True, data_format=config["data_format"],
                              split=config["train_split"])
    class_names = train_set.class_names
    sizes = (config["image_size"], config["grid_size"], len(class_names))
    train_set.transforms = (TrainTransform(*sizes, use_difficult=config["use_difficult"]) if config["augment"]
                            else EvalTransform(*sizes))
    val_set = None
    if has_test_annotations(config["protocol"]):
        val_set = build_dataset(config["protocol"], config["data_dir"], train=False, transforms=EvalTransform(*sizes),
                                class_names=class_names, data_format=config["data_format"], split=config["val_split"])
    else:
        say(f"protocol {config['protocol']}: no validation (the test set's annotations stay on the evaluation "
            f"server); evaluate.py writes the files it scores")
    datasets = [dataset for dataset in (train_set, val_set) if dataset is not None]
    for dataset in datasets:
        dataset.skip_unreadable = config["bad_images"] == "skip"
    say("\n".join([train_set.classes_line(), *(dataset.summary(split) for split, dataset in
                                                zip((config["train_split"], config["val_split"]), datasets))]))
    require_readable_images([dataset.image_path(index) for dataset in datasets for index in range(len(dataset))],
                            out_dir / CACHE_NAME)
    if config["cache_images"]:
        say(f"decoding {sum(map(len, datasets))} images into RAM "
            f"({sum(dataset.cached_bytes() for dataset in datasets) / 1e9:.1f} GB)")
        try:
            for dataset in datasets:
                dataset.cache_images()
        except ImageDecodeError as error:
            sys.exit(f"error: {error}")
    return train_set, val_set


def build_loaders(config: dict, train_set, val_set, rank: int, world_size: int, device: torch.device):
    """(the global batch sampler, the training loader copying to the device, the validation loader or None), their
    workers forked before any thread of the run starts: the validation loader's first, without pinned memory,
    then the training loader's, whose pin-memory thread starts with them (see build_loader's start_workers)."""
    sampler = GlobalBatchSampler(len(train_set), config["batch_size"], config["micro_batch_size"], rank, world_size,
                                 config["seed"])
    loading = {"num_workers": num_loader_workers(config["num_workers"]), "prefetch_factor": config["prefetch_factor"],
               "image_bytes": 3 * config["image_size"] ** 2, "start_workers": True}
    # Validation runs while the training workers keep their buffers.
    training_buffers = reused_buffer_bytes(loading["num_workers"], loading["prefetch_factor"],
                                           config["micro_batch_size"] * loading["image_bytes"])
    val_loader = None if val_set is None else build_loader(
        IndexedSamples(val_set, range(rank, len(val_set), world_size)), config["micro_batch_size"], shuffle=False,
        shared_memory_kept_by_others=training_buffers, pin_memory=False, **loading)
    # The training loop uses each micro-batch once: its workers can reuse their image buffers.
    train_loader = DevicePrefetcher(build_loader(SeededSamples(train_set), config["micro_batch_size"], shuffle=False,
                                                 sampler=sampler, reuse_image_buffers=True,
                                                 pin_memory=config["pin_memory"] and device.type == "cuda", **loading),
                                    device)
    return sampler, train_loader, val_loader


class Run:
    """One training run's parts and progress: what each epoch trains, validates and saves."""

    def __init__(self, config: dict, run_config: dict, model_args: dict, class_names, model, optimizer, scaler,
                 device: torch.device, dtype: torch.dtype):
        self.config, self.run_config, self.model_args, self.class_names = config, run_config, model_args, class_names
        self.model, self.optimizer, self.scaler, self.device = model, optimizer, scaler, device
        self.out_dir = Path(config["out_dir"])
        self.start_epoch, self.start_step, self.best_map = 0, 0, -1.0
        self.carried = None  # the loss sums, images and seconds of the part of an epoch done before an interruption
        self.loss_weights = {"lambda_coord": config["lambda_coord"], "lambda_noobj": config["lambda_noobj"]}
        self.forward_loss = partial(detection_loss, loss_weights=self.loss_weights, device=device, dtype=dtype)
        self.stop, self.writer = None, None

    def resume(self, checkpoint_path: Path | None) -> None:
        """Weights (--backbone_weights, or a checkpoint's), optimizer, scaler, RNG and progress of a rerun."""
        config = self.config
        if checkpoint_path is None:
            if config["backbone_weights"]:
                try:
                    load_backbone_weights(self.model, config["backbone_weights"])
                except CheckpointError as error:
                    sys.exit(f"error: --backbone_weights: {error}")
                say(f"backbone from {config['backbone_weights']}; the detection head starts fresh")
            return
        try:
            checkpoint = load_checkpoint(checkpoint_path, map_location=self.device)
        except CheckpointError as error:
            sys.exit(f"error: {error}")
        if list(checkpoint["class_names"]) != list(self.class_names):
            sys.exit(f"error: {checkpoint_path} was trained on the classes {list(checkpoint['class_names'])}, in "
                     f"that order; the dataset now has {list(self.class_names)}. Restore the dataset's class list "
                     f"({CLASS_LIST_ADVICE}), or choose another out_dir to start a new run.")
        # The classes are compared above; their ids in the files may change (and a checkpoint from before they were
        # kept has none).
        saved, current = ({key: value for key, value in settings.items() if key not in ("class_names", "class_ids")}
                          for settings in (checkpoint["config"], self.run_config))
        refuse_other_settings(checkpoint_path, saved, current, constants(globals()),
                              schedule_follows_epochs=config["lr_milestones_unit"] == "fraction")
        self.model.load_state_dict(checkpoint["model"])
        if "optimizer" in checkpoint:
            load_optimizer_state(self.optimizer, checkpoint["optimizer"])
            load_scaler_state(self.scaler, checkpoint["scaler"], checkpoint["config"].get("dtype"))
            self.start_epoch, self.start_step = checkpoint["epoch"], checkpoint["step"]
            self.best_map, self.carried = checkpoint["best_map"], checkpoint.get("partial_epoch")
            torch.set_rng_state(checkpoint["rng"]["torch"].cpu())
            random.setstate(checkpoint["rng"]["python"])
            say(f"resumed from {checkpoint_path}: epoch {self.start_epoch + 1}, step {self.start_step}")
        else:  # best.pt: weights only
            self.start_epoch, self.best_map = checkpoint["epoch"], checkpoint["val_voc12_map"]
            say(f"warm start from the weights of {checkpoint_path} (epoch {self.start_epoch}) with a fresh optimizer: "
                f"momentum starts again from zero, so the run will not equal an uninterrupted one")

    def checkpoint_state(self, epoch: int, step: int) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch": epoch, "step": step, "best_map": self.best_map,
                "config": self.run_config, "model_args": self.model_args, "class_names": list(self.class_names),
                "git_commit": git_commit(), "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}

    def fail(self, message: str) -> None:
        self.writer.wait()
        cleanup()
        sys.exit(f"error: {message}")

    def train_epoch(self, train_model, loader, sampler, epoch: int) -> tuple[dict, float]:
        """(the epoch's loss sums, images and steps, its seconds), a resumed epoch's earlier part included. A stop
        saves the step reached into last.pt and exits."""
        sampler.set_epoch(epoch, self.start_step)
        started = time.perf_counter()
        read_every = self.config["log_every"] if self.device.type == "cuda" else 1
        try:
            stats = train_one_epoch(
                train_model, loader, self.optimizer, self.scaler, forward_loss=self.forward_loss,
                term_names=LOSS_TERMS, epoch=epoch, start_step=self.start_step, accumulation=sampler.accumulation,
                device=self.device, stop_requested=self.stop, read_every=read_every,
                lr_at=lambda step: learning_rate(epoch + step / sampler.steps_per_epoch, self.config))
        except NonFiniteLossError as error:
            self.fail(str(error))
        except ImageDecodeError as error:
            self.fail(f"{error.reason}. {unreadable_image_advice(self.config)} (last.pt holds the last completed "
                      f"epoch).")
        seconds = time.perf_counter() - started
        if self.carried is not None:
            stats["terms"] = {name: value + self.carried["terms"][name] for name, value in stats["terms"].items()}
            stats["images"] += self.carried["images"]
            seconds += self.carried["seconds"]
            self.carried = None
        if stats["stopped"]:
            last = self.out_dir / "last.pt"
            if is_main_process():
                self.writer.save({**self.checkpoint_state(epoch, stats["steps"]), "partial_epoch": {
                    "terms": stats["terms"], "images": stats["images"], "seconds": seconds}}, last)
            exit_for_stop(self.stop, self.writer, f"saved {last} at epoch {epoch + 1}, step {stats['steps']}: "
                                                  f"rerun the same command to resume")
        self.start_step = 0
        return stats, seconds

    def validate(self, val_loader, val_set, epoch: int, row: dict) -> None:
        """The validation loss and mAP into `row`; best.pt where the mAP is the best yet."""
        # The training model itself, in eval mode: a folded copy would hold its memory a second time. Its fp32
        # weights: bf16 scores take 128 values in [0.5, 1), and their ties would rank by image order. The next
        # epoch's train_one_epoch puts it back in training mode.
        self.model.eval()
        try:
            validation = evaluate(Detector(self.model, torch.float32, self.device, prepare=False), val_loader,
                                  val_set, loss_weights=self.loss_weights, desc=f"validate {epoch + 1}")
        except ImageDecodeError as error:  # keep the epoch just trained, unvalidated
            if is_main_process():
                append_log(self.out_dir / "log.csv", row, LOG_COLUMNS)
                self.writer.save(self.checkpoint_state(epoch + 1, 0), self.out_dir / "last.pt")
            self.fail(f"validating epoch {epoch + 1}: {error.reason}. {unreadable_image_advice(self.config)} "
                      f"(last.pt holds epoch {epoch + 1}, not validated).")
        row["val_loss"] = f"{validation['loss']:.6f}"
        if is_main_process():
            metrics = validation["metrics"]
            row["val_voc07_map"] = f"{metrics['voc07_map']:.6f}"
            row["val_voc12_map"] = f"{metrics['voc12_map']:.6f}"
            if metrics["voc12_map"] > self.best_map:
                self.best_map = metrics["voc12_map"]
                self.writer.save({"model": self.model.state_dict(), "model_args": self.model_args, "epoch": epoch + 1,
                                  "class_names": list(self.class_names), "config": self.run_config,
                                  "val_voc12_map": self.best_map, "git_commit": git_commit()},
                                 self.out_dir / "best.pt")


def epoch_row(epoch: int, stats: dict, seconds: float, lr: float, batch_size: int) -> dict:
    """The epoch's log.csv row, validation columns empty."""
    return {"epoch": epoch + 1, "lr": f"{lr:.6g}",
            **{name: f"{value / stats['images']:.6f}" for name, value in stats["terms"].items()},
            "train_loss": f"{sum(stats['terms'].values()) / stats['images']:.6f}",
            "images_per_s": f"{stats['images'] / seconds:.2f}", "seconds": f"{seconds:.1f}",
            "skipped_images": round(stats["steps"] * batch_size - stats["images"]),
            "val_loss": "", "val_voc07_map": "", "val_voc12_map": ""}


def main(config: dict) -> None:
    device, dtype, rank, local_rank, world_size = start_process(config)
    out_dir = Path(config["out_dir"])
    if config["backbone_weights"] and config["pretrained"]:
        sys.exit("error: --backbone_weights replaces the ImageNet weights: add --pretrained=false.")
    process_group = f" in a {backend()} process group" if backend() else ""
    say(f"train.py on {world_size} process(es){process_group}, device {device}, "
        f"dtype {str(dtype).removeprefix('torch.')}\n{format_config(config)}")
    unreached = [milestone for milestone in milestone_epochs(config) if milestone >= config["epochs"]]
    if unreached:
        say(f"warning: the learning rate would drop at epochs {', '.join(f'{m:g}' for m in unreached)}, which a "
            f"run of {config['epochs']} epochs never reaches: set --lr_milestones (or lr_milestones_unit=fraction "
            f"with fractions of the run, as configs/small_data.py does)")
    random.seed(config["seed"])
    torch.manual_seed(config["seed"])

    train_set, val_set = open_datasets(config, out_dir)
    class_names = train_set.class_names
    model_args = {**{key: config[key] for key in ARCHITECTURE_KEYS if key in config}, "num_classes": len(class_names)}
    # The classes with their ids in the dataset's files, in config.json and every checkpoint.
    run_config = {**config, "num_classes": len(class_names), "class_names": list(class_names),
                  "class_ids": train_set.class_ids}
    sampler, train_loader, val_loader = build_loaders(config, train_set, val_set, rank, world_size, device)
    model = YOLOv1(**model_args, pretrained=config["pretrained"], zero_init_residual=config["zero_init_residual"])
    model = model.to(device, memory_format=torch.channels_last)
    optimizer, scaler = training_parts(model, config["optimizer"], config, device, dtype)
    run = Run(config, run_config, model_args, class_names, model, optimizer, scaler, device, dtype)
    run.resume(find_checkpoint(config, out_dir))
    if finished_already(out_dir, run.start_epoch, config["epochs"]):
        return
    start_run_folder(out_dir, run_config, run.start_epoch, LOG_COLUMNS)
    train_model = training_wrapper(model, device, local_rank, config["compile"])

    run.stop, run.writer = StopRequest(), CheckpointWriter()
    announce_epochs(run.start_epoch, config["epochs"], sampler)
    for epoch in range(run.start_epoch, config["epochs"]):
        stats, seconds = run.train_epoch(train_model, train_loader, sampler, epoch)
        row = epoch_row(epoch, stats, seconds, run.optimizer.param_groups[0]["lr"], config["batch_size"])
        last_epoch = epoch + 1 == config["epochs"]
        if val_set is not None and (last_epoch or (config["eval_every"] > 0
                                                   and (epoch + 1) % config["eval_every"] == 0)):
            run.validate(val_loader, val_set, epoch, row)
        save_epoch(run.writer, out_dir, row, LOG_COLUMNS, run.checkpoint_state(epoch + 1, 0), plot_training_curve)
        say(" | ".join(f"{key} {row[key]}" for key in LOG_COLUMNS if row[key] != ""))
        barrier()
        stop_if_requested(run.stop, run.writer, device, out_dir, epoch, last_epoch)
    run.writer.wait()
    if is_main_process():
        mark_finished(out_dir, config["epochs"])
    say(f"finished: {out_dir / 'last.pt'} holds the final model (best.pt: best validation mAP, for reference only)")
    cleanup()


if __name__ == "__main__":
    try:
        main(resolve_config(globals(), rules=RULES))
    except (ValueError, FileNotFoundError, CheckpointError, PretrainedWeightsError) as error:  # settings, data, disk
        sys.exit(f"error: {error}")
