import hashlib
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from PIL import Image

from command_lines import run_python
from data import make_synthetic
from yolo.data import build_dataset
from yolo.formats import detect_format, read_class_names, read_voc_annotation

SCRIPT = Path(__file__).resolve().parents[1] / "data" / "make_synthetic.py"


def file_hashes(root):
    return {path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()}


def split_ids(root, split):
    return (root / "ImageSets" / "Main" / f"{split}.txt").read_text().split()


def test_same_seed_same_bytes_and_cli(tmp_path, synthetic_root):
    # The CLI with the fixture's arguments (seed 0) must reproduce the fixture byte for byte.
    out = tmp_path / "again"
    run_python([sys.executable, str(SCRIPT), "--out", str(out), "--seed", "0",
                    "--train", str(len(split_ids(synthetic_root, "train"))),
                    "--val", str(len(split_ids(synthetic_root, "val")))], check=True, capture_output=True, text=True)
    assert file_hashes(out) == file_hashes(synthetic_root)


def test_other_seed_differs_and_smaller_set_is_a_prefix(tmp_path, synthetic_root):
    make_synthetic.generate(tmp_path / "seed1", train=2, val=0, seed=1)
    make_synthetic.generate(tmp_path / "small", train=2, val=0, seed=0)
    small = file_hashes(tmp_path / "small")
    reference = file_hashes(synthetic_root)
    assert file_hashes(tmp_path / "seed1")["JPEGImages/train_000000.jpg"] != small["JPEGImages/train_000000.jpg"]
    for name in ("JPEGImages/train_000001.jpg", "Annotations/train_000001.xml"):
        assert small[name] == reference[name]


def test_layout_and_learnable_properties(synthetic_root):
    class_names = read_class_names(synthetic_root / "classes.txt")
    assert class_names == make_synthetic.CLASS_NAMES
    image_ids = split_ids(synthetic_root, "train") + split_ids(synthetic_root, "val")
    assert len(image_ids) >= 16
    sizes, shared_cells, objects, parts = set(), 0, 0, 0
    for image_id in image_ids:
        xml_path = synthetic_root / "Annotations" / f"{image_id}.xml"
        annotation = read_voc_annotation(xml_path, class_names)
        width, height = annotation["width"], annotation["height"]
        sizes.add((width, height))
        assert make_synthetic.MIN_SIDE <= min(width, height) and max(width, height) <= make_synthetic.MAX_SIDE
        assert 1 <= len(annotation["labels"]) <= make_synthetic.DIFFICULTIES["standard"].max_objects
        boxes = annotation["boxes"]
        assert (boxes[:, :2] >= 1).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
        assert (boxes == boxes.round()).all()  # integer pixels, as VOC writes them
        easy = boxes[~annotation["difficult"]]
        side = ((easy[:, 2:] - easy[:, :2] + 1) / [width, height]).max(axis=1)
        assert (side > 0.08).all() and (side < 0.6).all()
        centres = (easy[:, :2] - 1 + easy[:, 2:]) / 2 / [width, height]
        cells = {tuple(cell) for cell in (centres * 4).astype(int).clip(max=3).tolist()}
        shared_cells += len(easy) - len(cells)
        objects += len(annotation["labels"])
        parts += len(ET.parse(xml_path).getroot().findall("object/part"))
    assert len(sizes) > 1 and any(w != h for w, h in sizes)
    assert shared_cells == 0
    assert parts > 0  # crosses carry a <part>, which readers must ignore
    assert objects >= 2 * len(image_ids)


def test_easy_difficulty_has_fewer_larger_objects(tmp_path):
    make_synthetic.generate(tmp_path, train=20, val=0, seed=0, difficulty="easy")
    dataset = build_dataset("synthetic", tmp_path, train=True)
    for annotation in dataset.annotations:
        assert 1 <= len(annotation["labels"]) <= 3
        sides = (annotation["boxes"][:, 2:] - annotation["boxes"][:, :2] + 1).min(axis=1)
        assert (sides >= 0.2 * min(annotation["width"], annotation["height"])).all()


def test_classification_crops_are_deterministic_and_cover_every_class_in_both_splits(tmp_path):
    make_synthetic.generate_classification(tmp_path / "a", train=12, val=5, seed=0, size=48)
    run_python([sys.executable, str(SCRIPT), "--layout", "imagefolder", "--out", str(tmp_path / "b"),
                    "--train", "12", "--val", "5", "--seed", "0", "--size", "48"], check=True, capture_output=True, text=True)
    assert file_hashes(tmp_path / "a") == file_hashes(tmp_path / "b")
    for split, count in (("train", 12), ("val", 5)):
        folders = sorted(path.name for path in (tmp_path / "a" / split).iterdir())
        assert folders == sorted(make_synthetic.CLASS_NAMES)
        images = sorted((tmp_path / "a" / split).rglob("*.jpg"))
        assert len(images) == count and all(len(list((tmp_path / "a" / split / name).glob("*.jpg"))) >= 1
                                            for name in folders)
    assert Image.open(images[0]).size == (48, 48)


def test_the_layout_is_chosen_by_format_or_its_alias_layout(tmp_path):
    for option, layout in (("--format", "coco"), ("--layout", "yolo")):
        make_synthetic.main(["--out", str(tmp_path / layout), "--train", "2", "--val", "1", option, layout])
        assert detect_format(tmp_path / layout) == layout
