"""Watching a file being replaced: what was on disk at each fsync and rename of it."""
import os


def record_file_writes(monkeypatch, path):
    """Events ("fsync", file, bytes on disk) and ("replace", source, target, target's bytes before) touching path or
    its temporary siblings, in order, with the real calls made."""
    events, fsync, replace = [], os.fsync, os.replace

    def recorded_fsync(descriptor):
        name = os.readlink(f"/proc/self/fd/{descriptor}")
        if name.startswith(str(path)):
            events.append(("fsync", name, os.fstat(descriptor).st_size))
        fsync(descriptor)

    def recorded_replace(source, target):
        if str(target) == str(path):
            events.append(("replace", str(source), str(target), path.read_bytes() if path.exists() else None))
        replace(source, target)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", recorded_replace)
    return events


def assert_atomic_write(events, path, before=b"an earlier export"):
    """The new contents went to a temporary file whose every byte was on disk when it was synced, then that file
    was renamed over path, which held its old contents until then."""
    assert [event[0] for event in events] == ["fsync", "replace"], events
    (_, synced, synced_size), (_, source, target, target_before) = events
    assert synced == source != str(path) and target == str(path)
    assert target_before == before
    assert path.stat().st_size == synced_size and path.read_bytes() != before
