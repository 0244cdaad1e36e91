"""Datasets as annotation tools write them (CVAT, Label Studio, Roboflow, LabelImg, ultralytics): the fields and
habits each layout really comes with, read with the right boxes and classes."""
import json
import shutil
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import pytest
from PIL import Image

from yolo.data import build_dataset


def save_image(path, width, height):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (90, 120, 150)).save(path)


def test_coco_as_cvat_label_studio_and_roboflow_export_it(tmp_path):
    """info and licenses, category ids from 1 with gaps and a supercategory, segmentation polygons, area,
    CVAT's attributes, image ids from 100, file names in sub-folders, an image without annotations."""
    save_image(tmp_path / "images" / "train" / "day 1" / "IMG_0001.JPG", 64, 48)
    save_image(tmp_path / "images" / "train" / "empty.png", 32, 32)
    document = {
        "info": {"description": "export", "version": "1.0", "year": 2026, "date_created": "2026-12-07"},
        "licenses": [{"id": 1, "name": "CC BY 4.0", "url": "https://creativecommons.org/licenses/by/4.0/"}],
        "categories": [{"id": 1, "name": "car", "supercategory": "vehicle"},
                       {"id": 3, "name": "person", "supercategory": ""},
                       {"id": 7, "name": "traffic light", "supercategory": "object"}],
        "images": [{"id": 100, "file_name": "day 1/IMG_0001.JPG", "width": 64, "height": 48, "license": 1,
                    "flickr_url": "", "coco_url": "", "date_captured": 0},
                   {"id": 101, "file_name": "empty.png", "width": 32, "height": 32}],
        "annotations": [
            {"id": 1, "image_id": 100, "category_id": 7, "segmentation": [[10, 4, 14, 4, 14, 20, 10, 20]],
             "area": 64.0, "bbox": [10.0, 4.0, 4.0, 16.0], "iscrowd": 0,
             "attributes": {"occluded": False, "rotation": 0.0}},
            {"id": 2, "image_id": 100, "category_id": 1, "segmentation": [], "area": 300.5,
             "bbox": [30.25, 20.5, 25.5, 12.0], "iscrowd": 0}]}
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train.json").write_text(json.dumps(document))
    dataset = build_dataset("custom", tmp_path, train=True)
    assert dataset.class_names == ("car", "person", "traffic light")
    assert dataset.image_ids == ["day 1/IMG_0001", "empty"]
    np.testing.assert_allclose(dataset.annotations[0]["boxes"], [[11, 5, 14, 20], [31.25, 21.5, 55.75, 32.5]])
    assert dataset.annotations[0]["labels"].tolist() == [2, 0]
    assert len(dataset.annotations[1]["labels"]) == 0 and dataset[1][0].shape == (3, 32, 32)


def test_yolo_as_ultralytics_and_roboflow_export_it(tmp_path):
    """data.yaml with nc, an absolute path, Roboflow's ../train/images entries and a test split; names as a
    list; nested folders; upper-case extensions; labels with blank lines, trailing spaces and Windows line ends;
    an image without a label file."""
    root = tmp_path / "export"
    save_image(root / "train" / "images" / "a" / "IMG_1.JPG", 40, 30)
    save_image(root / "train" / "images" / "b.PNG", 20, 20)
    save_image(root / "valid" / "images" / "c.jpeg", 40, 30)
    (root / "train" / "labels" / "a").mkdir(parents=True)
    (root / "train" / "labels" / "a" / "IMG_1.txt").write_bytes(b"1 0.5 0.5 0.25 0.5 \r\n\r\n0 0.125 0.25 0.25 0.5\r\n")
    (root / "valid" / "labels").mkdir(parents=True)
    (root / "valid" / "labels" / "c.txt").write_text("0 0.5 0.5 1 1\n")
    (root / "data.yaml").write_text(f"path: {root}\ntrain: ../train/images\nval: ../valid/images\n"
                                    "test: ../test/images\nnc: 2\nnames: ['car', 'traffic light']\n")
    dataset = build_dataset("custom", root, train=True)
    assert dataset.class_names == ("car", "traffic light")
    assert dataset.image_ids == ["a/IMG_1", "b"]
    np.testing.assert_allclose(dataset.annotations[0]["boxes"], [[16, 8.5, 25, 22.5], [1, 1, 10, 15]])
    assert dataset.annotations[0]["labels"].tolist() == [1, 0]
    assert len(dataset.annotations[1]["labels"]) == 0
    validation = build_dataset("custom", root, train=False)
    np.testing.assert_allclose(validation.annotations[0]["boxes"], [[1, 1, 40, 30]])

    # The same set under a relative path (relative to data_dir), names as a mapping.
    (tmp_path / "data.yaml").write_text("path: export\ntrain: train/images\nval: valid/images\n"
                                        "names:\n  0: car\n  1: traffic light\n")
    relative = build_dataset("custom", tmp_path, train=True)
    assert relative.image_ids == dataset.image_ids
    np.testing.assert_array_equal(relative.annotations[0]["boxes"], dataset.annotations[0]["boxes"])


def voc_xml(filename, size, objects):
    """A VOC file as LabelImg and CVAT write it: folder, path, source, segmented, pose, truncated, occluded."""
    body = "".join(f"""
  <object>
    <name>{name}</name><pose>Unspecified</pose><truncated>0</truncated><occluded>0</occluded>
    <difficult>0</difficult>
    <bndbox><xmin>{box[0]}</xmin><ymin>{box[1]}</ymin><xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox>
  </object>""" for name, box in objects)
    return f"""<annotation>
  <folder>JPEGImages</folder><filename>{filename}</filename><path>/home/someone/{filename}</path>
  <source><database>Unknown</database></source>
  {size}
  <segmented>0</segmented>{body}
</annotation>
"""


def test_voc_as_labelimg_and_cvat_export_it(tmp_path):
    """Float coordinates (CVAT), a <filename> that is not the id's, a <size> missing or 0 x 0 (the image's own
    is read), a depth."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (tmp_path / sub).mkdir(parents=True)
    (tmp_path / "classes.txt").write_text("dog\ncat\n")
    sizes = {"a": "<size><width>40</width><height>30</height><depth>3</depth></size>",
             "b": "", "c": "<size><width>0</width><height>0</height><depth>3</depth></size>"}
    for image_id, size in sizes.items():
        save_image(tmp_path / "JPEGImages" / f"{image_id}.jpg", 40, 30)
        (tmp_path / "Annotations" / f"{image_id}.xml").write_text(
            voc_xml("frame_0001.png", size, [("cat", (3.5, 4.25, 20.75, 25.0)), ("dog", (30, 10, 60, 20))]))
    (tmp_path / "ImageSets" / "Main" / "train.txt").write_text("a\nb\nc\n")
    dataset = build_dataset("custom", tmp_path, train=True)
    for annotation in dataset.annotations:
        assert (annotation["width"], annotation["height"]) == (40, 30)
        np.testing.assert_allclose(annotation["boxes"], [[3.5, 4.25, 20.75, 25], [30, 10, 40, 20]])
        assert annotation["labels"].tolist() == [1, 0]


DEEPFOREST = "deepforest==2.1.0"  # MIT; ships NEON aerial crops labelled with a real annotation tool


@pytest.fixture(scope="module")
def deepforest_data(tmp_path_factory):
    """deepforest's data folder, fetched from the package registry at test time (a fixture, not a dependency)."""
    folder = tmp_path_factory.mktemp("deepforest")
    result = subprocess.run([sys.executable, "-m", "pip", "download", DEEPFOREST, "--no-deps", "-q", "-d",
                             str(folder)], capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        pytest.skip(f"pip download {DEEPFOREST} failed (no package registry here?): {result.stderr[-300:]}")
    (wheel,) = folder.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = [name for name in archive.namelist() if name.startswith("deepforest/data/")]
        archive.extractall(folder, names)
    return folder / "deepforest" / "data"


def test_real_aerial_photos_labelled_with_a_real_tool_read_as_their_own_package_reads_them(deepforest_data,
                                                                                           tmp_path):
    """Two NEON crops with their VOC XML as the labelling tool wrote it (OSBS_029's <filename> names a .tif; the
    images are .png), read as a VOC set: every crown, with the coordinates deepforest's own CSV of the same file
    gives."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (tmp_path / sub).mkdir(parents=True)
    (tmp_path / "classes.txt").write_text("Tree\nAlive\nDead\n")  # SOAP_061's crowns are alive or dead
    ids = ["OSBS_029", "SOAP_061"]
    for image_id in ids:
        shutil.copy(deepforest_data / f"{image_id}.png", tmp_path / "JPEGImages")
        shutil.copy(deepforest_data / f"{image_id}.xml", tmp_path / "Annotations")
    (tmp_path / "ImageSets" / "Main" / "train.txt").write_text("\n".join(ids) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dataset = build_dataset("custom", tmp_path, train=True)
    counted = [[(deepforest_data / f"{image_id}.xml").read_text().count(f"<name>{name}</name>")
                for name in dataset.class_names] for image_id in ids]
    assert [np.bincount(a["labels"], minlength=3).tolist() for a in dataset.annotations] == counted
    assert counted[0] == [61, 0, 0] and sum(counted[1]) == 37
    rows = [line.split(",") for line in (deepforest_data / "OSBS_029.csv").read_text().splitlines()[1:]]
    np.testing.assert_array_equal(dataset.annotations[0]["boxes"], [[float(value) for value in row[1:5]]
                                                                     for row in rows])
    image, _ = dataset[0]
    assert image.shape == (3, 400, 400)
