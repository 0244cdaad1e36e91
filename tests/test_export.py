"""export.py's ONNX file in ONNX Runtime: PyTorch's outputs, detections and metrics, from the scripts and the API."""
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from onnx import TensorProto, helper

import detect
import evaluate
import export
import yolo
from command_lines import run_python
from yolo import onnx_model
from yolo.checkpoint import CheckpointError, git_commit, load_checkpoint, load_model
from yolo.config import resolve_config
from yolo.data import decode_image
from yolo.api import open_detector
from yolo.inference import Detector, preprocess
from yolo.onnx_model import OnnxDetector
from yolo.postprocess import NMS_IOU, select_detections

from file_writes import assert_atomic_write, record_file_writes

ROOT = Path(__file__).resolve().parents[1]


def run_script(module, *overrides) -> None:
    """A script's main, in this process, with its settings resolved from `overrides` as its command line's are."""
    module.main(resolve_config(vars(module), list(overrides), rules=module.RULES))


def script_error(module, *overrides) -> str:
    """The one `error:` line a script exits with."""
    with pytest.raises(SystemExit) as stopped:
        run_script(module, *overrides)
    message = str(stopped.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def exported(overfit_run, tmp_path_factory):
    """(the trained run's folder, its last.pt exported as export.py does by default: uint8 input, NMS outside)."""
    _, run_dir = overfit_run
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    run_script(export, f"--checkpoint={run_dir / 'last.pt'}", f"--out={path}")
    return run_dir, path


@pytest.fixture(scope="module")
def exported_with_nms(overfit_run, tmp_path_factory):
    """The same checkpoint exported for float32 input, with ONNX's NonMaxSuppression in the graph."""
    _, run_dir = overfit_run
    path = tmp_path_factory.mktemp("onnx_nms") / "tiny_nms.onnx"
    run_script(export, f"--checkpoint={run_dir / 'last.pt'}", f"--out={path}", "--input_type=float32", "--nms=true")
    return path


@pytest.fixture(scope="module")
def pytorch_detector(overfit_run):
    _, run_dir = overfit_run
    return Detector(load_model(run_dir / "last.pt")[0], torch.float32, "cpu")


@pytest.mark.parametrize("input_type", ["uint8", "float32"])
def test_onnx_runtime_gives_pytorchs_outputs_for_batches_of_1_and_3(exported, exported_with_nms, pytorch_detector,
                                                                    input_type):
    path = exported[1] if input_type == "uint8" else exported_with_nms
    onnx_detector = OnnxDetector(path)
    assert onnx_detector.session.get_inputs()[0].type == f"tensor({'uint8' if input_type == 'uint8' else 'float'})"
    generator = torch.Generator().manual_seed(0)
    for batch_size in (1, 3):  # one graph, any batch size
        pixels = torch.randint(0, 256, (batch_size, 3, 128, 128), dtype=torch.uint8, generator=generator)
        for batch in (pixels, pixels.float() / 255):  # pixels, or floats in [0, 1], whatever the graph takes
            for actual, expected in zip(onnx_detector.infer(batch), pytorch_detector.infer(batch)):
                assert actual.shape == expected.shape and actual.dtype == torch.float32
                torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(onnx_detector.predict(pixels), pytorch_detector.predict(pixels), atol=1e-4, rtol=0)


def test_the_files_metadata_is_the_checkpoints(exported):
    run_dir, path = exported
    saved = load_checkpoint(run_dir / "last.pt")
    state = OnnxDetector(path).state
    for key in ("class_names", "model_args", "config", "epoch", "git_commit"):
        assert state[key] == json.loads(json.dumps(saved[key])), key  # as JSON keeps them: tuples are lists
    assert state["input_type"] == "uint8" and state["nms"] is None and state["export_commit"]
    model = onnx.load(path)
    assert {entry.key: entry.value for entry in model.metadata_props}["grid_size"] == "4"
    assert [output.name for output in model.graph.output] == ["predictions", "boxes", "scores"]


def test_the_metadata_names_the_commit_that_trained_the_model_beside_the_exporting_one(overfit_run, tmp_path):
    _, run_dir = overfit_run
    state = load_checkpoint(run_dir / "last.pt")
    state["git_commit"] = "0123abcd"  # trained elsewhere
    torch.save(state, tmp_path / "elsewhere.pt")
    run_script(export, f"--checkpoint={tmp_path / 'elsewhere.pt'}", f"--out={tmp_path / 'm.onnx'}",
               "--check_batch_sizes=1")
    exported = OnnxDetector(tmp_path / "m.onnx").state
    assert exported["git_commit"] == "0123abcd" and exported["export_commit"] == git_commit() != "0123abcd"


def test_floats_between_pixel_levels_are_rounded_to_the_nearest_for_a_uint8_graph(exported):
    detector = OnnxDetector(exported[1])
    levels = torch.tensor([0.0, 0.4, 0.6, 1.5, 127.49, 127.51, 254.6, 255.0]) / 255
    batch = levels.repeat(3, 128, 16)[None]
    pixels = detector.graph_input(batch)
    assert pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels[0, 0, 0, :8], [0, 0, 1, 2, 127, 128, 255, 255])


def test_the_file_is_written_beside_flushed_synced_then_renamed_over_the_old_one(exported, tmp_path, monkeypatch):
    run_dir, _ = exported
    path = tmp_path / "model.onnx"
    events = record_file_writes(monkeypatch, path)
    run_script(export, f"--checkpoint={run_dir / 'last.pt'}", f"--out={path}", "--check_batch_sizes=1")
    assert_atomic_write(events, path)


def test_detect_on_the_onnx_file_gives_the_checkpoints_detections(exported, overfit_run, tmp_path):
    data_dir, _ = overfit_run
    run_dir, path = exported
    found = {}
    for name, checkpoint in (("pytorch", run_dir / "last.pt"), ("onnx", path)):
        run_script(detect, f"--checkpoint={checkpoint}", f"--source={data_dir / 'JPEGImages'}",
                   f"--out_dir={tmp_path / name}", "--dtype=fp32", "--score_threshold=0.05")
        found[name] = pd.read_csv(tmp_path / name / "detections.csv")
    assert len(found["pytorch"]) >= 8
    assert found["onnx"][["source", "class_id"]].equals(found["pytorch"][["source", "class_id"]])
    np.testing.assert_allclose(found["onnx"][["x1", "y1", "x2", "y2"]], found["pytorch"][["x1", "y1", "x2", "y2"]],
                               atol=0.1 + 1e-6, rtol=0)  # written to 0.1 pixel
    np.testing.assert_allclose(found["onnx"]["score"], found["pytorch"]["score"], atol=1e-4 + 1e-9, rtol=0)


def test_evaluate_on_the_onnx_file_gives_the_checkpoints_metrics(exported, tmp_path):
    run_dir, path = exported
    settings = [f"--out_dir={tmp_path}", "--num_workers=0", "--num_examples=0"]
    run_script(evaluate, f"--checkpoint={run_dir / 'last.pt'}", *settings)
    run_script(evaluate, f"--checkpoint={path}", *settings)
    metrics = pd.read_csv(tmp_path / "metrics.csv").set_index("model")
    # The .onnx file's row stands beside the checkpoint's (the default names differ).
    assert list(metrics.index) == [run_dir.name, f"{path.parent.name}_onnx"]
    pytorch, onnx_runtime = metrics.iloc[0], metrics.iloc[1]
    assert pytorch["voc12_map"] >= 0.9 and onnx_runtime["checkpoint"] == str(path)
    assert onnx_runtime["epoch"] == pytorch["epoch"] and onnx_runtime["dtype"] == "float32"
    for column in evaluate.METRIC_COLUMNS:
        assert onnx_runtime[column] == pytorch[column], column


def test_load_detector_takes_the_onnx_file(exported, overfit_run):
    data_dir, _ = overfit_run
    run_dir, path = exported
    images = sorted((data_dir / "JPEGImages").glob("*.jpg"))[:3]
    expected = yolo.load_detector(run_dir / "last.pt", device="cpu", dtype="fp32").predict(images)
    onnx_detector = yolo.load_detector(path)  # auto: the CPU in fp32
    actual = onnx_detector.predict(images)
    assert onnx_detector.class_ids == yolo.load_detector(run_dir / "last.pt").class_ids is not None
    assert sum(len(found) for found in expected) >= 3
    for found, wanted in zip(actual, expected):
        assert found.names == wanted.names
        torch.testing.assert_close(found.boxes, wanted.boxes, atol=1e-3, rtol=0)
        torch.testing.assert_close(found.scores, wanted.scores, atol=1e-4, rtol=0)


@pytest.mark.parametrize("nms_iou", [None, 0.2])
def test_the_graphs_nms_gives_the_projects_detections(exported_with_nms, overfit_run, tmp_path, nms_iou):
    data_dir, run_dir = overfit_run
    path = exported_with_nms
    if nms_iou is not None:  # the IoU asked for is the graph's
        path = tmp_path / "iou.onnx"
        run_script(export, f"--checkpoint={run_dir / 'last.pt'}", f"--out={path}", "--input_type=float32",
                   "--nms=true", f"--nms_iou={nms_iou}", "--check_batch_sizes=1")
    images = [decode_image(image) for image in sorted((data_dir / "JPEGImages").glob("*.jpg"))[:3]]
    batch = preprocess(images, 128)
    onnx_detector = OnnxDetector(path)
    names = [output.name for output in onnx_detector.session.get_outputs()]
    outputs = dict(zip(names, onnx_detector.session.run(None, {"images": onnx_detector.graph_input(batch)})))
    assert outputs["detection_scores"].shape == (3, 100)  # max_detections of the 4 x 4 x 2 boxes x 5 classes
    expected = select_detections(torch.from_numpy(outputs["boxes"]), torch.from_numpy(outputs["scores"]),
                                 nms_iou=nms_iou or NMS_IOU)
    if nms_iou is not None:
        default = select_detections(torch.from_numpy(outputs["boxes"]), torch.from_numpy(outputs["scores"]))
        assert sum(len(kept["scores"]) for kept in expected) < sum(len(kept["scores"]) for kept in default)
    for index, wanted in enumerate(expected):
        kept = outputs["detection_scores"][index] > 0
        assert 3 <= kept.sum() == len(wanted["scores"]) < 100  # some pairs under the threshold, some suppressed
        np.testing.assert_array_equal(outputs["detection_labels"][index][kept], wanted["labels"].numpy())
        np.testing.assert_allclose(outputs["detection_scores"][index][kept], wanted["scores"].numpy(), atol=1e-6)
        np.testing.assert_allclose(outputs["detection_boxes"][index][kept], wanted["boxes"].numpy(), atol=1e-6)


def test_a_missing_malformed_or_foreign_onnx_file_is_one_error_line(overfit_run, tmp_path):
    data_dir, _ = overfit_run
    source = f"--source={data_dir / 'JPEGImages'}"
    assert f"No ONNX model at {tmp_path / 'missing.onnx'}: export one" in script_error(
        detect, f"--checkpoint={tmp_path / 'missing.onnx'}", source, f"--out_dir={tmp_path / 'out'}")
    foreign = tmp_path / "foreign.onnx"  # the outputs' names, none of the metadata
    outputs = ("predictions", "boxes", "scores")
    graph = helper.make_graph([helper.make_node("Identity", ["images"], [name]) for name in outputs], "identity",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1]) for name in outputs])
    onnx.save(helper.make_model(graph), foreign)
    assert "is an ONNX model, but not one export.py wrote" in script_error(evaluate, f"--checkpoint={foreign}")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    assert f"{broken} is not a readable ONNX model (" in script_error(evaluate, f"--checkpoint={broken}")
    # The command line itself: one error line, no traceback.
    result = run_python([sys.executable, "detect.py", f"--checkpoint={broken}", source,
                             f"--out_dir={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"error: {broken} is not a readable ONNX model (")


def test_onnx_files_run_on_the_cpu_in_fp32_only(exported):
    _, path = exported
    assert "computes in fp32" in script_error(evaluate, f"--checkpoint={path}", "--dtype=bf16")
    with pytest.raises(CheckpointError, match="runs it on the CPU here, not on cuda"):
        OnnxDetector(path, device="cuda")


def test_an_environment_without_onnx_runtime_names_the_file_and_the_install(exported, monkeypatch):
    _, path = exported
    monkeypatch.setitem(sys.modules, "yolo.onnx_model", None)  # as if onnxruntime failed to import
    with pytest.raises(CheckpointError, match=r"tiny\.onnx: an \.onnx file runs in ONNX Runtime, which this "
                                              r"environment lacks .*pip install -r requirements\.txt"):
        open_detector(path)


def test_the_scripts_and_the_package_load_without_onnx():
    # onnx, onnxruntime and onnxscript are the package's optional [onnx] extra: only an .onnx file or an export
    # needs them.
    code = ("import sys, benchmark, detect, evaluate, train, yolo; "
            "print(sorted({name.split('.')[0] for name in sys.modules} & {'onnx', 'onnxruntime', 'onnxscript'}))")
    result = run_python([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_export_errors_are_one_line_and_keep_what_was_there(overfit_run, tmp_path, monkeypatch):
    _, run_dir = overfit_run
    checkpoint = f"--checkpoint={run_dir / 'last.pt'}"
    assert "No checkpoint at" in script_error(export, f"--checkpoint={tmp_path / 'none.pt'}")
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert f"--out={blocker / 'model.onnx'}: a file is in the way" in script_error(
        export, checkpoint, f"--out={blocker / 'model.onnx'}")
    assert "--out='model.pt': must be a path ending in .onnx" in script_error(export, checkpoint, "--out=model.pt")
    kept = tmp_path / "model.onnx"
    kept.write_bytes(b"an earlier export")
    monkeypatch.setattr(onnx_model, "ONNX_FILE_LIMIT", 10 ** 6)  # the tiny model's 47 MB stand for 2 GB
    message = script_error(export, checkpoint, f"--out={kept}")
    assert message.startswith(f"error: {run_dir / 'last.pt'}: the model's weights take 0.05 GB in fp32, over "
                              "ONNX's 2 GB limit")
    assert kept.read_bytes() == b"an earlier export" and sorted(tmp_path.iterdir()) == [blocker, kept]


def test_a_fixed_batch_graph_serves_any_number_of_images(exported, tmp_path):
    """export.py --dynamic_batch=false --batch_size=3: the graph takes exactly 3 images; OnnxDetector runs it on
    slices of 3, the last padded, so evaluate.py's 8 images (two full batches and a partial one) and single
    images give what the dynamic graph gives."""
    run_dir, dynamic_path = exported
    path = tmp_path / "fixed.onnx"
    run_script(export, f"--checkpoint={run_dir / 'last.pt'}", f"--out={path}", "--dynamic_batch=false",
               "--batch_size=3")
    fixed, dynamic = OnnxDetector(path), OnnxDetector(dynamic_path)
    assert fixed.session.get_inputs()[0].shape[0] == 3 and fixed.fixed_batch == 3 and dynamic.fixed_batch is None
    pixels = torch.randint(0, 256, (7, 3, fixed.image_size, fixed.image_size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    for count in (1, 3, 7):
        for got, expected in zip(fixed.infer(pixels[:count]), dynamic.infer(pixels[:count])):
            assert got.shape == expected.shape and got.shape[0] == count
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    settings = [f"--out_dir={tmp_path}", "--num_workers=0", "--num_examples=0", "--batch_size=3"]
    run_script(evaluate, f"--checkpoint={dynamic_path}", *settings, "--model_name=dynamic")
    run_script(evaluate, f"--checkpoint={path}", *settings, "--model_name=fixed")
    metrics = pd.read_csv(tmp_path / "metrics.csv").set_index("model")
    assert metrics.loc["fixed", "n_images"] == 8
    for column in evaluate.METRIC_COLUMNS:
        assert metrics.loc["fixed", column] == metrics.loc["dynamic", column], column
