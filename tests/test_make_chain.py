"""The Makefile's demo chain end to end at toy size: data -> train both -> evaluate -> benchmark -> table."""
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def make(tmp_path, *targets):
    # The tests' tiny training settings, with an 8-image batch and validation after each epoch.
    chain_preset = tmp_path / "chain.py"
    chain_preset.write_text("batch_size = 8\nmicro_batch_size = 8\neval_every = 1\n")
    variables = [f"DEMO_DATA={tmp_path / 'data'}", f"DEMO_RUNS={tmp_path / 'runs'}",
                 f"DEMO_RESULTS={tmp_path / 'demo'}", f"RESULTS={tmp_path / 'voc'}", f"README={tmp_path / 'README.md'}",
                 "DEMO_TRAIN_IMAGES=8", "DEMO_VAL_IMAGES=4", "DEMO_EPOCHS=1", "DEMO_EPOCHS_RESNET50=1",
                 "DEMO_MODEL=configs/tiny_model.py", f"DEMO_CONFIG=configs/tiny.py {chain_preset}",
                 "DEMO_BENCHMARK=--iters=1 --warmup=0 --batch_sizes=1 --baseline=false"]
    result = subprocess.run(["make", "--no-print-directory", *targets, *variables], cwd=ROOT, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_demo_chain_runs_and_a_second_run_only_checks(tmp_path):
    (tmp_path / "README.md").write_text("# Demo\n<!-- results-table:start -->\n<!-- results-table:end -->\n")
    make(tmp_path, "demo")
    metrics = pd.read_csv(tmp_path / "demo/metrics.csv")
    assert sorted(metrics["model"]) == ["resnet18", "resnet50"]
    assert set(pd.read_csv(tmp_path / "demo/benchmark.csv")["backbone"]) == {"resnet18", "resnet50"}
    readme = (tmp_path / "README.md").read_text()
    assert "| resnet50 | resnet50 | synthetic val (4 images) |" in readme
    assert (tmp_path / "demo/resnet18_training_curve.png").exists()

    again = make(tmp_path, "demo")
    assert "train.py" not in again and "evaluate.py" not in again


def test_help_lists_every_target():
    output = subprocess.run(["make", "help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for target in ("download", "train-resnet18", "train-resnet50", "train-darknet", "eval", "benchmark", "table",
                   "reproduce", "demo", "test", "clean", "help"):
        assert f"  {target} " in output, target


def test_reproduce_without_a_gpu_stops_before_downloading():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: make reproduce would start for real")
    result = subprocess.run(["make", "reproduce"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "No CUDA GPU found" in result.stderr and "FORCE_CPU=1" in result.stderr
    assert "download_voc.py" not in result.stdout


@pytest.mark.parametrize("target", ["train-resnet18", "train-darknet", "eval"])
def test_training_targets_without_a_gpu_stop_before_downloading(target):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the target would start for real")
    result = subprocess.run(["make", target], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "No CUDA GPU found" in result.stderr
    assert "download_voc.py" not in result.stdout + result.stderr


def test_download_passes_paths_with_spaces_and_quotes_as_single_arguments(tmp_path):
    # A stand-in interpreter that prints its arguments one per line: the recipe really runs through the shell.
    echo = tmp_path / "echo-arguments"
    echo.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    echo.chmod(0o755)
    (tmp_path / "installed").touch()
    variables = [f"PY={echo}", f"INSTALLED={tmp_path / 'installed'}", "VOC_MIRROR=http://mirror/my voc",
                 f"VOC_ARCHIVES_DIR={tmp_path}/my 'archives'", "VOC_STALL_TIMEOUT=7", "VOC_DEADLINE=0"]
    result = subprocess.run(["make", "--no-print-directory", "download", *variables], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, env={**os.environ, "MAKEFLAGS": ""})
    assert result.returncode == 0, result.stdout + result.stderr
    arguments = result.stdout.splitlines()[-11:]
    assert arguments == ["data/download_voc.py", "--data-dir", "data", "--mirror", "http://mirror/my voc",
                         "--archives-dir", f"{tmp_path}/my 'archives'", "--stall-timeout", "7", "--deadline", "0"]
