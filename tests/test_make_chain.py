"""The Makefile's demo chain end to end at toy size (data -> train both -> evaluate -> benchmark -> table), and
what `make table` and a fresh clone's file times do and do not run."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# This interpreter's environment, given to make, is used as it is: no test can start an install.
THIS_ENV = f"VENV={sys.prefix}"


def make(tmp_path, *targets, dry_run=False):
    # The tests' tiny training settings, with an 8-image batch and validation after each epoch; written once,
    # since a newer preset would rightly retrain.
    chain_preset = tmp_path / "chain.py"
    if not chain_preset.exists():
        chain_preset.write_text("batch_size = 8\nmicro_batch_size = 8\neval_every = 1\n")
    variables = [f"DEMO_DATA={tmp_path / 'data'}", f"DEMO_RUNS={tmp_path / 'runs'}",
                 f"DEMO_RESULTS={tmp_path / 'demo'}", f"RESULTS={tmp_path / 'voc'}", f"README={tmp_path / 'README.md'}",
                 "DEMO_TRAIN_IMAGES=8", "DEMO_VAL_IMAGES=4", "DEMO_EPOCHS=1", "DEMO_EPOCHS_RESNET50=1",
                 "DEMO_MODEL=configs/tiny_model.py", f"DEMO_CONFIG=configs/tiny.py {chain_preset}",
                 "DEMO_BENCHMARK=--iters=1 --warmup=0 --batch_sizes=1 --baseline=false"]
    command = ["make", "--no-print-directory", *(["-n"] if dry_run else []), *targets, *variables, THIS_ENV]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
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
    assert "train.py" not in again and "evaluate.py" not in again and "benchmark.py" not in again

    # As on a fresh clone, where git gives the committed results arbitrary times: older than every script.
    for path in (tmp_path / "demo").iterdir():
        os.utime(path, (0, 0))
    commands = make(tmp_path, "demo", dry_run=True)
    assert "table.py" in commands
    assert not any(script in commands for script in ("train.py", "evaluate.py", "benchmark.py", "make_synthetic"))


def test_make_table_only_reads_the_csvs_whatever_their_times(tmp_path):
    (tmp_path / "README.md").write_text("# Demo\n<!-- results-table:start -->\n<!-- results-table:end -->\n")
    (tmp_path / "voc").mkdir()
    (tmp_path / "voc/benchmark.csv").write_text(
        "backbone,device,device_name,dtype,batch_size,image_size,mode,compile,latency_ms_median,latency_ms_p90,"
        "throughput_img_s,params_m,gflops,torch_version,date\n"
        "resnet18,cuda,NVIDIA H100,bf16,1,448,end_to_end,False,5.0,6.0,200.0,255.8,19.6,2.14.1,2026-11-26\n")
    (tmp_path / "voc/metrics.csv").write_text(
        "model,backbone,split,voc12_map,image_size\nresnet18,resnet18,VOC2012 val,0.5,448\n")
    for path in (tmp_path / "voc").iterdir():
        os.utime(path, (0, 0))
    csvs = {path: path.read_bytes() for path in (tmp_path / "voc").iterdir()}

    commands = make(tmp_path, "table", dry_run=True).splitlines()
    assert len(commands) == 1 and " table.py " in commands[0], commands

    make(tmp_path, "table")
    readme = (tmp_path / "README.md").read_text()
    assert "| resnet18 | resnet18 | VOC2012 val (- images) | - | 50.00 |" in readme
    assert "NVIDIA H100:" in readme and "200.0 (bf16, NVIDIA H100)" in readme
    # The Markdown it writes beside them (speed.md here) is its output; the CSVs stay as they were.
    assert {path: path.read_bytes() for path in (tmp_path / "voc").glob("*.csv")} == csvs
    assert all(path.stat().st_mtime == 0 for path in csvs)
    assert "| resnet18 | 448 | end_to_end | bf16 | pytorch | 1 |" in (tmp_path / "voc/speed.md").read_text()


def test_an_interpreter_older_than_3_11_is_refused_before_the_venv(tmp_path):
    python310 = tmp_path / "python3.10"
    python310.write_text("#!/bin/sh\n"  # the real interpreter, reporting itself as 3.10 to the version check
                         f"exec {sys.executable} -c 'import sys; sys.version_info = (3, 10, 14); exec(sys.argv[1])' "
                         '"$2"\n')
    python310.chmod(0o755)
    result = subprocess.run(["make", "test", f"PYTHON={python310}", f"VENV={tmp_path / 'venv'}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "is Python 3.10.14; the pinned packages need 3.11 or newer: pass PYTHON=python3.11" in result.stderr
    assert not (tmp_path / "venv").exists()


def test_help_lists_every_target_and_variable():
    """Every phony target and every variable a user may set (`NAME ?= default`), each on a line of its own."""
    makefile = (ROOT / "Makefile").read_text()
    phony = re.search(r"^\.PHONY: (.*?)(?<!\\)$", makefile, re.MULTILINE | re.DOTALL).group(1)
    targets = phony.replace("\\\n", " ").split()
    variables = re.findall(r"^([A-Z0-9_]+) \?=", makefile, re.MULTILINE)
    assert len(targets) >= 16 and len(variables) >= 25
    lines = subprocess.run(["make", "help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.splitlines()
    for target in targets:
        assert any(re.match(rf"  {target} +\S", line) for line in lines), target
    for variable in variables:
        assert any(re.match(rf"  {variable}=(\S+( \S+)*)?  +\S", line) for line in lines), variable


def test_reproduce_without_a_gpu_stops_before_downloading():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: make reproduce would start for real")
    result = subprocess.run(["make", "reproduce", THIS_ENV], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "error: no CUDA GPU found" in result.stderr and "FORCE_CPU=1" in result.stderr
    assert "download_voc.py" not in result.stdout


def test_gpu_check_without_a_gpu_stops_at_once_and_installs_nothing(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: make gpu-check would start for real")
    # An environment given as VENV is used as it is: this one has no install stamp, and make must not
    # try to create or fill it.
    environment = tmp_path / "env"
    (environment / "bin").mkdir(parents=True)
    (environment / "bin/python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (environment / "bin/python").chmod(0o755)
    command = ["make", "--no-print-directory", "gpu-check", f"VENV={environment}", f"RESULTS={tmp_path}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "error: gpu_check.py exercises the CUDA paths and torch finds no CUDA GPU" in result.stderr
    assert "pip" not in result.stdout and "Traceback" not in result.stderr
    assert not (tmp_path / "gpu").exists() and not (environment / ".installed-requirements").exists()


def dry_run(*arguments, environment=None):
    """What make would run (make -n runs none of it), with no make variables inherited from a calling make."""
    result = subprocess.run(["make", "-n", "--no-print-directory", *arguments], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, env={**os.environ, "MAKEFLAGS": "", **(environment or {})})
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@pytest.mark.parametrize("interpreters, used", [(("python", "python3"), "python"), (("python3",), "python3")])
def test_gpu_check_in_a_given_environment_only_runs_gpu_check_in_it(tmp_path, interpreters, used):
    """An environment without the install stamp, given as VENV on the command line or in the environment:
    make gpu-check runs gpu_check.py with its interpreter and nothing else, while make test, which fills a
    VENV, shows its pip command in the same dry run. A system prefix may have python3 alone."""
    environment = tmp_path / "given-env"
    (environment / "bin").mkdir(parents=True)
    for name in interpreters:
        (environment / "bin" / name).touch()
    only_the_check = [f"{environment}/bin/{used} gpu_check.py --out_dir=results/gpu"]
    assert dry_run("gpu-check", f"VENV={environment}") == only_the_check
    assert dry_run("gpu-check", environment={"VENV": str(environment)}) == only_the_check
    assert any(" -m pip install " in command for command in dry_run("test", f"VENV={environment}"))


def test_make_help_says_how_to_run_gpu_check_in_this_python_installing_nothing():
    output = subprocess.run(["make", "help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    instruction = "make gpu-check VENV=$(python3 -c 'import sys; print(sys.prefix)')"
    assert instruction in next(line for line in output.splitlines() if line.startswith("  gpu-check "))
    assert "one given here is used as it is (nothing installed)" in next(
        line for line in output.splitlines() if line.startswith("  VENV="))
    # The instruction as a shell runs it: this machine's python3, and no install.
    prefix = subprocess.run(["python3", "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True,
                            check=True).stdout.strip()
    commands = subprocess.run(["bash", "-c", instruction.replace("make ", "make -n --no-print-directory ", 1)],
                              cwd=ROOT, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "MAKEFLAGS": ""}).stdout.splitlines()
    assert len(commands) == 1 and commands[0].endswith(" gpu_check.py --out_dir=results/gpu"), commands
    interpreter = Path(commands[0].split()[0])
    assert interpreter.parent == Path(prefix) / "bin" and os.access(interpreter, os.X_OK)


@pytest.mark.parametrize("target", ["train-resnet18", "train-darknet", "eval"])
def test_training_targets_without_a_gpu_stop_before_downloading(target):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the target would start for real")
    result = subprocess.run(["make", target, THIS_ENV], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "error: no CUDA GPU found" in result.stderr
    assert "download_voc.py" not in result.stdout + result.stderr


def test_download_passes_paths_with_spaces_and_quotes_as_single_arguments(tmp_path):
    # A stand-in interpreter that prints its arguments one per line: the recipe really runs through the shell.
    echo = tmp_path / "echo-arguments"
    echo.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    echo.chmod(0o755)
    (tmp_path / "installed").touch()
    variables = [f"PY={echo}", f"INSTALLED={tmp_path / 'installed'}", "VOC_MIRROR=http://mirror/my voc",
                 f"VOC_ARCHIVES_DIR={tmp_path}/my 'archives'", "VOC_STALL_TIMEOUT=7", "VOC_DEADLINE=0"]
    result = subprocess.run(["make", "--no-print-directory", "download", *variables, THIS_ENV], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, env={**os.environ, "MAKEFLAGS": ""})
    assert result.returncode == 0, result.stdout + result.stderr
    arguments = result.stdout.splitlines()[-11:]
    assert arguments == ["data/download_voc.py", "--data-dir", "data", "--mirror", "http://mirror/my voc",
                         "--archives-dir", f"{tmp_path}/my 'archives'", "--stall-timeout", "7", "--deadline", "0"]


def test_the_darknet_stages_chain_pretraining_into_detection(tmp_path):
    """The two CUDA targets, dry run: pretrain.py on IMAGENET_DIR, then train.py from its last.pt."""
    runs = tmp_path / "runs"
    result = subprocess.run(["make", "-n", "train-darknet", THIS_ENV, "FORCE_CPU=1", f"RUNS={runs}",
                             "IMAGENET_DIR=/data/in1k"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    pretraining = f"pretrain.py --backbone=darknet --data_dir=/data/in1k --out_dir={runs}/pretrain_darknet"
    detection = f"--backbone=darknet --pretrained=false --backbone_weights={runs}/pretrain_darknet/last.pt"
    assert pretraining in result.stdout and detection in result.stdout
    assert result.stdout.index(pretraining) < result.stdout.index(detection)


def test_pretraining_without_imagenet_dir_is_a_clear_error(tmp_path):
    result = subprocess.run(["make", "pretrain-darknet", THIS_ENV, "FORCE_CPU=1", f"RUNS={tmp_path}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "error: set IMAGENET_DIR to a folder holding train/ and val/" in result.stderr
    assert "pretrain.py" not in result.stdout


def test_submission_needs_the_test_archive_and_then_evaluates_the_servers_protocol(tmp_path):
    result = subprocess.run(["make", "submission", THIS_ENV, "FORCE_CPU=1"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0 and "error: set VOC2012_TEST_ARCHIVE to the VOC2012 test .tar" in result.stderr
    commands = dry_run("submission", THIS_ENV, "FORCE_CPU=1", f"RUNS={tmp_path}",
                       f"VOC2012_TEST_ARCHIVE={tmp_path}/VOC2012test.tar")
    extraction = next(index for index, line in enumerate(commands) if "--test-archive" in line)
    evaluations = [index for index, line in enumerate(commands) if " evaluate.py " in line]
    assert f"--test-archive '{tmp_path}/VOC2012test.tar'" in commands[extraction]
    assert len(evaluations) == 2 and extraction < min(evaluations)
    assert all(f"{tmp_path}/{model}_voc2012test/last.pt" in commands[index]
               for model, index in zip(("resnet18", "resnet50"), evaluations))
