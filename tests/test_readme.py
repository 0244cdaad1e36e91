"""Every command line in the README's shell blocks runs as written. Each is run here (in a scratch checkout, when
it runs on a CPU in seconds), or named with the test that runs it, or with the reason it cannot run here; a
README command in none of these fails, so a new one must be classified. Every command's settings, make targets
and make variables must also exist, whether it runs here or not."""
import ast
import re
import runpy
import shlex
import shutil
from pathlib import Path

import pytest
from PIL import Image

from data import make_synthetic
import test_pretrain
from command_lines import PYTHONS, ROOT, Runner, readme_commands, scratch_checkout
from yolo.checkpoint import save_checkpoint
from yolo.classification import BackboneClassifier
from yolo.config import ConfigError, apply_overrides, constants, is_preset

README = ROOT / "README.md"

# Run here as written, in this order: each finds what an earlier one made. The scratch checkout holds what
# `make demo` leaves that these need (a small data/synthetic) and a folder of photos.
MY_DATA_TRAINING = ("python train.py configs/demo_model.py configs/small_data.py --data_dir=my_data "
                    "--pretrained=false --device=cpu --out_dir=runs/my_data")
DEMO_MODEL_DETECTION = "python detect.py --checkpoint=runs/demo/resnet18/last.pt --source=my_photos/"
SECOND_STAGE = ("python train.py configs/tiny_model.py configs/tiny.py --backbone=fast --pretrained=false "
                "--backbone_weights=runs/pretrain_fast/last.pt --data_dir=data/synthetic_small "
                "--out_dir=runs/fast_small --epochs=1 --batch_size=8 --micro_batch_size=8")
PRETRAINING = ("python pretrain.py --backbone=fast --image_size=64 --data_dir=data/synthetic_classes "
               "--out_dir=runs/pretrain_fast --epochs=2 --batch_size=8 --micro_batch_size=4 --num_workers=1 "
               "--device=cpu --lr=0.05")
EXPORT = "python export.py --checkpoint=runs/demo/resnet18/last.pt --out=runs/demo/resnet18/model.onnx"
RUN_HERE = (
    "python train.py --help",
    "python data/make_synthetic.py --out my_data --format coco --train 200 --val 50 --difficulty easy --seed 5",
    MY_DATA_TRAINING,
    "python evaluate.py --checkpoint=runs/my_data/last.pt",
    "python table.py --results=runs/my_data/evaluate",
    "python detect.py --checkpoint=runs/my_data/last.pt --source=my_photos/",
    "python train.py configs/demo_model.py configs/demo.py --epochs=3 --out_dir=runs/my_demo",
    "python evaluate.py --checkpoint=runs/my_demo/last.pt --nms_iou=0.45",
    DEMO_MODEL_DETECTION,
    EXPORT,
    "python evaluate.py --checkpoint=runs/demo/resnet18/model.onnx",
    "python detect.py --checkpoint=runs/demo/resnet18/model.onnx --source=my_photos/",
    "python detect.py --checkpoint=runs/demo/resnet18/last.pt --source=data/synthetic/JPEGImages/val_000000.jpg",
    "python data/make_synthetic.py --layout imagefolder --out data/synthetic_classes --train 16 --val 10 --size 64",
    "python data/make_synthetic.py --out data/synthetic_small --train 16 --val 8",
    SECOND_STAGE,
)
# The own-data recipe trains for minutes: it is stopped once training has started, and SIGTERM saves the
# step's last.pt (README, "Changing a setting and rerunning"), which the commands after it use.
STOP_AT = {MY_DATA_TRAINING: r"^training epochs 1-40: "}
EXIT_STATUS = {MY_DATA_TRAINING: 128 + 15}
# What the README says each leaves or prints.
LEAVES = {
    "python data/make_synthetic.py --out my_data --format coco --train 200 --val 50 --difficulty easy --seed 5":
        ["my_data/annotations/instances_train.json", "my_data/annotations/instances_val.json"],
    MY_DATA_TRAINING: ["runs/my_data/last.pt"],
    "python evaluate.py --checkpoint=runs/my_data/last.pt": ["runs/my_data/evaluate/metrics.csv",
                                                             "runs/my_data/evaluate/per_class_ap.csv",
                                                             "runs/my_data/evaluate/my_data_detections.json"],
    "python detect.py --checkpoint=runs/my_data/last.pt --source=my_photos/": ["runs/my_data/detect/photo_1.jpg",
                                                                               "runs/my_data/detect/detections.csv"],
    "python train.py configs/demo_model.py configs/demo.py --epochs=3 --out_dir=runs/my_demo": ["runs/my_demo/done"],
    "python evaluate.py --checkpoint=runs/my_demo/last.pt --nms_iou=0.45": ["runs/my_demo/evaluate/metrics.csv"],
    DEMO_MODEL_DETECTION: ["runs/demo/resnet18/detect/photo_2.png", "runs/demo/resnet18/detect/detections.json"],
    "python data/make_synthetic.py --layout imagefolder --out data/synthetic_classes --train 16 --val 10 --size 64":
        ["data/synthetic_classes/train", "data/synthetic_classes/val"],
    SECOND_STAGE: ["runs/fast_small/done"],
    EXPORT: ["runs/demo/resnet18/model.onnx"],
    "python evaluate.py --checkpoint=runs/demo/resnet18/model.onnx": ["runs/demo/resnet18/evaluate/metrics.csv"],
    # Each detect.py run beside the same checkpoints keeps its own folder.
    "python detect.py --checkpoint=runs/demo/resnet18/model.onnx --source=my_photos/":
        ["runs/demo/resnet18/detect2/photo_1.jpg", "runs/demo/resnet18/detect2/detections.json"],
    "python detect.py --checkpoint=runs/demo/resnet18/last.pt --source=data/synthetic/JPEGImages/val_000000.jpg":
        ["runs/demo/resnet18/detect3/val_000000.jpg"],
}
PRINTS = {
    "python train.py --help": ["--epochs=145"],
    MY_DATA_TRAINING: ["saved runs/my_data/last.pt at epoch 1"],
    "python table.py --results=runs/my_data/evaluate": ["| my_data | resnet18 | custom val (50 images) |"],
}

# Run by another test, which runs the command's own arguments (a toy-sized set or a scratch folder aside).
COVERED_ELSEWHERE = {
    "make demo": "tests/test_make_chain.py::test_demo_chain_runs_and_a_second_run_only_checks",
    "make reproduce": "tests/test_reproduce.py::test_make_reproduce_runs_every_stage",
    "make reproduce PROTOCOL=voc2007test": "tests/test_reproduce.py::test_make_reproduce_runs_every_stage",
    "make download VOC_ARCHIVES_DIR=~/datasets/voc-tars":
        "tests/test_reproduce.py::test_make_reproduce_runs_every_stage",
    # The same server on the test model, on a free port rather than 8000, which another program may hold.
    "python serve.py --checkpoint=runs/demo/resnet18/last.pt":
        "tests/test_serve.py::test_the_page_shows_an_uploaded_images_detections_and_filters_them_by_score",
    "make download VOC_MIRROR=https://my.mirror/voc/":
        "tests/test_make_chain.py::test_download_passes_paths_with_spaces_and_quotes_as_single_arguments",
    # Its reference_run fixture runs these arguments (the test below holds them to it): two epochs that cost more
    # than the README's other CPU lines together, so the second stage here starts from a stand-in.
    PRETRAINING: "tests/test_pretrain.py::test_the_two_stages_hand_the_backbone_over_unchanged",
    # Both runtimes and dtypes of a tiny model, into a file of its own: the demo model's 20 timed runs of each
    # mode, batch size and dtype take a minute.
    "python benchmark.py configs/demo_model.py --device=cpu --runtimes=pytorch,onnxruntime --dtypes=fp32,bf16 "
    "--out=runs/demo/benchmark.csv":
        "tests/test_benchmark.py::test_onnx_runtime_is_timed_beside_pytorch_into_a_file_written_before_runtimes",
}

# Cannot run here, and why (their settings, targets and variables are still checked below).
NOT_HERE = {
    "make test": "the whole suite, of which this test is a part",
    "conda env create -f environment.yml && conda activate yolov1": "needs conda and the package index",
    "make test VENV=$CONDA_PREFIX": "needs a conda environment; the whole suite",
    "make reproduce NPROC=4": "needs 4 CUDA GPUs and the VOC download",
    "make submission VOC2012_TEST_ARCHIVE=~/Downloads/VOC2012test.tar":
        "needs CUDA and the test server's archive (test_make_chain.py dry-runs the chain)",
    "make pretrain-darknet IMAGENET_DIR=/data/imagenet": "needs CUDA and ImageNet (test_make_chain.py dry-runs it)",
    "make train-darknet": "needs CUDA, the VOC download and a finished ImageNet pretraining",
    "python pretrain.py --backbone=darknet --data_dir=/data/imagenet --out_dir=runs/pretrain_darknet":
        "needs ImageNet (about 140 GB) and days of GPU time",
    "python train.py --backbone=darknet --pretrained=false --backbone_weights=runs/pretrain_darknet/last.pt "
    "--protocol=voc2012val --out_dir=runs/darknet_voc2012val": "needs the VOC download and the ImageNet pretraining",
    "python train.py configs/small_data.py --data_dir=my_data --out_dir=runs/my_data":
        "downloads the ImageNet weights (the tests run offline); its 448 px model is for a GPU",
    "torchrun --nproc_per_node=4 train.py --backbone=resnet50 --out_dir=runs/resnet50_voc2012val":
        "needs 4 CUDA GPUs and the VOC download (test_train.py runs torchrun on the CPU)",
    "torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=host0:29500 train.py "
    "--backbone=resnet50 --micro_batch_size=4 --out_dir=runs/resnet50_voc2012val": "needs two machines of 8 GPUs",
    "python detect.py --checkpoint=runs/my_demo/last.pt --source=0":
        "needs a camera (test_evaluate_detect.py runs a live source from FFmpeg's test pattern)",
    "python train.py --backbone=resnet50 --micro_batch_size=8 --out_dir=runs/resnet50_small_gpu":
        "needs the VOC download and the ImageNet weights",
    "make neon-tiles": "fetches two wheels from the package index (test_neon_tiles.py tiles a wheel made there)",
    "python train.py configs/cpu_pretrained.py configs/small_data.py --data_dir=my_data --device=cpu "
    "--out_dir=runs/my_data": "needs MobileNetV2's ImageNet file in torch's cache (test_model.py loads a stand-in)",
    "make measure-neon": "fetches from the package index and trains for about 12 minutes on this CPU",
}

SETTINGS_SCRIPTS = ("train.py", "evaluate.py", "detect.py", "benchmark.py", "table.py", "pretrain.py",
                    "export_weights.py", "export.py", "serve.py")


@pytest.fixture(scope="module")
def commands():
    return readme_commands(README.read_text())


def test_every_readme_command_is_run_here_covered_elsewhere_or_excused(commands):
    classified = [*RUN_HERE, *COVERED_ELSEWHERE, *NOT_HERE]
    assert len(classified) == len(set(classified)), "a command is in more than one list"
    unclassified = [command for command in commands if command not in classified]
    assert not unclassified, ("README commands that nothing runs: add each to RUN_HERE, COVERED_ELSEWHERE or "
                              "NOT_HERE in tests/test_readme.py:\n" + "\n".join(unclassified))
    stale = [command for command in classified if command not in commands]
    assert not stale, "no longer in the README:\n" + "\n".join(stale)
    # A check keyed by a command that is not run would silently check nothing.
    assert set(LEAVES) | set(PRINTS) | set(STOP_AT) | set(EXIT_STATUS) | set(STAND_INS) <= set(RUN_HERE)


def test_the_tests_named_for_readme_commands_exist():
    for command, test in COVERED_ELSEWHERE.items():
        path, name = test.split("::")
        tree = ast.parse((ROOT / path).read_text())
        assert name in {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}, (command, test)


def test_the_pretraining_test_runs_the_readmes_arguments():
    arguments = shlex.split(PRETRAINING)[2:]
    assert sorted(word for word in arguments if not word.startswith(("--data_dir=", "--out_dir="))) == \
        sorted(test_pretrain.RESUMABLE)
    assert "reference_run" in ast.unparse(next(
        node for node in ast.parse((ROOT / "tests/test_pretrain.py").read_text()).body
        if isinstance(node, ast.FunctionDef) and node.name == "test_the_two_stages_hand_the_backbone_over_unchanged"))


def script_and_arguments(words: list[str]) -> tuple[str, list[str]] | None:
    """The script and its arguments of `python SCRIPT ...` or `torchrun [OPTIONS] SCRIPT ...`."""
    if words[0] in PYTHONS:
        return words[1], words[2:]
    if words[0] == "torchrun":
        index = next(index for index, word in enumerate(words) if word.endswith(".py"))
        return words[index], words[index + 1:]
    return None


def test_every_command_names_settings_targets_and_variables_that_exist(commands):
    """Names and types only: whether a value fits this machine (a GPU, a folder) is each run's business."""
    makefile = (ROOT / "Makefile").read_text()
    targets = re.search(r"^\.PHONY: (.*?)(?<!\\)$", makefile, re.MULTILINE | re.DOTALL).group(1)
    targets = set(targets.replace("\\\n", " ").split())
    variables = set(re.findall(r"^([A-Z0-9_]+) \?=", makefile, re.MULTILINE))
    defaults = {}
    for command in commands:
        for words in (shlex.split(part) for part in command.split("&&")):
            if words[0] == "make":
                names = [word.partition("=")[0] for word in words[1:] if "=" in word]
                assert set(words[1:]) - {word for word in words[1:] if "=" in word} <= targets, command
                assert set(names) <= variables, command
            found = script_and_arguments(words)
            if not found or found[0] not in SETTINGS_SCRIPTS or "--help" in found[1]:
                continue
            script, arguments = found
            if script not in defaults:
                defaults[script] = constants(runpy.run_path(str(ROOT / script), run_name="readme_check"))
            arguments = [str(ROOT / word) if is_preset(word) else word for word in arguments]
            try:
                apply_overrides(defaults[script], arguments)
            except ConfigError as error:
                pytest.fail(f"{command}: {error}")


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A scratch checkout after `make demo`'s data step (at 16 + 4 images), with two photos to detect in."""
    folder = scratch_checkout(tmp_path_factory.mktemp("readme") / "checkout")
    make_synthetic.generate(folder / "data/synthetic", train=16, val=4, seed=0, difficulty="easy")
    (folder / "my_photos").mkdir()
    shutil.copy(folder / "data/synthetic/JPEGImages/val_000001.jpg", folder / "my_photos/photo_1.jpg")
    # A PNG too: a folder source takes every usual image extension.
    Image.open(folder / "data/synthetic/JPEGImages/val_000002.jpg").save(folder / "my_photos/photo_2.png")
    yield folder
    shutil.rmtree(folder)  # its checkpoints take hundreds of MB


def stand_in_for_the_demo_model(checkout: Path) -> None:
    """`make demo`'s ResNet18 takes minutes to train: the 3-epoch run of the demo's recipe takes its place (where
    that run failed, the commands that need it fail too, after its own failure)."""
    (checkout / "runs/demo/resnet18").mkdir(parents=True)
    if (checkout / "runs/my_demo/last.pt").exists():  # a hard link: detect.py writes beside the path it is given
        (checkout / "runs/demo/resnet18/last.pt").hardlink_to(checkout / "runs/my_demo/last.pt")


def stand_in_for_the_pretraining(checkout: Path) -> None:
    """A pretrain.py checkpoint of the fast backbone, untrained: what the second stage reads from it."""
    classifier = BackboneClassifier("fast", num_classes=len(make_synthetic.CLASS_NAMES))
    (checkout / "runs/pretrain_fast").mkdir(parents=True)
    save_checkpoint({"model": classifier.state_dict(), "config": {"task": "classification", "backbone": "fast"}},
                    checkout / "runs/pretrain_fast/last.pt")


STAND_INS = {DEMO_MODEL_DETECTION: stand_in_for_the_demo_model, SECOND_STAGE: stand_in_for_the_pretraining}


def test_the_readmes_cpu_commands_run_as_written(checkout):
    runner = Runner()
    failures = []
    try:
        for command in RUN_HERE:
            if command in STAND_INS:
                STAND_INS[command](checkout)
            result = runner(command, checkout, stop_at=STOP_AT.get(command), timeout=300)
            output = result["output"]
            problems = [f"exit status {result['returncode']}"] if result["returncode"] != EXIT_STATUS.get(command, 0) \
                else []
            problems += [f"left no {path}" for path in LEAVES.get(command, []) if not (checkout / path).exists()]
            problems += [f"printed no {text!r}" for text in PRINTS.get(command, []) if text not in output]
            if problems or "Traceback" in output:
                failures.append(f"$ {command}\n{'; '.join(problems)}\n{output[-3000:]}")
    finally:
        runner.close()
    assert not failures, "\n\n".join(failures)
