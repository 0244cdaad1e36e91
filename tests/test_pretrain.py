"""pretrain.py end to end on a tiny synthetic classification set, and the two-stage recipe into train.py."""
import json
import os
import runpy
import shutil
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from command_lines import run_python
from data import make_synthetic
import pretrain
from yolo.checkpoint import load_backbone_weights, save_checkpoint
from yolo.classification import BackboneClassifier
from yolo.model import YOLOv1
from weights import assert_same_weights, final_weights

ROOT = Path(__file__).resolve().parents[1]
# One thread per process: runs compared bit for bit must use the same number of threads (see test_train.py).
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
# 16 images of 64 px: 2 optimizer steps of 2 accumulated micro-batches per epoch, Fast YOLO's small backbone.
RESUMABLE = ["--backbone=fast", "--image_size=64", "--epochs=2", "--batch_size=8", "--micro_batch_size=4",
             "--num_workers=1", "--device=cpu", "--lr=0.05"]
DETECTION = ["configs/tiny_model.py", "configs/tiny.py", "--backbone=fast", "--epochs=1", "--batch_size=8",
             "--micro_batch_size=8"]


def run_script(script, *arguments, expect_success=True):
    result = run_python([sys.executable, script, *map(str, arguments)], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, env=ONE_THREAD)
    if expect_success:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def pretrain_command(data_dir, out_dir, *overrides):
    return [sys.executable, "pretrain.py", f"--data_dir={data_dir}", f"--out_dir={out_dir}", *overrides]


@pytest.fixture(scope="module")
def classification_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("classification")
    make_synthetic.generate_classification(root, train=16, val=10, seed=0, size=64)
    return root


@pytest.fixture(scope="module")
def detection_dir(tmp_path_factory):
    """A detection set of this module's own: train.py leaves a record of its image check in the data folder."""
    root = tmp_path_factory.mktemp("detection")
    make_synthetic.generate(root, train=16, val=8, seed=0)
    return root


@pytest.fixture(scope="module")
def reference_run(classification_dir, tmp_path_factory):
    """Two uninterrupted epochs: what every interrupted and resumed run must reproduce bit for bit."""
    out_dir = tmp_path_factory.mktemp("pretrain_reference")
    run_script("pretrain.py", f"--data_dir={classification_dir}", f"--out_dir={out_dir}", *RESUMABLE)
    return out_dir


def test_pretraining_learns_and_logs_what_it_promises(tmp_path):
    data_dir = tmp_path / "data"
    make_synthetic.generate_classification(data_dir, train=40, val=10, seed=1, size=64)
    run_script("pretrain.py", f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'run'}", *RESUMABLE,
               "--micro_batch_size=8", "--num_workers=0", "--epochs=3")
    log = pd.read_csv(tmp_path / "run" / "log.csv")
    assert list(log.columns) == list(pretrain.LOG_COLUMNS)
    assert list(log["epoch"]) == [1, 2, 3]
    assert log["train_loss"].iloc[-1] < log["train_loss"].iloc[0]
    assert log["val_top1"].iloc[-1] >= 0.6, log.to_string()  # 5 classes: chance is 0.2
    assert (log["val_top5"] >= log["val_top1"]).all()
    assert (tmp_path / "run" / "training_curve.png").stat().st_size > 0
    assert (tmp_path / "run" / "done").exists()
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert {"model", "optimizer", "scaler", "epoch", "step", "config", "class_names", "rng"} <= saved.keys()
    assert saved["class_names"] == sorted(make_synthetic.CLASS_NAMES) and saved["config"]["task"] == "classification"


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(classification_dir, reference_run, tmp_path):
    out_dir = tmp_path / "killed"
    # Killed at the start of epoch 2's first optimizer step (tests/instrumented.py), with epoch 1's last.pt on disk.
    command = [sys.executable, "tests/instrumented.py", "--send_signal=SIGKILL:3",
               *pretrain_command(classification_dir, out_dir, *RESUMABLE)[1:]]
    result = run_python(command, cwd=ROOT, env=ONE_THREAD, capture_output=True, text=True, timeout=600)
    assert result.returncode == -signal.SIGKILL, result.stdout + result.stderr
    killed_at = torch.load(out_dir / "last.pt", weights_only=True)
    assert (killed_at["epoch"], killed_at["step"]) == (1, 0)

    result = run_script("pretrain.py", f"--data_dir={classification_dir}", f"--out_dir={out_dir}", *RESUMABLE)
    assert "resumed from" in result.stdout
    assert_same_weights(final_weights(out_dir), final_weights(reference_run))
    assert list(pd.read_csv(out_dir / "log.csv")["epoch"]) == [1, 2]


def test_sigterm_saves_the_step_and_resume_is_exact(classification_dir, reference_run, tmp_path):
    out_dir = tmp_path / "terminated"
    # The signal comes at the start of the first optimizer step: that step finishes, and the save is there.
    command = [sys.executable, "tests/instrumented.py", "--send_signal=SIGTERM:1",
               *pretrain_command(classification_dir, out_dir, *RESUMABLE)[1:]]
    result = run_python(command, cwd=ROOT, env=ONE_THREAD, capture_output=True, text=True, timeout=600)
    assert result.returncode == 128 + signal.SIGTERM, result.stdout + result.stderr
    saved = torch.load(out_dir / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["step"]) == (0, 1)

    # The resumed run validates after a checkpoint write has started its thread: no worker is forked beside it.
    run_script("tests/instrumented.py", "--check_forks", "pretrain.py", f"--data_dir={classification_dir}",
               f"--out_dir={out_dir}", *RESUMABLE)
    assert_same_weights(final_weights(out_dir), final_weights(reference_run))


def test_torchrun_on_two_processes_matches_one_process(classification_dir, reference_run, tmp_path):
    """Two gloo processes with one micro-batch each against one process accumulating both (see test_train.py)."""
    out_dir = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "pretrain.py",
               f"--data_dir={classification_dir}", f"--out_dir={out_dir}", *RESUMABLE]
    result = run_python(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=ONE_THREAD)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("| train_loss") == 2  # rank 0 alone prints the epoch lines
    ddp, single = final_weights(out_dir), final_weights(reference_run)
    for name, value in single.items():
        if value.is_floating_point() and "running" not in name:
            torch.testing.assert_close(ddp[name], value, rtol=1e-4, atol=1e-5, msg=name)
    # Each process validates half the images with its own BatchNorm statistics: the accuracy is not compared.
    assert pd.read_csv(out_dir / "log.csv")["val_top1"].between(0, 1).all()


def test_resume_refuses_other_settings_and_a_longer_cosine_run(classification_dir, reference_run):
    result = run_script("pretrain.py", f"--data_dir={classification_dir}", f"--out_dir={reference_run}", *RESUMABLE,
                        "--epochs=3", expect_success=False)
    assert "error: " in result.stderr and "epochs: 2 -> 3" in result.stderr
    result = run_script("pretrain.py", f"--data_dir={classification_dir}", f"--out_dir={reference_run}", *RESUMABLE,
                        "--lr=0.5", expect_success=False)
    assert "lr: 0.05 -> 0.5" in result.stderr


def test_the_two_stages_hand_the_backbone_over_unchanged(reference_run, detection_dir, tmp_path):
    """With a zero learning rate the detector's backbone after its first step is the pretrained one
    (BatchNorm's running statistics excepted: they follow the detection images)."""
    out_dir = tmp_path / "detector"
    weights = reference_run / "last.pt"
    run_script("train.py", f"--data_dir={detection_dir}", f"--out_dir={out_dir}", *DETECTION, "--lr=0",
               "--warmup_lr=0", "--pretrained=false", f"--backbone_weights={weights}")
    pretrained, detector = final_weights(reference_run), final_weights(out_dir)
    backbone_parameters = [name for name, _ in YOLOv1("fast", num_classes=5, grid_size=4, image_size=128)
                           .backbone.named_parameters()]
    assert len(backbone_parameters) == 18  # 6 convolutions, each with BatchNorm's weight and bias
    for name in backbone_parameters:
        assert torch.equal(detector[f"backbone.{name}"], pretrained[f"backbone.{name}"]), name
    assert json.loads((out_dir / "config.json").read_text())["backbone_weights"] == str(weights)

    result = run_script("train.py", f"--data_dir={detection_dir}", f"--out_dir={out_dir}", *DETECTION, "--lr=0",
                        "--warmup_lr=0", "--pretrained=false", "--epochs=2", expect_success=False)
    assert f"backbone_weights: '{weights}' -> ''" in result.stderr


def test_every_backbone_tensor_reaches_the_detector_and_nothing_else(tmp_path):
    """Darknet: the classifier's 20 convolutions and BatchNorms, buffers included; the head keeps its own."""
    torch.manual_seed(0)
    classifier = BackboneClassifier("darknet", num_classes=3)
    for module in classifier.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # non-default statistics, so that copying them shows
            module.running_mean.uniform_()
            module.running_var.uniform_(0.5, 2)
    path = tmp_path / "last.pt"
    save_checkpoint({"model": classifier.state_dict(), "config": {"task": "classification", "backbone": "darknet"}},
                    path)
    detector = YOLOv1("darknet", grid_size=2, image_size=64, head_channels=8, fc_dim=8)
    head_before = {name: value.clone() for name, value in detector.head.state_dict().items()}
    load_backbone_weights(detector, path)
    assert_same_weights(detector.backbone.state_dict(), classifier.backbone.state_dict())
    assert_same_weights(detector.head.state_dict(), head_before)


@pytest.mark.parametrize("case, message", [
    ("missing", "No checkpoint at"),
    ("detector", "is not a pretrain.py checkpoint"),
    ("other_backbone", "holds a pretrained darknet backbone, not the fast"),
    ("mismatched", "does not fit the fast backbone"),
])
def test_bad_backbone_weights_are_one_clear_error(detection_dir, tmp_path, case, message):
    path = tmp_path / "weights.pt"
    config = {"task": "classification", "backbone": "fast"}
    if case == "detector":
        save_checkpoint({"model": {}, "config": {"backbone": "fast"}}, path)
    elif case == "other_backbone":
        save_checkpoint({"model": {}, "config": {**config, "backbone": "darknet"}}, path)
    elif case == "mismatched":
        narrow = BackboneClassifier("fast", 5).state_dict()
        narrow["backbone.0.0.weight"] = narrow["backbone.0.0.weight"][:8]
        save_checkpoint({"model": narrow, "config": config}, path)
    result = run_script("train.py", f"--data_dir={detection_dir}", f"--out_dir={tmp_path / 'run'}", *DETECTION,
                        "--pretrained=false", f"--backbone_weights={path}", expect_success=False)
    assert result.returncode != 0
    assert result.stderr.startswith("error: --backbone_weights: ") and str(path) in result.stderr, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("overrides, message", [
    (["--data_dir=/nonexistent"], "/nonexistent/train: not an image-folder split"),
    (["--schedule=linear"], "--schedule='linear': must be one of cosine, step"),
    (["--label_smoothing=1"], "--label_smoothing=1.0: must be between 0.0 and 0.999"),
    (["--batch_size=64"], "fewer than one batch"),
])
def test_bad_pretraining_settings_are_clear_errors(classification_dir, tmp_path, overrides, message):
    result = run_script("pretrain.py", f"--data_dir={classification_dir}", f"--out_dir={tmp_path}", *RESUMABLE,
                        *overrides, expect_success=False)
    assert result.returncode != 0
    assert "error: " in result.stderr and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_train_and_val_must_hold_the_same_classes(tmp_path):
    data_dir = tmp_path / "data"
    make_synthetic.generate_classification(data_dir, train=10, val=10, seed=0, size=32)
    for image in (data_dir / "val" / "cross").iterdir():
        image.unlink()
    (data_dir / "val" / "cross").rmdir()
    result = run_script("pretrain.py", f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'run'}", *RESUMABLE,
                        expect_success=False)
    assert "train/ and val/ must hold the same class folders" in result.stderr and "cross" in result.stderr


def test_the_schedules():
    cosine = {"schedule": "cosine", "lr": 0.1, "epochs": 90, "lr_milestones": (30, 60), "lr_gamma": 0.1}
    assert [pretrain.learning_rate(epoch, cosine) for epoch in (0, 45, 90, 120)] == pytest.approx([0.1, 0.05, 0, 0])
    step = {**cosine, "schedule": "step"}
    assert [pretrain.learning_rate(epoch, step) for epoch in (0, 29.9, 30, 60, 120)] == \
        pytest.approx([0.1, 0.1, 0.01, 0.001, 0.001])


def test_too_little_shared_memory_is_one_error_line(classification_dir, tmp_path, monkeypatch):
    """A /dev/shm that others have nearly filled: pretrain.py says so in one line before any worker starts."""
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=2 ** 26, used=2 ** 26 - 2 ** 18,
                                                                            free=2 ** 18))
    monkeypatch.setattr(sys, "argv", ["pretrain.py", f"--data_dir={classification_dir}", f"--out_dir={tmp_path}",
                                      *RESUMABLE])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(ROOT / "pretrain.py"), run_name="__main__")
    assert str(exited.value.code).startswith("error: /dev/shm has 0 MB free, and the loader needs about 1 MB")
    assert "\n" not in str(exited.value.code)
