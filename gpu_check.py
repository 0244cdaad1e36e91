"""Exercise every CUDA path of the project on a small synthetic set at the real 448 size, in minutes.

    python gpu_check.py            # or: make gpu-check VENV=/path/to/an/env/with/torch

Each check runs the real scripts (train.py, torchrun, evaluate.py, benchmark.py) in subprocesses and prints
one PASS or FAIL line with its seconds; a failing check does not stop the others, and its full output is
kept in work_dir/<check>.log. results go to out_dir: checks.csv (one row per check) and benchmark.csv (the
benchmark.py rows, which name the device). Needs only torch, torchvision, numpy, pillow, pandas, matplotlib
and tqdm. Sizing on one H100: each training run is a process start (~15 s with CUDA and the 256 M parameter
model), 2 epochs of 4 steps of 16 images, and a 2 GB last.pt per epoch; the compile run adds about two
minutes; the in-process check that training steps do not synchronise the host with the GPU builds
one more model; the benchmark 2 backbones x 2 batch sizes x 3 dtypes x 3 modes of 13 runs each.

GPU kernels are not bitwise reproducible run to run (cuDNN autotuning, atomic adds), so SIGTERM-then-resume
is compared with the uninterrupted run relative to one epoch's change of the weights; the CPU tests
(make test) prove the resume bit for bit.
"""
import csv
import datetime
import math
import shutil
import signal
import subprocess
import sys
import time
import traceback
import warnings
from functools import partial
from pathlib import Path

import torch

from benchmark import random_training_batch
from yolo.config import at_least, resolve_config
from yolo.device import device_name
from yolo.engine import LOSS_TERMS, detection_loss, train_one_epoch
from yolo.model import YOLOv1
from yolo.optim import build_optimizer
from yolo.photometric import draw_colour_factors
from yolo.transforms import DetectionBatch, DevicePrefetcher

# --- what to run
out_dir = "results/gpu"        # checks.csv, benchmark.csv and the evaluation's CSVs
work_dir = "runs/gpu_check"    # synthetic data, training runs and logs (emptied at the start)
train_images = 64              # synthetic training images (160-320 px a side, resized to image_size)
val_images = 16                # synthetic validation images
image_size = 448               # network input side in pixels
batch_size = 16                # images per optimizer step of the training runs
num_workers = 4                # loader processes of the training runs
benchmark_iters = 10           # timed runs of each benchmark measurement
loader_workers = (8, 16)       # worker counts of benchmark.py's loader mode
resume_tolerance = 0.05        # SIGTERM + resume vs uninterrupted: weight difference / one epoch's weight change
timeout = 420                  # seconds any one subprocess may take

RULES = {"train_images": at_least(2 * 16), "val_images": at_least(1), "image_size": at_least(64),
         "batch_size": at_least(1), "num_workers": at_least(0), "benchmark_iters": at_least(1),
         "loader_workers": at_least(0), "resume_tolerance": at_least(0.0), "timeout": at_least(1)}
PYTHON = sys.executable
LOSS_WEIGHTS = {"lambda_coord": 5.0, "lambda_noobj": 0.5}  # the paper's
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
            f"--micro_batch_size={config['batch_size']}", f"--num_workers={config['num_workers']}",
            "--eval_every=1", f"--out_dir={work / run_name}", "--resume=auto", *overrides]


def weights(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {name: value.float() for name, value in state["model"].items() if value.is_floating_point()}


def distance(first: dict, second: dict) -> float:
    return sum(float((first[name] - second[name]).pow(2).sum()) for name in first) ** 0.5


def last_epoch_row(config: dict, run_name: str) -> dict:
    with open(Path(config["work_dir"]) / run_name / "log.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    if not rows or not all(math.isfinite(float(rows[-1][key])) for key in ("train_loss", "val_loss")):
        raise CheckFailed(f"{run_name}/log.csv has no finite train and val loss: {rows[-1:] or 'no rows'}")
    return rows[-1]


def host_synchronisations(steps: int, model, optimizer, batch: DetectionBatch) -> int:
    """Synchronising CUDA calls (as torch's sync debug mode reports them) in one bf16 epoch of `steps`
    steps on `batch`, copied to the GPU as train.py's batches are, with the host reading the device's results
    only at the end of the epoch."""
    device = torch.device("cuda")
    loader = DevicePrefetcher([batch] * steps, device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_one_epoch(model, loader, optimizer, torch.amp.GradScaler("cuda", enabled=False),
                            forward_loss=partial(detection_loss, loss_weights=LOSS_WEIGHTS, device=device,
                                                 dtype=torch.bfloat16),
                            term_names=LOSS_TERMS, epoch=0, start_step=0, accumulation=1, lr_at=lambda step: 1e-3,
                            device=device, stop_requested=lambda: False, read_every=steps)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(warning.message) for warning in caught)


def check_no_host_sync(config: dict, shared: dict) -> str:
    """More optimizer steps between two reads add no synchronisation of the host with the GPU."""
    torch.manual_seed(0)
    model = YOLOv1("resnet18", image_size=config["image_size"]).to("cuda", memory_format=torch.channels_last)
    optimizer = build_optimizer(model, "sgd", 1e-3, 0.9, 5e-4, fused=True)
    batch = random_training_batch(8, {"image_size": config["image_size"], "grid_size": 7}, torch.device("cpu"))
    # uint8, with colour factors and pinned, as the DataLoader's
    batch = batch._replace(images=batch.images.pin_memory(), grids=batch.grids.pin_memory(),
                           colour_factors=torch.stack([draw_colour_factors() for _ in range(8)]).pin_memory())
    host_synchronisations(2, model, optimizer, batch)  # cuDNN autotuning and lazy initialisation happen once
    few, many = (host_synchronisations(steps, model, optimizer, batch) for steps in (2, 6))
    if many != few:
        raise CheckFailed(f"an epoch of 6 steps synchronised {many} times, one of 2 steps {few} times")
    del model, optimizer
    torch.cuda.empty_cache()  # leave the GPU's memory to the scripts the next checks start
    return f"{few} synchronisations per epoch of 2 or of 6 steps (the reads at its end)"


def check_data(config: dict, shared: dict) -> str:
    run("data", [PYTHON, "data/make_synthetic.py", f"--out={Path(config['work_dir']) / 'data'}",
                 f"--train={config['train_images']}", f"--val={config['val_images']}", "--seed=0"], config)
    return f"{config['train_images']} + {config['val_images']} images"


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


def check_torchrun(config: dict, shared: dict) -> str:
    launcher = (PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1")
    output = run("torchrun", train_command(config, "torchrun", "--dtype=bf16", "--epochs=1", launcher=launcher),
                 config)
    if "in a nccl process group" not in output:
        raise CheckFailed("train.py under torchrun did not join an NCCL process group")
    return "1 process, nccl"


def check_sigterm_resume(config: dict, shared: dict) -> str:
    """The bf16 run again, stopped by SIGTERM after its first optimizer step, then resumed to the end."""
    if "epoch1_weights" not in shared:
        raise CheckFailed("needs the bf16 check's run as its reference")
    work = Path(config["work_dir"])
    # Reads every step, so the stop lands mid-epoch (reads do not change what is computed).
    command = train_command(config, "sigterm", "--dtype=bf16", "--epochs=2", "--log_every=1")
    log = (work / "sigterm.log").open("w")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        log.write(line)
        if line.startswith("training epochs"):
            process.send_signal(signal.SIGTERM)
            break
    try:
        log.write(process.communicate(timeout=config["timeout"])[0])
    except subprocess.TimeoutExpired:
        process.kill()
        raise CheckFailed(f"the stopped run did not exit within {config['timeout']} s (log: {work / 'sigterm.log'})")
    log.close()
    if process.returncode != 128 + signal.SIGTERM:
        raise CheckFailed(f"exit {process.returncode} after SIGTERM, not {128 + signal.SIGTERM} "
                          f"(log: {work / 'sigterm.log'})")
    saved = torch.load(work / "sigterm" / "last.pt", map_location="cpu", weights_only=True)
    stopped_at = f"epoch {saved['epoch'] + 1} step {saved['step']}"
    run("sigterm_resume", command, config)
    final, reference = weights(work / "sigterm" / "last.pt"), weights(work / "bf16" / "last.pt")
    ratio = distance(final, reference) / distance(reference, shared["epoch1_weights"])
    if not ratio <= config["resume_tolerance"]:
        raise CheckFailed(f"stopped at {stopped_at}; the resumed weights differ from the uninterrupted run's by "
                          f"{ratio:.2%} of one epoch's change (tolerance {config['resume_tolerance']:.0%})")
    return f"stopped at {stopped_at}; resumed weights within {ratio:.2%} of one epoch's change"


def check_evaluate(config: dict, shared: dict) -> str:
    run("evaluate", [PYTHON, "evaluate.py", f"--checkpoint={Path(config['work_dir']) / 'bf16' / 'last.pt'}",
                     f"--out_dir={Path(config['out_dir']) / 'evaluate'}", "--dtype=auto", "--num_examples=1"], config)
    return f"metrics in {Path(config['out_dir']) / 'evaluate'}"


def check_benchmark(config: dict, shared: dict) -> str:
    run("benchmark", [PYTHON, "benchmark.py", "--device=cuda", "--backbones=resnet18,resnet50", "--batch_sizes=1,64",
                      "--modes=forward,end_to_end,train_step", "--dtypes=fp32,bf16,fp16",
                      f"--iters={config['benchmark_iters']}", f"--out={Path(config['out_dir']) / 'benchmark.csv'}"],
        config)
    return f"rows in {Path(config['out_dir']) / 'benchmark.csv'}"


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


def main(config: dict) -> None:
    if not torch.cuda.is_available():
        sys.exit("error: gpu_check.py exercises the CUDA paths and torch finds no CUDA GPU here; run it on a "
                 "machine with one (make test covers the CPU paths).")
    work, out = Path(config["work_dir"]), Path(config["out_dir"])
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    gpu = device_name(torch.device("cuda"))
    print(f"gpu_check on {gpu}, torch {torch.__version__}; logs in {work}", flush=True)
    # The measurements the README reports come first and the slowest check (compile) last, so that a run
    # stopped by a time limit still has the figures.
    checks = {"synthetic data": check_data, "benchmark forward/end_to_end/train_step": check_benchmark,
              **{f"benchmark loader {workers} workers": loader_check(workers) for workers in config["loader_workers"]},
              "training steps without host sync": check_no_host_sync, "bf16 training": check_bf16,
              "fp16 + GradScaler": check_fp16, "torchrun nccl 1 process": check_torchrun,
              "SIGTERM then resume": check_sigterm_resume, "evaluate.py": check_evaluate, "compile": check_compile}
    rows = run_checks(checks, config, gpu)
    failed = [row["check"] for row in rows if row["result"] == "FAIL"]
    total = sum(float(row["seconds"]) for row in rows)
    print(f"{len(rows) - len(failed)} of {len(rows)} checks passed in {total:.0f} s; {out / 'checks.csv'}")
    if failed:
        sys.exit(f"error: failed: {', '.join(failed)} (logs in {work})")


if __name__ == "__main__":
    main(resolve_config(globals(), rules=RULES))
