"""gpu_check.py's parts that need no GPU: the runner (one row per check on disk as soon as that check ends, and a
failing check does not stop the ones after it), the plan and its budget, the commands the checks run, the batch
the in-process checks train on, and the command line. (Its refusal without CUDA is tested with the Makefile in
test_make_chain.)"""
import csv
import os
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

import gpu_check
import yolo.optim
import yolo.photometric
from command_lines import run_python
from yolo.config import resolve_config
from yolo.engine import detection_loss
from yolo.model import YOLOv1
from yolo.photometric import MAX_COLOUR_FACTOR

ROOT = Path(__file__).resolve().parents[1]


def read_rows(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_each_check_is_on_disk_as_it_ends_and_a_failure_does_not_stop_the_rest(tmp_path, capsys):
    checks_csv = tmp_path / "checks.csv"
    seen_on_disk = {}

    def first(config, shared):
        shared["made by first"] = 7
        return "made a thing"

    def second(config, shared):
        seen_on_disk["second"] = [row["check"] for row in read_rows(checks_csv)]
        raise gpu_check.CheckFailed("exit 1: broken (log: somewhere)")

    def third(config, shared):
        seen_on_disk["third"] = [(row["check"], row["result"]) for row in read_rows(checks_csv)]
        return f"used {shared['made by first']}"

    rows = gpu_check.run_checks({"first": first, "second": second, "third": third}, {"out_dir": str(tmp_path)},
                                "Some GPU")

    assert seen_on_disk == {"second": ["first"], "third": [("first", "PASS"), ("second", "FAIL")]}
    on_disk = read_rows(checks_csv)
    assert on_disk == rows
    assert [(row["check"], row["result"], row["detail"]) for row in on_disk] == [
        ("first", "PASS", "made a thing"), ("second", "FAIL", "exit 1: broken (log: somewhere)"),
        ("third", "PASS", "used 7")]
    assert {row["device_name"] for row in on_disk} == {"Some GPU"}
    assert tuple(on_disk[0]) == gpu_check.CHECK_COLUMNS
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in printed] == [["PASS", "first"], ["FAIL", "second"], ["PASS", "third"]]


def test_an_unexpected_exception_is_a_failed_check_with_its_traceback(tmp_path, capsys):
    """An error gpu_check did not foresee (an API that this torch lacks, say) fails that check alone: the GPU
    run is one call, and the checks after it still give their rows."""
    def missing_api(config, shared):
        return len(None)

    def fine(config, shared):
        return "ok"

    rows = gpu_check.run_checks({"missing api": missing_api, "fine": fine}, {"out_dir": str(tmp_path)}, "Some GPU")
    assert [(row["check"], row["result"]) for row in read_rows(tmp_path / "checks.csv")] == [
        ("missing api", "FAIL"), ("fine", "PASS")]
    assert rows[0]["detail"].startswith("TypeError: object of type 'NoneType' has no len()")
    printed = capsys.readouterr()
    assert "Traceback" in printed.err and "len(None)" in printed.err
    assert printed.out.splitlines()[0].startswith("FAIL  missing api")


def default_config(tmp_path):
    return resolve_config(vars(gpu_check), [f"--work_dir={tmp_path}"], rules=gpu_check.RULES)


def test_the_plan_covers_the_recipe_paths_in_order_within_the_budget(tmp_path):
    plan = gpu_check.planned_checks(default_config(tmp_path))
    assert list(plan) == [
        "synthetic data", "benchmark forward/end_to_end/train_step", "benchmark loader 8 workers",
        "benchmark loader 16 workers", "training steps without host sync, bf16; copy overlap",
        "training steps without host sync, fp16 overflowing; as stock SGD", "bf16 training", "fp16 + GradScaler",
        "torchrun nccl, SIGTERM then resume", "two processes on one GPU: DDP no_sync", "evaluate.py",
        "fused AdamW, fast backbone", "cache_images, darknet backbone", "pretrain.py", "compile"]
    # One command on the lent GPU may run 10 minutes; the estimates leave a sixth of it for what they miss.
    assert sum(seconds for _, seconds in plan.values()) <= gpu_check.BUDGET <= 500


def commands_of(check, config, monkeypatch):
    """The commands `check` would run (recorded, not run), up to the first result file it reads."""
    issued = []

    def record(name, command, config):
        issued.append(command)
        return "train.py on 1 process(es) in a nccl process group\nresumed from last.pt"

    def record_stopped(name, command, config, at_line):
        issued.append(command)
        return 1, "in a nccl process group\nreceived SIGTERM\nrerun the same command to resume"

    monkeypatch.setattr(gpu_check, "run", record)
    monkeypatch.setattr(gpu_check, "run_and_stop", record_stopped)
    try:
        check(config, {"epoch1_weights": {}})
    except FileNotFoundError:  # the run's last.pt or log.csv: nothing ran
        pass
    return issued


def test_every_training_run_accumulates_micro_batches_of_4_into_steps_of_16(tmp_path, monkeypatch):
    config = default_config(tmp_path)
    plan = gpu_check.planned_checks(config)
    commands = {name: commands_of(plan[name][0], config, monkeypatch)
                for name in ("bf16 training", "fp16 + GradScaler", "torchrun nccl, SIGTERM then resume",
                             "fused AdamW, fast backbone",
                             "cache_images, darknet backbone", "pretrain.py", "compile")}
    for name, issued in commands.items():
        training = [command for command in issued if {"train.py", "pretrain.py"} & set(command)]
        assert training, name
        for command in training:
            assert "--batch_size=16" in command and "--micro_batch_size=4" in command, (name, command)
    assert {"--optimizer=adamw", "--backbone=fast", "--pretrained=false"} <= set(
        commands["fused AdamW, fast backbone"][0])
    assert {"--cache_images=true", "--backbone=darknet", "--pretrained=false"} <= set(
        commands["cache_images, darknet backbone"][0])
    assert {"pretrain.py", "--backbone=darknet"} <= set(commands["pretrain.py"][0])


def test_torchrun_starts_a_process_per_gpu_up_to_two(tmp_path, monkeypatch):
    config = default_config(tmp_path)
    for gpus, processes in ((1, 1), (2, 2), (8, 2)):
        monkeypatch.setattr(gpu_check.torch.cuda, "device_count", lambda: gpus)
        command = commands_of(gpu_check.check_torchrun_sigterm_resume, config, monkeypatch)[0]
        assert f"--nproc_per_node={processes}" in command and "--dtype=bf16" in command, command


def test_a_loader_batch_reaches_the_model_colour_jittered(monkeypatch):
    """What the host-sync checks train on: a uint8 micro-batch that the training loss takes as train.py's loader
    gives it, with each image's colour factors, so that the on-device jitter runs in those checks."""
    jittered = []

    def record_jitter(images, factors):
        jittered.append(factors)
        return images

    monkeypatch.setattr(yolo.photometric, "jitter_colours_", record_jitter)
    config = {"micro_batch_size": 2, "image_size": 224}
    batch = gpu_check.loader_batch(config, torch.device("cpu"))
    assert batch[0].dtype == torch.uint8 and batch[0].shape == (2, 3, 224, 224)
    model = YOLOv1("resnet18", image_size=224, head_channels=8, fc_dim=16)
    terms, images = detection_loss(model, batch, loss_weights=gpu_check.LOSS_WEIGHTS, device=torch.device("cpu"),
                                   dtype=torch.float32)
    assert images == 2 and all(torch.isfinite(value) for value in terms.values())
    assert len(jittered) == 1 and jittered[0].shape == (2, 2)
    assert ((jittered[0] >= 1 / MAX_COLOUR_FACTOR) & (jittered[0] <= MAX_COLOUR_FACTOR)).all()


def test_non_finite_state_names_the_weights_and_momentum_holding_nan_or_inf():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(3, 2)).sum().backward()
    optimizer.step()
    assert gpu_check.non_finite_state(model, optimizer) == []
    optimizer.state[model[0].bias]["momentum_buffer"][0] = float("nan")
    with torch.no_grad():
        model[0].weight[1, 0] = float("inf")
    model[1].running_var[0] = float("nan")
    assert gpu_check.non_finite_state(model, optimizer) == ["0.weight", "1.running_var", "0.bias momentum_buffer"]


def test_hidden_share_counts_the_copy_time_under_any_kernel_once():
    kernels = [(0, 10), (5, 20), (30, 40)]  # merged: 0-20 and 30-40
    assert gpu_check.hidden_share([(2, 6)], kernels) == 1.0
    assert gpu_check.hidden_share([(15, 35)], kernels) == 0.5  # 15-20 and 30-35 of 20
    assert gpu_check.hidden_share([(20, 30), (40, 50)], kernels) == 0.0
    assert gpu_check.hidden_share([(18, 22), (36, 44)], kernels) == 0.5
    assert gpu_check.hidden_share([(12, 22)], [(5, 20), (0, 10)]) == 0.8  # in any order
    assert gpu_check.hidden_share([], kernels) == 0.0


def test_a_stopped_command_is_signalled_at_its_line_and_its_output_kept(tmp_path):
    # Its handler is in place before the line that triggers the signal.
    waiter = ("import signal, sys\nsignal.signal(signal.SIGTERM, lambda *_: sys.exit(print('received SIGTERM') or 3))\n"
              "print('loading'); print('training epochs 1-2', flush=True)\nsignal.pause()")
    config = {"work_dir": str(tmp_path), "timeout": 60}
    status, output = gpu_check.run_and_stop("stop", [sys.executable, "-c", waiter], config, at_line="training")
    assert (status, output) == (3, "loading\ntraining epochs 1-2\nreceived SIGTERM\n")
    assert (tmp_path / "stop.log").read_text().endswith("\n" + output)


def test_a_command_that_outlives_its_sigterm_is_a_failed_check(tmp_path):
    ignores = ("import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('training', flush=True)\n"
               "signal.pause()")
    with pytest.raises(gpu_check.CheckFailed, match="did not exit within 1 s of SIGTERM"):
        gpu_check.run_and_stop("stop", [sys.executable, "-c", ignores], {"work_dir": str(tmp_path), "timeout": 1},
                               at_line="training")


def leftover_memory(tensor, **options):
    """What `torch.empty_like` may hand back on a GPU: memory that held something finite before."""
    return torch.full_like(tensor, 0.5, **options)


@pytest.mark.parametrize("start_momentum", ["as built", "reverted"])
def test_an_overflowing_first_fused_step_is_compared_with_stock_sgd_and_fails_without_start_momentum(
        monkeypatch, start_momentum):
    """The fp16 check's comparison, run on the CPU, where fused SGD and the GradScaler exist too: one skipped
    step and one taken, against stock SGD's one step. Without `start_momentum`'s zeros, fused SGD keeps the
    momentum buffers it made with `empty_like` at the skipped step (here holding 0.5, as a GPU's reused memory
    may), the weights stay finite, and only the comparison sees it."""
    monkeypatch.setattr(torch, "empty_like", leftover_memory)
    if start_momentum == "reverted":
        monkeypatch.setattr(yolo.optim, "start_momentum", lambda optimizer: None)
    torch.manual_seed(0)
    model = YOLOv1("resnet18", image_size=224, head_channels=16, fc_dim=32)
    cpu = torch.device("cpu")
    micro_batches = [gpu_check.loader_batch({"micro_batch_size": 1, "image_size": 224}, cpu)] * 2
    check = partial(gpu_check.overflowing_first_step_check, model, micro_batches, 1, cpu, tolerance=1e-6)
    if start_momentum == "reverted":
        with pytest.raises(gpu_check.CheckFailed, match=r"fused SGD's weights differ from stock SGD's by \d+"):
            check()
    else:
        assert check().startswith("the first step overflowed and was skipped; then as stock SGD")


@pytest.mark.parametrize("no_sync", ["as PyTorch has it", "reverted"])
def test_two_processes_reduce_once_per_step_as_one_process_trains_and_fail_without_no_sync(
        tmp_path, monkeypatch, no_sync):
    """The two-process check of DDP's no_sync, run on the CPU (gloo, as on the GPU): 4 micro-batches a step, 2 in
    each process. A `no_sync` that does nothing (planted in the spawned processes through sitecustomize, which
    every interpreter imports at start) makes DDP reduce after each micro-batch: the same weights, and only the
    record of when it reduced shows it."""
    if no_sync == "reverted":
        (tmp_path / "sitecustomize.py").write_text(
            "import contextlib\nfrom torch.nn.parallel import DistributedDataParallel\n"
            "DistributedDataParallel.no_sync = lambda self: contextlib.nullcontext()\n")
        monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    micro_batches = [gpu_check.loader_batch({"micro_batch_size": 1, "image_size": 224}, cpu) for _ in range(4)]
    check = partial(gpu_check.two_process_no_sync, micro_batches, 4, cpu, torch.float32, tmp_path, tolerance=1e-6)
    if no_sync == "reverted":
        with pytest.raises(gpu_check.CheckFailed, match=r"process 0 reduced gradients after forward passes \[1, 2\], "
                                                         r"not only after the last micro-batch of each step \(\[2\]\)"):
            check()
    else:
        assert check().startswith("2 processes on one cpu device: gradients reduced once per step of 2 + 2")


@pytest.mark.parametrize("argument, message", [
    ("--sync_check", "error: --sync_check: unknown setting"),
    ("--micro_batch_size=0", "error: --micro_batch_size=0: must be at least 1"),
    ("--sync_check_steps=1", "error: --sync_check_steps=1: must be at least 2")])
def test_a_bad_command_line_is_one_error_line(argument, message):
    result = run_python([sys.executable, "gpu_check.py", argument], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1 and result.stderr.startswith(message)
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_a_failed_check_makes_the_whole_run_fail(tmp_path, monkeypatch):
    """What make gpu-check's caller sees: any FAIL is a non-zero exit, naming the check."""
    def broken(config, shared):
        raise gpu_check.CheckFailed("exit 1: broken")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_check, "device_name", lambda device: "Some GPU")
    monkeypatch.setattr(gpu_check, "planned_checks", lambda config: {"fine": (lambda c, s: "ok", 1),
                                                                    "broken": (broken, 1)})
    config = {"work_dir": str(tmp_path / "work"), "out_dir": str(tmp_path / "out")}
    with pytest.raises(SystemExit) as stopped:
        gpu_check.main(config)
    assert stopped.value.code == f"error: failed: broken (logs in {tmp_path / 'work'})"
