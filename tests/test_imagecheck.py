"""The pre-training check of a dataset's images: unreadable files named, good ones remembered."""
import json
import os
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from yolo import imagecheck
from yolo.imagecheck import CACHE_NAME, find_unreadable_images, require_readable_images


@pytest.fixture
def folder(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "good.jpg")
    Image.fromarray(pixels).save(tmp_path / "renamed_png.jpg", format="PNG")
    (tmp_path / "text.jpg").write_text("not an image")
    (tmp_path / "empty.jpg").write_bytes(b"")
    return tmp_path


def test_unreadable_files_are_named_with_their_problem(folder):
    paths = [folder / name for name in ("good.jpg", "text.jpg", "renamed_png.jpg", "empty.jpg", "gone.jpg")]
    problems = dict(find_unreadable_images(paths))
    assert list(problems) == [folder / "text.jpg", folder / "empty.jpg", folder / "gone.jpg"]
    assert "not a readable image" in problems[folder / "text.jpg"]
    assert problems[folder / "gone.jpg"] == "file not found"


def test_files_that_passed_are_remembered_in_the_runs_folder_until_they_change(folder, tmp_path_factory):
    good, cache = folder / "good.jpg", tmp_path_factory.mktemp("run") / "new" / CACHE_NAME
    listing = sorted(folder.iterdir())
    assert find_unreadable_images([good], cache) == []
    assert list(json.loads(cache.read_text())) == [str(good)]
    good.write_text("now broken")  # another size: checked again
    assert [path for path, _ in find_unreadable_images([good], cache)] == [good]
    assert json.loads(cache.read_text()) == {}
    assert sorted(folder.iterdir()) == listing  # nothing written into the dataset's folder


def test_the_error_lists_the_first_files_and_the_way_out(folder):
    paths = [folder / f"missing_{index}.jpg" for index in range(7)]
    with pytest.raises(ValueError, match=r"7 image\(s\) cannot be read \(.*missing_0.jpg: file not found;.* and 2 "
                                         r"more\)\. Replace them .* ImageSets/Main"):
        require_readable_images(paths)
    with pytest.raises(ValueError) as raised:  # as many as are shown: all named, nothing more to count
        require_readable_images(paths[:2], shown=2)
    assert str(raised.value).startswith(f"2 image(s) cannot be read ({paths[0]}: file not found; {paths[1]}: file "
                                        f"not found). Replace them")


def test_a_huge_image_is_read_from_its_header_without_a_warning(tmp_path):
    """A 12,000 x 10,000 PNG (120 megapixels, over Pillow's decompression-bomb warning at 89) of no pixel data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path = tmp_path / "huge.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 12_000, 10_000, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert imagecheck.header_size(path) == (12_000, 10_000)


def test_a_rerun_reads_no_header_of_an_unchanged_file(folder, monkeypatch):
    good, cache = folder / "good.jpg", folder / "run" / CACHE_NAME
    assert find_unreadable_images([good], cache) == []
    opened = []
    monkeypatch.setattr(imagecheck, "header_problem", lambda path: opened.append(path))
    assert find_unreadable_images([good], cache) == [] and opened == []
    assert find_unreadable_images([good]) == [] and opened == [good]  # without a cache: checked each time


def test_a_rewrite_of_the_same_size_is_checked_again(folder):
    """Size alone does not say a file is unchanged: the modification time is part of what is remembered."""
    good, cache = folder / "good.jpg", folder / "run" / CACHE_NAME
    assert find_unreadable_images([good], cache) == []
    size, modified = good.stat().st_size, good.stat().st_mtime_ns
    good.write_bytes(b"\0" * size)
    os.utime(good, ns=(modified + 10 ** 9, modified + 10 ** 9))
    assert [path for path, _ in find_unreadable_images([good], cache)] == [good]


def test_the_cache_goes_into_a_new_nested_run_folder_written_through_a_file_of_this_process(folder, tmp_path_factory,
                                                                                           monkeypatch):
    """train.py checks its images before creating its out_dir (runs/<name> may not exist yet, nor runs/), and
    every process of a torchrun job checks the same images: each writes through a temporary file of its own."""
    good, cache = folder / "good.jpg", tmp_path_factory.mktemp("runs") / "new" / "run" / CACHE_NAME
    renamed, replace = [], os.replace
    monkeypatch.setattr(os, "replace", lambda source, target: renamed.append(str(source)) or replace(source, target))
    require_readable_images([good], cache)
    assert list(json.loads(cache.read_text())) == [str(good)]
    assert renamed == [str(cache.with_name(f"{CACHE_NAME}.{os.getpid()}.tmp"))]
