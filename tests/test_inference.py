import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.transforms import v2

import yolo.device
from yolo.device import device_name, inference_dtype, is_native
from yolo.inference import Detector, fold_batch_norms, prepare_for_inference, preprocess
from yolo.loss import yolo_loss
from yolo.metrics import evaluate_detections
from yolo.model import BACKBONES, YOLOv1
from yolo.postprocess import DISPLAY_SCORE_THRESHOLD
from yolo.targets import encode_target

IMAGE_SIZE, GRID_SIZE, NUM_CLASSES = 128, 4, 3
COLOURS = torch.tensor([[220, 30, 30], [30, 200, 40], [40, 60, 230]], dtype=torch.uint8)  # class = colour


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: a second thread adds only synchronisation, which on a busy machine costs more
    than the work itself (tens of times more on a shared 2-core runner)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_model(backbone="resnet18", head_channels=16, fc_dim=32):
    return YOLOv1(backbone, NUM_CLASSES, GRID_SIZE, image_size=IMAGE_SIZE, head_channels=head_channels,
                  fc_dim=fc_dim)


def calibrate_batch_norms(module, inputs, generator=None):
    """BatchNorm statistics of `inputs` (one pass, cumulative average), as training leaves them, so the
    activations have realistic scales; with a generator, random affine parameters too."""
    for batch_norm in module.modules():
        if isinstance(batch_norm, nn.BatchNorm2d):
            batch_norm.reset_running_stats()
            batch_norm.momentum = None
            if generator is not None:
                batch_norm.weight.data.copy_(torch.rand(batch_norm.num_features, generator=generator) + 0.5)
                batch_norm.bias.data.copy_(torch.randn(batch_norm.num_features, generator=generator) * 0.1)
    with torch.no_grad():
        module.train()(inputs)
    return module.eval()


@pytest.mark.parametrize("backbone", BACKBONES)
def test_folded_model_gives_the_eval_models_outputs(backbone):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    model = calibrate_batch_norms(small_model(backbone), images, generator)
    inference_model = prepare_for_inference(model, "fp32")
    assert not any(isinstance(module, nn.BatchNorm2d) for module in inference_model.modules())
    assert not any(parameter.requires_grad for parameter in inference_model.parameters())
    assert any(isinstance(module, nn.BatchNorm2d) for module in model.modules()), "the argument must stay intact"
    with torch.no_grad():
        expected = model(images)
        actual = inference_model(images.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


def test_folding_needs_eval_mode_and_refuses_a_batch_norm_it_cannot_fold():
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norms(small_model().train())
    orphan = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4)).eval()
    with pytest.raises(ValueError, match="no convolution"):
        fold_batch_norms(orphan)


def test_dtype_names():
    assert inference_dtype("bf16", "cpu") == torch.bfloat16
    # auto: bf16 only where the CPU computes it natively (here, AVX2 only, it is emulated and slower).
    assert inference_dtype("auto", "cpu") == (torch.bfloat16 if is_native(torch.bfloat16, "cpu") else torch.float32)
    with pytest.raises(ValueError, match="unknown dtype"):
        inference_dtype("int8", "cpu")


@pytest.mark.parametrize("capability, flags, instructions", [
    ("AVX512", "fma avx2 avx512f avx512_bf16", "AVX512-BF16"),
    ("AVX512", "fma avx2 avx512f", "AVX512"),
    ("AVX2", "fma avx2 avx512f avx512_bf16", "AVX2"),  # kernels held to AVX2 by ATEN_CPU_CAPABILITY
])
def test_a_cpu_is_named_with_its_vector_instructions(monkeypatch, capability, flags, instructions):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(yolo.device, "read_cpuinfo", lambda: {"model name": "AMD EPYC", "flags": flags})
    assert device_name(torch.device("cpu")) == f"AMD EPYC, {instructions}, {torch.get_num_threads()} threads"


@pytest.mark.skipif("avx2" not in yolo.device.read_cpuinfo().get("flags", ""), reason="needs an AVX2 CPU")
def test_the_name_follows_the_instructions_torch_is_held_to():
    command = [sys.executable, "-c", "import torch; from yolo.device import device_name; "
                                     "print(device_name(torch.device('cpu')))"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True,
                            env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "OMP_NUM_THREADS": "1"},
                            cwd=Path(__file__).resolve().parents[1])
    assert result.stdout.strip().endswith(", AVX2, 1 threads")


def test_preprocess_gives_the_evaluation_transforms_input():
    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 90, 140), dtype=torch.uint8, generator=generator),
              torch.randint(0, 256, (3, 200, 120), dtype=torch.uint8, generator=generator)]
    batch = preprocess(images, IMAGE_SIZE)
    assert batch.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE) and batch.is_contiguous(memory_format=torch.channels_last)
    for image, actual in zip(images, batch):
        # What yolo.transforms.EvalTransform does to an image.
        resized = v2.functional.resize(image, [IMAGE_SIZE, IMAGE_SIZE], antialias=True)
        torch.testing.assert_close(actual, v2.functional.to_dtype(resized, torch.float32, scale=True))
    same_size = torch.stack([images[0], images[0]])
    torch.testing.assert_close(preprocess(same_size, IMAGE_SIZE)[1], batch[0])


def synthetic_scenes(count, generator):
    """uint8 images of coloured rectangles on grey, their normalised boxes and labels, sizes varying."""
    images, boxes, labels = [], [], []
    for index in range(count):
        height, width = 96 + 16 * (index % 3), 160 - 16 * (index % 2)
        image = torch.full((3, height, width), 110, dtype=torch.uint8)
        image_boxes, image_labels = [], []
        for label in torch.randperm(NUM_CLASSES, generator=generator)[:2].tolist():
            box_w, box_h = (torch.randint(25, 55, (2,), generator=generator)).tolist()
            x1 = torch.randint(0, width - box_w, (1,), generator=generator).item()
            y1 = torch.randint(0, height - box_h, (1,), generator=generator).item()
            image[:, y1:y1 + box_h, x1:x1 + box_w] = COLOURS[label][:, None, None]
            image_boxes.append([x1 / width, y1 / height, (x1 + box_w) / width, (y1 + box_h) / height])
            image_labels.append(label)
        images.append(image)
        boxes.append(torch.tensor(image_boxes))
        labels.append(torch.tensor(image_labels))
    return images, boxes, labels


def overfit(model, images, boxes, labels, steps):
    """Train the head on the fixed scenes; the backbone stays random, its BatchNorm statistics those of the scenes."""
    inputs = preprocess(images, IMAGE_SIZE)
    targets = torch.stack([encode_target(b, l, GRID_SIZE, NUM_CLASSES) for b, l in zip(boxes, labels)])
    calibrate_batch_norms(model, inputs)
    with torch.no_grad():
        features = model.backbone((inputs - model.mean) / model.std)
    optimizer = torch.optim.Adam(model.head.parameters(), lr=1e-3)
    model.head.train()
    for _ in range(steps):
        pred = torch.sigmoid(model.head(features)).view(*targets.shape[:3], -1)
        loss = yolo_loss(pred, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # The head's statistics as it ended, so that evaluation sees exactly what training last saw.
    return calibrate_batch_norms(model, inputs), loss.item()


def ground_truth_arrays(images, boxes, labels):
    arrays = []
    for image, image_boxes, image_labels in zip(images, boxes, labels):
        height, width = image.shape[1:]
        # Normalised continuous boxes -> VOC 1-based inclusive pixels.
        pixels = image_boxes * torch.tensor([width, height, width, height]) + torch.tensor([1, 1, 0, 0])
        arrays.append(np.column_stack([pixels.numpy(), image_labels.numpy(), np.zeros(len(image_labels))]))
    return arrays


def voc_iou(a, b):
    width = min(a[2], b[2]) - max(a[0], b[0]) + 1
    height = min(a[3], b[3]) - max(a[1], b[1]) + 1
    intersection = max(width, 0) * max(height, 0)
    area = lambda box: (box[2] - box[0] + 1) * (box[3] - box[1] + 1)  # noqa: E731
    return intersection / (area(a) + area(b) - intersection)


def unmatched_confident_boxes(detections, others, margin):
    """Detections above the display threshold (by more than `margin`) without a same-class box of IoU > 0.9
    among `others` (those above the threshold less `margin`)."""
    missing = []
    for row in detections[detections[:, 4] > DISPLAY_SCORE_THRESHOLD + margin]:
        same_class = others[(others[:, 5] == row[5]) & (others[:, 4] > DISPLAY_SCORE_THRESHOLD - margin)]
        if not any(voc_iou(row, other) > 0.9 for other in same_class):
            missing.append(row)
    return missing


def test_bf16_detections_match_fp32():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    images, boxes, labels = synthetic_scenes(8, generator)
    model, loss = overfit(small_model(head_channels=64, fc_dim=256), images, boxes, labels, steps=150)
    fp32 = Detector(model, "fp32")(images)
    bf16 = Detector(model, "bf16")(images)
    ground_truths = ground_truth_arrays(images, boxes, labels)

    confident = sum(int((d[:, 4] > DISPLAY_SCORE_THRESHOLD).sum()) for d in fp32)
    assert confident >= len(images), f"the overfitted model should detect its scenes (loss {loss:.3f})"
    # A score within 0.02 of the display threshold may land on either side of it in bf16.
    for fp32_detections, bf16_detections in zip(fp32, bf16):
        assert not unmatched_confident_boxes(fp32_detections, bf16_detections, margin=0.02)
        assert not unmatched_confident_boxes(bf16_detections, fp32_detections, margin=0.02)

    fp32_metrics = evaluate_detections(fp32, ground_truths, NUM_CLASSES)
    bf16_metrics = evaluate_detections(bf16, ground_truths, NUM_CLASSES)
    assert fp32_metrics["voc07_map"] > 0.5
    for key in ("voc07_map", "voc12_map"):
        assert abs(bf16_metrics[key] - fp32_metrics[key]) <= 0.005, (key, fp32_metrics[key], bf16_metrics[key])


def test_detector_takes_a_batch_a_list_or_preprocessed_images():
    generator = torch.Generator().manual_seed(1)
    batch = torch.randint(0, 256, (2, 3, 75, 100), dtype=torch.uint8, generator=generator)
    detector = Detector(calibrate_batch_norms(small_model(), preprocess(batch, IMAGE_SIZE)), "fp32")
    from_batch = detector(batch)
    from_list = detector(list(batch))
    from_inputs = detector(preprocess(batch, IMAGE_SIZE), original_sizes=[(75, 100), (75, 100)])
    for a, b, c in zip(from_batch, from_list, from_inputs):
        assert a.shape[1] == 6 and len(a) > 0
        np.testing.assert_allclose(a, b)
        np.testing.assert_allclose(a, c)
        assert a[:, [0, 2]].min() >= 1 and a[:, [0, 2]].max() <= 100 and a[:, [1, 3]].max() <= 75
    with pytest.raises(ValueError, match="original"):
        detector(preprocess(batch, IMAGE_SIZE))


def test_an_unprepared_detector_runs_the_model_itself_as_the_folded_copy_does():
    generator = torch.Generator().manual_seed(2)
    batch = torch.randint(0, 256, (2, 3, 75, 100), dtype=torch.uint8, generator=generator)
    model = calibrate_batch_norms(small_model(), preprocess(batch, IMAGE_SIZE), generator)
    model.to(memory_format=torch.channels_last)  # as train.py lays it out
    unprepared = Detector(model, "fp32", prepare=False, score_threshold=0.0)
    assert unprepared.model is model
    for found, expected in zip(unprepared(batch), Detector(model, "fp32", score_threshold=0.0)(batch)):
        assert len(found) > 0
        np.testing.assert_allclose(found, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"^An unprepared model runs in its own dtype and on its own device "
                                         r"\(torch.float32 on cpu\), not torch.bfloat16 on cpu\.$"):
        Detector(model, "bf16", prepare=False)
    with pytest.raises(ValueError, match=r"not torch.float32 on meta\.$"):
        Detector(model, "fp32", "meta", prepare=False)


def test_predict_takes_uint8_batches_as_pixels():
    model = small_model().eval()
    detector = Detector(model, "fp32")
    pixels = torch.randint(0, 256, (2, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(detector.predict(pixels), detector.predict(pixels.float() / 255))
    assert not torch.allclose(detector.predict(pixels), detector.predict(pixels.float()))


def test_preprocess_gives_a_uint8_graph_the_resized_pixels_themselves():
    images = [torch.randint(0, 256, (3, 75, 100), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)),
              torch.randint(0, 256, (3, 40, 30), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))]
    pixels = preprocess(images, IMAGE_SIZE, torch.uint8)
    assert pixels.dtype == torch.uint8 and pixels.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.equal(pixels, preprocess(images, IMAGE_SIZE).mul(255).round().to(torch.uint8))
