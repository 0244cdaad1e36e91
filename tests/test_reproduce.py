"""A dress rehearsal of `make reproduce`, the project's main job, on the CPU: miniature VOC archives with the real
names and directory layout (verified against this test's own checksum list), a tiny model, both protocols,
scratch data, runs, results and README. Each stage of the chain must leave its files; a second run does
nothing; a deleted checkpoint retrains that model alone."""
import hashlib
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data import make_synthetic

ROOT = Path(__file__).resolve().parents[1]
# The synthetic shapes under VOC class names (the VOC protocols read the 20 VOC classes).
VOC_NAMES = dict(zip(make_synthetic.CLASS_NAMES, ("person", "car", "dog", "bottle", "chair")))
# archive -> (year folder, {split list: image ids}); 3 images per split keep every run to seconds.
VOC2012_TRAIN = ["2008_000002", "2008_000003", "2008_000007"]
VOC2012_VAL = ["2008_000008", "2008_000009", "2008_000010"]
ARCHIVES = {
    "VOCtrainval_06-Nov-2007.tar": ("VOC2007", {"trainval": ["000005", "000007", "000009"]}),
    "VOCtest_06-Nov-2007.tar": ("VOC2007", {"test": ["000001", "000002", "000003"]}),
    "VOCtrainval_11-May-2012.tar": ("VOC2012", {"train": VOC2012_TRAIN, "val": VOC2012_VAL,
                                                "trainval": VOC2012_TRAIN + VOC2012_VAL}),
}
TEST_SPLITS = {"voc2012val": "VOC2012 val", "voc2007test": "VOC2007 test"}
RECIPE = ("pretrained = False\nepochs = 1\nbatch_size = 3\nmicro_batch_size = 3\nwarmup_epochs = 0.5\n"
          'num_workers = "0"\ndevice = "cpu"\neval_every = 0\n')
MODELS = ("resnet18", "resnet50")


def write_archive(path: Path, year: str, splits: dict, seed: int) -> None:
    """A VOC .tar: VOCdevkit/<year>/Annotations, JPEGImages and ImageSets/Main/<split>.txt."""
    staging = path.with_suffix("")
    root = make_synthetic.make_voc_dirs(staging / "VOCdevkit" / year)
    for index, image_id in enumerate(dict.fromkeys(image_id for ids in splits.values() for image_id in ids)):
        pixels, objects = make_synthetic.render_image(np.random.default_rng([seed, index]), 96, 80)
        make_synthetic.write_voc_item(root, image_id, pixels,
                                      [{**obj, "name": VOC_NAMES[obj["name"]]} for obj in objects])
    for split, ids in splits.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{image_id}\n" for image_id in ids))
    with tarfile.open(path, "w") as tar:
        tar.add(staging / "VOCdevkit", arcname="VOCdevkit")


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    """(folder of the three miniature archives, their md5sum-format checksum file)."""
    folder = tmp_path_factory.mktemp("voc_archives")
    for seed, (name, (year, splits)) in enumerate(ARCHIVES.items()):
        write_archive(folder / name, year, splits, seed)
    checksums = folder / "MD5SUMS"
    checksums.write_text("".join(f"{hashlib.md5((folder / name).read_bytes()).hexdigest()}  {name}\n"
                                 for name in ARCHIVES))
    return folder, checksums


def make_reproduce(scratch: Path, archives, protocol: str, *options: str, targets=("reproduce",)) -> str:
    folder, checksums = archives
    (scratch / "recipe.py").exists() or (scratch / "recipe.py").write_text(RECIPE)
    variables = [f"VENV={sys.prefix}", "FORCE_CPU=1", f"PROTOCOL={protocol}", f"VOC_DATA={scratch / 'data'}",
                 f"VOC_ARCHIVES_DIR={folder}", f"VOC_CHECKSUMS={checksums}", f"RUNS={scratch / 'runs'}",
                 f"RESULTS={scratch / 'results'}", f"DEMO_RESULTS={scratch / 'demo'}",
                 f"README={scratch / 'README.md'}",
                 "VOC_MODEL=configs/tiny_model.py", f"VOC_CONFIG={scratch / 'recipe.py'}",
                 "BENCHMARK_SETTINGS=--iters=1 --warmup=0 --batch_sizes=1 --baseline=false --image_size=128 --grid_size=4 "
                 "--head_channels=32 --fc_dim=64"]
    result = subprocess.run(["make", "--no-print-directory", *options, *targets, *variables], cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reproduce")
    (folder / "README.md").write_text("# Rehearsal\n<!-- results-table:start -->\n<!-- results-table:end -->\n")
    return folder


@pytest.mark.parametrize("protocol", TEST_SPLITS)
def test_make_reproduce_runs_every_stage(scratch, archives, protocol):
    make_reproduce(scratch, archives, protocol)
    assert all((scratch / "data/archives" / f"{name}.extracted").is_file() for name in ARCHIVES)
    assert all((scratch / "runs" / f"{model}_{protocol}/done").is_file() for model in MODELS)
    metrics = pd.read_csv(scratch / "results/metrics.csv").set_index("model")
    for model in MODELS:
        row = metrics.loc[f"{model}_{protocol}"]
        assert (row["backbone"], row["protocol"], row["split"], row["n_images"]) == \
            (model, protocol, TEST_SPLITS[protocol], 3)
    assert set(pd.read_csv(scratch / "results/benchmark.csv")["backbone"]) == set(MODELS)
    readme = (scratch / "README.md").read_text()
    assert all(f"| {model}_{protocol} | {model} | {TEST_SPLITS[protocol]} (3 images) |" in readme for model in MODELS)


def test_a_second_run_does_nothing_and_a_deleted_checkpoint_retrains_that_model_alone(scratch, archives):
    protocol = "voc2012val"
    if not (scratch / "runs" / f"resnet50_{protocol}/done").is_file():
        make_reproduce(scratch, archives, protocol)
    again = make_reproduce(scratch, archives, protocol)
    assert not any(script in again for script in ("download_voc.py", "train.py", "evaluate.py", "benchmark.py"))
    # Each stage depends on the scripts that make it: what an edit of each would rerun (make -n -W: as if new;
    # -W does not reach the sub-makes that `reproduce` starts, so the stages' files are asked for directly).
    stamps = scratch / "runs" / "stamps"
    stages = [*(f"{stamps}/eval-{model}_{protocol}" for model in MODELS), f"{stamps}/benchmark-cpu"]
    for edited, reruns, stays in (("train.py", ["--backbone=resnet18", "--backbone=resnet50", "evaluate.py "],
                                   ["benchmark.py "]),
                                  ("evaluate.py", ["evaluate.py "], ["train.py ", "benchmark.py "]),
                                  ("benchmark.py", ["benchmark.py "], ["train.py ", "evaluate.py "])):
        commands = make_reproduce(scratch, archives, protocol, "-n", f"--what-if={edited}", targets=stages)
        assert all(command in commands for command in reruns) and not any(c in commands for c in stays), edited

    (scratch / "runs" / f"resnet18_{protocol}/last.pt").unlink()
    retrained = make_reproduce(scratch, archives, protocol)
    assert "--backbone=resnet18" in retrained and "--backbone=resnet50" not in retrained
    assert retrained.count("evaluate.py ") == 1 and f"resnet18_{protocol}/last.pt" in retrained
    assert "download_voc.py" not in retrained and "benchmark.py" not in retrained
    assert (scratch / "runs" / f"resnet18_{protocol}/last.pt").is_file()
