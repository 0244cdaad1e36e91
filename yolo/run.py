"""The parts of a resumable training run that every training script shares: messages, stop signals,
log.csv, the run folder, the finished-run marker, which checkpoint to resume from, and the training wrapper."""
import csv
import json
import math
import os
import signal
import sys
from pathlib import Path

import torch

from yolo.checkpoint import RESUMABLE_CHANGES, CheckpointWriter, config_differences
from yolo.device import autocast_dtype, resolve_device
from yolo.distributed import any_process, backend, barrier, cleanup, init_distributed, is_main_process
from yolo.files import atomic_write
from yolo.optim import build_optimizer


def start_process(config: dict) -> tuple[torch.device, torch.dtype, int, int, int]:
    """This process's part of the run: (its device, its autocast dtype, rank, local rank, world size), the process
    group joined under torchrun."""
    device = resolve_device(config["device"], 0)
    rank, local_rank, world_size = init_distributed(device.type)
    device = resolve_device(config["device"], local_rank)
    return device, autocast_dtype(config["dtype"], device), rank, local_rank, world_size


def say(*args) -> None:
    if is_main_process():
        print(*args, flush=True)


class StopRequest:
    """Turns SIGINT and SIGTERM into a flag the loop reads at its read points (see train.py's docstring).

    Loader workers forked from the process inherit the handler; in them it does nothing (Ctrl-C reaches the
    whole process group): the process that installed it stops them."""

    def __init__(self):
        self.signal, self.pid = None, os.getpid()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self.request)

    def request(self, signum, frame) -> None:
        if os.getpid() != self.pid:
            return
        if self.signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum
        say(f"\nreceived {signal.Signals(signum).name}: saving at the end of this optimizer step")

    def __call__(self) -> bool:
        return self.signal is not None

    def exit_code(self) -> int:
        """128 + the signal, as a shell reports it; a process stopping because another one was signalled
        reports SIGTERM."""
        return 128 + (self.signal or signal.SIGTERM)


def read_log(path: Path, up_to_epoch: float = math.inf) -> list[dict]:
    """The rows of an existing log.csv up to `up_to_epoch` (a resumed run rewrites the rest)."""
    if not path.exists():
        return []
    with open(path, newline="") as file:
        return [row for row in csv.DictReader(file) if int(row["epoch"]) <= up_to_epoch]


def write_log(path: Path, rows: list[dict], columns: tuple[str, ...]) -> None:
    with atomic_write(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def append_log(path: Path, row: dict, columns: tuple[str, ...]) -> None:
    """log.csv with `row` after its rows, written whole through a temporary file as the checkpoints are: a
    process killed while writing leaves the previous log, never half a row."""
    write_log(path, read_log(path) + [row], columns)


def mark_finished(out_dir: Path, epochs: int) -> None:
    """out_dir/done: the file the Makefile waits for; it exists only once last.pt is the final model, complete
    on disk (after CheckpointWriter.wait)."""
    (out_dir / "done").write_text(json.dumps({"epochs": epochs, "checkpoint": "last.pt"}) + "\n")


def find_checkpoint(config: dict, out_dir: Path) -> Path | None:
    last = out_dir / "last.pt"
    if config["resume"] == "auto":
        return last if last.exists() else None
    if config["resume"] == "never":
        if last.exists():
            sys.exit(f"error: {last} exists and resume=never would overwrite it: choose another out_dir, "
                     f"delete the old run, or use --resume=auto.")
        return None
    return Path(config["resume"])


def load_scaler_state(scaler: torch.amp.GradScaler, state: dict, saved_dtype: str | None) -> None:
    """The GradScaler's saved state where both runs use one (fp16); a run switching dtype starts afresh."""
    if not scaler.is_enabled():
        return  # fp16 -> bf16 / fp32: the scale has no use without fp16 gradients
    if state:
        scaler.load_state_dict(state)
    else:
        say(f"the checkpoint was trained with dtype {saved_dtype} and has no gradient scaler state: "
            f"fp16 starts a fresh one (scale {scaler.get_scale():g})")


def refuse_other_settings(checkpoint_path: Path, saved: dict, current: dict, defaults: dict,
                          schedule_follows_epochs: bool) -> None:
    """Exit with one line naming every setting that the resumed run changes and may not (RESUMABLE_CHANGES; when
    the learning-rate schedule is laid out over `epochs`, a longer run is another run too). `defaults`: the
    script's, standing for settings the checkpoint predates."""
    may_change = [key for key in RESUMABLE_CHANGES if key != "epochs" or not schedule_follows_epochs]
    differences = config_differences(saved, current, may_change, defaults=defaults)
    if differences:
        sys.exit(f"error: {checkpoint_path} was trained with other settings ({'; '.join(differences)}). "
                 f"Rerun with the saved settings, or choose another out_dir to start a new run.")


def finished_already(out_dir: Path, start_epoch: int, epochs: int) -> bool:
    """True (after saying so, marking the run done and leaving the process group) when the checkpoint
    resumed from already holds all `epochs`: a rerun of a finished command does nothing."""
    if start_epoch < epochs:
        return False
    say(f"{out_dir} already holds a finished run of {epochs} epochs: nothing to do.")
    if is_main_process():
        mark_finished(out_dir, start_epoch)
    cleanup()
    return True


def start_run_folder(out_dir: Path, run_config: dict, start_epoch: int, log_columns: tuple[str, ...]) -> None:
    """On rank 0: the run's folder, its settings in config.json, log.csv cut back to the epochs that
    last.pt holds, and no `done` marker until the run ends."""
    if not is_main_process():
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "done").unlink(missing_ok=True)
    with atomic_write(out_dir / "config.json", "w") as file:
        file.write(json.dumps(run_config, indent=2) + "\n")
    write_log(out_dir / "log.csv", read_log(out_dir / "log.csv", start_epoch), log_columns)


def announce_epochs(start_epoch: int, epochs: int, sampler) -> None:
    """The line that opens training (the tests wait for its first words): the epochs to run, their steps,
    and the images that sit out each epoch when the last batch is incomplete (dropped, so that every step
    has the same size; a different set each epoch, since the order is reshuffled)."""
    left_out = sampler.dataset_size - sampler.steps_per_epoch * sampler.batch_size
    sitting_out = (f"; {left_out} of the {sampler.dataset_size} images sit out each epoch (a different "
                   f"{left_out} each time)" if left_out else "")
    say(f"training epochs {start_epoch + 1}-{epochs}: {sampler.steps_per_epoch} steps of {sampler.batch_size} "
        f"images each ({sampler.accumulation} accumulated micro-batches per process){sitting_out}")


def training_parts(model: torch.nn.Module, optimizer_name: str, config: dict, device: torch.device,
                   dtype: torch.dtype) -> tuple[torch.optim.Optimizer, torch.amp.GradScaler]:
    """The optimizer and gradient scaler of a training run on `device`, which is also made ready for it.

    On CUDA the optimizer is fused, so that a step skips on the device without a host read (see
    yolo.engine.train_one_epoch), and cuDNN times its convolution algorithms once for the run's fixed
    input size. The GradScaler is enabled for fp16 alone.
    """
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    optimizer = build_optimizer(model, optimizer_name, config["lr"], config["momentum"], config["weight_decay"],
                                fused=cuda)
    return optimizer, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def training_wrapper(model: torch.nn.Module, device: torch.device, local_rank: int, compile: bool) -> torch.nn.Module:
    """What the training loop calls: DistributedDataParallel in a process group (one process under torchrun
    included), compiled on request in PyTorch's recommended order (the DDP wrapper, whose optimizer splits
    the graph at its buckets)."""
    train_model = model
    if backend():
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device.type == "cuda" else None)
    return torch.compile(train_model) if compile else train_model


def save_epoch(writer: CheckpointWriter, out_dir: Path, row: dict, columns: tuple[str, ...], state: dict,
               plot_curve) -> None:
    """On rank 0: the epoch's log.csv row, last.pt (written in the background), and after a validation
    `plot_curve(log.csv, png)`; a figure that cannot be written is a warning (log.csv holds its numbers), not a
    reason to stop the run."""
    if not is_main_process():
        return
    append_log(out_dir / "log.csv", row, columns)
    writer.save(state, out_dir / "last.pt")
    if row["val_loss"]:
        try:
            plot_curve(out_dir / "log.csv", out_dir / "training_curve.png")
        except OSError as error:
            say(f"warning: cannot write {out_dir / 'training_curve.png'} ({error.strerror or error})")


def stop_if_requested(stop: StopRequest, writer: CheckpointWriter, device: torch.device, out_dir: Path, epoch: int,
                      last_epoch: bool) -> None:
    """After a saved epoch: exit when any process was asked to stop (all of them agree), unless the run ends
    anyway."""
    if any_process(stop(), device) and not last_epoch:
        exit_for_stop(stop, writer, f"saved {out_dir / 'last.pt'} at the end of epoch {epoch + 1}: rerun the same "
                                    f"command to resume")


def exit_for_stop(stop: StopRequest, writer: CheckpointWriter, message: str) -> None:
    """Every process's exit on a stop request, once rank 0's last checkpoint is on disk: all wait for it at a
    barrier, since one that exits first makes torchrun end the others. A failed write raises its
    CheckpointError instead."""
    writer.wait()
    say(message)
    barrier()
    cleanup()
    sys.exit(stop.exit_code())
