"""train.py end to end on tiny synthetic sets: learning, exact resume, signals, torchrun, clear errors."""
import copy
import csv
import os
import shutil
import signal
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from command_lines import run_python
from data import make_synthetic
import train
import yolo
from yolo.checkpoint import config_differences, load_checkpoint
from yolo.api import open_detector
from yolo.config import resolve_config
from yolo.data import build_dataset
from yolo.engine import evaluate
from yolo.sampling import IndexedSamples
from yolo.transforms import EvalTransform, build_loader
from yolo.device import autocast_dtype
from weights import assert_same_weights, final_weights

ROOT = Path(__file__).resolve().parents[1]
TINY = ["configs/tiny_model.py", "configs/tiny.py"]
# At initialisation both predictors of a cell propose nearly the same box, so which one is responsible
# (an argmax over IoUs) flips with the last bit of a sum: runs compared bit for bit must use the same
# number of threads per process. One thread each also keeps two processes from oversubscribing 2 cores.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
# A short, resumable run: 16 images, 2 optimizer steps of 2 accumulated micro-batches per epoch.
RESUMABLE = TINY + ["--epochs=2", "--batch_size=8", "--micro_batch_size=4", "--num_workers=1"]
# `python tests/instrumented.py --option ... train.py --name=value ...`: train.py interrupted at a chosen event.
INSTRUMENTED = [sys.executable, "tests/instrumented.py"]


def train_command(data_dir, out_dir, *overrides):
    return [sys.executable, "train.py", f"--data_dir={data_dir}", f"--out_dir={out_dir}", *overrides]


def run_train(data_dir, out_dir, *overrides, expect_success=True):
    result = run_python(train_command(data_dir, out_dir, *overrides), cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env=ONE_THREAD)
    if expect_success:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_synthetic")
    make_synthetic.generate(root, train=16, val=4, seed=3)
    return root


@pytest.fixture(scope="module")
def reference_run(data_dir, tmp_path_factory):
    """Two uninterrupted epochs: what every interrupted and resumed run must reproduce bit for bit."""
    out_dir = tmp_path_factory.mktemp("reference")
    run_train(data_dir, out_dir, *RESUMABLE)
    return out_dir


def test_training_learns_until_the_training_images_are_detected(overfit_run):
    """Targets, loss, decoding and metrics together: 8 images, no augmentation, validated on themselves."""
    _, out_dir = overfit_run
    log = pd.read_csv(out_dir / "log.csv")
    assert list(log["epoch"]) == list(range(1, 41))
    assert log["val_voc12_map"].iloc[-1] >= 0.9, log.to_string()
    assert log["train_loss"].iloc[-1] < log["train_loss"].iloc[0] / 5
    assert (out_dir / "training_curve.png").stat().st_size > 0
    assert (out_dir / "done").exists()
    best = torch.load(out_dir / "best.pt", weights_only=True)
    assert best["val_voc12_map"] == pytest.approx(log["val_voc12_map"].max(), abs=1e-6)


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(data_dir, reference_run, tmp_path):
    out_dir = tmp_path / "killed"
    command = [*INSTRUMENTED, "--send_signal=SIGKILL:3", *train_command(data_dir, out_dir, *RESUMABLE)[1:]]
    result = run_python(command, cwd=ROOT, env=ONE_THREAD, capture_output=True, text=True, timeout=600)
    assert result.returncode == -signal.SIGKILL, result.stdout + result.stderr  # at epoch 2's first step
    killed_at = torch.load(out_dir / "last.pt", weights_only=True)
    assert (killed_at["epoch"], killed_at["step"]) == (1, 0)

    result = run_train(data_dir, out_dir, *RESUMABLE)
    assert "resumed from" in result.stdout
    assert_same_weights(final_weights(out_dir), final_weights(reference_run))
    assert list(pd.read_csv(out_dir / "log.csv")["epoch"]) == [1, 2]


def test_training_goes_on_while_last_pt_is_written_and_a_kill_then_keeps_the_previous_one(data_dir, reference_run,
                                                                                           tmp_path):
    out_dir = tmp_path / "killed_while_saving"
    # Each write starts only when the training waits for it: epoch 2's line comes while its last.pt is pending,
    # and that write is killed after its bytes, before it completes.
    command = [*INSTRUMENTED, "--slow_disk", "--kill_during_write=last.pt:2",
               *train_command(data_dir, out_dir, *RESUMABLE)[1:]]
    result = run_python(command, cwd=ROOT, env=ONE_THREAD, capture_output=True, text=True, timeout=600)
    assert result.returncode == -signal.SIGKILL, result.stdout + result.stderr
    assert "epoch 2 |" in result.stdout
    killed_at = torch.load(out_dir / "last.pt", weights_only=True)
    assert (killed_at["epoch"], killed_at["step"]) == (1, 0), "the killed write must leave epoch 1's last.pt"
    assert not (out_dir / "done").exists()

    result = run_train(data_dir, out_dir, *RESUMABLE)
    assert "resumed from" in result.stdout
    assert_same_weights(final_weights(out_dir), final_weights(reference_run))


def test_done_appears_only_once_the_final_last_pt_is_on_disk(data_dir, tmp_path):
    """With every write held until the training waits for it, marking the run finished before waiting fails."""
    out_dir = tmp_path / "slow_writes"
    command = [*INSTRUMENTED, "--slow_disk", *train_command(data_dir, out_dir, *RESUMABLE, "--epochs=1")[1:]]
    result = run_python(command, cwd=ROOT, env=ONE_THREAD, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (out_dir / "done").exists()
    assert torch.load(out_dir / "last.pt", weights_only=True)["epoch"] == 1


def test_sigterm_saves_the_step_and_resume_is_exact(data_dir, reference_run, tmp_path):
    out_dir = tmp_path / "terminated"
    # The signal comes at the start of the first optimizer step: that step finishes, and the save is there.
    command = [*INSTRUMENTED, "--send_signal=SIGTERM:1", *train_command(data_dir, out_dir, *RESUMABLE)[1:]]
    result = run_python(command, cwd=ROOT, env=ONE_THREAD, capture_output=True, text=True, timeout=600)
    assert result.returncode == 128 + signal.SIGTERM, result.stdout + result.stderr
    assert "rerun the same command to resume" in result.stdout
    saved = torch.load(out_dir / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["step"]) == (0, 1)

    run_train(data_dir, out_dir, *RESUMABLE)
    assert_same_weights(final_weights(out_dir), final_weights(reference_run))
    # The interrupted epoch's log row covers the whole epoch, the steps before the stop included.
    resumed, uninterrupted = (pd.read_csv(folder / "log.csv") for folder in (out_dir, reference_run))
    columns = ["coord", "obj", "noobj", "cls", "train_loss", "skipped_images"]
    pd.testing.assert_frame_equal(resumed[columns], uninterrupted[columns], atol=1e-6)


def test_a_finished_run_is_a_no_op(data_dir, reference_run):
    before = (reference_run / "last.pt").stat().st_mtime_ns
    result = run_train(data_dir, reference_run, *RESUMABLE)
    assert "nothing to do" in result.stdout
    assert (reference_run / "last.pt").stat().st_mtime_ns == before


def test_resume_refuses_a_run_with_other_settings(data_dir, reference_run):
    result = run_train(data_dir, reference_run, *RESUMABLE, "--lr=0.5", "--epochs=3", expect_success=False)
    assert result.returncode != 0
    assert "lr: 0.01 -> 0.5" in result.stderr and "another out_dir" in result.stderr


def test_torchrun_on_two_processes_matches_one_process(data_dir, tmp_path):
    """Two gloo processes accumulating two micro-batches each equal one process accumulating all four.

    Each micro-batch's forward and backward are the same computations in both runs (same images, same
    augmentation, BatchNorm over the same 4 images); the gradients are averaged across processes on each
    step's last micro-batch alone (DDP's no_sync before it), so only the order of the sum differs (gloo's
    all-reduce instead of autograd's accumulation), a float32 rounding difference of about 1e-7 relative per
    step, far below the tolerance.
    """
    # One step of 16 images: a second would start from weights a rounding apart, and at this tiny scale which
    # predictor is responsible for a box can flip with the last bit.
    settings = [*TINY, "--epochs=1", "--batch_size=16", "--micro_batch_size=4", "--num_workers=1"]
    single_dir, ddp_dir = tmp_path / "single", tmp_path / "ddp"
    run_train(data_dir, single_dir, *settings)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
               f"--data_dir={data_dir}", f"--out_dir={ddp_dir}", *settings]
    result = run_python(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=ONE_THREAD)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(2 accumulated micro-batches per process)" in result.stdout
    assert result.stdout.count("| train_loss") == 1  # rank 0 alone prints the epoch lines
    ddp, single = final_weights(ddp_dir), final_weights(single_dir)
    for name, value in single.items():
        if value.is_floating_point() and "running" not in name:
            torch.testing.assert_close(ddp[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_a_stop_signalled_to_one_torchrun_process_stops_all_at_one_step(data_dir, reference_run, tmp_path):
    """SIGTERM to rank 1 only: both processes agree on the step, rank 0 saves, and the resume completes the run."""
    out_dir = tmp_path / "ddp_stop"
    arguments = [f"--data_dir={data_dir}", f"--out_dir={out_dir}", *RESUMABLE]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command = [*torchrun, "tests/instrumented.py", "--send_signal=SIGTERM:1:1", "train.py", *arguments]
    result = run_python(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=ONE_THREAD)
    output = result.stdout + result.stderr
    assert output.count("rerun the same command to resume") == 1, output  # said by rank 0 alone
    saved = torch.load(out_dir / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["step"]) == (0, 1), output

    resumed = run_python([*torchrun, "train.py", *arguments], cwd=ROOT, capture_output=True, text=True,
                             timeout=600, env=ONE_THREAD)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stdout + resumed.stderr
    ddp, single = final_weights(out_dir), final_weights(reference_run)
    for name, value in single.items():
        if value.is_floating_point() and "running" not in name:
            torch.testing.assert_close(ddp[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_a_sigterm_to_torchrun_saves_the_step_and_the_rerun_resumes_it_exactly(data_dir, reference_run, tmp_path):
    """torchrun passes a SIGTERM on to every process (as it does when SLURM or a user stops it): one stop
    message, last.pt at that step, and the rerun ends with the uninterrupted run's weights."""
    out_dir = tmp_path / "torchrun_stop"
    arguments = [f"--data_dir={data_dir}", f"--out_dir={out_dir}", *RESUMABLE]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    # At the second epoch's first step: every process has installed its handler by then (at an earlier step the
    # other one may still be starting, and a SIGTERM there ends it before it has anything to save).
    command = [*torchrun, "tests/instrumented.py", "--send_signal=SIGTERM:3:0", "--to_launcher", "train.py",
               *arguments]
    result = run_python(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=ONE_THREAD)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and output.count("received SIGTERM") == 1, output
    assert output.count("rerun the same command to resume") == 1, output
    saved = torch.load(out_dir / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["step"]) == (1, 1), output  # the partial epoch

    # No loader worker of the rerun is forked beside another thread (its fork hook).
    resumed = run_python([*torchrun, "tests/instrumented.py", "--check_forks", "train.py", *arguments], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env=ONE_THREAD)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stdout + resumed.stderr
    ddp, single = final_weights(out_dir), final_weights(reference_run)
    for name, value in single.items():
        if value.is_floating_point() and "running" not in name:
            torch.testing.assert_close(ddp[name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm on this platform")
def test_torchrun_counts_the_shared_memory_of_all_its_processes_on_the_machine(data_dir, tmp_path):
    """Batches ahead that fit /dev/shm for one process, not for two: both processes refuse before a worker starts."""
    batch_bytes = 8 * 3 * 128 ** 2
    prefetch = int(0.7 * shutil.disk_usage("/dev/shm").free / batch_bytes)
    settings = [*TINY, "--epochs=1", "--batch_size=16", "--micro_batch_size=8", "--num_workers=1",
                f"--prefetch_factor={prefetch}"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
               f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'ddp'}", *settings]
    result = run_python(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=ONE_THREAD)
    # Each process's error is one line (torchrun then reports the failed processes with its own traceback).
    assert result.returncode != 0 and 'train.py", line' not in result.stderr, result.stderr
    refusals = [line for line in result.stderr.splitlines() if line.startswith("error: /dev/shm has")]
    assert refusals and all("the 2 processes on this machine (LOCAL_WORLD_SIZE) need" in line for line in refusals)
    assert not (tmp_path / "ddp" / "last.pt").exists()


def test_torchrun_with_one_process_takes_the_distributed_path(data_dir, tmp_path):
    out_dir = tmp_path / "ddp1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py",
               f"--data_dir={data_dir}", f"--out_dir={out_dir}", *RESUMABLE, "--epochs=1"]
    result = run_python(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=ONE_THREAD)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "train.py on 1 process(es) in a gloo process group" in result.stdout
    assert (out_dir / "done").exists()


@pytest.mark.parametrize("overrides, message", [
    (["--epoch=3"], "unknown setting. Valid names: backbone"),
    (["--backbone=vgg"], "--backbone='vgg': must be one of resnet18, resnet50, mobilenet_v2, darknet"),
    (["--protocol=coco"], "--protocol='coco': must be one of voc2012val"),
    (["--micro_batch_size=0"], "--micro_batch_size=0: must be at least 1"),
    (["--epochs=0"], "--epochs=0: must be at least 1"),
    (["--num_workers=many"], "--num_workers='many': must be auto or a whole number of at least 0"),
    (["--lr=-0.01"], "--lr=-0.01: must be at least 0.0"),
    (["--warmup_lr=-5"], "--warmup_lr=-5.0: must be at least 0.0"),
    (["--lr_gamma=-1"], "--lr_gamma=-1.0: must be at least 0.0"),
    (["configs/tiny.py", "configs/nope.py"], "configs/nope.py: cannot read this preset"),
])
def test_bad_settings_are_one_error_line(tmp_path, overrides, message):
    """What `python train.py ...` exits with (its __main__ resolves the settings so, before main starts)."""
    with pytest.raises(SystemExit) as stopped:
        resolve_config(vars(train), [*TINY, f"--out_dir={tmp_path / 'run'}", *overrides], rules=train.RULES)
    assert str(stopped.value.code).startswith("error: ") and message in str(stopped.value.code)


@pytest.mark.parametrize("overrides, message", [
    (["--micro_batch_size=3"], "not a multiple of micro_batch_size"),
    (["--batch_size=64"], "fewer than one batch"),
    # More batches ahead than any /dev/shm holds: refused before a worker starts (and dies of a bus error).
    (["--num_workers=1", "--prefetch_factor=100000000"], "error: /dev/shm has"),
])
def test_settings_that_do_not_fit_the_data_are_clear_errors(data_dir, tmp_path, overrides, message):
    result = run_train(data_dir, tmp_path / "run", *TINY, "--batch_size=8", "--micro_batch_size=8", *overrides,
                       expect_success=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "error: " in result.stderr and message in result.stderr, result.stderr


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm on this platform")
def test_the_validation_loader_is_refused_when_the_training_workers_buffers_leave_it_too_little(data_dir, tmp_path):
    # Enough batches ahead that the training loader's kept buffers fit /dev/shm alone, but not with validation's.
    batch_bytes = 8 * 3 * 128 ** 2
    prefetch = int(0.7 * shutil.disk_usage("/dev/shm").free / batch_bytes)
    result = run_train(data_dir, tmp_path / "run", *TINY, "--batch_size=8", "--micro_batch_size=8", "--num_workers=1",
                       f"--prefetch_factor={prefetch}", expect_success=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("error: /dev/shm has") and "that the training loader's workers keep" in \
        result.stderr, result.stderr


def test_imagenet_weights_out_of_reach_are_one_error_line(data_dir, tmp_path):
    """No network (a proxy that refuses every connection) and an empty hub cache: what to do, no traceback."""
    offline = {**ONE_THREAD, "TORCH_HOME": str(tmp_path / "hub"), "https_proxy": "http://127.0.0.1:9",
               "HTTPS_PROXY": "http://127.0.0.1:9"}
    command = train_command(data_dir, tmp_path / "run", *TINY, "--batch_size=8", "--micro_batch_size=8",
                            "--pretrained=true")
    result = run_python(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=offline)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("error: Could not load the ImageNet weights of resnet18")
    assert "--pretrained=false" in result.stderr and str(tmp_path / "hub" / "hub" / "checkpoints") in result.stderr


def test_a_non_finite_loss_stops_the_run_and_names_the_step(data_dir, tmp_path):
    result = run_train(data_dir, tmp_path / "run", *TINY, "--batch_size=8", "--micro_batch_size=8", "--epochs=2",
                       "--lr=1e30", "--warmup_epochs=0", "--num_workers=0", expect_success=False)
    assert result.returncode != 0
    assert "NaN or infinite at epoch" in result.stderr and "optimizer step" in result.stderr


def test_the_schedule_warms_up_then_steps_at_each_milestone():
    config = {"lr": 1e-2, "warmup_lr": 1e-3, "warmup_epochs": 10.0, "lr_milestones": (85, 115),
              "lr_milestones_unit": "epochs", "lr_gamma": 0.1}
    assert train.learning_rate(0.0, config) == pytest.approx(1e-3)
    assert train.learning_rate(5.0, config) == pytest.approx(5.5e-3)
    assert [train.learning_rate(epoch, config) for epoch in (10, 84.9, 85, 114.9, 115, 1000)] == \
        pytest.approx([1e-2, 1e-2, 1e-3, 1e-3, 1e-4, 1e-4])
    assert train.learning_rate(0.0, {**config, "warmup_epochs": 0.0}) == pytest.approx(1e-2)


def test_a_milestone_may_fall_inside_an_epoch():
    """The demo's one-epoch ResNet50 run drops its learning rate three quarters of the way through."""
    config = resolve_config(vars(train), ["--lr=3e-4", "--warmup_epochs=0", "--lr_milestones=0.75",
                                          "--lr_gamma=0.2"], rules=train.RULES)
    assert config["lr_milestones"] == (0.75,)
    assert [train.learning_rate(epoch, config) for epoch in (0.0, 0.74, 0.75, 1.0)] == \
        pytest.approx([3e-4, 3e-4, 6e-5, 6e-5])


def test_a_resume_may_change_only_the_listed_settings():
    saved = {"epochs": 145, "lr": 0.01, "lr_milestones": [85, 115], "num_workers": 4, "dtype": "auto"}
    current = {"epochs": 200, "lr": 0.01, "lr_milestones": (85, 115), "num_workers": 8, "dtype": "bf16"}
    assert config_differences(saved, current) == []
    assert config_differences(saved, {**current, "lr_milestones": (90, 115)}) == \
        ["lr_milestones: [85, 115] -> (90, 115)"]
    # A setting the saved run did not have (added since) counts as its default: the value the run used.
    defaults = {"label_smoothing": 0.0}
    assert config_differences(saved, {**current, "label_smoothing": 0.0}, defaults=defaults) == []
    assert config_differences(saved, {**current, "label_smoothing": 0.1}, defaults=defaults) == \
        ["label_smoothing: 0.0 -> 0.1"]
    assert config_differences(saved, {**current, "label_smoothing": 0.0}) == ["label_smoothing: None -> 0.0"]


def test_milestones_as_fractions_follow_the_runs_length_which_a_resume_then_keeps(data_dir, tmp_path):
    fractions = ["--lr_milestones=0.5,0.75", "--lr_milestones_unit=fraction", "--warmup_epochs=0", "--lr_gamma=0.1"]
    for epochs, dropped_at in ((40, (20, 30)), (8, (4, 6))):
        config = resolve_config(vars(train), [*fractions, f"--epochs={epochs}"], rules=train.RULES)
        first, second = dropped_at
        assert [train.learning_rate(epoch, config) for epoch in (first - 0.01, first, second - 0.01, second)] == \
            pytest.approx([1e-2, 1e-3, 1e-3, 1e-4])
    out_dir = tmp_path / "run"
    result = run_train(data_dir, out_dir, *TINY, "--batch_size=8", "--micro_batch_size=8", "--epochs=1", *fractions)
    assert "warning" not in result.stdout
    longer = run_train(data_dir, out_dir, *TINY, "--batch_size=8", "--micro_batch_size=8", "--epochs=2", *fractions,
                       expect_success=False)
    assert longer.returncode != 0 and "epochs: 1 -> 2" in longer.stderr


def test_milestones_past_the_end_of_the_run_are_a_warning_and_sitting_out_images_are_said(data_dir, tmp_path):
    result = run_train(data_dir, tmp_path / "run", *TINY, "--batch_size=12", "--micro_batch_size=4", "--epochs=1",
                       "--lr_milestones=0.5,3")
    assert "warning: the learning rate would drop at epochs 3, which a run of 1 epochs never reaches" in result.stdout
    assert "1 steps of 12 images each (3 accumulated micro-batches per process); 4 of the 16 images sit out each " \
           "epoch" in result.stdout


def test_autocast_dtype_on_a_cpu():
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) == torch.float32
    assert autocast_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'fp64'"):
        autocast_dtype("fp64", cpu)


def test_an_out_dir_that_is_a_file_is_refused_before_any_work(data_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    result = run_train(data_dir, blocker, *TINY, "--batch_size=8", expect_success=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"--out_dir='{blocker}': a file is in the way" in result.stderr
    assert blocker.read_text() == "keep me"


def test_resume_refuses_reordered_classes_and_warm_starts_from_best_pt(tmp_path):
    data, out_dir = tmp_path / "data", tmp_path / "run"
    make_synthetic.generate(data, train=8, val=2, seed=4)
    settings = [*TINY, "--batch_size=8", "--micro_batch_size=8"]
    run_train(data, out_dir, *settings, "--epochs=1")
    classes = (data / "classes.txt").read_text()
    (data / "classes.txt").write_text("\n".join(classes.split()[::-1]) + "\n")
    result = run_train(data, out_dir, *settings, "--epochs=2", expect_success=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "was trained on the classes" in result.stderr and "classes.txt" in result.stderr

    (data / "classes.txt").write_text(classes)
    (out_dir / "last.pt").write_bytes((out_dir / "last.pt").read_bytes()[:1000])  # truncated
    result = run_train(data, out_dir, *settings, "--epochs=2", f"--resume={out_dir / 'best.pt'}")
    assert "warm start from the weights of" in result.stdout and "epoch 1" in result.stdout
    assert torch.load(out_dir / "last.pt", weights_only=True)["epoch"] == 2
    assert list(pd.read_csv(out_dir / "log.csv")["epoch"]) == [1, 2]


def test_a_checkpoint_that_cannot_be_written_leaves_no_temporary_and_says_disk_full(tmp_path):
    from yolo.checkpoint import CheckpointError, save_checkpoint
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1}, path)
    (tmp_path / "last.pt.tmp").symlink_to("/dev/full")  # every write there fails with ENOSPC
    with pytest.raises(CheckpointError, match=r"disk full while saving .*last.pt \(.*still holds its previous"):
        save_checkpoint({"step": 2, "weights": torch.zeros(100_000)}, path)
    assert not (tmp_path / "last.pt.tmp").exists()
    assert torch.load(path, weights_only=True) == {"step": 1}


def test_a_failed_background_write_ends_the_run_with_one_error_line(data_dir, tmp_path):
    out_dir = tmp_path / "full"
    out_dir.mkdir()
    (out_dir / "last.pt.tmp").symlink_to("/dev/full")  # every write there fails with ENOSPC
    result = run_train(data_dir, out_dir, *RESUMABLE, "--epochs=1", expect_success=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"error: disk full while saving {out_dir / 'last.pt'}"), result.stderr
    assert not (out_dir / "done").exists() and not (out_dir / "last.pt").exists()


def test_an_unreadable_image_stops_the_run_before_training_naming_the_file(tmp_path):
    data, out_dir = tmp_path / "data", tmp_path / "run"
    make_synthetic.generate(data, train=8, val=2, seed=5)
    broken = data / "JPEGImages" / "val_000001.jpg"
    broken.write_bytes(b"\x00" * 100)
    result = run_train(data, out_dir, *TINY, "--batch_size=8", "--micro_batch_size=8", "--epochs=1",
                       expect_success=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert f"1 image(s) cannot be read ({broken}: not a readable image" in result.stderr
    assert "training epochs" not in result.stdout


def test_an_image_that_fails_during_training_is_skipped_and_counted_or_stops_the_run(tmp_path):
    data = tmp_path / "data"
    make_synthetic.generate(data, train=16, val=2, seed=6, layout="yolo")  # the policy holds for every layout
    damaged = data / "images" / "train" / "train_000003.jpg"
    damaged.write_bytes(damaged.read_bytes()[:2000])  # the header reads, the pixels do not
    settings = [*TINY, "--batch_size=8", "--micro_batch_size=8", "--epochs=1"]
    result = run_train(data, tmp_path / "skip", *settings)
    assert f"warning: skipped {damaged}" in result.stderr and "Traceback" not in result.stderr
    assert pd.read_csv(tmp_path / "skip" / "log.csv")["skipped_images"].tolist() == [1]

    result = run_train(data, tmp_path / "error", *settings, "--bad_images=error", expect_success=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert f"error: {damaged}" in result.stderr and "--bad_images=skip" in result.stderr


def test_an_unreadable_validation_image_costs_no_trained_epoch(tmp_path):
    data = tmp_path / "data"
    make_synthetic.generate(data, train=8, val=2, seed=7, layout="coco")  # with a split of another name
    (data / "images" / "val").rename(data / "images" / "holdout")
    (data / "annotations" / "instances_val.json").rename(data / "annotations" / "instances_holdout.json")
    damaged = data / "images" / "holdout" / "val_000001.jpg"
    damaged.write_bytes(damaged.read_bytes()[:2000])  # the header reads, the pixels do not
    # skipped: alone in its validation batch, the batch is left out
    result = run_train(data, tmp_path / "skip", *TINY, "--batch_size=8", "--micro_batch_size=1", "--epochs=1",
                       "--val_split=holdout")
    assert f"warning: skipped {damaged}" in result.stderr and "Traceback" not in result.stderr
    assert pd.read_csv(tmp_path / "skip" / "log.csv")["val_voc12_map"].notna().all()

    out_dir = tmp_path / "error"
    result = run_train(data, out_dir, *TINY, "--batch_size=8", "--micro_batch_size=8", "--epochs=1",
                       "--val_split=holdout", "--bad_images=error", expect_success=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert f"error: validating epoch 1: {damaged}" in result.stderr and "last.pt holds epoch 1" in result.stderr
    assert torch.load(out_dir / "last.pt", weights_only=True)["epoch"] == 1
    assert pd.read_csv(out_dir / "log.csv")["epoch"].tolist() == [1]


def test_a_mobilenet_v2_model_goes_through_every_script(data_dir, tmp_path):
    """--backbone=mobilenet_v2 as a user runs it: train, evaluate, detect, export (ONNX Runtime gives the
    checkpoint's metrics), the Python API and benchmark."""
    run_train(data_dir, tmp_path / "run", *TINY, "--backbone=mobilenet_v2", "--epochs=1", "--batch_size=8",
              "--micro_batch_size=8")
    checkpoint = tmp_path / "run" / "last.pt"
    assert load_checkpoint(checkpoint)["model_args"]["backbone"] == "mobilenet_v2"

    def run(*command):
        result = run_python([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=ONE_THREAD)
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    onnx_file = tmp_path / "model.onnx"
    run("export.py", f"--checkpoint={checkpoint}", f"--out={onnx_file}")
    for model in (checkpoint, onnx_file):
        run("evaluate.py", f"--checkpoint={model}", f"--out_dir={tmp_path / 'evaluate'}", "--num_workers=0",
            "--device=cpu", "--num_examples=0")
    rows = list(csv.DictReader((tmp_path / "evaluate" / "metrics.csv").open(newline="")))
    assert [row["model"] for row in rows] == ["run", f"{tmp_path.name}_onnx"]  # the .onnx named by its folder
    for column in ("voc07_map", "voc12_map", "coco_map"):
        assert float(rows[0][column]) == pytest.approx(float(rows[1][column]), abs=1e-3), column
    image = sorted((data_dir / "JPEGImages").glob("*.jpg"))[0]
    run("detect.py", f"--checkpoint={checkpoint}", f"--source={image}", f"--out_dir={tmp_path / 'detect'}",
        "--device=cpu")
    assert (tmp_path / "detect" / image.name).is_file()
    assert isinstance(yolo.load_detector(checkpoint, "cpu", "fp32").predict(image), yolo.Detections)
    run("benchmark.py", "--device=cpu", "--backbones=mobilenet_v2", "--image_size=64", "--grid_size=2",
        "--head_channels=8", "--fc_dim=16", "--warmup=0", "--iters=2", "--batch_sizes=1", "--modes=forward",
        f"--out={tmp_path / 'benchmark.csv'}")
    assert {row["backbone"] for row in csv.DictReader((tmp_path / "benchmark.csv").open(newline=""))} == \
        {"mobilenet_v2"}


def test_validation_runs_the_training_model_itself_not_a_copy(data_dir, tmp_path, monkeypatch):
    """In this process: no copy of the model is made for validation (on a GPU it would hold the model's memory
    twice), and its figures are logged."""
    copied, deepcopy = [], copy.deepcopy

    def recording_deepcopy(value, memo=None):
        if isinstance(value, torch.nn.Module):
            copied.append(type(value).__name__)
        return deepcopy(value, memo)

    monkeypatch.setattr(copy, "deepcopy", recording_deepcopy)
    out_dir = tmp_path / "run"
    try:
        train.main(resolve_config(vars(train), [*TINY, f"--data_dir={data_dir}", f"--out_dir={out_dir}",
                                                "--epochs=1", "--batch_size=8", "--micro_batch_size=8"], rules=train.RULES))
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert copied == []
    # What it logged is what evaluation of last.pt gives (its folded copy, in eval mode): the loss to float rounding.
    detector, state = open_detector(out_dir / "last.pt", "cpu", "fp32")
    dataset = build_dataset("synthetic", data_dir, train=False, class_names=state["class_names"],
                            transforms=EvalTransform(detector.image_size, detector.grid_size, detector.num_classes))
    loader = build_loader(IndexedSamples(dataset), 4, shuffle=False, num_workers=0,
                          image_bytes=3 * detector.image_size ** 2)
    expected = evaluate(detector, loader, dataset, loss_weights={"lambda_coord": train.lambda_coord,
                                                                 "lambda_noobj": train.lambda_noobj})
    (logged,) = pd.read_csv(out_dir / "log.csv").to_dict("records")
    assert logged["epoch"] == 1 and logged["val_loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert logged["val_voc12_map"] == pytest.approx(expected["metrics"]["voc12_map"], abs=1e-6)
