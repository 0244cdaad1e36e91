"""EXIF orientation: photos are read as displayed, in every decode, every header size and every layout."""
import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision.io
from PIL import Image, ImageOps

import evaluate
import detect
from data import make_synthetic
from yolo.api import load_detector
from yolo.config import resolve_config
from yolo.data import build_dataset, decode_image
from yolo.imagecheck import header_size
from yolo.orientation import header_orientation, upright
from yolo.transforms import EvalTransform

# The turn that stores a displayed image so that orientation `o` shows it again (PIL's exif_transpose undoes it).
STORED_BY = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
             4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
             7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}
ORIENTATIONS = range(1, 9)


def save_as_stored(displayed: Image.Image, orientation: int, path, file_format="JPEG", **options):
    """Write `displayed` the way a camera does: the pixels turned, and the tag that turns them back."""
    stored = displayed if STORED_BY[orientation] is None else displayed.transpose(STORED_BY[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, file_format, exif=exif.tobytes(), **options)
    with Image.open(path) as written:  # the test's own premise, checked with Pillow alone
        assert ImageOps.exif_transpose(written).size == displayed.size


def pixels_of(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_each_format_decodes_as_displayed_with_its_header_size(tmp_path, orientation):
    """Against two references: Pillow's exif_transpose for every format, torchvision's own EXIF rotation for
    JPEG (the same decoder: equal to the bit)."""
    displayed = Image.fromarray(np.random.default_rng(orientation).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    for file_format, suffix, options in (("JPEG", "jpg", {}), ("PNG", "png", {}),
                                         ("WEBP", "webp", {"lossless": True}), ("TIFF", "tif", {})):
        path = tmp_path / f"photo.{suffix}"
        save_as_stored(displayed, orientation, path, file_format, **options)
        decoded = decode_image(path)
        with Image.open(path) as image:
            assert torch.equal(decoded, pixels_of(ImageOps.exif_transpose(image))), file_format
        if file_format == "JPEG":
            with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders; yolo.data says why it stays
                warnings.simplefilter("ignore", DeprecationWarning)
                reference = torchvision.io.decode_image(str(path), torchvision.io.ImageReadMode.RGB,
                                                        apply_exif_orientation=True)
            assert torch.equal(decoded, reference)
        if file_format != "JPEG":
            assert torch.equal(decoded, pixels_of(displayed)), file_format
        assert header_size(path) == (50, 30), file_format


def test_upright_on_a_batch_and_a_damaged_or_missing_tag(tmp_path):
    stored = torch.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    assert torch.equal(upright(stored, 6), stored.rot90(-1, dims=(-2, -1)))  # a quarter turn clockwise
    assert torch.equal(upright(stored, 8), stored.rot90(1, dims=(-2, -1)))
    for orientation in (0, 1, 9, (6,)):  # not an orientation: the pixels as stored
        assert torch.equal(upright(stored, orientation), stored)
    path = tmp_path / "odd.jpg"
    Image.new("RGB", (8, 4)).save(path, exif=b"Exif\x00\x00II*\x00\xff\xff\xff\x7f")  # an IFD offset past the end
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's "Corrupt EXIF data" is not repeated at every decode
        assert decode_image(path).shape == (3, 4, 8) and header_size(path) == (8, 4)
    stored = Image.fromarray(np.random.default_rng(0).integers(0, 256, (4, 8, 3), dtype=np.uint8))
    for suffix in ("png", "webp"):  # an EXIF block that is not TIFF data: Pillow raises reading it
        stored.save(tmp_path / f"damaged.{suffix}", exif=b"XX*\x00\x08\x00\x00\x00", lossless=True)
        with Image.open(tmp_path / f"damaged.{suffix}") as image:
            assert header_orientation(image) == 1
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.equal(decode_image(tmp_path / f"damaged.{suffix}"), pixels_of(stored))
    Image.new("RGB", (8, 4)).save(tmp_path / "odd.png", exif=b"Exif\x00\x00II*\x00\xff\xff\xff\x7f")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # through Pillow (every PNG is) as well
        assert decode_image(tmp_path / "odd.png").shape == (3, 4, 8)
    exif = Image.Exif()
    exif[0x010F] = "a camera that writes no orientation"  # Make
    Image.new("RGB", (8, 4)).save(tmp_path / "untagged.jpg", exif=exif.tobytes())
    with Image.open(tmp_path / "untagged.jpg") as image:
        assert header_orientation(image) == 1
    Image.new("RGB", (8, 4)).save(tmp_path / "plain.png")
    with Image.open(tmp_path / "plain.png") as image:
        assert header_orientation(image) == 1 and image.tile  # its pixels are still to decode: not read to find out


def test_predict_takes_a_path_or_a_pil_image_as_displayed_and_arrays_as_they_are(overfit_run, tmp_path):
    data_dir, run_dir = overfit_run
    detector = load_detector(run_dir / "last.pt", dtype="fp32")
    original = sorted((data_dir / "JPEGImages").glob("*.jpg"))[0]
    displayed = decode_image(original)
    path = tmp_path / "phone.png"
    save_as_stored(Image.fromarray(displayed.permute(1, 2, 0).numpy()), 6, path, "PNG")
    expected = detector.predict(displayed)
    with Image.open(path) as image:
        for source in (path, image):
            result = detector.predict(source)
            assert torch.equal(result.boxes, expected.boxes) and torch.equal(result.scores, expected.scores)
        stored = np.array(image)
    assert stored.shape[:2] == displayed.shape[2:0:-1]  # sideways, and an array is taken as it is
    assert len(expected.boxes) > 0


# Two shapes at places that a wrong turn moves: (class, (x1, y1, x2, y2) VOC pixels, colour) in a 48 x 32 image.
SHAPES = (("circle", (6, 21, 15, 30), (255, 0, 0)), ("square", (31, 3, 44, 12), (0, 0, 255)))


def displayed_photo() -> np.ndarray:
    pixels = np.full((32, 48, 3), 128, dtype=np.uint8)
    for _, (x1, y1, x2, y2), colour in SHAPES:
        pixels[y1 - 1:y2, x1 - 1:x2] = colour
    return pixels


@pytest.mark.parametrize("layout", make_synthetic.WRITERS)
def test_every_layout_reads_boxes_labelled_as_displayed_on_the_displayed_pixels(tmp_path, layout):
    """One photo per orientation, boxes labelled on the displayed image (as annotation tools do): each box lies
    on its shape's colour, without a size warning, and its target lands in the displayed cell."""
    writer = make_synthetic.WRITERS[layout](tmp_path)
    objects = [{"name": name, "bndbox": box, "difficult": False} for name, box, _ in SHAPES]
    ids = [f"photo{orientation}" for orientation in ORIENTATIONS]
    for image_id in ids:
        writer.add("train", image_id, displayed_photo(), objects)
    writer.end_split("train", ids)
    writer.end()
    for orientation, image_id in zip(ORIENTATIONS, ids):
        (path,) = tmp_path.rglob(f"{image_id}.jpg")
        save_as_stored(Image.fromarray(displayed_photo()), orientation, path, quality=95)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "decoded size differs" would be one
        dataset = build_dataset("custom", tmp_path, train=True, data_format=layout)
        transform = EvalTransform(64, 4, len(make_synthetic.CLASS_NAMES))
        for index in range(len(ids)):
            image, annotation = dataset[index]
            assert image.shape == (3, 32, 48)
            for (x1, y1, x2, y2), label in zip(annotation["boxes"].round().astype(int), annotation["labels"]):
                _, _, colour = SHAPES[int(label)]
                inside = image[:, y1 - 1:y2, x1 - 1:x2].float().mean(dim=(1, 2))
                np.testing.assert_allclose(inside.numpy(), colour, atol=48, err_msg=f"{ids[index]} {layout}")
            _, target = transform(image, annotation)
            # The circle's centre (10.5, 25.5) of 48 x 32 is in row 3, column 0 of the 4 x 4 grid; the square's
            # (37.5, 7.5) in row 0, column 3. The class channels follow x, y, w, h and confidence.
            assert target["grid"][3, 0, 5 + make_synthetic.CLASS_NAMES.index("circle")] == 1
            assert target["grid"][0, 3, 5 + make_synthetic.CLASS_NAMES.index("square")] == 1


def oriented_copy(data_dir, layout, out, turned=True):
    """The overfit set in `layout`, as split val, its images stored turned (orientations 1-8 in turn, with their
    tags) or upright. PNG inside each .jpg name, which is lossless: the displayed pixels are exactly the
    original's, so every number computed from them must be the same."""
    dataset = build_dataset("custom", data_dir, train=False)
    writer = make_synthetic.WRITERS[layout](out)
    for index, annotation in enumerate(dataset.annotations):
        objects = [{"name": make_synthetic.CLASS_NAMES[label], "bndbox": box.tolist(), "difficult": bool(hard)}
                   for box, label, hard in zip(annotation["boxes"], annotation["labels"], annotation["difficult"])]
        writer.add("val", dataset.image_ids[index], np.zeros((annotation["height"], annotation["width"], 3),
                                                             dtype=np.uint8), objects)
        (path,) = out.rglob(f"{dataset.image_ids[index]}.jpg")
        displayed = Image.fromarray(decode_image(dataset.image_path(index)).permute(1, 2, 0).numpy())
        save_as_stored(displayed, ORIENTATIONS[index % 8] if turned else 1, path, "PNG")
    writer.end_split("val", dataset.image_ids)
    writer.end()
    return dataset


def evaluate_metrics(checkpoint, out_dir, *overrides):
    evaluate.main(resolve_config(vars(evaluate), [f"--checkpoint={checkpoint}", f"--out_dir={out_dir}",
                                                  "--num_workers=0", "--num_examples=0", *overrides],
                                 rules=evaluate.RULES))
    return pd.read_csv(out_dir / "metrics.csv").iloc[0][list(evaluate.METRIC_COLUMNS)]


def test_phone_photos_evaluate_and_detect_as_their_upright_originals_in_every_layout(overfit_run, tmp_path):
    data_dir, run_dir = overfit_run
    checkpoint = run_dir / "last.pt"
    for layout in make_synthetic.WRITERS:  # YOLO has no difficult flag: its upright copy is its reference
        metrics = {}
        for name, turned in ((layout, True), (f"{layout}_upright", False)):
            oriented_copy(data_dir, layout, tmp_path / name, turned)
            metrics[name] = evaluate_metrics(checkpoint, tmp_path / f"{name}_metrics", f"--data_dir={tmp_path / name}",
                                             f"--data_format={layout}", "--val_split=val")
        assert metrics[layout]["voc12_map"] > 0.5
        pd.testing.assert_series_equal(metrics[layout], metrics[f"{layout}_upright"], obj=layout)

    # detect.py: the same detections, and annotated copies drawn upright (the same pixels as the originals').
    for source, out in ((data_dir / "JPEGImages", "upright_detect"), (tmp_path / "voc" / "JPEGImages", "detect")):
        detect.main(resolve_config(vars(detect), [f"--checkpoint={checkpoint}", f"--source={source}",
                                                  f"--out_dir={tmp_path / out}", "--dtype=fp32"], rules=detect.RULES))
    rows = {out: [{key: value for key, value in row.items() if key != "source"}
                  for row in json.loads((tmp_path / out / "detections.json").read_text())]
            for out in ("upright_detect", "detect")}
    assert rows["detect"] == rows["upright_detect"] and len(rows["detect"]) >= 8
    for path in sorted((tmp_path / "upright_detect").glob("*.jpg")):
        assert torch.equal(decode_image(tmp_path / "detect" / path.name), decode_image(path))
