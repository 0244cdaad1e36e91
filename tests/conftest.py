"""Shared fixtures: a tiny synthetic VOC-layout dataset and a briefly trained checkpoint, made once per session."""
import os
import shutil
import sys
from pathlib import Path

import pytest
from filelock import FileLock

from command_lines import run_python
from data import make_synthetic

ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR_VARIABLE = "YOLO_TEST_SHARED_DIR"


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """VOC-layout folder with 16 train / 8 val synthetic images and classes.txt. Read-only: do not modify."""
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic.generate(root, train=16, val=8, seed=0)
    return root


# A run of train.py small enough for a test, trained until it detects its own training images: the
# end-to-end check of targets, loss, decoding and metrics, and the checkpoint that evaluate.py,
# detect.py and the inference tests run on. Validated on the training images themselves.
OVERFIT_SETTINGS = ["configs/tiny_model.py", "configs/tiny.py", "--head_channels=64", "--fc_dim=256", "--epochs=40",
                    "--eval_every=10", "--batch_size=8", "--micro_batch_size=8", "--augment=false", "--optimizer=adamw",
                    "--lr=1e-3", "--weight_decay=0", "--warmup_epochs=0"]


@pytest.fixture(scope="session")
def overfit_run(request, tmp_path_factory):
    """(data_dir, out_dir) of a finished train.py run on 8 synthetic images, validated on the same 8.

    Trained once per test session: pytest-xdist's workers share their parent's temporary folder, and the first
    to take the lock trains while the others wait for it. A run left unfinished (its `done` missing) is redone.
    With YOLO_TEST_SHARED_DIR set (`make mutate` sets it), the run is kept there for every session that names it."""
    shared = tmp_path_factory.getbasetemp()
    if hasattr(request.config, "workerinput"):  # an xdist worker: its base is a sub-folder of the session's
        shared = shared.parent
    shared = Path(os.environ.get(SHARED_DIR_VARIABLE) or shared)
    root = shared / "overfit"
    data_dir, out_dir = root / "data", root / "run"
    with FileLock(str(shared / "overfit.lock")):
        if not (out_dir / "done").exists():
            shutil.rmtree(root, ignore_errors=True)
            make_synthetic.generate(data_dir, train=8, val=0, seed=1)
            shutil.copy(data_dir / "ImageSets/Main/train.txt", data_dir / "ImageSets/Main/val.txt")
            command = [sys.executable, "train.py", f"--data_dir={data_dir}", f"--out_dir={out_dir}",
                       *OVERFIT_SETTINGS]
            result = run_python(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
            assert result.returncode == 0, result.stdout + result.stderr
    return data_dir, out_dir
