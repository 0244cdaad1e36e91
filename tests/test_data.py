import contextlib
import copy
import math
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import warnings
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data._utils.pin_memory import pin_memory
from torchvision.transforms import v2

from data import make_synthetic
import yolo.data
from yolo import transforms
from yolo.boxes import normalized_to_voc
from yolo.data import PROTOCOLS, DetectionDataset, ImageDecodeError, build_dataset, decode_image
from yolo.formats import MISSING_DATA_HINT, AnnotationError, read_splits, read_voc_annotation
from yolo.loader_benchmark import BaselineTrainTransform
from yolo.photometric import MAX_COLOUR_FACTOR, draw_colour_factors, model_input
from yolo.sampling import SeededSamples
from yolo.transforms import (DetectionBatch, DevicePrefetcher, EvalTransform, TrainTransform, build_loader,
                             num_loader_workers)
from yolo.visualize import draw_boxes, save_image

CLASSES = ("cat", "dog")
WIDTH, HEIGHT = 40, 30


def write_item(root, image_id, objects=(), size=(WIDTH, HEIGHT), image_size=None):
    """One image + annotation in a VOC-layout root; objects are (name, VOC box, difficult)."""
    make_synthetic.make_voc_dirs(root)
    width, height = image_size or size
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "JPEGImages" / f"{image_id}.jpg")
    xml = make_synthetic.annotation_xml(f"{image_id}.jpg", *size, [
        {"name": name, "bndbox": box, "difficult": difficult} for name, box, difficult in objects])
    (root / "Annotations" / f"{image_id}.xml").write_text(xml)
    return root / "Annotations" / f"{image_id}.xml"


def write_split(root, split, ids):
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))


def dataset_of(root, ids, **kwargs):
    write_split(root, "train", ids)
    return DetectionDataset(*read_splits("voc", [(root, "train")], CLASSES), **kwargs)


def test_read_annotation_parts_decimals_missing_difficult(tmp_path):
    xml_path = tmp_path / "a.xml"
    xml_path.write_text("""<annotation><size><width>40</width><height>30</height><depth>3</depth></size>
      <object><name>dog</name><bndbox><xmin>2.5</xmin><ymin>3</ymin><xmax>20.0</xmax><ymax>25</ymax></bndbox>
        <part><name>head</name><bndbox><xmin>3</xmin><ymin>4</ymin><xmax>8</xmax><ymax>9</ymax></bndbox></part>
      </object>
      <object><name>cat</name><difficult>1</difficult>
        <bndbox><xmin>1</xmin><ymin>1</ymin><xmax>40</xmax><ymax>30</ymax></bndbox></object>
    </annotation>""")
    annotation = read_voc_annotation(xml_path, CLASSES)
    assert annotation["boxes"].dtype == np.float32 and annotation["boxes"].shape == (2, 4)
    np.testing.assert_array_equal(annotation["boxes"], [[2.5, 3, 20, 25], [1, 1, 40, 30]])
    assert annotation["labels"].tolist() == [1, 0] and annotation["labels"].dtype == np.int64
    assert annotation["difficult"].tolist() == [False, True]
    assert (annotation["width"], annotation["height"]) == (40, 30)


def test_truncated_xml_names_the_file(tmp_path):
    xml_path = write_item(tmp_path, "x", [("cat", (1, 1, 5, 5), False)])
    xml_path.write_text(xml_path.read_text()[:60])
    with pytest.raises(AnnotationError, match=r"x\.xml.*cannot parse"):
        dataset_of(tmp_path, ["x"])


def test_missing_field_names_file_and_field(tmp_path):
    xml_path = write_item(tmp_path, "x", [("cat", (1, 1, 5, 5), False)])
    root = ET.parse(xml_path).getroot()
    bndbox = root.find("object/bndbox")
    bndbox.remove(bndbox.find("xmax"))
    xml_path.write_text(ET.tostring(root, encoding="unicode"))
    with pytest.raises(AnnotationError, match=r"x\.xml.*bndbox/xmax"):
        read_voc_annotation(xml_path, CLASSES)


def test_unknown_class_names_file_class_and_remedy(tmp_path):
    write_item(tmp_path, "x", [("unicorn", (1, 1, 5, 5), False)])
    with pytest.raises(AnnotationError, match=r"(?s)classes: cat, dog\):.*x\.xml:\d+: class 'unicorn'.*classes\.txt"):
        dataset_of(tmp_path, ["x"])


def test_missing_split_annotation_or_image_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train\.txt.*make download"):
        read_splits("voc", [(tmp_path, "train")], CLASSES)
    write_item(tmp_path, "a")
    with pytest.raises(AnnotationError, match=r"train\.txt:2: annotation \S*Annotations/b\.xml not found"):
        dataset_of(tmp_path, ["a", "b"])
    (tmp_path / "JPEGImages" / "a.jpg").unlink()
    with pytest.raises(AnnotationError, match=r"train\.txt:1: image \S*JPEGImages/a\.\* not found"):
        dataset_of(tmp_path, ["a"])


def test_corrupt_or_truncated_jpeg_names_the_file(tmp_path):
    write_item(tmp_path, "garbage")
    (tmp_path / "JPEGImages" / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    write_item(tmp_path, "truncated")
    path = tmp_path / "JPEGImages" / "truncated.jpg"
    path.write_bytes(path.read_bytes()[:300])
    dataset = dataset_of(tmp_path, ["garbage", "truncated"])  # construction does not decode images
    for index, name in enumerate(("garbage", "truncated")):
        with pytest.raises(ImageDecodeError, match=rf"{name}\.jpg: cannot decode"):
            dataset[index]


PIXELS = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
GRAY = PIXELS[..., 0]


def palette_image():
    return Image.fromarray(PIXELS).convert("P")


# name -> (how to write it, the RGB pixels expected back, or None: as PIL's own decode of the file gives)
IMAGE_FORMATS = {
    "rgb.png": (lambda path: Image.fromarray(PIXELS).save(path), PIXELS),
    "rgba.png": (lambda path: Image.fromarray(np.dstack([PIXELS, GRAY])).save(path), PIXELS),
    "palette.png": (lambda path: palette_image().save(path), np.array(palette_image().convert("RGB"))),
    "gray.png": (lambda path: Image.fromarray(GRAY).save(path), np.dstack([GRAY] * 3)),
    "gray16.png": (lambda path: Image.fromarray(GRAY.astype(np.uint16) * 257).save(path), np.dstack([GRAY] * 3)),
    "rgb.bmp": (lambda path: Image.fromarray(PIXELS).save(path), PIXELS),
    "rgb.tif": (lambda path: Image.fromarray(PIXELS).save(path), PIXELS),
    "gray.jpg": (lambda path: Image.fromarray(GRAY).save(path), None),
    "cmyk.jpg": (lambda path: Image.fromarray(PIXELS).convert("CMYK").save(path), None),
}


@pytest.mark.parametrize("name", IMAGE_FORMATS)
def test_decode_image_reads_every_format_as_rgb(tmp_path, name):
    write, expected = IMAGE_FORMATS[name]
    path = tmp_path / name
    write(path)
    if expected is None:
        expected = np.array(Image.open(path).convert("RGB"))
    image = decode_image(path)
    assert image.dtype == torch.uint8 and image.shape == (3, 5, 7)
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), expected, atol=1)


def test_png_named_jpg_in_a_dataset_is_read_by_content(tmp_path):
    write_item(tmp_path, "disguised")
    pixels = np.random.default_rng(2).integers(0, 256, (HEIGHT, WIDTH, 4), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "JPEGImages" / "disguised.jpg", format="PNG")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image, annotation = dataset_of(tmp_path, ["disguised"])[0]
    np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), pixels[..., :3])
    assert (annotation["width"], annotation["height"]) == (WIDTH, HEIGHT)


@pytest.mark.parametrize("content, reason", [
    (b"", "the file is empty"),
    (b"name,score\nfoo,1\n", "not an image"),
    ("truncated", "truncated"),
])
def test_undecodable_file_is_one_clear_error(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    if content == "truncated":
        Image.fromarray(PIXELS).resize((64, 64)).save(path)
        content = path.read_bytes()[:300]
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError, match=rf"bad\.jpg: cannot decode image \(.*{reason}") as raised:
        decode_image(path)
    message = str(raised.value)
    assert "\n" not in message and "csrc" not in message and ".cpp" not in message


def test_unreadable_path_names_the_file(tmp_path):
    with pytest.raises(ImageDecodeError, match=r"missing\.jpg: cannot read the file \(No such file"):
        decode_image(tmp_path / "missing.jpg")


def test_missing_data_hint_names_real_make_targets():
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    targets = re.findall(r"`make (\S+)`", MISSING_DATA_HINT)
    assert targets and all(re.search(rf"^{target}:", makefile, re.MULTILINE) for target in targets)
    assert "data/make_synthetic.py" in MISSING_DATA_HINT


def test_box_under_a_pixel_is_drawn_as_one_pixel():
    # A decoded detection narrower than a pixel has x2 < x1 in VOC's inclusive convention.
    for size, box, pixel in ((1, (1.2, 1.3, 0.4, 0.9), (0, 0)), (5, (3.2, 4.1, 2.6, 3.5), (3, 2))):
        image = torch.zeros(3, size, size, dtype=torch.uint8)
        drawn = draw_boxes(image, [box], [0], CLASSES, colors=[(255, 128, 7)], width=1)
        assert drawn[:, pixel[0], pixel[1]].tolist() == [255, 128, 7]


def test_an_image_without_boxes_is_returned_unchanged_and_silently():
    image = torch.randint(0, 256, (3, 6, 5), dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torchvision warns when asked to draw no box
        drawn = draw_boxes(image, torch.zeros(0, 4), [], CLASSES)
    assert torch.equal(drawn, image) and drawn.data_ptr() != image.data_ptr()


def test_empty_annotation_is_valid(tmp_path):
    dataset = dataset_of(tmp_path, [write_item(tmp_path, "empty").stem], transforms=EvalTransform(32, 4, 2))
    image, target = dataset[0]
    assert image.shape == (3, 32, 32)
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert not target["grid"].any()


def test_out_of_image_box_clipped_box_wholly_outside_dropped_each_listed_once(tmp_path, capsys, monkeypatch):
    write_item(tmp_path, "x", [("cat", (-5, 3, 50, 40), False), ("dog", (45, 2, 60, 10), False),
                               ("cat", (7, 7, 7, 7), False)])
    dataset = dataset_of(tmp_path, ["x"])
    xml = tmp_path / "Annotations" / "x.xml"
    assert capsys.readouterr().err == (
        f"warning: dropped 1 object(s) lying wholly outside their image:\n  {xml}: <object> 2 (dog 45 2 60 10)\n"
        f"warning: clipped 1 box(es) reaching a pixel or more outside their image to its edges:\n"
        f"  {xml}: <object> 1 (cat -5 3 50 40)\n")
    monkeypatch.setattr(yolo.data, "is_main_process", lambda: False)  # another process of a torchrun job
    dataset_of(tmp_path, ["x"])
    assert capsys.readouterr().err == ""
    annotation = dataset.annotations[0]
    # Clipped to [1, 40] x [1, 30]; a one-pixel box (x1 == x2) is valid under the inclusive convention.
    np.testing.assert_array_equal(annotation["boxes"], [[1, 3, 40, 30], [7, 7, 7, 7]])
    assert annotation["labels"].tolist() == [0, 0]


def test_image_size_disagreeing_with_xml_trusts_pixels(tmp_path):
    write_item(tmp_path, "x", [("cat", (5, 5, 40, 30), False)], size=(40, 30), image_size=(20, 16))
    dataset = dataset_of(tmp_path, ["x"])
    with pytest.warns(UserWarning, match=r"x\.jpg: decoded size 20 x 16 differs"):
        image, annotation = dataset[0]
    assert image.shape == (3, 16, 20) and (annotation["width"], annotation["height"]) == (20, 16)
    np.testing.assert_array_equal(annotation["boxes"], [[5, 5, 20, 16]])


def test_voc_protocols_combine_the_right_splits(tmp_path):
    splits = {"VOC2007": {"trainval": ["000005"], "test": ["000001"]},
              "VOC2012": {"train": ["2008_000001"], "val": ["2008_000002"], "trainval": ["2008_000001", "2008_000002"]}}
    for year, lists in splits.items():
        root = tmp_path / "VOCdevkit" / year
        for image_id in {i for ids in lists.values() for i in ids}:
            write_item(root, image_id, [("cat", (1, 1, 5, 5), False)])
        for split, ids in lists.items():
            write_split(root, split, ids)
    ids = {(protocol, train): build_dataset(protocol, tmp_path, train=train, class_names=CLASSES).image_ids
           for protocol in ("voc2012val", "voc2007test") for train in (True, False)}
    assert ids[("voc2012val", True)] == ["000005", "000001", "2008_000001"]
    assert ids[("voc2012val", False)] == ["2008_000002"]
    assert ids[("voc2007test", True)] == ["000005", "2008_000001", "2008_000002"]
    assert ids[("voc2007test", False)] == ["000001"]
    with pytest.raises(ValueError, match="known protocols: " + ", ".join(PROTOCOLS)):
        build_dataset("voc2010", tmp_path, train=True)


def test_synthetic_set_through_both_transforms_loader_and_drawing(synthetic_root, tmp_path):
    raw = build_dataset("synthetic", synthetic_root, train=True)
    assert raw.class_names == make_synthetic.CLASS_NAMES
    num_classes = len(raw.class_names)
    # <part> boxes are not objects: one box per <object>, whatever the parts.
    for index, image_id in enumerate(raw.image_ids):
        xml_root = ET.parse(synthetic_root / "Annotations" / f"{image_id}.xml").getroot()
        assert len(raw.annotations[index]["labels"]) == len(xml_root.findall("object"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the synthetic set is clean
        image, annotation = raw[0]
    assert image.dtype == torch.uint8 and image.shape == (3, annotation["height"], annotation["width"])

    torch.manual_seed(0)
    for transform, split in ((TrainTransform(64, 4, num_classes), True), (EvalTransform(64, 4, num_classes), False)):
        dataset = build_dataset("synthetic", synthetic_root, train=split, transforms=transform)
        for index in range(4):
            image, target = dataset[index]
            assert image.shape == (3, 64, 64) and image.dtype == torch.uint8
            boxes = target["boxes"]
            assert boxes.dtype == torch.float32 and ((boxes >= 0) & (boxes <= 1)).all()
            assert (boxes[:, 2:] > boxes[:, :2]).all()
            assert len(boxes) == len(target["labels"]) == len(target["difficult"])
            assert target["grid"].shape == (4, 4, 5 + num_classes)
            assert target["orig_size"].tolist() == [dataset.annotations[index]["height"],
                                                    dataset.annotations[index]["width"]]
            assert target["image_id"] == dataset.image_ids[index]
    # Evaluation only resizes: its boxes map back exactly onto the annotation.
    annotation = dataset.annotations[3]
    torch.testing.assert_close(normalized_to_voc(boxes, annotation["width"], annotation["height"]),
                               torch.from_numpy(annotation["boxes"]))

    loader = build_loader(dataset, batch_size=3, shuffle=False, num_workers=0, image_bytes=3 * 64 * 64)
    images, grids, factors, targets = next(iter(loader))
    assert images.shape == (3, 3, 64, 64) and grids.shape == (3, 4, 4, 5 + num_classes) and len(targets) == 3
    assert factors is None  # the evaluation transform draws none

    drawn = draw_boxes(image, normalized_to_voc(boxes, 64, 64), target["labels"], dataset.class_names)
    assert drawn.shape == (3, 64, 64) and drawn.dtype == torch.uint8 and not torch.equal(drawn, image)
    save_image(drawn, tmp_path / "drawn.png")
    assert Image.open(tmp_path / "drawn.png").size == (64, 64)


def test_train_transform_can_drop_difficult_and_is_seeded(synthetic_root):
    dataset = build_dataset("synthetic", synthetic_root, train=True)
    index = next(i for i, a in enumerate(dataset.annotations) if a["difficult"].any())
    image, annotation = dataset[index]
    num_classes = len(dataset.class_names)
    kept = EvalTransform(64, 4, num_classes)(image, annotation)[1]
    assert kept["difficult"].any()
    for seed in range(3):
        torch.manual_seed(seed)
        _, first = TrainTransform(64, 4, num_classes, use_difficult=False)(image, annotation)
        torch.manual_seed(seed)
        _, again = TrainTransform(64, 4, num_classes, use_difficult=False)(image, annotation)
        assert not first["difficult"].any()
        torch.testing.assert_close(first["boxes"], again["boxes"])


def test_colour_factors_are_log_uniform_with_half_of_them_darkening():
    torch.manual_seed(0)
    factors = torch.stack([draw_colour_factors() for _ in range(20_000)])
    assert factors.shape == (20_000, 2) and factors.dtype == torch.float32
    assert factors.min() >= 1 / MAX_COLOUR_FACTOR - 1e-6 and factors.max() <= MAX_COLOUR_FACTOR + 1e-6
    # log f / log 1.5 must be uniform on [-1, 1]. Kolmogorov-Smirnov: at n = 20,000 the 0.1 % critical
    # distance is 1.95 / sqrt(n) = 0.014; the old draw (uniform in [1/1.5, 1.5], 39 % darkening) is 0.11 away.
    positions = (factors.double().log() / np.log(MAX_COLOUR_FACTOR)).clamp(-1, 1)
    for column in positions.T:
        ordered = column.sort().values
        cdf = (ordered + 1) / 2
        ranks = torch.arange(1, len(ordered) + 1, dtype=torch.float64) / len(ordered)
        distance = torch.maximum(ranks - cdf, cdf - (ranks - 1 / len(ordered))).max().item()
        assert distance < 1.95 / np.sqrt(len(ordered)), distance
        # About half darken (or desaturate): 0.5 within 4 standard deviations (0.0035 each) of the count.
        assert abs((column < 0).double().mean().item() - 0.5) < 4 * 0.5 / np.sqrt(len(ordered))
    # The two factors of an image are drawn independently.
    assert abs(np.corrcoef(positions.T.numpy())[0, 1]) < 4 / np.sqrt(len(positions))


def test_the_batched_jitter_is_torchvisions_brightness_then_saturation_per_image():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 3, 24, 40), dtype=torch.uint8, generator=generator)
    factors = torch.tensor([[1 / 1.5, 1.5], [1.5, 1 / 1.5], [1.0, 1.0], [1.3, 1.2], [0.8, 0.9]])
    batch = model_input(images, torch.device("cpu"), factors)
    assert batch.dtype == torch.float32 and batch.is_contiguous(memory_format=torch.channels_last)
    for image, factor, actual in zip(images, factors, batch):
        expected = v2.functional.to_dtype(image, torch.float32, scale=True)
        expected = v2.functional.adjust_saturation(v2.functional.adjust_brightness(expected, factor[0].item()),
                                                   factor[1].item())
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)
    # Without factors (evaluation, augment=false): only the scaling to [0, 1].
    torch.testing.assert_close(model_input(images, torch.device("cpu")), images.float() / 255)
    # A float batch is left as it was by the in-place jitter.
    floats = images.float() / 255
    model_input(floats, torch.device("cpu"), factors)
    torch.testing.assert_close(floats, images.float() / 255)


def test_boxes_stay_on_their_object_through_geometry_and_colour_jitter(tmp_path):
    """A red rectangle on a dark background: after the training transform its box must hold only red
    pixels and be surrounded by others; the colour jitter changes pixels, never boxes, and the boxes are
    the ones the torchvision pipeline it replaced gives for the same seed."""
    width, height, box = 200, 150, (41, 31, 120, 100)  # VOC pixels, 1-based inclusive
    write_item(tmp_path, "x", [("cat", box, False)], size=(width, height))
    pixels = np.full((height, width, 3), 30, dtype=np.uint8)
    pixels[box[1] - 1:box[3], box[0] - 1:box[2]] = (220, 30, 30)
    Image.fromarray(pixels).save(tmp_path / "JPEGImages" / "x.jpg", quality=100)
    transform = TrainTransform(96, 4, 2)
    dataset = dataset_of(tmp_path, ["x"], transforms=transform)
    seeded = SeededSamples(dataset)
    baseline = BaselineTrainTransform(96, 4, 2)
    flips = 0
    for seed in range(40):
        image, target = seeded[(0, seed)]
        assert image.dtype == torch.uint8 and image.shape == (3, 96, 96)
        (x1, y1, x2, y2), = (target["boxes"] * 96).tolist()
        inside = image[:, round(y1) + 2:round(y2) - 2, round(x1) + 2:round(x2) - 2].int()
        assert (inside[0] > 180).all() and (inside[1:] < 70).all(), seed
        ring = torch.ones(96, 96, dtype=torch.bool)
        ring[max(round(y1) - 2, 0):round(y2) + 2, max(round(x1) - 2, 0):round(x2) + 2] = False
        assert (image[0][ring] < 150).all(), seed
        flips += x1 > 96 - x2  # the rectangle sits left of centre: a flip moves it right
        jittered = model_input(image[None], torch.device("cpu"), target["colour_factors"][None])
        assert not torch.equal(jittered, image[None].float() / 255)
        torch.manual_seed(seed)
        _, old_target = baseline(*_without_transforms(dataset)[0])
        torch.testing.assert_close(old_target["boxes"], target["boxes"])
        assert torch.equal(old_target["grid"], target["grid"])
    assert 10 <= flips <= 30


def _without_transforms(dataset):
    """A shallow copy of a DetectionDataset that returns raw (image, annotation) pairs."""
    raw = copy.copy(dataset)
    raw.transforms = None
    return raw


def test_workers_deliver_uint8_batches_equal_to_in_process_and_cached_ones(synthetic_root):
    num_classes = len(make_synthetic.CLASS_NAMES)
    samples = [(index % 16, 1000 + index) for index in range(12)]

    def batches(num_workers, cache):
        dataset = build_dataset("synthetic", synthetic_root, train=True, transforms=TrainTransform(64, 4, num_classes))
        if cache:
            assert dataset.cached_bytes() == sum(3 * a["width"] * a["height"] for a in dataset.annotations)
            dataset.cache_images()
        loader = build_loader(SeededSamples(dataset), batch_size=4, shuffle=False, num_workers=num_workers,
                              sampler=samples, pin_memory=False, prefetch_factor=2, image_bytes=3 * 64 * 64)
        return [(images, grids, factors) for images, grids, factors, _ in loader]

    reference = batches(num_workers=0, cache=False)
    for images, grids, factors in reference:
        assert images.dtype == torch.uint8 and images.shape == (4, 3, 64, 64)
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert factors.shape == (4, 2) and grids.shape == (4, 4, 4, 5 + num_classes)
    for num_workers, cache in ((1, False), (0, True), (2, True)):
        for actual, expected in zip(batches(num_workers, cache), reference, strict=True):
            for a, e in zip(actual, expected):
                assert torch.equal(a, e), (num_workers, cache)


def test_cached_images_are_copies(synthetic_root):
    dataset = build_dataset("synthetic", synthetic_root, train=True)
    dataset.cache_images()
    image, _ = dataset[0]
    image.zero_()
    assert dataset[0][0].any()
    assert torch.equal(dataset[0][0], build_dataset("synthetic", synthetic_root, train=True)[0][0])


def test_a_damaged_image_is_skipped_with_the_cache_as_without(tmp_path):
    root = tmp_path / "data"
    make_synthetic.generate(root, train=3, val=0, seed=2)
    damaged = root / "JPEGImages" / "train_000001.jpg"
    damaged.write_bytes(damaged.read_bytes()[:2000])  # the header reads, the pixels do not
    for cached in (False, True):
        dataset = build_dataset("synthetic", root, train=True)
        dataset.skip_unreadable = True
        if cached:
            dataset.cache_images()
        assert [dataset[index] is None for index in range(3)] == [False, True, False]
    dataset = build_dataset("synthetic", root, train=True)
    with pytest.raises(ImageDecodeError, match="train_000001.jpg"):
        dataset.cache_images()


def test_num_workers_auto_shares_the_cores_among_processes(monkeypatch):
    monkeypatch.setattr(transforms, "usable_cores", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert num_loader_workers("auto") == 15
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert num_loader_workers("auto") == 3
    monkeypatch.setattr(transforms, "usable_cores", lambda: 2)
    assert num_loader_workers("auto") == 0
    monkeypatch.setattr(transforms, "usable_cores", lambda: 256)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert num_loader_workers("auto") == transforms.MAX_AUTO_WORKERS
    assert num_loader_workers("3") == 3
    with pytest.raises(ValueError, match="auto or a whole number"):
        num_loader_workers("-1")


def _training_samples(synthetic_root, count, size=64):
    dataset = build_dataset("synthetic", synthetic_root, train=True,
                            transforms=TrainTransform(size, 4, len(make_synthetic.CLASS_NAMES)))
    return [SeededSamples(dataset)[(index % len(dataset), index)] for index in range(count)]


def test_the_collate_copies_each_image_into_a_channels_last_batch_in_shared_memory_in_a_worker(synthetic_root,
                                                                                              monkeypatch):
    samples = _training_samples(synthetic_root, 5)
    samples[1] = (samples[1][0].contiguous(), samples[1][1])  # channels-first: the batch is channels-last all the same
    expected = torch.stack([image for image, _ in samples])
    for in_worker in (False, True):
        monkeypatch.setattr(transforms, "get_worker_info", lambda: object() if in_worker else None)
        images = transforms.collate_detection(samples).images
        assert images.dtype == torch.uint8 and images.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(images, expected)
        # A worker passes its batch on through shared memory: allocated there, it is not copied there again.
        assert images.is_shared() == in_worker


@pytest.mark.parametrize("flip", [False, True])
def test_the_crop_and_resize_fills_around_the_region_channels_last_whatever_the_window(flip):
    # Decoded as (H, W, C) memory seen channels-first, as the decoders give it.
    image = torch.randint(0, 256, (30, 40, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    image = image.permute(2, 0, 1)
    for x_window, y_window in (((0, 40, 2, 30), (0, 30, 1, 31)),    # the whole image, shrunk: a border of fill
                               ((5, 35, 0, 32), (3, 27, 0, 32))):   # a part of it, filling the output
        out = transforms.crop_and_resize(image, x_window, y_window, 32, flip)
        # Channels-last as a (1, C, H, W) batch would be: the layout of the resize's fast path and of the batch.
        assert out[None].is_contiguous(memory_format=torch.channels_last), x_window
        x_src1, x_src2, x_out1, x_out2 = x_window
        y_src1, y_src2, y_out1, y_out2 = y_window
        region = v2.functional.resize(image[:, y_src1:y_src2, x_src1:x_src2].contiguous(),
                                      [y_out2 - y_out1, x_out2 - x_out1], antialias=True)
        expected = torch.full((3, 32, 32), transforms.FILL, dtype=torch.uint8)
        if flip:
            region, x_out1, x_out2 = region.flip(-1), 32 - x_out2, 32 - x_out1
        expected[:, y_out1:y_out2, x_out1:x_out2] = region
        assert (out.int() - expected.int()).abs().max() <= 1, x_window  # channels-first resizes round apart by 1


def test_a_worker_collating_into_reused_buffers_takes_them_in_turn(synthetic_root, monkeypatch):
    samples = _training_samples(synthetic_root, 4)
    monkeypatch.setattr(transforms, "get_worker_info", lambda: object())
    addresses = [transforms.collate_detection(samples[:count], image_buffers=3).images.data_ptr()
                 for count in (4, 4, 4, 4, 3, 4, 4)]
    # Three buffers in turn; a smaller batch (skipped images) fits in its turn's buffer.
    assert len(set(addresses[:3])) == 3 and addresses[3:6] == addresses[:3] and addresses[6] == addresses[0]
    assert torch.equal(transforms.collate_detection(samples, image_buffers=3).images,
                       torch.stack([image for image, _ in samples]))
    fresh = [transforms.collate_detection(samples).images for _ in range(2)]
    assert fresh[0].data_ptr() != fresh[1].data_ptr()


def wait_until_the_workers_have_run_ahead(iterator):
    """Returns once every batch the loader has asked its workers for is made (waiting in its queue or in its
    reorder buffer): the workers are then as far ahead as the loader lets them."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        asked = iterator._send_idx - iterator._rcvd_idx
        reordered = sum(len(info) == 2 for index, info in iterator._task_info.items() if index >= iterator._rcvd_idx)
        if iterator._data_queue.qsize() + reordered >= asked:
            return
        time.sleep(0.001)
    raise AssertionError("the loader's workers made no progress for a minute")


@pytest.mark.parametrize("num_workers", [1, 2])
def test_reused_image_buffers_hold_each_batch_while_the_consumer_holds_two(synthetic_root, num_workers,
                                                                           monkeypatch):
    # The consumer waits for the workers to run as far ahead as the loader lets them; a ring one buffer too
    # short overwrites the batch before the current one while it is still held.
    dataset = build_dataset("synthetic", synthetic_root, train=True,
                            transforms=TrainTransform(64, 4, len(make_synthetic.CLASS_NAMES)))
    samples = [(index % len(dataset), 2000 + index) for index in range(4 * 10)]
    expected = [transforms.collate_detection([SeededSamples(dataset)[sample] for sample in samples[i:i + 4]]).images
                for i in range(0, len(samples), 4)]
    # A ring already in this process (as a loader made in it before leaves): each forked worker must take its
    # own, not share the one it inherits with its siblings. The rings this test makes go when it ends.
    monkeypatch.setattr(transforms, "_worker_buffers", {})
    with monkeypatch.context() as patched:
        patched.setattr(transforms, "get_worker_info", lambda: object())
        transforms.collate_detection([SeededSamples(dataset)[sample] for sample in samples[:4]], image_buffers=4)
    loader = build_loader(SeededSamples(dataset), batch_size=4, shuffle=False, num_workers=num_workers,
                          sampler=samples, pin_memory=False, prefetch_factor=2, image_bytes=3 * 64 * 64,
                          reuse_image_buffers=True)
    previous, iterator = None, iter(loader)
    for index, batch in enumerate(iterator):
        wait_until_the_workers_have_run_ahead(iterator)
        assert torch.equal(batch.images, expected[index]), index
        if previous is not None:
            assert torch.equal(previous.images, expected[index - 1]), index - 1
        previous = batch
    assert index == len(expected) - 1
    with pytest.raises(ValueError, match="collate_detection"):
        build_loader(dataset, batch_size=4, shuffle=False, num_workers=1, collate_fn=lambda batch: batch,
                     image_bytes=3 * 64 * 64, reuse_image_buffers=True)


def test_colour_factors_are_one_tensor_at_the_top_of_the_batch_where_pin_memory_pins_them(synthetic_root,
                                                                                         monkeypatch):
    samples = _training_samples(synthetic_root, 4)
    batch = transforms.collate_detection(samples)
    assert torch.equal(batch.colour_factors, torch.stack([target["colour_factors"] for _, target in samples]))
    assert batch.colour_factors.dtype == torch.float32 and batch.colour_factors.shape == (4, 2)
    assert not any("colour_factors" in target for target in batch.targets)
    pinned = []

    def pin(tensor, *args, **kwargs):  # the DataLoader's pin thread calls this on each tensor it finds
        pinned.append(tensor)
        return tensor

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    pin_memory(batch)
    assert {id(tensor) for tensor in pinned} == {id(batch.images), id(batch.grids), id(batch.colour_factors)}


def test_on_cuda_each_batch_waits_for_its_own_copy_made_on_a_side_stream(monkeypatch):
    """The CUDA path, its stream calls recorded on the CPU: batch k + 1's copy is queued on the side stream before
    batch k is used, and the compute stream waits for batch k's copy (and marks its tensors) before using it."""
    events = []

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            events.append(("wait", self.name, other.name))

    side, compute, current = Stream("side"), Stream("compute"), []

    @contextlib.contextmanager
    def on(stream):
        current.append(stream)
        yield
        current.pop()

    def to(tensor, device, non_blocking=False):
        events.append(("copy", current[-1].name if current else "compute", non_blocking))
        return tensor.clone()

    monkeypatch.setattr(torch.cuda, "Stream", lambda device: side)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: compute)
    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda tensor, stream: events.append(("mark", stream.name)))
    loader = [(torch.zeros(2), "first"), None, (torch.ones(2), "last")]
    for batch in DevicePrefetcher(loader, torch.device("cuda")):
        events.append(("use", batch and batch[1]))
    copy, wait, mark = ("copy", "side", True), ("wait", "compute", "side"), ("mark", "compute")
    assert events == [copy, wait, mark, ("use", "first"), wait, copy, ("use", None), wait, mark, ("use", "last")]


@pytest.mark.skipif(sys.platform != "linux", reason="the loader chooses fork on Linux only")
def test_loader_workers_are_forked_on_linux(synthetic_root):
    dataset = build_dataset("synthetic", synthetic_root, train=True)
    with_workers = build_loader(dataset, batch_size=2, shuffle=False, num_workers=1, image_bytes=3 * 64 * 64)
    assert with_workers.multiprocessing_context.get_start_method() == "fork"
    in_process = build_loader(dataset, batch_size=2, shuffle=False, num_workers=0, image_bytes=3 * 64 * 64)
    assert in_process.multiprocessing_context is None  # the DataLoader takes none without workers


def test_started_workers_are_forked_at_once_and_given_no_work_before_the_first_iteration(synthetic_root):
    """So that a run can fork every loader's workers before it starts any thread: building the loader starts no
    thread (a queue's feeder starts with the first work queued)."""
    dataset = build_dataset("synthetic", synthetic_root, train=False,
                            transforms=EvalTransform(64, 4, len(make_synthetic.CLASS_NAMES)))
    expected = [batch.images for batch in build_loader(dataset, batch_size=3, shuffle=False, num_workers=0,
                                                       image_bytes=3 * 64 * 64)]
    threads = set(threading.enumerate())
    loader = build_loader(dataset, batch_size=3, shuffle=False, num_workers=1, pin_memory=False,
                          image_bytes=3 * 64 * 64, start_workers=True)
    (worker,) = loader._iterator._workers
    assert worker.is_alive() and set(threading.enumerate()) == threads
    for _ in range(2):  # every epoch whole, the first included
        batches = [batch.images for batch in loader]
        assert len(batches) == len(expected) and all(map(torch.equal, batches, expected))
    in_process = build_loader(dataset, batch_size=3, shuffle=False, num_workers=0, image_bytes=3 * 64 * 64,
                              start_workers=True)
    assert len([batch.images for batch in in_process]) == len(expected)
    with pytest.raises(ValueError, match=r"^start_workers takes shuffle=False"):
        build_loader(dataset, batch_size=3, shuffle=True, num_workers=1, image_bytes=3 * 64 * 64, start_workers=True)


def test_without_sigwaitinfo_a_worker_keeps_pytorchs_sigterm_handler(monkeypatch):
    """macOS has no sigwaitinfo: the worker set-up then changes nothing (no thread, no blocked signal)."""
    monkeypatch.delattr(signal, "sigwaitinfo", raising=False)
    threads, blocked = set(threading.enumerate()), signal.pthread_sigmask(signal.SIG_BLOCK, [])
    transforms.leave_stop_signals_to_the_main_process(0)
    assert set(threading.enumerate()) == threads and signal.pthread_sigmask(signal.SIG_BLOCK, []) == blocked


@pytest.mark.skipif(sys.platform != "linux", reason="the loader chooses fork on Linux only")
def test_a_loader_worker_ignores_a_sigterm_from_another_process_and_ends_on_its_parents(synthetic_root):
    """torchrun and SLURM signal every process of a job: a loader worker goes on (the training process saves,
    then closes it); its parent's SIGTERM (the loader's shutdown, the process's exit) still ends it."""
    dataset = build_dataset("synthetic", synthetic_root, train=False,
                            transforms=EvalTransform(64, 4, len(make_synthetic.CLASS_NAMES)))
    loader = build_loader(dataset, batch_size=1, shuffle=False, num_workers=1, prefetch_factor=1,
                          image_bytes=3 * 64 * 64)
    batches = iter(loader)
    next(batches)
    (worker,) = batches._workers
    subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)  # sent by a process that is not its parent
    # The worker makes the rest of this epoch and all of the next (persistent workers): it has met the signal.
    assert len(list(batches)) + 1 == len(loader) == len(list(loader)) and worker.is_alive()
    worker.terminate()  # SIGTERM from its parent
    worker.join(timeout=60)
    assert worker.exitcode == 0


@pytest.mark.skipif(not transforms.SHARED_MEMORY.is_dir(), reason="no /dev/shm on this platform")
def test_too_little_shared_memory_is_one_clear_error_before_any_worker_starts(synthetic_root, monkeypatch):
    dataset = build_dataset("synthetic", synthetic_root, train=True)
    mb = 2 ** 20
    asked = []

    def disk_usage(path):  # a Docker container's default: 64 MB
        asked.append(path)
        return SimpleNamespace(total=64 * mb, used=4 * mb, free=60 * mb)

    monkeypatch.setattr(transforms.shutil, "disk_usage", disk_usage)
    image_bytes = 3 * 448 * 448
    with pytest.raises(transforms.SharedMemoryError) as raised:
        build_loader(dataset, batch_size=16, shuffle=False, num_workers=4, prefetch_factor=4, image_bytes=image_bytes)
    # 4 workers x 4 batches ahead + 2 batches of 16 images of 448 x 448 x 3 bytes
    assert str(raised.value).startswith(f"/dev/shm has 60 MB free, and the loader needs about "
                                        f"{18 * 16 * image_bytes / mb:.0f} MB there")
    assert "docker run --shm-size=1g" in str(raised.value) and "\n" not in str(raised.value)
    assert all(word in str(raised.value) for word in ("num_workers", "prefetch_factor", "batch size"))
    assert asked == [Path("/dev/shm")]
    build_loader(dataset, batch_size=16, shuffle=False, num_workers=1, prefetch_factor=1, image_bytes=image_bytes)
    build_loader(dataset, batch_size=16, shuffle=False, num_workers=0, image_bytes=image_bytes)  # no workers: no check
    assert len(asked) == 2


@pytest.fixture
def empty_64_mb_shm(monkeypatch):
    """/dev/shm as a Docker container's default gives it: 64 MB, all free."""
    monkeypatch.setattr(transforms.shutil, "disk_usage",
                        lambda path: SimpleNamespace(total=64 * 2 ** 20, used=0, free=64 * 2 ** 20))


@pytest.mark.skipif(not transforms.SHARED_MEMORY.is_dir(), reason="no /dev/shm on this platform")
def test_the_validation_loader_counts_the_buffers_the_training_workers_keep(synthetic_root, empty_64_mb_shm):
    dataset = build_dataset("synthetic", synthetic_root, train=True)
    mb = 2 ** 20
    image_bytes = 3 * 448 * 448  # 9.2 MB batches of 16
    loading = {"num_workers": 1, "prefetch_factor": 2, "image_bytes": image_bytes}
    build_loader(dataset, batch_size=16, shuffle=False, reuse_image_buffers=True, **loading)  # 4 batches: 37 MB
    kept = transforms.reused_buffer_bytes(1, 2, 16 * image_bytes)
    assert kept == 4 * 16 * image_bytes
    build_loader(dataset, batch_size=16, shuffle=False, **loading)  # 1 x 2 + 2 batches alone: 37 MB
    with pytest.raises(transforms.SharedMemoryError) as raised:  # both: 74 MB
        build_loader(dataset, batch_size=16, shuffle=False, shared_memory_kept_by_others=kept, **loading)
    assert str(raised.value).startswith(f"/dev/shm has 64 MB free, and the loader needs about "
                                        f"{8 * 16 * image_bytes / mb:.0f} MB there")
    assert f"besides {kept / mb:.0f} MB that the training loader's workers keep" in str(raised.value)


@pytest.mark.skipif(not transforms.SHARED_MEMORY.is_dir(), reason="no /dev/shm on this platform")
def test_the_processes_of_a_machine_share_its_shared_memory(synthetic_root, empty_64_mb_shm, monkeypatch):
    """torchrun's processes on one machine each build the same loader: their need is counted together."""
    dataset = build_dataset("synthetic", synthetic_root, train=True)
    mb = 2 ** 20
    image_bytes = 3 * 448 * 448
    loading = {"batch_size": 16, "shuffle": False, "num_workers": 1, "prefetch_factor": 2, "image_bytes": image_bytes}
    per_process = 4 * 16 * image_bytes  # 1 x 2 + 2 batches: 37 MB
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    build_loader(dataset, **loading)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(transforms.SharedMemoryError) as raised:
        build_loader(dataset, **loading)
    assert str(raised.value).startswith(f"/dev/shm has 64 MB free, and the loader needs about "
                                        f"{2 * per_process / mb:.0f} MB there (num_workers 1 x prefetch_factor 2 + 2 "
                                        f"batches of {16 * image_bytes / mb:.1f} MB; the 2 processes on this machine "
                                        f"(LOCAL_WORLD_SIZE) need {per_process / mb:.0f} MB each).")
    assert f"docker run --shm-size={math.ceil(2 * per_process / 2 ** 30)}g" in str(raised.value)


def test_the_prefetcher_passes_batches_through_in_order_on_a_cpu_none_included():
    batches = [DetectionBatch(torch.full((1, 3, 2, 2), index), torch.zeros(1), None, []) for index in range(3)]
    batches.insert(1, None)  # every image of that micro-batch was skipped as unreadable
    prefetched = DevicePrefetcher(batches, torch.device("cpu"))
    assert len(prefetched) == 4
    assert [id(batch) for batch in prefetched] == [id(batch) for batch in batches]
    assert [id(batch) for batch in prefetched] == [id(batch) for batch in batches]  # and again, for the next epoch


def test_a_png_whose_image_data_stops_short_is_an_error_not_a_crash(tmp_path):
    """Its zlib stream is whole but holds fewer rows than the header's size: torchvision's decoder ends the process
    on it (libpng's "Not enough image data"), so PNGs are decoded by Pillow."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path = tmp_path / "short.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 10, 10, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    with pytest.raises(ImageDecodeError, match=r"short\.png: cannot decode image \(.*\); re-extract or replace"):
        decode_image(path)
