"""yolo.files.atomic_write: a file is replaced whole or not at all."""
import os

import pytest

from file_writes import PREVIOUS, assert_atomic_write, record_file_writes
from yolo.files import atomic_write, kept_message


def test_the_new_contents_are_synced_then_renamed_over_the_old(tmp_path, monkeypatch):
    path = tmp_path / "log.csv"
    events = record_file_writes(monkeypatch, path)
    with atomic_write(path, "w", newline="") as file:
        file.write("epoch,loss\r\n1,0.5\r\n")
    assert_atomic_write(events, path)
    assert path.read_bytes() == b"epoch,loss\r\n1,0.5\r\n" and sorted(tmp_path.iterdir()) == [path]


def test_a_failure_inside_the_block_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(PREVIOUS)
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(path) as file:
            file.write(b"half of it")
            raise KeyboardInterrupt
    assert path.read_bytes() == PREVIOUS and sorted(tmp_path.iterdir()) == [path]
    assert kept_message(path) == f"{path} still holds its previous contents"
    assert kept_message(tmp_path / "new.pt") == f"{tmp_path / 'new.pt'} was not written"


def test_a_full_disk_raises_and_leaves_nothing_behind(tmp_path):
    """The temporary file of this process (`shared`: one per process) is a link to /dev/full: every write fails."""
    path = tmp_path / "cache.json"
    (tmp_path / f"cache.json.{os.getpid()}.tmp").symlink_to("/dev/full")
    with pytest.raises(OSError):
        with atomic_write(path, "w", shared=True) as file:
            file.write("x" * 100_000)
    assert list(tmp_path.iterdir()) == []


def test_the_open_arguments_reach_the_file_and_a_failed_open_raises_its_own_error(tmp_path):
    path = tmp_path / "names.txt"
    with atomic_write(path, "w", encoding="utf-16") as file:
        file.write("café")
    assert path.read_bytes() == "café".encode("utf-16")
    with pytest.raises(FileNotFoundError) as raised:  # the folder is missing: no temporary file was made
        with atomic_write(tmp_path / "missing" / "names.txt", "w") as file:
            file.write("never")
    assert raised.value.__context__ is None  # the open's error itself, not one from cleaning up after it
