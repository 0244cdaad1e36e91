"""Replacing a file whole or not at all: the one way the project writes the files a crash must not damage
(checkpoints, weights and ONNX exports, result CSVs, logs, the image check's cache, detection files)."""
import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *, shared: bool = False, **open_args):
    """A file open for writing on a temporary sibling of `path` (`path` + .tmp; `shared`, where several processes
    may write the same file at once: `path` + .<process id>.tmp, one each); when the block ends it is flushed,
    synced to disk and renamed over `path`. Until then `path` keeps its previous contents: if the block or the
    write fails (a kill, a full disk), the temporary file is removed and the error raised."""
    path = Path(path)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp" if shared else f"{path.name}.tmp")
    try:
        with open(temporary, mode, **open_args) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def kept_message(path: Path) -> str:
    """What a failed atomic_write left at `path`, for the error that reports it."""
    return f"{path} still holds its previous contents" if path.exists() else f"{path} was not written"
