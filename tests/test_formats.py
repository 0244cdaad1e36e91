"""Own data in the VOC, COCO and YOLO layouts: the same set reads the same in each, and each reader's edge cases."""
import contextlib
import io
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from command_lines import ROOT, run_python
from data import make_synthetic
from yolo.data import build_dataset
from yolo.box_formats import voc_to_yolo, yolo_to_voc
from yolo.engine import ground_truth_array
from yolo.formats import (AnnotationError, MAX_LISTED_PROBLEMS, detect_format, has_area_inside, read_splits,
                          read_voc_annotation, yolo_label_path)
from yolo.metrics import evaluate_detections
from yolo.transforms import EvalTransform, TrainTransform

CLASSES = ("Stop Sign", "Traffic Light")  # spaces and capitals, as a user's own classes have them


def save_image(path, width, height):
    """Random pixels in the format the file's extension names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


def fixed_detections(ground_truths):
    """Detections near every ground truth (shifted by a pixel or two, scores falling) and one of the wrong class."""
    detections = []
    for index, truth in enumerate(ground_truths):
        boxes = truth[:, :4] + [1.5, -1.0, -2.0, 0.5]
        scores = 0.9 - 0.1 * np.arange(len(truth)) - 0.01 * index
        wrong = [[*truth[0, :4], 0.95, (truth[0, 4] + 1) % len(make_synthetic.CLASS_NAMES)]]
        detections.append(np.concatenate([np.column_stack([boxes, scores, truth[:, 4]]), wrong]))
    return detections


def test_the_same_set_in_the_three_layouts_gives_the_same_targets_and_metrics(tmp_path):
    for layout in ("voc", "coco"):
        make_synthetic.generate(tmp_path / layout, train=6, val=0, seed=0, layout=layout)
    make_synthetic.main(["--out", str(tmp_path / "yolo"), "--train", "6", "--val", "0", "--layout", "yolo"])
    num_classes = len(make_synthetic.CLASS_NAMES)
    datasets = {}
    for layout in ("voc", "coco", "yolo"):
        assert detect_format(tmp_path / layout) == layout
        datasets[layout] = build_dataset("custom", tmp_path / layout, train=True,
                                         transforms=EvalTransform(64, 4, num_classes))
        assert datasets[layout].class_names == make_synthetic.CLASS_NAMES
        assert datasets[layout].image_ids == [f"train_{index:06d}" for index in range(6)]
    truths = {layout: [ground_truth_array(annotation) for annotation in dataset.annotations]
              for layout, dataset in datasets.items()}
    assert any(truth[:, 5].any() for truth in truths["voc"])
    for voc, coco, yolo in zip(*truths.values()):
        # COCO and YOLO have no difficult flag: the same objects, all ordinary.
        for other in (coco, yolo):
            np.testing.assert_array_equal(other, np.column_stack([voc[:, :5], np.zeros(len(voc))]))
    for index in range(6):
        (voc_image, voc_target), *others = (datasets[layout][index] for layout in ("voc", "coco", "yolo"))
        for image, target in others:
            assert torch.equal(image, voc_image)
            for key in ("grid", "boxes", "labels", "orig_size"):
                assert torch.equal(target[key], voc_target[key]), key

    detections = fixed_detections(truths["voc"])
    voc_metrics = evaluate_detections(detections, truths["voc"], num_classes)
    assert 0 < voc_metrics["coco_map"] < voc_metrics["voc12_map"] < 1
    without_difficult = evaluate_detections(
        detections, [np.column_stack([truth[:, :5], np.zeros(len(truth))]) for truth in truths["voc"]], num_classes)
    for layout in ("coco", "yolo"):
        np.testing.assert_equal(evaluate_detections(detections, truths[layout], num_classes), without_difficult)


def write_voc(root, items, split="train"):
    """items: (image id, image file name, [(class, VOC box)]), each image 40 x 30."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("".join(f"{name}\n" for name in CLASSES))
    for image_id, file_name, objects in items:
        save_image(root / "JPEGImages" / file_name, 40, 30)
        xml = make_synthetic.annotation_xml(file_name, 40, 30, [
            {"name": name, "bndbox": box, "difficult": False} for name, box in objects])
        (root / "Annotations" / f"{image_id}.xml").write_text(xml)
    # Windows line ends and a blank line: only each line's ends are stripped.
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\r\n" for i, _, _ in items) + "\n")


def test_voc_png_image_id_with_a_space_and_a_custom_split(tmp_path):
    write_voc(tmp_path, [("road sign 1", "road sign 1.png", [("Traffic Light", (3, 4, 20, 25))]),
                         ("b", "b.JPEG", [("Stop Sign", (1, 1, 40, 30))])], split="fold A")
    dataset = build_dataset("custom", tmp_path, train=True, split="fold A")
    assert dataset.class_names == CLASSES
    assert dataset.image_ids == ["road sign 1", "b"]
    assert [dataset.image_path(index).name for index in range(2)] == ["road sign 1.png", "b.JPEG"]
    image, annotation = dataset[0]
    assert image.shape == (3, 30, 40) and annotation["labels"].tolist() == [1]
    np.testing.assert_array_equal(annotation["boxes"], [[3, 4, 20, 25]])


def test_a_voc_id_with_a_dot_matches_its_own_image_and_a_one_pixel_box_is_kept(tmp_path):
    """The image's extension is what follows the last dot (img.v2.jpg is id img.v2, beside an id img); a box one
    pixel wide and high (xmin == xmax, ymin == ymax: VOC boxes are inclusive) is an object."""
    write_voc(tmp_path, [("img.v2", "img.v2.jpg", [("Stop Sign", (5, 6, 5, 6))]),
                         ("img", "img.png", [("Traffic Light", (2, 3, 30, 20))])])
    dataset = build_dataset("custom", tmp_path, train=True)
    assert dataset.image_ids == ["img.v2", "img"]
    assert [dataset.image_path(index).name for index in range(2)] == ["img.v2.jpg", "img.png"]
    np.testing.assert_array_equal(dataset.annotations[0]["boxes"], [[5, 6, 5, 6]])
    assert dataset.annotations[0]["labels"].tolist() == [0]


def write_coco(root, split, images, annotations, categories):
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": categories}, indent=1))


def test_coco_bridge_category_ids_iscrowd_and_cocos_own_image_folder(tmp_path):
    # COCO's own layout: images in data_dir/<split>/ (here with a sub-folder), category ids neither 1..N nor sorted.
    save_image(tmp_path / "val2017" / "a.jpg", 40, 30)
    save_image(tmp_path / "val2017" / "more" / "b.png", 50, 20)
    categories = [{"id": 17, "name": "Traffic Light"}, {"id": 3, "name": "Stop Sign"}]
    write_coco(tmp_path, "val2017", [{"id": 5, "file_name": "a.jpg", "width": 40, "height": 30},
                                     {"id": 9, "file_name": "more/b.png", "width": 50, "height": 20}], [
        {"id": 1, "image_id": 5, "category_id": 3, "bbox": [10, 20, 5, 4], "iscrowd": 0},
        {"id": 2, "image_id": 5, "category_id": 17, "bbox": [0.5, 1.25, 30, 8.5], "iscrowd": 1},
        {"id": 3, "image_id": 5, "category_id": 17, "bbox": [0, 0, 40, 30]},
    ], categories)
    dataset = build_dataset("custom", tmp_path, train=False, split="val2017")
    assert dataset.class_names == ("Traffic Light", "Stop Sign")  # the file's order
    assert dataset.image_ids == ["a", "more/b"]
    annotation = dataset.annotations[0]
    # x1 = x + 1, y1 = y + 1, x2 = x + w, y2 = y + h.
    np.testing.assert_array_equal(annotation["boxes"], [[11, 21, 15, 24], [1.5, 2.25, 30.5, 9.75], [1, 1, 40, 30]])
    assert annotation["labels"].tolist() == [1, 0, 0]
    assert annotation["difficult"].tolist() == [False, True, False]
    assert len(dataset.annotations[1]["labels"]) == 0 and dataset[1][0].shape == (3, 20, 50)
    assert dataset.annotations[1]["labels"].dtype == np.int64 and dataset.annotations[1]["crowd"].dtype == bool
    # A checkpoint's class order: the labels follow the names.
    reordered = build_dataset("custom", tmp_path, train=False, split="val2017", class_names=CLASSES)
    assert reordered.annotations[0]["labels"].tolist() == [0, 1, 1]


def test_yolo_names_mapping_label_rule_list_split_and_image_without_labels(tmp_path):
    (tmp_path / "data.yaml").write_text("path: set\ntrain: images/train\nval: [val.txt]\n"
                                        "names:\n  1: Traffic Light\n  0: Stop Sign\n")
    root = tmp_path / "set"
    save_image(root / "images" / "train" / "wide.jpg", 40, 30)
    save_image(root / "images" / "train" / "sub" / "unlabelled.png", 16, 16)
    (root / "labels" / "train").mkdir(parents=True)
    # cx 0.5, w 0.25 of 40 px: x in [15, 25]; cy 0.5, h 0.5 of 30 px: y in [7.5, 22.5].
    (root / "labels" / "train" / "wide.txt").write_text("1 0.5 0.5 0.25 0.5\n\n0 0.125 0.25 0.25 0.5\n")
    dataset = build_dataset("custom", tmp_path, train=True)
    assert dataset.class_names == CLASSES
    assert dataset.image_ids == ["sub/unlabelled", "wide"]
    assert len(dataset.annotations[0]["labels"]) == 0
    np.testing.assert_allclose(dataset.annotations[1]["boxes"], [[16, 8.5, 25, 22.5], [1, 1, 10, 15]])
    assert dataset.annotations[1]["labels"].tolist() == [1, 0]

    # A checkpoint's class order (Traffic Light first): each label is mapped by its name, not taken as the id.
    reordered = build_dataset("custom", tmp_path, train=True, class_names=CLASSES[::-1])
    assert reordered.annotations[1]["labels"].tolist() == [0, 1]

    (root / "val.txt").write_text("./images/train/wide.jpg\n")  # as ultralytics' autosplit writes them
    validation = build_dataset("custom", tmp_path, train=False)
    assert validation.image_ids == ["images/train/wide"]
    np.testing.assert_array_equal(validation.annotations[0]["boxes"], dataset.annotations[1]["boxes"])
    assert yolo_label_path(Path("/d/images/set/images/train/a.b.jpg")) == Path("/d/images/set/labels/train/a.b.txt")
    assert yolo_label_path(Path("/d/train/a.jpg")) == Path("/d/train/a.txt")


def object_lines(xml_path):
    return [number for number, line in enumerate(xml_path.read_text().splitlines(), start=1) if "<object>" in line]


def test_every_voc_problem_in_every_file_is_reported_in_one_error(tmp_path):
    write_voc(tmp_path, [("a", "a.jpg", [("Stop Sign", (1, 1, 5, 5)), ("unicorn", (1, 1, 5, 5))]),
                         ("b", "b.jpg", [("dragon", (1, 1, 5, 5)), ("Stop Sign", (9, 2, 8, 6))]),
                         ("c", "c.jpg", [])])
    (tmp_path / "JPEGImages" / "c.jpg").unlink()
    save_image(tmp_path / "JPEGImages" / "b.png", 4, 4)
    with pytest.raises(AnnotationError) as raised:
        build_dataset("custom", tmp_path, train=True)
    a_lines, b_lines = object_lines(tmp_path / "Annotations/a.xml"), object_lines(tmp_path / "Annotations/b.xml")
    split_file = tmp_path / "ImageSets/Main/train.txt"
    assert raised.value.problems == [
        f"{tmp_path}/Annotations/a.xml:{a_lines[1]}: class 'unicorn' is not one of the dataset's classes",
        f"{split_file}:2: 2 images for this id in {tmp_path}/JPEGImages (b.jpg, b.png); keep one",
        f"{split_file}:3: image {tmp_path}/JPEGImages/c.* not found",
    ]
    (tmp_path / "JPEGImages" / "b.png").unlink()
    with pytest.raises(AnnotationError) as raised:
        build_dataset("custom", tmp_path, train=True)
    assert raised.value.problems[1:3] == [
        f"{tmp_path}/Annotations/b.xml:{b_lines[0]}: class 'dragon' is not one of the dataset's classes",
        f"{tmp_path}/Annotations/b.xml:{b_lines[1]}: degenerate box xmin 9 ymin 2 xmax 8 ymax 6: VOC boxes are "
        f"1-based inclusive, xmax >= xmin and ymax >= ymin",
    ]
    assert str(raised.value).startswith("4 problem(s) in the dataset's files (its classes: Stop Sign, Traffic Light)")


def test_every_coco_problem_is_reported_with_its_annotation_id(tmp_path):
    save_image(tmp_path / "images" / "train" / "a.jpg", 40, 30)
    write_coco(tmp_path, "train", [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30},
                                   {"id": 2, "file_name": "gone.jpg", "width": 40, "height": 30}], [
        {"id": 10, "image_id": 1, "category_id": 4, "bbox": [1, 2, 3, 4]},
        {"id": 11, "image_id": 1, "category_id": 1, "bbox": [1, 2, 0, 4]},
        {"id": 12, "image_id": 3, "category_id": 1, "bbox": [1, 2, 3, 4]},
        {"id": 13, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3]},
    ], [{"id": 1, "name": "Stop Sign"}, {"id": 2, "name": "Traffic Light"}])
    with pytest.raises(AnnotationError) as raised:
        build_dataset("custom", tmp_path, train=True)
    json_path = tmp_path / "annotations" / "instances_train.json"
    assert raised.value.problems == [
        f"{json_path}: images[1] (id 2): image {tmp_path}/images/train/gone.jpg not found",
        f"{json_path}: annotation id 10 (annotations[0]): category_id 4 is not among the categories",
        f"{json_path}: annotation id 11 (annotations[1]): degenerate bbox [1, 2, 0, 4]: width and height must be "
        f"positive",
        f"{json_path}: annotation id 12 (annotations[2]): image_id 3 is not among the images",
        f"{json_path}: annotation id 13 (annotations[3]): bbox [1, 2, 3] is not four numbers [x, y, w, h]",
    ]
    # Categories outside a checkpoint's classes are unknown classes.
    write_coco(tmp_path, "train", [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30}],
               [{"id": 10, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4]}], [{"id": 1, "name": "Stop Sign"}])
    with pytest.raises(AnnotationError, match=r"annotation id 10 \(annotations\[0\]\): class 'Stop Sign' "
                                              r"\(category_id 1\) is not one of the dataset's classes"):
        build_dataset("custom", tmp_path, train=True, class_names=("Yield",))


def test_every_yolo_problem_is_reported_with_file_and_line_and_long_lists_are_cut(tmp_path):
    (tmp_path / "data.yaml").write_text("train: images\nval: images\nnames: [Stop Sign, Traffic Light]\n")
    for name in ("a", "b"):
        save_image(tmp_path / "images" / f"{name}.jpg", 40, 30)
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "a.txt").write_text("0 0.5 0.5 0.2\n2 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2 1.5\n")
    (tmp_path / "labels" / "b.txt").write_text("0 0.5 0.5 0 0.2\n" + "x 1 1 1 1\n" * 30)
    with pytest.raises(AnnotationError) as raised:
        build_dataset("custom", tmp_path, train=True)
    a, b = tmp_path / "labels" / "a.txt", tmp_path / "labels" / "b.txt"
    assert raised.value.problems[:4] == [
        f"{a}:1: '0 0.5 0.5 0.2' is not 'class cx cy w h' (a class id and four numbers)",
        f"{a}:2: class id 2 is not in data.yaml's names (ids 0, 1)",
        f"{a}:3: cx cy w h must be normalised to [0, 1] by the image's width and height",
        f"{b}:1: degenerate box: w and h must be positive",
    ]
    assert len(raised.value.problems) == 34
    message = str(raised.value)
    assert len(re.findall(r"^  /", message, re.MULTILINE)) == MAX_LISTED_PROBLEMS
    assert f"\n  and {34 - MAX_LISTED_PROBLEMS} more\n" in message and "data.yaml's names" in message


def test_the_layout_is_found_or_the_setting_asked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no data\.yaml \(YOLO\).*protocol=custom"):
        build_dataset("custom", tmp_path, train=True)
    (tmp_path / "ImageSets" / "Main").mkdir(parents=True)
    (tmp_path / "data.yaml").write_text("names: [a]\n")
    with pytest.raises(ValueError, match="holds the yolo and voc layouts: set data_format"):
        build_dataset("custom", tmp_path, train=True)
    with pytest.raises(FileNotFoundError, match=r"ImageSets/Main/train\.txt not found"):
        build_dataset("custom", tmp_path, train=True, data_format="voc", class_names=CLASSES)
    with pytest.raises(ValueError, match="data_format=coco is for protocol=custom"):
        build_dataset("voc2012val", tmp_path, train=True, data_format="coco")


def test_the_yolo_bridges_compute_in_float64_whatever_the_input():
    """float32 labels (as a NumPy loader gives them) are converted in float64, as the docstrings promise: in
    float32 a 1,000 px image's centre would be off by a few thousandths of a pixel."""
    normalised = np.array([[0.123457, 0.654321, 0.2, 0.1]], dtype=np.float32)
    boxes = yolo_to_voc(normalised, 1000, 750)
    assert boxes.dtype == np.float64
    np.testing.assert_array_equal(boxes, yolo_to_voc(normalised.astype(np.float64), 1000, 750))
    back = voc_to_yolo(boxes.astype(np.float32), 1000, 750)
    assert back.dtype == np.float64
    np.testing.assert_array_equal(back, voc_to_yolo(boxes.astype(np.float32).astype(np.float64), 1000, 750))


def test_coco_crowd_regions_are_never_trained_on_and_scored_as_pycocotools_scores_the_file(tmp_path):
    """Crowd regions (iscrowd=1) are not objects: no training target holds one, with or without difficult
    objects, and an image that is one whole crowd has an empty grid. In the metrics they are regions where
    detections count neither way: COCO AP equals pycocotools' run on the file itself."""
    categories = [{"id": 7, "name": "car"}, {"id": 2, "name": "person"}]  # ids neither 1..N nor sorted
    images = [{"id": 10 + index, "file_name": f"{index}.jpg", "width": 64, "height": 48} for index in range(3)]
    for image in images:
        save_image(tmp_path / "images" / "val" / image["file_name"], 64, 48)
    boxes = [(10, 7, [4, 5, 20, 16], 0), (10, 7, [30, 20, 25, 20], 0), (10, 2, [0, 30, 40, 18], 1),
             (11, 2, [0, 0, 64, 48], 1), (12, 7, [2, 2, 30, 30], 0), (12, 2, [35, 10, 20, 30], 0)]
    annotations = [{"id": number, "image_id": image_id, "category_id": category, "bbox": bbox,
                    "area": bbox[2] * bbox[3], "iscrowd": crowd, "segmentation": []}
                   for number, (image_id, category, bbox, crowd) in enumerate(boxes, start=1)]
    write_coco(tmp_path, "val", images, annotations, categories)
    dataset = build_dataset("custom", tmp_path, train=False)
    assert dataset.class_names == ("car", "person")
    assert dataset.classes_line() == "data: coco layout, 2 classes (their ids in the files): car (7), person (2)"
    assert dataset.summary("val") == "val: 3 images, 6 objects: car 3, person 3"
    assert [annotation["crowd"].tolist() for annotation in dataset.annotations] == [
        [False, False, True], [True], [False, False]]

    for use_difficult in (True, False):
        train = build_dataset("custom", tmp_path, train=False,
                              transforms=TrainTransform(64, 4, 2, use_difficult=use_difficult))
        for seed in range(20):
            torch.manual_seed(seed)
            targets = [train[index][1] for index in range(3)]
            assert not targets[1]["grid"].any() and len(targets[1]["labels"]) == 0  # the frame is one crowd
            assert len(targets[0]["labels"]) <= 2 and not targets[0]["difficult"].any()
    _, evaluated = build_dataset("custom", tmp_path, train=False, transforms=EvalTransform(64, 4, 2))[1]
    assert not evaluated["grid"].any() and evaluated["difficult"].tolist() == [True]  # kept for the metrics

    ground_truths = [ground_truth_array(annotation) for annotation in dataset.annotations]
    # VOC pixels, score, class index: a hit, a detection inside each crowd region, a near miss, a false one.
    detections = [np.array([[5, 6, 24, 21, 0.9, 0], [2, 32, 30, 46, 0.8, 1], [31, 21, 50, 38, 0.7, 0],
                            [40, 2, 60, 12, 0.6, 1]]),
                  np.array([[10, 10, 30, 30, 0.95, 1], [1, 1, 64, 48, 0.5, 1]]),
                  np.array([[3, 3, 32, 32, 0.85, 0], [36, 11, 55, 40, 0.4, 1], [36, 11, 55, 40, 0.3, 0]])]
    ours = evaluate_detections(detections, ground_truths, 2)
    category_ids = [7, 2]
    results = [{"image_id": images[index]["id"], "category_id": category_ids[int(label)],
                "bbox": [x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1], "score": score}
               for index, rows in enumerate(detections) for x1, y1, x2, y2, score, label in rows.tolist()]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(tmp_path / "annotations" / "instances_val.json"))
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    np.testing.assert_allclose([ours["coco_map"], ours["coco_ap50"], ours["coco_ap75"]], evaluator.stats[:3],
                               rtol=0, atol=1e-12)
    assert 0 < ours["coco_map"] < 1


def test_a_box_under_a_pixel_is_kept_and_one_wholly_outside_is_dropped_by_its_name_in_the_file(tmp_path, capsys):
    """COCO bbox [50.2, 30, 0.6, 12] is 0.6 px wide: an object (a marker's tip, a distant car), kept in the
    ground truth and the metrics; a YOLO box of 0.2 px likewise. Only a box with no area inside the image is
    dropped, and the warning names the file and the object as the file writes it."""
    save_image(tmp_path / "images" / "val" / "a.jpg", 64, 48)
    write_coco(tmp_path, "val", [{"id": 3, "file_name": "a.jpg", "width": 64, "height": 48}], [
        {"id": 8, "image_id": 3, "category_id": 1, "bbox": [50.2, 30, 0.6, 12]},
        {"id": 9, "image_id": 3, "category_id": 1, "bbox": [70, 5, 3, 4]}], [{"id": 1, "name": "marker"}])
    dataset = build_dataset("custom", tmp_path, train=False)
    assert capsys.readouterr().err == ("warning: dropped 1 object(s) lying wholly outside their image:\n"
                                       f"  {tmp_path / 'annotations' / 'instances_val.json'} (image id 3): "
                                       "annotation id 9 (bbox [70, 5, 3, 4])\n")
    np.testing.assert_allclose(dataset.annotations[0]["boxes"], [[51.2, 31, 50.8, 42]], rtol=1e-6)
    truth = ground_truth_array(dataset.annotations[0])
    detection = np.array([[51.2, 31, 50.8, 42, 0.9, 0]])
    assert evaluate_detections([detection], [truth], 1)["voc12_map"] == 1
    _, target = build_dataset("custom", tmp_path, train=False, transforms=EvalTransform(64, 4, 1))[0]
    assert target["grid"][:, :, 4].sum() == 1  # the tiny object has its cell

    root = tmp_path / "yolo"
    (root / "data.yaml").parent.mkdir()
    (root / "data.yaml").write_text("train: images\nnames: [marker]\n")
    save_image(root / "images" / "a.png", 40, 30)
    (root / "labels").mkdir()
    (root / "labels" / "a.txt").write_text("0 0.5 0.5 0.005 0.5\n")  # 0.2 px wide
    capsys.readouterr()
    annotation = build_dataset("custom", root, train=True).annotations[0]
    np.testing.assert_allclose(annotation["boxes"], [[20.9, 8.5, 20.1, 22.5]], rtol=1e-6)
    assert capsys.readouterr().err == ""  # kept without a word


def test_the_errors_advice_on_classes_comes_only_with_a_problem_of_a_class(tmp_path):
    write_voc(tmp_path, [("a", "a.jpg", [("Stop Sign", (1, 1, 5, 5))])])
    (tmp_path / "JPEGImages" / "a.jpg").unlink()
    with pytest.raises(AnnotationError) as raised:
        build_dataset("custom", tmp_path, train=True)
    assert str(raised.value).endswith("\nFix them, or leave those images out of the split.")
    write_voc(tmp_path, [("a", "a.jpg", [("unicorn", (1, 1, 5, 5))])])
    with pytest.raises(AnnotationError, match=r"Fix them \(an unknown class: the label, or the class list: VOC: "
                                              r"classes\.txt; .*\), or leave those images out of the split\.$"):
        build_dataset("custom", tmp_path, train=True)


def test_a_voc_split_of_images_alone_is_sized_from_their_headers(tmp_path):
    """voc_images (the VOC2012 test set, whose annotations the server keeps): no Annotations folder is needed;
    each listed image is a sample without objects, of its header's size, from the split file. Every unreadable
    image is a problem naming its line and file."""
    write_voc(tmp_path, [("a", "a.jpg", []), ("b", "b.png", [])])
    for path in (tmp_path / "Annotations").iterdir():
        path.unlink()
    (tmp_path / "Annotations").rmdir()
    save_image(tmp_path / "JPEGImages" / "b.png", 50, 20)
    split_file = tmp_path / "ImageSets/Main/train.txt"
    class_names, samples, class_ids = read_splits("voc_images", [(tmp_path, "train")])
    assert (class_names, class_ids) == (CLASSES, [1, 2])
    assert [(sample.image_id, sample.image_path, sample.source, sample.annotation["width"],
             sample.annotation["height"]) for sample in samples] == [
        ("a", tmp_path / "JPEGImages/a.jpg", str(split_file), 40, 30),
        ("b", tmp_path / "JPEGImages/b.png", str(split_file), 50, 20)]
    for sample in samples:
        annotation = sample.annotation
        assert annotation["boxes"].shape == (0, 4) and annotation["boxes"].dtype == np.float32
        assert len(annotation["labels"]) == len(annotation["difficult"]) == len(annotation["crowd"]) == 0
        assert annotation["refs"] == []

    for name in ("a.jpg", "b.png"):
        (tmp_path / "JPEGImages" / name).write_bytes(b"not an image")
    with pytest.raises(AnnotationError) as raised:
        read_splits("voc_images", [(tmp_path, "train")])
    assert [problem.partition(": not a readable")[0] for problem in raised.value.problems] == [
        f"{split_file}:1: image {tmp_path}/JPEGImages/a.jpg", f"{split_file}:2: image {tmp_path}/JPEGImages/b.png"]

    with pytest.raises(FileNotFoundError, match=rf"^folder {tmp_path}/Annotations not found; run `make download`"):
        read_splits("voc", [(tmp_path, "train")])  # annotated: the folder is needed
    for path in (tmp_path / "JPEGImages").iterdir():
        path.unlink()
    (tmp_path / "JPEGImages").rmdir()
    with pytest.raises(FileNotFoundError, match=rf"^folder {tmp_path}/JPEGImages not found; run `make download`"):
        read_splits("voc_images", [(tmp_path, "train")])
    split_file.write_text("\n \n")
    with pytest.raises(ValueError, match=rf"^{split_file} lists no images: add image ids to it"):
        read_splits("voc_images", [(tmp_path, "train")])


def write_xml(path, text):
    path.write_text(f"<annotation>\n{text}\n</annotation>\n")
    return path


def test_a_voc_size_missing_empty_or_0_x_0_is_the_images_own_and_any_other_bad_size_is_a_problem(tmp_path):
    write_voc(tmp_path, [("a", "a.jpg", []), ("b", "b.jpg", []), ("c", "c.jpg", []), ("d", "d.jpg", [])])
    sizes = {"a": "", "b": "<size><width></width><height></height></size>",
             "c": "<size><width>0</width><height>0</height></size>", "d": "<size></size>"}
    for image_id, size in sizes.items():
        write_xml(tmp_path / "Annotations" / f"{image_id}.xml", size)
    _, samples, _ = read_splits("voc", [(tmp_path, "train")])
    assert [(sample.annotation["width"], sample.annotation["height"]) for sample in samples] == [(40, 30)] * 4

    for image_id in ("a", "b"):  # and the image's header cannot tell it either
        (tmp_path / "JPEGImages" / f"{image_id}.jpg").write_bytes(b"not an image")
    with pytest.raises(AnnotationError) as raised:
        read_splits("voc", [(tmp_path, "train")])
    assert [problem.partition(": not a readable")[0] for problem in raised.value.problems] == [
        f"{tmp_path}/Annotations/{image_id}.xml: no <size>, and image {tmp_path}/JPEGImages/{image_id}.jpg"
        for image_id in ("a", "b")]

    for width, height in ((0, 10), (10, 0), (-1, -1)):
        path = write_xml(tmp_path / "bad.xml", f"<size><width>{width}</width><height>{height}</height></size>")
        with pytest.raises(AnnotationError) as raised:
            read_voc_annotation(path, CLASSES)
        assert raised.value.problems == [f"{path}:1: image size {width} x {height} is not positive"]
    path = write_xml(tmp_path / "one.xml", "<size><width>1</width><height>1</height></size>")
    assert (read_voc_annotation(path, CLASSES)["width"], read_voc_annotation(path, CLASSES)["height"]) == (1, 1)


def test_each_problem_of_a_voc_file_is_named_with_its_line_and_the_classes(tmp_path):
    path = write_xml(tmp_path / "a.xml", "\n".join([
        "<size><width>40</width><height>30</height></size>",
        "<object><name>Stop Sign</name></object>",
        "<object><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>4</xmax><ymax>4</ymax></bndbox></object>",
        "<object><name>Stop Sign</name><bndbox><xmin>1</xmin><ymin>abc</ymin><xmax>4</xmax></bndbox></object>"]))
    with pytest.raises(AnnotationError) as raised:
        read_voc_annotation(path, CLASSES)
    assert raised.value.problems == [f"{path}:3: <bndbox> missing",
                                     f"{path}:4: class '' is not one of the dataset's classes",
                                     f"{path}:5: <bndbox/ymin> is 'abc', not a number",
                                     f"{path}:5: <bndbox/ymax> missing"]
    assert "(its classes: Stop Sign, Traffic Light)" in str(raised.value)

    broken = tmp_path / "broken.xml"
    broken.write_text("<annotation>\n  <size>\n    <width>40</wid>\n</annotation>\n")
    unreadable = tmp_path / "folder.xml"
    unreadable.mkdir()
    for path, problem in ((broken, f"{broken}:3: cannot parse the XML (mismatched tag: line 3, column 15); "
                                   f"re-extract or fix it"),
                          (unreadable, f"{unreadable}: cannot read it (Is a directory)")):
        with pytest.raises(AnnotationError) as raised:
            read_voc_annotation(path, CLASSES)
        assert raised.value.problems == [problem]
        assert "(its classes: Stop Sign, Traffic Light)" in str(raised.value)


def test_every_problem_of_a_coco_files_structure_is_reported_and_the_rest_still_checked(tmp_path):
    """Each bad image, category and annotation entry is named by its place; the others are still read."""
    save_image(tmp_path / "images" / "train" / "a.jpg", 40, 30)
    save_image(tmp_path / "images" / "train" / "b.jpg", 40, 30)
    json_path = tmp_path / "annotations" / "instances_train.json"
    write_coco(tmp_path, "train", [
        {"id": 1, "file_name": "a.jpg", "width": 40, "height": 30},
        {"id": "2", "file_name": "b.jpg"}, {"id": 3, "file_name": ""}, {"id": 4}, {"file_name": "b.jpg"}, "b.jpg",
        {"id": 1, "file_name": "b.jpg", "width": 40, "height": 30},
        {"id": 5, "file_name": "b.jpg", "width": 0, "height": 30}, {"id": 6, "file_name": "b.jpg", "width": 40},
        {"id": 7, "file_name": "b.jpg", "width": True, "height": 30},
        {"id": 8, "file_name": "b.jpg", "width": 1, "height": 1},
    ], [
        {"id": 10, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 0]},
        {"id": 11, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 1], "iscrowd": 2},
        {"id": 12, "image_id": 1, "category_id": "1", "bbox": [1, 2, 3, 4]},
        {"id": 13, "image_id": True, "category_id": 1, "bbox": [1, 2, 3, 4]},
        "not an annotation",
        {"id": 14, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, float("inf")]},
        {"id": 15, "image_id": 1, "category_id": True, "bbox": [1, 2, 3, 4]},
    ], [{"id": 1, "name": "Stop Sign"}, {"id": 2, "name": "Stop Sign"}, {"id": 1, "name": "Traffic Light"},
        {"id": "3", "name": "x"}, {"id": 4, "name": 5}, {"id": 5}, "Yield", {"id": 6, "name": "Traffic Light"}])
    with pytest.raises(AnnotationError) as raised:
        read_splits("coco", [(tmp_path, "train")])
    entry = f"{json_path}: "
    assert raised.value.problems == [
        entry + "categories[1]: id 2 or name 'Stop Sign' repeats",
        entry + "categories[2]: id 1 or name 'Traffic Light' repeats",
        *(entry + f"categories[{position}]: needs an integer id and a string name" for position in (3, 4, 5, 6)),
        *(entry + f"images[{position}]: needs an integer id and a string file_name" for position in (1, 2, 3, 4, 5)),
        entry + "images[6] (id 1): the image id repeats",
        *(entry + f"images[{position}] (id {position - 2}): width and height must be positive integers"
          for position in (7, 8, 9)),
        entry + "annotation id 10 (annotations[0]): degenerate bbox [1, 2, 3, 0]: width and height must be positive",
        entry + "annotation id 11 (annotations[1]): iscrowd is 2, not 0 or 1",
        entry + "annotation id 12 (annotations[2]): category_id '1' is not among the categories",
        entry + "annotation id 13 (annotations[3]): image_id True is not among the images",
        entry + "annotation id None (annotations[4]): image_id None is not among the images",
        entry + "annotation id 14 (annotations[5]): bbox [1, 2, 3, inf] is not four numbers [x, y, w, h]",
        entry + "annotation id 15 (annotations[6]): category_id True is not among the categories",
    ]
    message = str(raised.value).splitlines()
    assert message[0] == "22 problem(s) in the dataset's files (its classes: Stop Sign, Traffic Light):"
    assert message[MAX_LISTED_PROBLEMS + 1] == "  and 2 more"

    # A one-pixel image and a 1 x 1 box are fine; an annotation with iscrowd 1 or 0, or none, reads as it says.
    write_coco(tmp_path, "train", [{"id": 8, "file_name": "b.jpg", "width": 1, "height": 1}], [
        {"id": 1, "image_id": 8, "category_id": 1, "bbox": [0, 0, 1, 1]},
        {"id": 2, "image_id": 8, "category_id": 1, "bbox": [0, 0, 1, 1], "iscrowd": 1}],
        [{"id": 1, "name": "Stop Sign"}])
    _, samples, class_ids = read_splits("coco", [(tmp_path, "train")])
    assert class_ids == [1] and [sample.file_id for sample in samples] == [8]
    annotation = samples[0].annotation
    assert annotation["crowd"].dtype == bool and annotation["crowd"].tolist() == [False, True]
    assert annotation["labels"].dtype == np.int64 and annotation["boxes"].tolist() == [[1, 1, 1, 1]] * 2


@pytest.mark.parametrize("content, problem", [
    (b'{\n "images": [\n  1,,\n ]}', ":3: not valid JSON (Expecting value)"),
    (b'{"images": "\xff"}', ":1: not valid JSON ('utf-8' codec can't decode byte 0xff in position 12: invalid start "
                            "byte)"),
    (b'{"images": [], "annotations": []}', ": a COCO instances file is an object with lists images, annotations and "
                                          "categories"),
    (b"[]", ": a COCO instances file is an object with lists images, annotations and categories"),
])
def test_a_coco_file_that_is_not_an_instances_file_is_one_problem(tmp_path, content, problem):
    (tmp_path / "images" / "train").mkdir(parents=True)
    json_path = tmp_path / "annotations" / "instances_train.json"
    json_path.parent.mkdir()
    json_path.write_bytes(content)
    with pytest.raises(AnnotationError) as raised:
        read_splits("coco", [(tmp_path, "train")], class_names=CLASSES)
    assert raised.value.problems == [f"{json_path}{problem}"]


def test_a_coco_split_without_its_file_folder_or_images_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"^COCO annotations {tmp_path}/annotations/instances_train.json not "
                                                r"found; run `make download`"):
        read_splits("coco", [(tmp_path, "train")])
    write_coco(tmp_path, "train", [], [], [{"id": 1, "name": "Stop Sign"}])
    with pytest.raises(FileNotFoundError, match=rf"^image folder {tmp_path}/images/train \(or {tmp_path}/train\) not "
                                                r"found; run `make download`"):
        read_splits("coco", [(tmp_path, "train")])
    (tmp_path / "train").mkdir()
    with pytest.raises(ValueError, match=rf"^{tmp_path}/annotations/instances_train.json lists no images: add them"):
        read_splits("coco", [(tmp_path, "train")])


def test_every_problem_of_a_yolo_sets_files_is_named_and_the_class_ids_are_data_yamls(tmp_path):
    (tmp_path / "data.yaml").write_text("train: [../images/a, images/b, lists/list.txt]\nnames: {3: Stop Sign, 7: "
                                        "Traffic Light}\n")
    for name in ("a/one.jpg", "a/two.jpg", "b/three.jpg"):
        save_image(tmp_path / "images" / name, 40, 30)
    (tmp_path / "images" / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "list.txt").write_text(f"../images/b/three.jpg\n{tmp_path}/images/a/one.jpg\n")
    listed_label = f"{tmp_path}/lists/../labels/b/three.txt"
    labels = tmp_path / "labels"
    (labels / "a").mkdir(parents=True)
    (labels / "b").mkdir()
    (labels / "a" / "one.txt").write_text("7 0.5 0.5 0.2 0.4\n3 0.25 0.25 0.1 0.1\n")
    (labels / "a" / "two.txt").write_text("3 1.5 0.5 0.2 0.4\n3 0.5 0.5 0.2 0\n3 0.5 0.5 -0.2 0.3\n")
    (labels / "b" / "three.txt").mkdir()  # a label "file" that cannot be read
    with pytest.raises(AnnotationError) as raised:
        read_splits("yolo", [(tmp_path, "train")], class_names=("Stop Sign",))
    assert raised.value.problems == [
        f"{labels}/a/one.txt:1: class 'Traffic Light' is not one of the dataset's classes",
        f"{labels}/a/two.txt:1: cx cy w h must be normalised to [0, 1] by the image's width and height",
        f"{labels}/a/two.txt:2: degenerate box: w and h must be positive",
        f"{labels}/a/two.txt:3: cx cy w h must be normalised to [0, 1] by the image's width and height",
        f"{labels}/b/three.txt: cannot read it ([Errno 21] Is a directory: '{labels}/b/three.txt')",
        f"{listed_label}: cannot read it ([Errno 21] Is a directory: '{listed_label}')",
        f"{labels}/a/one.txt:1: class 'Traffic Light' is not one of the dataset's classes",
    ]

    (labels / "b" / "three.txt").rmdir()
    (labels / "a" / "two.txt").unlink()
    class_names, samples, class_ids = read_splits("yolo", [(tmp_path, "train")])
    assert (class_names, class_ids) == (CLASSES, [3, 7])
    # A folder's images are named from it, a list's from the list's folder (or whole, outside it).
    assert [(sample.image_id, sample.source) for sample in samples] == [
        ("one", f"{labels}/a/one.txt"), ("two", f"{labels}/a/two.txt"), ("three", f"{labels}/b/three.txt"),
        ("../images/b/three", listed_label), (f"{tmp_path}/images/a/one", f"{labels}/a/one.txt")]
    assert samples[0].annotation["refs"] == ["line 1 (7 0.5 0.5 0.2 0.4)", "line 2 (3 0.25 0.25 0.1 0.1)"]
    assert samples[0].annotation["labels"].tolist() == [1, 0]

    for name in ("one.jpg", "two.jpg"):
        (tmp_path / "images" / "a" / name).write_bytes(b"not an image")
    with pytest.raises(AnnotationError) as raised:
        read_splits("yolo", [(tmp_path, "train")])
    assert [problem.partition(": not a readable")[0] for problem in raised.value.problems] == [
        f"{tmp_path}/images/a/one.jpg", f"{tmp_path}/images/a/two.jpg", f"{tmp_path}/images/a/one.jpg"]


@pytest.mark.parametrize("data_yaml, problem", [
    ("train: a\nnames: [a\n", ":3: not valid YAML (expected ',' or ']', but got '<stream end>')"),
    ("train: a\nnames:\n  - a\n - b\n", ":4: not valid YAML (expected <block end>, but found '<block sequence start>')"),
    ("- a\n- b\n", ": names must be a list of class names or a mapping of class id to name"),
    ("train: a\nnames: {a: Stop Sign}\n", ": names must be a list of class names or a mapping of class id to name"),
    ("train: a\nnames: Stop Sign\n", ": names must be a list of class names or a mapping of class id to name"),
    ("val: a\nnames: [Stop Sign]\n", ": no 'train' entry (the split's image folder or list of images)"),
])
def test_a_data_yaml_that_cannot_be_used_is_one_problem(tmp_path, data_yaml, problem):
    (tmp_path / "data.yaml").write_text(data_yaml)
    with pytest.raises(AnnotationError) as raised:
        read_splits("yolo", [(tmp_path, "train")])
    assert raised.value.problems == [f"{tmp_path / 'data.yaml'}{problem}"]


def test_a_data_yaml_with_a_character_yaml_refuses_is_a_problem_of_its_first_line(tmp_path):
    """PyYAML's reader error has no line mark and no `problem`: its own message, at line 1."""
    (tmp_path / "data.yaml").write_text("train: a\nnames: [a\x07]\n")
    with pytest.raises(AnnotationError) as raised:
        read_splits("yolo", [(tmp_path, "train")])
    assert raised.value.problems[0].startswith(f"{tmp_path / 'data.yaml'}:1: not valid YAML (unacceptable character "
                                               f"#x0007: special characters are not allowed")


def test_a_yolo_split_that_is_missing_or_empty_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"^{tmp_path}/data.yaml not found; run `make download`"):
        read_splits("yolo", [(tmp_path, "train")])
    (tmp_path / "data.yaml").write_text("train: images\nnames: [Stop Sign]\n")
    with pytest.raises(FileNotFoundError, match=rf"^{tmp_path}/images \('train' in {tmp_path}/data.yaml\) not found: "
                                                r"the split names an image folder or a \.txt list of images"):
        read_splits("yolo", [(tmp_path, "train")])
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=rf"^{tmp_path}/data.yaml: split 'train' \(images\) holds no "
                                         r"\.jpg/\.jpeg/\.png/"):
        read_splits("yolo", [(tmp_path, "train")])


def test_a_box_has_area_inside_the_image_unless_it_lies_wholly_beyond_an_edge():
    """VOC pixels are 1-based: the image covers [0, W] x [0, H] as continuous boxes, x1 - 1 to x2."""
    boxes = np.array([[-5, 5, 0, 10], [0.5, 5, 0.8, 10], [41, 5, 45, 10], [40, 5, 45, 10],
                      [5, -5, 10, 0], [5, 0.5, 10, 0.8], [5, 31, 10, 35], [5, 30, 10, 35], [5, -9, 10, -3]])
    assert has_area_inside(boxes, 40, 30).tolist() == [False, True, False, True, False, True, False, True, False]


def test_the_errors_own_lines_without_classes_and_at_the_listing_limit():
    assert str(AnnotationError(["a: wrong"])).splitlines() == [
        "1 problem(s) in the dataset's files:", "  a: wrong", "Fix them, or leave those images out of the split."]
    at_the_limit = str(AnnotationError([f"p{index}" for index in range(MAX_LISTED_PROBLEMS)], ("x",))).splitlines()
    assert len(at_the_limit) == MAX_LISTED_PROBLEMS + 2 and "more" not in at_the_limit[-2]


def test_missing_data_dir_and_class_list_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"^data_dir {tmp_path}/none not found; run `make download`"):
        detect_format(tmp_path / "none")
    write_voc(tmp_path, [("a", "a.jpg", [])])
    (tmp_path / "classes.txt").unlink()
    with pytest.raises(FileNotFoundError, match=rf"^class list {tmp_path}/classes.txt not found; run `make"):
        read_splits("voc", [(tmp_path, "train")])


# Under the C locale with Python's UTF-8 mode off, a file opened without an encoding is read as ASCII.
ASCII_LOCALE = {"LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}


def test_the_class_lists_are_read_as_utf_8_whatever_the_locale(tmp_path):
    """classes.txt and data.yaml name the classes; the file names are the file system's business."""
    names = ("Café", "Straße")
    voc = tmp_path / "voc"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True)
    (voc / "classes.txt").write_text("".join(f"{name}\n" for name in names), encoding="utf-8")
    save_image(voc / "JPEGImages" / "creme.jpg", 40, 30)
    (voc / "Annotations" / "creme.xml").write_text(make_synthetic.annotation_xml(
        "creme.jpg", 40, 30, [{"name": "Straße", "bndbox": (1, 2, 10, 12), "difficult": False}]), encoding="utf-8")
    (voc / "ImageSets" / "Main" / "train.txt").write_text("creme\n", encoding="utf-8")
    yolo = tmp_path / "yolo"
    save_image(yolo / "images" / "creme.jpg", 40, 30)
    (yolo / "labels").mkdir()
    (yolo / "labels" / "creme.txt").write_text("1 0.5 0.5 0.2 0.2\n", encoding="utf-8")
    (yolo / "data.yaml").write_text("train: images\nnames: [Café, Straße]\n", encoding="utf-8")
    code = ("import sys; from yolo.formats import read_splits; "
            "print([(names, [s.image_id for s in samples], [s.annotation['labels'].tolist() for s in samples]) "
            "for names, samples, _ in (read_splits(layout, [(root, 'train')]) for layout, root in "
            "(('voc', sys.argv[1]), ('yolo', sys.argv[2])))])")
    result = run_python([sys.executable, "-c", code, str(voc), str(yolo)], cwd=ROOT,
                        env={**os.environ, **ASCII_LOCALE, "PYTHONIOENCODING": "utf-8"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str([(names, ["creme"], [[1]]), (names, ["creme"], [[1]])])
