"""Watching a file being replaced: what was on disk at each fsync and rename of it."""
import os

PREVIOUS = b"the previous contents"


def record_file_writes(monkeypatch, path):
    """Writes PREVIOUS to path, then records ("fsync", file, bytes on disk) for path and its temporary siblings and
    ("replace", source, target, target's bytes before) for renames onto path, in order, making the real calls."""
    path.write_bytes(PREVIOUS)
    events, fsync, replace = [], os.fsync, os.replace

    def recorded_fsync(descriptor):
        name = os.readlink(f"/proc/self/fd/{descriptor}")
        if name.startswith(str(path)):
            events.append(("fsync", name, os.fstat(descriptor).st_size))
        fsync(descriptor)

    def recorded_replace(source, target):
        if str(target) == str(path):
            events.append(("replace", str(source), str(target), path.read_bytes()))
        replace(source, target)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", recorded_replace)
    return events


def assert_atomic_write(events, path):
    """The new contents went to a temporary file whose every byte was on disk when it was synced, then that file
    was renamed over path, which held its previous contents until then."""
    assert [event[0] for event in events] == ["fsync", "replace"], events
    (_, synced, synced_size), (_, source, target, target_before) = events
    assert synced == source != str(path) and target == str(path)
    assert target_before == PREVIOUS
    assert path.stat().st_size == synced_size and path.read_bytes() != PREVIOUS
