"""Exercise every CUDA path of the project on a small synthetic set at the real 448 size, in minutes.

    python gpu_check.py            # or: make gpu-check VENV=/path/to/an/env/with/torch

Each check runs the real scripts (train.py, torchrun, pretrain.py, evaluate.py, benchmark.py) in subprocesses,
or the training loop itself in this process, and prints one PASS or FAIL line with its seconds; a failing
check does not stop the others, and its full output is kept in work_dir/<check>.log. results go to out_dir:
checks.csv (one row per check) and benchmark.csv (the benchmark.py rows, which name the device). Needs only
torch, torchvision, numpy, pillow, pandas, matplotlib and tqdm. Every training run accumulates gradients
(micro_batch_size of batch_size), as the recipe does.

Sizing on one H100, from which `planned_checks` estimates each check's seconds (their sum must stay within
BUDGET): a training run is a process start (~15 s with CUDA and a 256 M parameter model) and ~5 s per epoch
(4 steps of 16 images, validation, a 2 GB last.pt); torchrun adds ~5 s, compile about two minutes; an
in-process check builds one model and trains 3 x sync_check_steps steps (~12 s: a warm-up epoch, the checked
one, and a profiled epoch in bf16 or stock SGD's in fp16); the benchmark is 3
backbones x 2 batch sizes x 3 dtypes x 3 modes of 13 runs each (~65 s), each loader measurement ~15 s.

GPU kernels are not bitwise reproducible run to run (cuDNN autotuning, atomic adds), so SIGTERM-then-resume
is compared with the uninterrupted run relative to one epoch's change of the weights; the CPU tests
(make test) prove the resume bit for bit.
"""
import csv
import datetime
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from functools import partial
from pathlib import Path

import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from benchmark import random_training_batch
from yolo.config import at_least, resolve_config
from yolo.device import DTYPES, device_name
from yolo.engine import LOSS_TERMS, detection_loss, train_one_epoch
from yolo.model import YOLOv1
from yolo.optim import build_optimizer
from yolo.photometric import draw_colour_factors
from yolo.transforms import DetectionBatch, DevicePrefetcher, collate_detection

# --- what to run
out_dir = "results/gpu"        # checks.csv, benchmark.csv and the evaluation's CSVs
work_dir = "runs/gpu_check"    # synthetic data, training runs and logs (emptied at the start)
train_images = 64              # synthetic training images (160-320 px a side, resized to image_size)
val_images = 16                # synthetic validation images
image_size = 448               # network input side in pixels
batch_size = 16                # images per optimizer step of the training runs
micro_batch_size = 4           # images per forward pass: each step accumulates batch_size / micro_batch_size of them
num_workers = 4                # loader processes of the training runs
sync_check_steps = 3           # steps of the epoch checked for host synchronisation (2+: fp16 skips the first)
benchmark_iters = 10           # timed runs of each benchmark measurement
loader_workers = (8, 16)       # worker counts of benchmark.py's loader mode
resume_tolerance = 0.05        # SIGTERM + resume vs uninterrupted: weight difference / one epoch's weight change
min_hidden_copy = 0.5          # share of the copies to the GPU (the first aside) that must run beside kernels
same_tolerance = 0.01          # runs that must train alike (fused SGD past a skipped fp16 step and stock SGD, two
                               # processes and one): weight difference / the weights' change
timeout = 420                  # seconds any one subprocess may take

RULES = {"train_images": at_least(2 * 16), "val_images": at_least(1), "image_size": at_least(64),
         "batch_size": at_least(1), "micro_batch_size": at_least(1), "num_workers": at_least(0),
         "sync_check_steps": at_least(2), "benchmark_iters": at_least(1), "loader_workers": at_least(0),
         "resume_tolerance": at_least(0.0), "same_tolerance": at_least(0.0),
         "min_hidden_copy": at_least(0.0), "timeout": at_least(1)}
PYTHON = sys.executable
BUDGET = 490                   # seconds: the checks' estimated sum on one H100 stays within this
LOSS_WEIGHTS = {"lambda_coord": 5.0, "lambda_noobj": 0.5}  # the paper's
GRID_SIZE = 7                  # the paper's S, as train.py's default
# The fp16 host-sync check's GradScaler: a first scale at which fp16 gradients overflow for certain, and a
# back-off after which the following steps run at 2 ** 10.
OVERFLOWING_SCALE = 2.0 ** 40
SCALE_BACKOFF = 2.0 ** -30
CHECK_COLUMNS = ("check", "result", "seconds", "detail", "device_name", "torch_version", "date")


class CheckFailed(Exception):
    """A check whose command failed or whose result is wrong; the message says which and where the log is."""


def run(name: str, command: list[str], config: dict) -> str:
    """Run `command`, add its output to work_dir/<name>.log, and return it; a non-zero exit is a CheckFailed."""
    log = Path(config["work_dir"]) / f"{name}.log"
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=config["timeout"])
    except subprocess.TimeoutExpired:
        raise CheckFailed(f"{' '.join(command[:3])} ran past {config['timeout']} s") from None
    with log.open("a") as file:
        file.write(f"$ {' '.join(command)}\n{result.stdout}{result.stderr}")
    if result.returncode != 0:
        last_line = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
        raise CheckFailed(f"exit {result.returncode}: {last_line} (log: {log})")
    return result.stdout


def train_command(config: dict, run_name: str, *overrides: str, launcher: tuple[str, ...] = (PYTHON,)) -> list[str]:
    work = Path(config["work_dir"])
    return [*launcher, "train.py", "--protocol=synthetic", f"--data_dir={work / 'data'}", "--pretrained=false",
            f"--image_size={config['image_size']}", f"--batch_size={config['batch_size']}",
            f"--micro_batch_size={config['micro_batch_size']}", f"--num_workers={config['num_workers']}",
            "--eval_every=1", f"--out_dir={work / run_name}", "--resume=auto", *overrides]


def weights(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {name: value.float() for name, value in state["model"].items() if value.is_floating_point()}


def norm(tensors: dict) -> float:
    return sum(float(value.pow(2).sum()) for value in tensors.values()) ** 0.5


def distance(first: dict, second: dict) -> float:
    return norm({name: first[name] - second[name] for name in first})


def last_epoch_row(config: dict, run_name: str) -> dict:
    with open(Path(config["work_dir"]) / run_name / "log.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    if not rows or not all(math.isfinite(float(rows[-1][key])) for key in ("train_loss", "val_loss")):
        raise CheckFailed(f"{run_name}/log.csv has no finite train and val loss: {rows[-1:] or 'no rows'}")
    return rows[-1]


def loader_batch(config: dict, device: torch.device) -> DetectionBatch:
    """A training micro-batch as train.py's loader delivers it for `device`: random uint8 images and their
    targets, each image with the colour factors its worker draws, put together by the loader's collate
    function and pinned for CUDA. The one place that knows the loader's batch format."""
    random_batch = random_training_batch(config["micro_batch_size"],
                                         {"image_size": config["image_size"], "grid_size": GRID_SIZE},
                                         torch.device("cpu"))
    batch = collate_detection([(image, {"grid": grid, "colour_factors": draw_colour_factors()})
                               for image, grid in zip(random_batch.images, random_batch.grids)])
    if device.type != "cuda":
        return batch
    return DetectionBatch(*(item.pin_memory() if isinstance(item, torch.Tensor) else item for item in batch))


def train_epoch(model, micro_batches: list, optimizer, scaler, dtype: torch.dtype, accumulation: int,
                stop_requested=lambda: False, device: torch.device = torch.device("cuda")) -> dict:
    """One epoch of train.py's loop on `device` over `micro_batches`, copied to a GPU as train.py's are (a side
    stream's prefetch), the host reading the device's results only at its end (where the loop first calls
    `stop_requested`)."""
    return train_one_epoch(model, DevicePrefetcher(micro_batches, device), optimizer, scaler,
                           forward_loss=partial(detection_loss, loss_weights=LOSS_WEIGHTS, device=device, dtype=dtype),
                           term_names=LOSS_TERMS, epoch=0, start_step=0, accumulation=accumulation,
                           lr_at=lambda step: 1e-3, device=device, stop_requested=stop_requested,
                           read_every=len(micro_batches) // accumulation)


def train_epoch_without_host_sync(model, micro_batches: list, optimizer, scaler, dtype: torch.dtype,
                                  accumulation: int, device: torch.device = torch.device("cuda")) -> None:
    """`train_epoch` under CUDA's sync debug mode "error": any call that makes the host wait for the GPU raises,
    until the epoch's one read at its end, where the mode goes off."""
    reads = []

    def read_point() -> bool:
        torch.cuda.set_sync_debug_mode(0)
        reads.append(True)
        return False

    torch.cuda.set_sync_debug_mode("error")
    try:
        train_epoch(model, micro_batches, optimizer, scaler, dtype, accumulation, read_point, device)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    if len(reads) != 1:  # an earlier read would have ended the watch before the steps after it
        raise CheckFailed(f"the loop read the device's results {len(reads)} times in an epoch that reads once")


def non_finite_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The weights, buffers and optimizer state (momentum, Adam's moments) holding a NaN or an infinity, by name."""
    names = {parameter: name for name, parameter in model.named_parameters()}
    found = [name for name, value in model.state_dict().items()
             if value.is_floating_point() and not torch.isfinite(value).all()]
    for parameter, state in optimizer.state.items():
        found += [f"{names[parameter]} {key}" for key, value in state.items()
                  if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all()]
    return found


def require_finite(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    non_finite = non_finite_state(model, optimizer)
    if non_finite:
        raise CheckFailed(f"NaN or infinity after the epoch in {len(non_finite)} tensors: {', '.join(non_finite[:4])}")


def hidden_share(copies: list[tuple[float, float]], kernels: list[tuple[float, float]]) -> float:
    """The share of the copies' time, (start, end) intervals, during which at least one kernel ran."""
    busy = []  # the kernels' intervals merged, in order: a moment under two kernels counts once
    for start, end in sorted(kernels):
        if busy and start <= busy[-1][1]:
            busy[-1][1] = max(busy[-1][1], end)
        else:
            busy.append([start, end])
    covered = sum(max(0.0, min(end, busy_end) - max(start, busy_start))
                  for start, end in copies for busy_start, busy_end in busy)
    total = sum(end - start for start, end in copies)
    return covered / total if total > 0 else 0.0


def copy_overlap(model: torch.nn.Module, micro_batches: list, accumulation: int,
                 dtype: torch.dtype) -> tuple[str, float]:
    """An epoch of `train_epoch` profiled: how much of the copies to the GPU ran while kernels computed.
    DevicePrefetcher copies the next micro-batch on a side stream during the current one's steps; a copy on the
    compute stream would wait for them and hide nothing. The first copy, which nothing can hide, is left out.
    Returns the figure in words and as a share."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as profile:
        train_epoch(model, micro_batches, sgd(model, fused=True), torch.amp.GradScaler("cuda", enabled=False), dtype,
                    accumulation)
        torch.cuda.synchronize()
    device_events = [event for event in profile.events() if event.device_type == torch.profiler.DeviceType.CUDA]
    # Every host-to-device copy: the micro-batches' (from pinned memory) take nearly all of the copies' time.
    copies = sorted((event.time_range.start, event.time_range.end) for event in device_events if "HtoD" in event.name)
    kernels = [(event.time_range.start, event.time_range.end) for event in device_events
               if not event.name.startswith(("Memcpy", "Memset"))]
    if len(copies) < 2 or not kernels:
        raise CheckFailed(f"the profile shows {len(copies)} copies to the GPU and {len(kernels)} kernels: not one "
                          f"copy per micro-batch ({len(micro_batches)})")
    hidden = hidden_share(copies[1:], kernels)
    copy_ms = sum(end - start for start, end in copies[1:]) / 1000
    return f"{hidden:.0%} of the next micro-batches' copies ({copy_ms:.1f} ms) hidden behind kernels", hidden


def sgd(model: torch.nn.Module, fused: bool) -> torch.optim.Optimizer:
    return build_optimizer(model, "sgd", 1e-3, 0.9, 5e-4, fused=fused)


def overflowing_first_step_check(model: torch.nn.Module, micro_batches: list, accumulation: int,
                                 device: torch.device, tolerance: float, run_epoch=train_epoch) -> str:
    """Fused SGD in fp16 whose first step overflows (the GradScaler's first scale is too large) and is skipped
    on the device, against stock SGD that starts from the same weights at the second step with the scale the
    first one backed off to: the skipped step must change nothing, so both end with the same weights and
    momentum (within `tolerance` of the weights' change and of the momentum's size). A fused SGD that made a
    momentum buffer with `empty_like` at the skipped step and kept it would move the weights by whatever
    memory it got (`yolo.optim.start_momentum` prevents it). `run_epoch` is `train_epoch` or a variant of it."""
    start = {name: value.clone() for name, value in model.state_dict().items()}
    fused = sgd(model, fused=True)
    scaler = torch.amp.GradScaler(device.type, init_scale=OVERFLOWING_SCALE, backoff_factor=SCALE_BACKOFF)
    run_epoch(model, micro_batches, fused, scaler, torch.float16, accumulation, device=device)
    if scaler.get_scale() != OVERFLOWING_SCALE * SCALE_BACKOFF:
        raise CheckFailed(f"the GradScaler's scale went from {OVERFLOWING_SCALE:g} to {scaler.get_scale():g}, "
                          f"not {OVERFLOWING_SCALE * SCALE_BACKOFF:g}: not exactly the first step overflowed")
    require_finite(model, fused)
    parameters = dict(model.named_parameters())
    fused_weights = {name: parameter.detach().clone() for name, parameter in parameters.items()}
    fused_momentum = {name: fused.state[parameter]["momentum_buffer"] for name, parameter in parameters.items()}
    model.load_state_dict(start)
    stock = sgd(model, fused=False)
    train_epoch(model, micro_batches[accumulation:], stock,
                torch.amp.GradScaler(device.type, init_scale=OVERFLOWING_SCALE * SCALE_BACKOFF),
                torch.float16, accumulation, device=device)
    stock_weights = {name: parameter.detach() for name, parameter in parameters.items()}
    stock_momentum = {name: stock.state[parameter]["momentum_buffer"] for name, parameter in parameters.items()}
    start_weights = {name: start[name] for name in parameters}
    weights_off = distance(fused_weights, stock_weights) / distance(stock_weights, start_weights)
    momentum_off = distance(fused_momentum, stock_momentum) / norm(stock_momentum)
    if not max(weights_off, momentum_off) <= tolerance:
        raise CheckFailed(f"after the skipped first step, fused SGD's weights differ from stock SGD's by "
                          f"{weights_off:.2%} of their change and its momentum by {momentum_off:.2%} of its size "
                          f"(tolerance {tolerance:.0%}): the skipped step changed the optimizer's state")
    return (f"the first step overflowed and was skipped; then as stock SGD (weights within {weights_off:.1e} of "
            f"their change, momentum within {momentum_off:.1e} of its size)")


def no_host_sync_check(dtype_name: str):
    """Training steps as the recipe takes them (fused SGD, `dtype_name` autocast, accumulated micro-batches of
    colour-jittered uint8 images) never make the host wait for the GPU before the epoch's read. In bf16 a third
    epoch measures the side stream's copies (`copy_overlap`); in fp16 the GradScaler's first step overflows, and
    the run is compared with stock SGD (`overflowing_first_step_check`)."""
    def check(config: dict, shared: dict) -> str:
        device, dtype, fp16 = torch.device("cuda"), DTYPES[dtype_name], dtype_name == "fp16"
        torch.backends.cudnn.benchmark = True  # as train.py trains on CUDA
        torch.manual_seed(0)
        model = YOLOv1("resnet18", image_size=config["image_size"]).to(device, memory_format=torch.channels_last)
        accumulation = config["batch_size"] // config["micro_batch_size"]
        micro_batches = [loader_batch(config, device)] * (accumulation * config["sync_check_steps"])
        # cuDNN autotuning and lazy initialisation happen once, and may synchronise: a first epoch, with an
        # optimizer and scaler of its own, so that the checked epoch starts both afresh (fp16: overflowing).
        train_epoch(model, micro_batches, sgd(model, fused=True), torch.amp.GradScaler("cuda", enabled=fp16), dtype,
                    accumulation)
        detail = (f"{config['sync_check_steps']} steps of {accumulation} x {config['micro_batch_size']} jittered "
                  f"images, fused SGD, no synchronisation before the epoch's read")
        if fp16:
            detail += "; " + overflowing_first_step_check(model, micro_batches, accumulation, device,
                                                          config["same_tolerance"], train_epoch_without_host_sync)
        else:
            optimizer = sgd(model, fused=True)
            train_epoch_without_host_sync(model, micro_batches, optimizer, torch.amp.GradScaler("cuda", enabled=False),
                                          dtype, accumulation)
            require_finite(model, optimizer)
            overlap, hidden = copy_overlap(model, micro_batches, accumulation, dtype)
            if not hidden >= config["min_hidden_copy"]:
                raise CheckFailed(f"{overlap}, under {config['min_hidden_copy']:.0%}: the copies wait for the compute")
            detail += "; " + overlap
        del model, micro_batches
        torch.cuda.empty_cache()  # leave the GPU's memory to the scripts the next checks start
        return detail
    return check


def no_sync_model(device: torch.device) -> YOLOv1:
    """The same small model in every process (a narrow head: the check is about when gradients are reduced)."""
    torch.manual_seed(0)
    model = YOLOv1("resnet18", image_size=224, head_channels=64, fc_dim=128)
    return model.to(device, memory_format=torch.channels_last)


def no_sync_process(rank: int, shares: list[list], accumulation: int, device_type: str, dtype: torch.dtype,
                    port: int, out_dir: Path) -> None:
    """Process `rank` of `two_process_no_sync`: train_epoch under DDP on its share of each step's micro-batches
    (`accumulation` of them), recording after how many of its forward passes each gradient bucket is reduced;
    the record and the weights go to out_dir/no_sync_<rank>.pt. Both processes use device 0 and gloo, which
    reduces CUDA tensors too (NCCL takes one GPU per process)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=len(shares))
    try:
        device = torch.device(device_type, 0) if device_type == "cuda" else torch.device(device_type)
        model, forwards, reduced_after = no_sync_model(device), [0], set()
        model.register_forward_pre_hook(lambda module, inputs: forwards.__setitem__(0, forwards[0] + 1))
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[0] if device_type == "cuda" else None)

        def recording_allreduce(state, bucket):
            reduced_after.add(forwards[0])
            return allreduce_hook(state, bucket)

        ddp.register_comm_hook(None, recording_allreduce)
        train_epoch(ddp, shares[rank], sgd(model, fused=True), torch.amp.GradScaler(device_type, enabled=False),
                    dtype, accumulation, device=device)
        torch.save({"reduced_after": sorted(reduced_after),
                    "weights": {name: value.detach().cpu() for name, value in model.named_parameters()}},
                   out_dir / f"no_sync_{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def two_process_no_sync(micro_batches: list, accumulation: int, device: torch.device, dtype: torch.dtype,
                        out_dir: Path, tolerance: float) -> str:
    """Two processes on one device train as one process does with `accumulation` micro-batches per step, each
    taking half of every step's micro-batches: DDP must reduce the gradients once per step, after the last
    micro-batch (its `no_sync` on the others), and both must end with the one process's weights (within
    `tolerance` of their change). The processes are spawned: a fork would inherit this one's CUDA context, or its
    CPU thread pool, which then hangs the child's first parallel operation."""
    model = no_sync_model(device)
    start = {name: value.detach().cpu().clone() for name, value in model.named_parameters()}
    train_epoch(model, micro_batches, sgd(model, fused=True), torch.amp.GradScaler(device.type, enabled=False), dtype,
                accumulation, device=device)
    alone = {name: value.detach().cpu() for name, value in model.named_parameters()}
    half = accumulation // 2
    shares = [[batch for index, batch in enumerate(micro_batches) if index % accumulation // half == rank]
              for rank in (0, 1)]
    with socket.socket() as probe:  # a free port for the two processes' rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.start_processes(no_sync_process, (shares, half, device.type, dtype, port, out_dir), nprocs=2,
                                          start_method="spawn")
    expected = list(range(half, len(shares[0]) + 1, half))
    offs = []
    for rank in (0, 1):
        result = torch.load(out_dir / f"no_sync_{rank}.pt", weights_only=True)
        if result["reduced_after"] != expected:
            raise CheckFailed(f"process {rank} reduced gradients after forward passes {result['reduced_after']}, not "
                              f"only after the last micro-batch of each step ({expected})")
        offs.append(distance(result["weights"], alone) / distance(alone, start))
    if not max(offs) <= tolerance:
        raise CheckFailed(f"the two processes' weights differ from one process's by {max(offs):.2%} of their change "
                          f"(tolerance {tolerance:.0%})")
    return (f"2 processes on one {device.type} device: gradients reduced once per step of {half} + {half} "
            f"micro-batches; weights within {max(offs):.1e} of one process's change")


def check_no_sync(config: dict, shared: dict) -> str:
    """DDP's no_sync on CUDA, with two processes on the one GPU: `two_process_no_sync` on two steps."""
    accumulation = config["batch_size"] // config["micro_batch_size"]
    if accumulation % 2:
        raise CheckFailed(f"batch_size / micro_batch_size is {accumulation}: two processes need an even number")
    torch.manual_seed(0)  # the micro-batches' colour factors
    micro_batches = [loader_batch({**config, "image_size": 224}, torch.device("cuda")) for _ in range(2 * accumulation)]
    return two_process_no_sync(micro_batches, accumulation, torch.device("cuda"), torch.bfloat16,
                               Path(config["work_dir"]), config["same_tolerance"])


def check_data(config: dict, shared: dict) -> str:
    """The detection set, and pretrain.py's classification crops (one shape each, 64 px)."""
    work = Path(config["work_dir"])
    for layout, folder in (("voc", "data"), ("imagefolder", "classification")):
        run("data", [PYTHON, "data/make_synthetic.py", f"--layout={layout}", f"--out={work / folder}",
                     f"--train={config['train_images']}", f"--val={config['val_images']}", "--seed=0"], config)
    return f"{config['train_images']} + {config['val_images']} images, as many classification crops"


def check_bf16(config: dict, shared: dict) -> str:
    """Two epochs in bf16, as one epoch then a resume to two (keeping epoch 1's weights for the SIGTERM check)."""
    run("bf16", train_command(config, "bf16", "--dtype=bf16", "--epochs=1"), config)
    shared["epoch1_weights"] = weights(Path(config["work_dir"]) / "bf16" / "last.pt")
    output = run("bf16", train_command(config, "bf16", "--dtype=bf16", "--epochs=2"), config)
    if "resumed from" not in output:
        raise CheckFailed("the second call did not resume from epoch 1")
    row = last_epoch_row(config, "bf16")
    return f"train_loss {float(row['train_loss']):.3f}, {float(row['images_per_s']):.0f} img/s"


def check_fp16(config: dict, shared: dict) -> str:
    """fp16 with a GradScaler, then a resume of that run in bf16 (the scaler state is set aside)."""
    run("fp16", train_command(config, "fp16", "--dtype=fp16", "--epochs=1"), config)
    scale = torch.load(Path(config["work_dir"]) / "fp16" / "last.pt", map_location="cpu",
                       weights_only=True)["scaler"].get("scale")
    if scale is None:
        raise CheckFailed("the fp16 checkpoint holds no GradScaler state")
    run("fp16", train_command(config, "fp16", "--dtype=bf16", "--epochs=2"), config)
    last_epoch_row(config, "fp16")
    return f"scale {scale:g}; resumed in bf16"


def check_compile(config: dict, shared: dict) -> str:
    run("compile", train_command(config, "compile", "--dtype=bf16", "--epochs=1", "--compile=true"), config)
    return f"train_loss {float(last_epoch_row(config, 'compile')['train_loss']):.3f}"


def run_and_stop(name: str, command: list[str], config: dict, at_line: str) -> tuple[int, str]:
    """Start `command`, send it SIGTERM at the first line of its output that starts with `at_line`, and return its
    exit status and output (also added to work_dir/<name>.log); one that does not end is a CheckFailed."""
    log = Path(config["work_dir"]) / f"{name}.log"
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith(at_line):
            process.send_signal(signal.SIGTERM)
            break
    try:
        lines.append(process.communicate(timeout=config["timeout"])[0])
    except subprocess.TimeoutExpired:
        process.kill()
        lines.append(process.communicate()[0])
        raise CheckFailed(f"{' '.join(command[:3])} did not exit within {config['timeout']} s of SIGTERM (log: {log})")
    finally:
        with log.open("a") as file:
            file.write(f"$ {' '.join(command)}\n{''.join(lines)}")
    return process.returncode, "".join(lines)


def check_torchrun_sigterm_resume(config: dict, shared: dict) -> str:
    """The bf16 run again under torchrun over NCCL (two processes where there are two GPUs: DDP, with its no_sync
    on the micro-batches that do not complete a step), stopped by a SIGTERM to torchrun as training starts, as
    SLURM or a user stops it, then resumed to the end with the same command."""
    if "epoch1_weights" not in shared:
        raise CheckFailed("needs the bf16 check's run as its reference")
    work = Path(config["work_dir"])
    processes = 2 if torch.cuda.device_count() >= 2 else 1
    launcher = (PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}")
    # Reads every step, so the stop lands mid-epoch (reads do not change what is computed). The line opening
    # training comes after the model is wrapped in DDP, which every process joins just before it installs its
    # signal handler (the CPU tests stop torchrun's processes at a chosen step: tests/instrumented.py).
    command = train_command(config, "sigterm", "--dtype=bf16", "--epochs=2", "--log_every=1", launcher=launcher)
    status, output = run_and_stop("sigterm", command, config, at_line="training epochs")
    if "in a nccl process group" not in output:
        raise CheckFailed(f"train.py under torchrun did not join an NCCL process group (log: {work / 'sigterm.log'})")
    if status == 0 or output.count("received SIGTERM") != 1 or output.count("rerun the same command") != 1:
        raise CheckFailed(f"after SIGTERM: exit {status}, {output.count('received SIGTERM')} stop messages and "
                          f"{output.count('rerun the same command')} saves reported, not a failed exit, one and one "
                          f"(log: {work / 'sigterm.log'})")
    saved = torch.load(work / "sigterm" / "last.pt", map_location="cpu", weights_only=True)
    stopped_at = f"epoch {saved['epoch'] + 1} step {saved['step']}"
    if saved["epoch"] != 0 or saved["step"] == 0:
        raise CheckFailed(f"the SIGTERM saved at {stopped_at}, not within epoch 1 (log: {work / 'sigterm.log'})")
    output = run("sigterm_resume", command, config)
    if "resumed from" not in output:
        raise CheckFailed("the rerun did not resume from the stopped run's last.pt")
    final, reference = weights(work / "sigterm" / "last.pt"), weights(work / "bf16" / "last.pt")
    ratio = distance(final, reference) / distance(reference, shared["epoch1_weights"])
    if not ratio <= config["resume_tolerance"]:
        raise CheckFailed(f"stopped at {stopped_at}; the resumed weights differ from the uninterrupted run's by "
                          f"{ratio:.2%} of one epoch's change (tolerance {config['resume_tolerance']:.0%})")
    accumulation = config["batch_size"] // (config["micro_batch_size"] * processes)
    return (f"{processes} process(es), nccl, {accumulation} micro-batches per process and step; stopped at "
            f"{stopped_at}; resumed weights within {ratio:.2%} of one epoch's change")


def check_evaluate(config: dict, shared: dict) -> str:
    run("evaluate", [PYTHON, "evaluate.py", f"--checkpoint={Path(config['work_dir']) / 'bf16' / 'last.pt'}",
                     f"--out_dir={Path(config['out_dir']) / 'evaluate'}", "--dtype=auto", "--num_examples=1"], config)
    return f"metrics in {Path(config['out_dir']) / 'evaluate'}"


def check_benchmark(config: dict, shared: dict) -> str:
    run("benchmark", [PYTHON, "benchmark.py", "--device=cuda", "--backbones=resnet18,resnet50,mobilenet_v2",
                      "--batch_sizes=1,64", "--modes=forward,end_to_end,train_step", "--dtypes=fp32,bf16,fp16",
                      f"--iters={config['benchmark_iters']}", f"--out={Path(config['out_dir']) / 'benchmark.csv'}"],
        config)
    return f"rows in {Path(config['out_dir']) / 'benchmark.csv'}"


def training_run_check(name: str, *overrides: str):
    """One epoch of train.py in bf16 with `overrides` (a backbone, an optimizer, a data setting)."""
    def check(config: dict, shared: dict) -> str:
        run(name, train_command(config, name, "--dtype=bf16", "--epochs=1", *overrides), config)
        return f"{' '.join(overrides)}: train_loss {float(last_epoch_row(config, name)['train_loss']):.3f}"
    return check


def check_pretrain(config: dict, shared: dict) -> str:
    """pretrain.py (the paper's classification stage) on the synthetic crops, darknet, accumulating."""
    work = Path(config["work_dir"])
    # lr: the recipe's 0.1 is for batches of 256 images.
    run("pretrain", [PYTHON, "pretrain.py", "--backbone=darknet", f"--data_dir={work / 'classification'}",
                     f"--out_dir={work / 'pretrain'}", "--epochs=1", f"--batch_size={config['batch_size']}",
                     f"--micro_batch_size={config['micro_batch_size']}", f"--num_workers={config['num_workers']}",
                     "--lr=0.01", "--dtype=bf16"], config)
    row = last_epoch_row(config, "pretrain")
    return f"train_loss {float(row['train_loss']):.3f}, val_top1 {float(row['val_top1']):.2f}"


def loader_check(workers: int):
    def check(config: dict, shared: dict) -> str:
        run(f"loader_{workers}", [PYTHON, "benchmark.py", "--modes=loader", "--protocol=synthetic",
                                  f"--data_dir={Path(config['work_dir']) / 'data'}", f"--num_workers={workers}",
                                  f"--image_size={config['image_size']}", "--device=cuda",
                                  f"--out={Path(config['out_dir']) / 'benchmark.csv'}"], config)
        return f"rows in {Path(config['out_dir']) / 'benchmark.csv'}"
    return check


def run_checks(checks: dict, config: dict, gpu: str) -> list[dict]:
    """Run each check in order, print its PASS or FAIL line and write its row to out_dir/checks.csv as it ends,
    so that a run stopped from outside keeps the rows of the checks it finished. A failure, even an unexpected
    exception (printed with its traceback), does not stop the checks after it."""
    rows, shared = [], {}  # shared: what one check leaves for a later one (the bf16 run's epoch-1 weights)
    with open(Path(config["out_dir"]) / "checks.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, CHECK_COLUMNS)
        writer.writeheader()
        for name, check in checks.items():
            started = time.perf_counter()
            try:
                result, detail = "PASS", check(config, shared)
            except CheckFailed as error:
                result, detail = "FAIL", str(error)
            except Exception as error:  # a GPU run is one long command: a bug in one check must not end it
                traceback.print_exc()
                result, detail = "FAIL", f"{type(error).__name__}: {error} (traceback above)"
            seconds = time.perf_counter() - started
            print(f"{result}  {name:<42} {seconds:6.1f} s  {detail}", flush=True)
            rows.append({"check": name, "result": result, "seconds": f"{seconds:.1f}", "detail": detail,
                         "device_name": gpu, "torch_version": torch.__version__,
                         "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
            writer.writerow(rows[-1])
            file.flush()
    return rows


def planned_checks(config: dict) -> dict[str, tuple]:
    """{name: (check, estimated seconds on one H100, from the sizing in the module docstring)}, in the order
    they run: the measurements the README reports first and the slowest check (compile) last, so that a run
    stopped by a time limit still has the figures. Checks that use an earlier one's run come after it."""
    return {
        "synthetic data": (check_data, 6),
        "benchmark forward/end_to_end/train_step": (check_benchmark, 65),
        **{f"benchmark loader {workers} workers": (loader_check(workers), 15) for workers in config["loader_workers"]},
        "training steps without host sync, bf16; copy overlap": (no_host_sync_check("bf16"), 15),
        "training steps without host sync, fp16 overflowing; as stock SGD": (no_host_sync_check("fp16"), 12),
        "bf16 training": (check_bf16, 40),
        "fp16 + GradScaler": (check_fp16, 40),
        "torchrun nccl, SIGTERM then resume": (check_torchrun_sigterm_resume, 50),
        "two processes on one GPU: DDP no_sync": (check_no_sync, 15),
        "evaluate.py": (check_evaluate, 20),
        "fused AdamW, fast backbone": (training_run_check("adamw_fast", "--optimizer=adamw", "--backbone=fast"), 20),
        "cache_images, darknet backbone": (
            training_run_check("cache_darknet", "--cache_images=true", "--backbone=darknet"), 22),
        "pretrain.py": (check_pretrain, 15),
        "compile": (check_compile, 135),
    }


def main(config: dict) -> None:
    if not torch.cuda.is_available():
        sys.exit("error: gpu_check.py exercises the CUDA paths and torch finds no CUDA GPU here; run it on a "
                 "machine with one (make test covers the CPU paths).")
    work, out = Path(config["work_dir"]), Path(config["out_dir"])
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    gpu = device_name(torch.device("cuda"))
    plan = planned_checks(config)
    print(f"gpu_check on {gpu}, torch {torch.__version__}: {len(plan)} checks, estimated "
          f"{sum(seconds for _, seconds in plan.values())} s on one H100; logs in {work}", flush=True)
    rows = run_checks({name: check for name, (check, _) in plan.items()}, config, gpu)
    failed = [row["check"] for row in rows if row["result"] == "FAIL"]
    total = sum(float(row["seconds"]) for row in rows)
    print(f"{len(rows) - len(failed)} of {len(rows)} checks passed in {total:.0f} s; {out / 'checks.csv'}")
    if failed:
        sys.exit(f"error: failed: {', '.join(failed)} (logs in {work})")


if __name__ == "__main__":
    main(resolve_config(globals(), rules=RULES))
