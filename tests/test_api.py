"""yolo.load_detector and its predict, the fp16 weights file and torch.hub, on the overfitted test checkpoint."""
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import yolo
from yolo.api import open_detector
from yolo.checkpoint import load_checkpoint, load_model
from yolo.device import inference_dtype
from yolo.inference import Detector
from yolo.data import decode_image
from yolo.postprocess import EVAL_SCORE_THRESHOLD
from yolo.visualize import PALETTE, draw_boxes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def detector(overfit_run):
    _, run_dir = overfit_run
    return yolo.load_detector(run_dir / "best.pt", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def image_paths(overfit_run):
    data_dir, _ = overfit_run
    return sorted((data_dir / "JPEGImages").glob("*.jpg"))


def assert_same_detections(actual, expected, what="", box_atol=1e-4, score_atol=1e-4):
    assert actual.names == expected.names and torch.equal(actual.labels, expected.labels), what
    torch.testing.assert_close(actual.boxes, expected.boxes, atol=box_atol, rtol=0, msg=what)
    torch.testing.assert_close(actual.scores, expected.scores, atol=score_atol, rtol=0, msg=what)


def test_every_form_of_an_image_gives_the_same_detections(detector, image_paths):
    path = image_paths[0]
    pixels = np.array(Image.open(path).convert("RGB"))
    chw = torch.from_numpy(pixels).permute(2, 0, 1)
    forms = {"str": str(path), "Path": path, "PIL": Image.open(path), "NumPy HWC uint8": pixels,
             "NumPy HWC float64": pixels / 255, "NumPy, negative strides": pixels[..., ::-1].copy()[..., ::-1],
             "CHW uint8": chw, "HWC uint8": chw.permute(1, 2, 0), "CHW float32": chw / 255,
             "HWC float16": (chw.permute(1, 2, 0) / 255).half()}
    expected = detector.predict(str(path))
    assert len(expected) > 0 and expected.names == [detector.class_names[i] for i in expected.labels.tolist()]
    for form, image in forms.items():
        assert_same_detections(detector.predict(image), expected, form)
    for result in detector.predict(list(forms.values())) + detector.predict(torch.stack([chw, chw])):
        assert_same_detections(result, expected)


def test_one_image_gives_one_result_and_a_list_or_a_batch_gives_a_list(detector, image_paths):
    path = image_paths[0]
    single = detector.predict(path)
    assert isinstance(single, yolo.Detections) and single.source == path
    pixels = np.array(Image.open(path).convert("RGB"))
    for several in ([path], (path,), np.stack([pixels]), torch.from_numpy(pixels).permute(2, 0, 1)[None]):
        results = detector.predict(several)
        assert isinstance(results, list) and len(results) == 1, type(several)
        assert_same_detections(results[0], single)
    assert detector.predict([]) == []


def test_results_carry_the_class_ids_of_the_training_sets_files(detector, overfit_run, image_paths, tmp_path):
    _, run_dir = overfit_run
    saved_ids = load_checkpoint(run_dir / "best.pt")["config"]["class_ids"]
    assert detector.class_ids == saved_ids == list(range(1, len(detector.class_names) + 1))  # VOC: from 1
    result = detector.predict(image_paths[0])
    assert len(result) > 0 and result.class_ids == [saved_ids[label] for label in result.labels.tolist()]
    # As a COCO file would number them, and kept by the weights file.
    coco_ids = [7 + 5 * index for index in range(len(detector.class_names))]
    as_coco = yolo.ImageDetector(detector.detector, detector.class_names, class_ids=coco_ids)
    assert as_coco.predict(image_paths[0]).class_ids == [coco_ids[label] for label in result.labels.tolist()]
    assert yolo.load_detector(yolo.export_weights(run_dir / "best.pt", tmp_path), "cpu", "fp32").class_ids == saved_ids
    assert yolo.ImageDetector(detector.detector, detector.class_names).predict(image_paths[0]).class_ids is None
    with pytest.raises(ValueError, match=r"^2 class ids for 3 class names: give one id per class"):
        yolo.ImageDetector(detector.detector, ["a", "b", "c"], class_ids=[1, 2])


def test_plot_draws_each_box_in_its_class_colour_and_save_writes_that_image(detector, image_paths, tmp_path):
    path = image_paths[1]
    image = np.array(Image.open(path).convert("RGB"))
    result = detector.predict(path, max_detections=1)
    assert len(result) == 1
    plotted = np.array(result.plot())
    assert plotted.shape == image.shape and plotted.dtype == np.uint8
    x1, y1, x2, y2 = result.boxes[0].tolist()
    colour = list(PALETTE[result.labels[0].item() % len(PALETTE)])
    # The outline, 2 pixels wide, lies inside the box: from pixel x1 (0-based) to pixel x2 - 1, the same down.
    row, column = int((y1 + y2) / 2), int((x1 + x2) / 2)
    left, top, right, bottom = int(x1), int(y1), int(x2 - 1), int(y2 - 1)
    assert plotted[row, left].tolist() == plotted[row, left + 1].tolist() == colour
    assert plotted[row, right].tolist() == plotted[row, right - 1].tolist() == colour
    assert plotted[bottom, column].tolist() == plotted[bottom - 1, column].tolist() == colour
    assert plotted[top, column].tolist() == colour
    for outside in ((row, left - 1), (row, right + 1), (bottom + 1, column), (top - 1, column)):
        assert plotted[outside].tolist() == image[outside].tolist(), outside
    assert np.array_equal(plotted[bottom + 1:], image[bottom + 1:])  # nothing drawn below the box
    # The caption gives the score: the class name alone draws less.
    name_only = draw_boxes(torch.from_numpy(image).permute(2, 0, 1), result.boxes + torch.tensor([1.0, 1, 0, 0]),
                           result.labels, detector.class_names)
    assert not np.array_equal(name_only.permute(1, 2, 0).numpy(), plotted)
    assert not np.array_equal(np.array(result.plot(line_width=4)), plotted)
    # The source as it was given: an array gives the same picture; save writes it, making the folders.
    assert np.array_equal(np.array(detector.predict(image, max_detections=1).plot()), plotted)
    saved = result.save(tmp_path / "out" / "nested" / "boxes.png")
    assert saved == tmp_path / "out" / "nested" / "boxes.png"
    assert np.array_equal(np.array(Image.open(saved)), plotted)
    assert np.array_equal(np.array(Image.open(result.save(tmp_path / "wide.png", line_width=4))),
                          np.array(result.plot(line_width=4)))


def test_a_detector_built_from_a_model_runs_it_where_and_as_asked(detector, overfit_run, image_paths):
    _, run_dir = overfit_run
    model = load_model(run_dir / "best.pt")[0]
    names = detector.class_names
    expected = detector.predict(image_paths[0])
    for device in ("cpu", torch.device("cpu")):
        built = yolo.ImageDetector(model, names, device=device, dtype="fp32")
        assert (built.detector.device, built.detector.dtype) == (torch.device("cpu"), torch.float32)
        assert_same_detections(built.predict(image_paths[0]), expected)
    assert yolo.ImageDetector(model, names, dtype="bf16").detector.dtype == torch.bfloat16
    default = yolo.ImageDetector(model, names)  # auto: this machine has no GPU; bf16 where the CPU computes it
    assert default.detector.device == torch.device("cpu") and default.detector.dtype in (torch.float32, torch.bfloat16)


def test_images_go_through_the_network_batch_size_at_a_time(detector, image_paths, monkeypatch):
    sizes, infer = [], detector.detector.infer
    monkeypatch.setattr(detector.detector, "infer", lambda batch: sizes.append(len(batch)) or infer(batch))
    assert len(detector.predict([image_paths[0]] * 9)) == 9 and sizes == [8, 1]  # the default: 8
    sizes.clear()
    assert len(detector.predict([image_paths[0]] * 5, batch_size=2)) == 5 and sizes == [2, 2, 1]
    blank = detector.predict(np.zeros((60, 80, 3), dtype=np.uint8), score_threshold=0.999)
    assert len(blank) == 0 and blank.labels.dtype == torch.int64 and blank.boxes.shape == (0, 4)


def test_boxes_are_in_the_original_images_pixels(detector, image_paths):
    image = decode_image(image_paths[1])
    height, width = image.shape[1:]
    found = detector.predict(image)
    assert len(found) > 0 and found.boxes.dtype == torch.float32
    assert found.boxes.min() >= 0 and found.boxes[:, [0, 2]].max() <= width and found.boxes[:, [1, 3]].max() <= height
    # Twice as wide: x doubles and y does not move (the network sees nearly the same 128 x 128 input).
    wide = detector.predict(image.repeat_interleave(2, dim=2))
    assert torch.equal(wide.labels, found.labels)
    torch.testing.assert_close(wide.boxes, found.boxes * torch.tensor([2.0, 1.0, 2.0, 1.0]), atol=1.0, rtol=0)
    doubled = detector.predict(image.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2))
    torch.testing.assert_close(doubled.boxes, found.boxes * 2, atol=1.0, rtol=0)


def test_the_display_threshold_keeps_far_fewer_boxes_than_the_evaluation_one(detector):
    blank = np.full((300, 400, 3), 127, dtype=np.uint8)
    shown = detector.predict(blank)
    kept_for_map = detector.predict(blank, score_threshold=EVAL_SCORE_THRESHOLD)
    assert len(kept_for_map) >= 10 and len(shown) * 5 <= len(kept_for_map)
    assert len(detector.predict(blank, max_detections=3)) <= 3
    # The NMS IoU given is the one used: none suppressed at 1, fewer kept at 0.1.
    counts = [len(detector.predict(blank, score_threshold=EVAL_SCORE_THRESHOLD, nms_iou=iou))
              for iou in (1.0, 0.5, 0.1)]
    assert counts[0] >= counts[1] >= counts[2] and counts[0] > counts[2], counts


@pytest.mark.parametrize("image, error, message", [
    (np.zeros((60, 80), dtype=np.uint8), ValueError, r"^an image of shape \(60, 80\): expected \(H, W, 3\) for a "
                                                      r"NumPy array \(a grayscale image: repeat it to 3 channels\)\. "
                                                      r"Accepted: a path"),
    (np.zeros((60, 80, 4), dtype=np.uint8), ValueError, r"^an image of shape \(60, 80, 4\): expected \(H, W, 3\) for "
                                                         r"a NumPy array \(RGBA: drop the alpha channel\)\. Accepted"),
    (np.zeros((3, 60, 80), dtype=np.uint8), ValueError, r"^an image of shape \(3, 60, 80\): expected \(H, W, 3\) for "
                                                         r"a NumPy array\. Accepted"),
    (torch.zeros(60, 80, 4), ValueError, r"expected \(3, H, W\) or \(H, W, 3\) for a tensor \(RGBA"),
    (torch.zeros(2, 4, 5), ValueError, r"^an image of shape \(2, 4, 5\): expected \(3, H, W\) or \(H, W, 3\) for a "
                                       r"tensor\. Accepted"),
    (np.zeros((60, 4), dtype=np.uint8), ValueError, r"^an image of shape \(60, 4\): expected \(H, W, 3\) for a "
                                                     r"NumPy array \(a grayscale image: repeat it to 3 channels\)\."),
    (np.zeros((60, 80, 3), dtype=np.int32), TypeError, r"^an image of dtype int32: expected uint8, or floats in "
                                                        r"\[0, 1\]\. Accepted: a path"),
    (torch.zeros((3, 60, 80), dtype=torch.int16), TypeError, r"^an image of dtype int16: expected uint8"),
    (torch.full((3, 60, 80), 255.0), ValueError, r"values from 255 to 255: floats must be in \[0, 1\]"),
    (torch.full((3, 60, 80), 1.5), ValueError, r"^a float image with values from 1\.5 to 1\.5: floats must be in "),
    (torch.full((3, 60, 80), -0.25), ValueError, r"^a float image with values from -0\.25 to -0\.25: floats must"),
    (b"\xff\xd8", TypeError, r"cannot read an image from a bytes"),
])
def test_a_wrong_image_is_a_clear_error(detector, image, error, message):
    with pytest.raises(error, match=message):
        detector.predict(image)


def test_a_weights_file_is_half_the_checkpoint_named_by_its_hash_and_detects_alike(detector, overfit_run,
                                                                                    image_paths, tmp_path):
    _, run_dir = overfit_run
    path = yolo.export_weights(run_dir / "best.pt", tmp_path / "weights" / "shared")  # folders made
    assert path.stat().st_size < 0.6 * (run_dir / "best.pt").stat().st_size
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert re.fullmatch(r"run_best-[0-9a-f]{8}\.pth", path.name)
    assert torch.hub.HASH_REGEX.search(path.name).group(1) == digest[:8]  # what check_hash=True compares
    saved = load_checkpoint(path)
    assert {"model_args", "class_names", "config"} <= set(saved) and "optimizer" not in saved
    model = load_model(path)[0]
    assert {saved["model"][name].dtype for name, _ in model.named_parameters()} == {torch.float16}
    assert {saved["model"][name].dtype for name, _ in model.named_buffers() if "running" in name} == {torch.float32}
    assert {parameter.dtype for parameter in model.parameters()} == {torch.float32}
    from_weights = yolo.load_detector(path, device="cpu", dtype="fp32")
    for actual, expected in zip(from_weights.predict(image_paths), detector.predict(image_paths)):
        assert_same_detections(actual, expected, box_atol=1.0, score_atol=5e-3)


def test_torch_hub_loads_the_detector(overfit_run, image_paths):
    _, run_dir = overfit_run
    hub_detector = torch.hub.load(str(ROOT), "yolov1", source="local", checkpoint=str(run_dir / "best.pt"),
                                  device="cpu", dtype="fp32")
    assert isinstance(hub_detector, yolo.ImageDetector) and len(hub_detector.predict(image_paths[0])) > 0
    # The device and dtype asked for reach the detector (auto would give fp32 or bf16, and never fail).
    assert hub_detector.detector.dtype == torch.float32
    bf16 = torch.hub.load(str(ROOT), "yolov1", source="local", checkpoint=str(run_dir / "best.pt"), dtype="bf16")
    assert bf16.detector.dtype == torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU is available here"):
            torch.hub.load(str(ROOT), "yolov1", source="local", checkpoint=str(run_dir / "best.pt"),
                           device="cuda")


def test_the_readmes_example_runs_outside_the_repository(overfit_run, image_paths, tmp_path):
    _, run_dir = overfit_run
    readme = (ROOT / "README.md").read_text()
    example = re.search(r"## Detection from Python\n.*?```python\n(.*?)```", readme, re.DOTALL).group(1)
    example = (example.replace("runs/resnet18_voc2012val/last.pt", str(run_dir / "best.pt"))
               .replace('"street.jpg"', repr(str(image_paths[0]))).replace("kitchen.png", str(image_paths[1])))
    # The repository on PYTHONPATH stands in for the editable install that `make` does.
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, env=environment, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    line = re.compile(r" *(circle|square|triangle|cross|diamond) [01]\.\d\d \(\d+, \d+\) - \(\d+, \d+\)")
    lines = result.stdout.splitlines()
    assert lines and all(line.fullmatch(text) for text in lines), result.stdout
    assert Image.open(tmp_path / "street_boxes.jpg").size == Image.open(image_paths[0]).size


def test_float_images_may_reach_0_and_1_and_pil_images_of_any_mode_are_read_as_rgb(detector, image_paths):
    from yolo.api import as_image
    extremes = torch.tensor([0.0, 1.0, 0.5]).repeat(3, 4, 1)
    assert torch.equal(as_image(extremes), torch.tensor([0, 255, 128], dtype=torch.uint8).repeat(3, 4, 1))
    with Image.open(image_paths[0]) as opened:
        rgb = opened.convert("RGB")
    for mode in ("L", "RGBA", "P", "CMYK"):
        converted = rgb.convert(mode)
        assert torch.equal(as_image(converted), torch.from_numpy(np.array(converted.convert("RGB"))).permute(2, 0, 1))
    assert len(detector.predict(rgb.convert("RGBA"))) > 0


class RecordingDetector(Detector):
    """A detector on the meta device (standing in for a GPU) that records the batches it is given and finds
    nothing in them."""

    def infer(self, batch):
        self.batches.append((batch.device, batch.dtype, tuple(batch.shape)))
        candidates = self.grid_size ** 2 * 2
        return None, torch.zeros(len(batch), candidates, 4), torch.zeros(len(batch), candidates, self.num_classes)


def test_predict_gives_the_detector_its_input_type_on_its_device(detector, overfit_run):
    _, run_dir = overfit_run
    model = load_model(run_dir / "best.pt")[0]
    recording = RecordingDetector(model, "fp32", torch.device("meta"))
    recording.batches, recording.input_dtype = [], torch.uint8  # as an .onnx graph that takes pixels
    found = yolo.ImageDetector(recording, detector.class_names).predict(torch.empty(3, 40, 50, dtype=torch.uint8,
                                                                                    device="meta"))
    size = recording.image_size
    assert len(found) == 0 and recording.batches == [(torch.device("meta"), torch.uint8, (1, 3, size, size))]


def test_a_device_given_as_a_torch_device_is_where_the_model_runs(detector, overfit_run):
    """torch.device("meta") is no device name resolve_device takes: it is used as given, by ImageDetector and by
    open_detector, whose defaults are auto (no GPU here: the CPU) and auto's dtype."""
    _, run_dir = overfit_run
    model = load_model(run_dir / "best.pt")[0]
    meta = torch.device("meta")
    assert yolo.ImageDetector(model, detector.class_names, device=meta, dtype="fp32").detector.device == meta
    assert open_detector(run_dir / "best.pt", meta, "fp32")[0].device == meta
    default, _ = open_detector(run_dir / "best.pt")
    assert (default.device, default.dtype) == (torch.device("cpu"), inference_dtype("auto", torch.device("cpu")))


def test_a_checkpoint_without_its_runs_settings_gives_no_class_ids(overfit_run, tmp_path):
    _, run_dir = overfit_run
    state = load_checkpoint(run_dir / "best.pt")
    del state["config"]  # as checkpoints saved before the settings were kept
    torch.save(state, tmp_path / "old.pt")
    assert yolo.load_detector(tmp_path / "old.pt", "cpu", "fp32").class_ids is None


def test_a_tensor_image_stays_on_its_device_until_preprocess_moves_it():
    """A CUDA tensor given to predict is not copied to the host and back: the meta device, which cannot be
    copied to the host, stands in for the GPU."""
    from yolo.api import as_image
    pixels = torch.empty(3, 8, 6, dtype=torch.uint8, device="meta")
    assert as_image(pixels).device.type == "meta"
    assert as_image(pixels.permute(1, 2, 0)).shape == (3, 8, 6)
