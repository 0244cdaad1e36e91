"""Generate a small synthetic detection dataset in PASCAL VOC, COCO or YOLO layout.

It exists so the whole pipeline (training, evaluation, benchmark) can be shown working on a CPU in
minutes. Each class is a distinct shape AND a distinct colour on a desaturated noisy background, objects
are large and rarely share a grid cell, so a YOLOv1 trained from scratch at 128 px (S=4) or 224 px (S=7)
learns it quickly. The output is byte-for-byte deterministic for a given seed: every image draws from
its own generator seeded by (seed, split, index), so `--train 16` is a prefix of `--train 1000`.

    python data/make_synthetic.py --out data/synthetic --train 800 --val 200 --seed 0   (the defaults)

writes Annotations/*.xml, JPEGImages/*.jpg, ImageSets/Main/{train,val}.txt and classes.txt. `--layout coco`
and `--layout yolo` write the same images and boxes in those layouts (yolo/formats.py describes all three; COCO
and YOLO have no difficult flag, so difficult objects are ordinary there). With `--layout imagefolder` it writes a
classification set instead (pretrain.py's input): {train,val}/<class>/*.jpg, square crops of one shape each.
Crosses carry a `<part>` (their hub), like VOC person parts, which readers must not take for objects.
"""
import argparse
import json
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import NamedTuple

import numpy as np
import yaml
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for the yolo package
from yolo.box_formats import voc_to_coco, voc_to_yolo  # noqa: E402

# (class name, RGB colour): hues far apart and saturated, unlike the grey background.
CLASSES = (
    ("circle", (220, 40, 40)),
    ("square", (40, 170, 60)),
    ("triangle", (40, 80, 230)),
    ("cross", (235, 200, 30)),
    ("diamond", (200, 50, 210)),
)
CLASS_NAMES = tuple(name for name, _ in CLASSES)
SPLIT_CODES = {"train": 0, "val": 1}

MIN_SIDE, MAX_SIDE = 160, 320

class Difficulty(NamedTuple):
    max_objects: int  # 1 to this many objects per image
    size_range: tuple[float, float]  # object side as a fraction of the image side
    tiny_probability: float  # chance that an object is tiny (and so marked difficult)


# "easy" (fewer, larger objects, none tiny) is what a from-scratch model learns within the CPU demo's minutes.
DIFFICULTIES = {
    "standard": Difficulty(max_objects=6, size_range=(0.15, 0.45), tiny_probability=0.06),
    "easy": Difficulty(max_objects=3, size_range=(0.25, 0.5), tiny_probability=0.0),
}
TINY_SIZE_RANGE = (0.05, 0.08)
MAX_COVERAGE = 0.3  # at most this fraction of a box may lie under boxes placed before it
DIFFICULT_VISIBLE_FRACTION = 0.4  # fewer visible pixels than this: difficult
# Centres are kept in distinct cells of both grids the demo uses, so a cell rarely holds two objects.
GRIDS = (4, 7)
JPEG_QUALITY = 90
NOISE_LEVEL = 24
PLACEMENT_TRIES = 40
# The classification crops (--layout imagefolder): a distinct seed stream, and the shape's side as a fraction
# of the crop, large as in an ImageNet photo of one object.
CLASSIFICATION_CODE = 7
CROP_OBJECT_SIZE_RANGE = (0.4, 0.9)


def shape_mask(class_name, width, height):
    """Filled mask (height, width) bool of one shape spanning the whole array."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    x2, y2 = width - 1, height - 1
    cx, cy = x2 / 2, y2 / 2
    if class_name == "circle":
        draw.ellipse((0, 0, x2, y2), fill=1)
    elif class_name == "square":
        draw.rectangle((0, 0, x2, y2), fill=1)
    elif class_name == "triangle":
        draw.polygon([(0, y2), (cx, 0), (x2, y2)], fill=1)
    elif class_name == "cross":
        third_w, third_h = width / 3, height / 3
        draw.rectangle((0, cy - third_h / 2, x2, cy + third_h / 2), fill=1)
        draw.rectangle((cx - third_w / 2, 0, cx + third_w / 2, y2), fill=1)
    elif class_name == "diamond":
        draw.polygon([(cx, 0), (x2, cy), (cx, y2), (0, cy)], fill=1)
    else:
        raise ValueError(f"unknown synthetic class {class_name!r}")
    return np.asarray(canvas, dtype=bool)


def background(rng, width, height):
    """Desaturated blotchy texture plus pixel noise, so objects must be found by shape and colour."""
    base = rng.uniform(70, 170)
    coarse = rng.normal(0, 18, size=(height // 16 + 2, width // 16 + 2, 1)) + rng.normal(0, 6, size=(1, 1, 3))
    # Capped so that adding the uint8 noise below cannot overflow.
    coarse = np.clip(base + coarse, 0, 255 - NOISE_LEVEL).astype(np.uint8)
    texture = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR))
    return texture + rng.integers(0, NOISE_LEVEL + 1, size=(height, width, 3), dtype=np.uint8)


def _grid_cells(box, width, height):
    cx = (box[0] + box[2] + 1) / 2 / width
    cy = (box[1] + box[3] + 1) / 2 / height
    return {(s, min(int(cx * s), s - 1), min(int(cy * s), s - 1)) for s in GRIDS}


def _coverage(box, others):
    """Fraction of `box` covered by `others`; overlaps are summed, an upper bound where others overlap too."""
    area = (box[2] - box[0] + 1) * (box[3] - box[1] + 1)
    covered = 0
    for other in others:
        w = min(box[2], other[2]) - max(box[0], other[0]) + 1
        h = min(box[3], other[3]) - max(box[1], other[1]) + 1
        covered += max(w, 0) * max(h, 0)
    return covered / area


def place_objects(rng, width, height, difficulty):
    """Choose (class index, 0-based inclusive box, tiny) with modest overlap and distinct grid cells."""
    placed, used_cells = [], set()
    for _ in range(rng.integers(1, difficulty.max_objects + 1)):
        for _ in range(PLACEMENT_TRIES):
            tiny = rng.random() < difficulty.tiny_probability
            low, high = TINY_SIZE_RANGE if tiny else difficulty.size_range
            side = rng.uniform(low, high) * min(width, height)
            aspect = rng.uniform(0.7, 1.4)
            w = max(int(side * aspect ** 0.5), 4)
            h = max(int(side / aspect ** 0.5), 4)
            x1, y1 = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
            box = (x1, y1, x1 + w - 1, y1 + h - 1)
            cells = _grid_cells(box, width, height)
            boxes = [b for _, b, _ in placed]
            if cells & used_cells and not tiny:
                continue
            if _coverage(box, boxes) > MAX_COVERAGE or any(_coverage(b, [box]) > MAX_COVERAGE for b in boxes):
                continue
            placed.append((int(rng.integers(len(CLASSES))), box, tiny))
            used_cells |= cells
            break
    return placed


def paint_shape(rng, pixels, class_index, box):
    """Fill the 0-based inclusive `box` of `pixels` with the class's shape in a jittered shade of its colour;
    return the box's region (slices) and the shape's mask within it."""
    name, colour = CLASSES[class_index]
    x1, y1, x2, y2 = box
    region = (slice(y1, y2 + 1), slice(x1, x2 + 1))
    mask = shape_mask(name, x2 - x1 + 1, y2 - y1 + 1)
    shade = np.clip(np.array(colour) + rng.integers(-20, 21, size=3), 0, 255).astype(np.uint8)
    pixels[region][mask] = shade
    return region, mask


def render_image(rng, width, height, difficulty=DIFFICULTIES["standard"]):
    """Draw one image; return (H, W, 3) uint8 pixels and its objects as dicts with VOC boxes."""
    pixels = background(rng, width, height)
    owner = np.zeros((height, width), dtype=np.int16)  # which object is on top at each pixel (1-based)
    objects, regions = [], []
    for number, (class_index, box, tiny) in enumerate(place_objects(rng, width, height, difficulty), start=1):
        name = CLASSES[class_index][0]
        x1, y1 = box[:2]
        region, mask = paint_shape(rng, pixels, class_index, box)
        owner[region][mask] = number
        ys, xs = np.nonzero(mask)
        # Tight box from the drawn pixels, converted to VOC's 1-based inclusive convention.
        voc_box = (x1 + int(xs.min()) + 1, y1 + int(ys.min()) + 1, x1 + int(xs.max()) + 1, y1 + int(ys.max()) + 1)
        objects.append({"name": name, "bndbox": voc_box, "difficult": tiny})
        regions.append((region, mask))
        if name == "cross":
            cx, cy = (voc_box[0] + voc_box[2]) // 2, (voc_box[1] + voc_box[3]) // 2
            objects[-1]["part"] = ("hub", (cx - 2, cy - 2, cx + 2, cy + 2))
    for number, (obj, (region, mask)) in enumerate(zip(objects, regions), start=1):
        visible = np.count_nonzero(owner[region][mask] == number) / np.count_nonzero(mask)
        obj["difficult"] = obj["difficult"] or visible < DIFFICULT_VISIBLE_FRACTION
    return pixels, objects


def annotation_xml(filename, width, height, objects, folder="synthetic"):
    """VOC annotation XML text; objects are dicts with name, bndbox (VOC pixels), difficult, optional part."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = folder
    ET.SubElement(root, "filename").text = filename
    size = ET.SubElement(root, "size")
    for tag, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    ET.SubElement(root, "segmented").text = "0"
    for obj in objects:
        element = ET.SubElement(root, "object")
        ET.SubElement(element, "name").text = obj["name"]
        ET.SubElement(element, "pose").text = "Unspecified"
        ET.SubElement(element, "truncated").text = "0"
        ET.SubElement(element, "difficult").text = str(int(obj["difficult"]))
        _add_bndbox(element, obj["bndbox"])
        if "part" in obj:
            part = ET.SubElement(element, "part")
            ET.SubElement(part, "name").text = obj["part"][0]
            _add_bndbox(part, obj["part"][1])
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"


def _add_bndbox(parent, box):
    bndbox = ET.SubElement(parent, "bndbox")
    for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), box):
        ET.SubElement(bndbox, tag).text = str(value)


def save_jpeg(pixels, path):
    Image.fromarray(pixels).save(path, quality=JPEG_QUALITY)


def write_voc_item(root, image_id, pixels, objects):
    """Write one JPEG and its annotation under a VOC-layout root."""
    height, width = pixels.shape[:2]
    save_jpeg(pixels, root / "JPEGImages" / f"{image_id}.jpg")
    xml = annotation_xml(f"{image_id}.jpg", width, height, objects)
    (root / "Annotations" / f"{image_id}.xml").write_text(xml)


def make_voc_dirs(root):
    root = Path(root)
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return root


class VOCWriter:
    """Annotations/<id>.xml, JPEGImages/<id>.jpg, ImageSets/Main/<split>.txt and classes.txt."""

    def __init__(self, root):
        self.root = make_voc_dirs(root)

    def add(self, split, image_id, pixels, objects):
        write_voc_item(self.root, image_id, pixels, objects)

    def end_split(self, split, image_ids):
        (self.root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in image_ids))

    def end(self):
        (self.root / "classes.txt").write_text("".join(f"{name}\n" for name in CLASS_NAMES))


class COCOWriter:
    """images/<split>/<id>.jpg and annotations/instances_<split>.json; category ids 1..N as in COCO's files.
    Difficult objects are ordinary (iscrowd=1 marks a crowd region, which is not trained on)."""

    def __init__(self, root):
        self.root = Path(root)
        self.images, self.annotations = [], []

    def add(self, split, image_id, pixels, objects):
        folder = self.root / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        save_jpeg(pixels, folder / f"{image_id}.jpg")
        height, width = pixels.shape[:2]
        self.images.append({"id": len(self.images) + 1, "file_name": f"{image_id}.jpg", "width": width,
                            "height": height})
        for obj in objects:
            x, y, w, h = voc_to_coco(np.array([obj["bndbox"]]))[0].tolist()
            self.annotations.append({"id": len(self.annotations) + 1, "image_id": self.images[-1]["id"],
                                     "category_id": CLASS_NAMES.index(obj["name"]) + 1, "bbox": [x, y, w, h],
                                     "area": w * h, "iscrowd": 0})

    def end_split(self, split, image_ids):
        (self.root / "images" / split).mkdir(parents=True, exist_ok=True)
        (self.root / "annotations").mkdir(exist_ok=True)
        categories = [{"id": index + 1, "name": name, "supercategory": "shape"}
                      for index, name in enumerate(CLASS_NAMES)]
        (self.root / "annotations" / f"instances_{split}.json").write_text(json.dumps(
            {"images": self.images, "annotations": self.annotations, "categories": categories}))
        self.images, self.annotations = [], []

    def end(self):
        pass


class YOLOWriter:
    """images/<split>/<id>.jpg, labels/<split>/<id>.txt (coordinates written in full, so they read back to the
    same boxes) and data.yaml."""

    def __init__(self, root):
        self.root = Path(root)

    def add(self, split, image_id, pixels, objects):
        for folder in ("images", "labels"):
            (self.root / folder / split).mkdir(parents=True, exist_ok=True)
        save_jpeg(pixels, self.root / "images" / split / f"{image_id}.jpg")
        height, width = pixels.shape[:2]
        rows = voc_to_yolo(np.array([obj["bndbox"] for obj in objects]).reshape(-1, 4), width, height)
        lines = [f"{CLASS_NAMES.index(obj['name'])} {' '.join(repr(float(value)) for value in row)}\n"
                 for obj, row in zip(objects, rows)]
        (self.root / "labels" / split / f"{image_id}.txt").write_text("".join(lines))

    def end_split(self, split, image_ids):
        (self.root / "images" / split).mkdir(parents=True, exist_ok=True)

    def end(self):
        (self.root / "data.yaml").write_text(yaml.safe_dump(
            {"train": "images/train", "val": "images/val", "names": dict(enumerate(CLASS_NAMES))}, sort_keys=False))


WRITERS = {"voc": VOCWriter, "coco": COCOWriter, "yolo": YOLOWriter}


def generate(out, train=800, val=200, seed=0, difficulty="standard", layout="voc"):
    """Write the dataset under `out` (created if needed) in `layout` (voc, coco or yolo: the same images and
    boxes); return {split: [image ids]}."""
    writer = WRITERS[layout](out)
    splits = {}
    for split, count in (("train", train), ("val", val)):
        ids = []
        for index in range(count):
            rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
            width, height = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2))
            pixels, objects = render_image(rng, width, height, DIFFICULTIES[difficulty])
            image_id = f"{split}_{index:06d}"
            writer.add(split, image_id, pixels, objects)
            ids.append(image_id)
        writer.end_split(split, ids)
        splits[split] = ids
    writer.end()
    return splits


def generate_classification(out, train=200, val=50, seed=0, size=64):
    """Write an ImageFolder classification set under `out`: {train,val}/<class>/<id>.jpg, `size` x `size`
    crops each centred loosely on one shape, classes in turn (so every class has images in both splits
    once a split has as many images as there are classes). Return {split: number of images}."""
    out = Path(out)
    for split, count in (("train", train), ("val", val)):
        for name in CLASS_NAMES:
            (out / split / name).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            rng = np.random.default_rng([seed, SPLIT_CODES[split], index, CLASSIFICATION_CODE])
            class_index = index % len(CLASSES)
            pixels = background(rng, size, size)
            side = rng.uniform(*CROP_OBJECT_SIZE_RANGE) * size
            aspect = rng.uniform(0.7, 1.4)
            w, h = max(int(side * aspect ** 0.5), 4), max(int(side / aspect ** 0.5), 4)
            w, h = min(w, size), min(h, size)
            x1, y1 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            paint_shape(rng, pixels, class_index, (x1, y1, x1 + w - 1, y1 + h - 1))
            save_jpeg(pixels, out / split / CLASS_NAMES[class_index] / f"{split}_{index:06d}.jpg")
    return {"train": train, "val": val}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/synthetic", help="output folder")
    parser.add_argument("--train", type=int, default=800, help="number of training images")
    parser.add_argument("--val", type=int, default=200, help="number of validation images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--difficulty", choices=tuple(DIFFICULTIES), default="standard",
                        help="standard: 1-6 objects, some tiny and difficult; easy: 1-3 larger objects")
    parser.add_argument("--format", "--layout", dest="layout", choices=(*WRITERS, "imagefolder"), default="voc",
                        help="voc, coco, yolo: the detection set in that layout (the same images and boxes); "
                             "imagefolder: classification crops of one shape each (train/ and val/, one folder per "
                             "class), for pretrain.py")
    parser.add_argument("--size", type=int, default=64, help="side of the imagefolder crops in pixels")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.layout == "imagefolder":
        generate_classification(args.out, args.train, args.val, args.seed, args.size)
    else:
        generate(args.out, args.train, args.val, args.seed, args.difficulty, args.layout)
    print(f"wrote {args.train} train + {args.val} val images to {args.out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
