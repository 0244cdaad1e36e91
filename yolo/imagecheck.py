"""The check a dataset's images pass before training starts: each listed file opens as an image.

Only the header is read (a few hundred bytes per file, in parallel threads), so the whole of VOC takes
seconds; files that passed are remembered by size and modification time in a cache file in the run's folder
(never in the dataset's folders), so a rerun checks only what changed. A file whose header is fine but whose
pixels are damaged is caught later, when the loader decodes it (see `yolo.data`), and skipped there.
"""
import json
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from yolo.files import atomic_write
from yolo.orientation import displayed_size

# What a folder scan picks up as images; yolo.data.decode_image reads them by content, whatever the extension says.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")
CACHE_NAME = "checked_images.json"  # in a run's folder: what passed the check there
THREADS = 16  # header reads wait on the disk, not the CPU
LEAVE_OUT_OF_SPLIT = ("leave them out of the split (VOC: its ImageSets/Main list; COCO: the JSON's images; YOLO: the "
                      "split's image folder or list)")


def header_size(path: Path) -> tuple[int, int] | str:
    """(width, height) of `path` as displayed (EXIF orientation applied, as the decoder applies it), read from
    its header, or what is wrong with the file. Pillow opens no image of width or height 0."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)  # damaged metadata ("Corrupt EXIF data"): read without
            with Image.open(path) as image:
                return displayed_size(image)
    except FileNotFoundError:
        return "file not found"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        return f"not a readable image ({error})"


def header_problem(path: Path) -> str | None:
    """None when `path` opens as an image with a positive size, else what is wrong with it."""
    size = header_size(path)
    return size if isinstance(size, str) else None


def _signature(path: Path) -> list[int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def _read_cache(cache: Path | None) -> dict:
    try:
        return json.loads(cache.read_text()) if cache else {}
    except (OSError, ValueError):
        return {}


def _write_cache(cache: Path, entries: dict) -> None:
    # A folder that cannot be written only loses the cache, not the check. One temporary file per process: every
    # process of a torchrun job checks the same images.
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(cache, "w", shared=True) as file:
            file.write(json.dumps(entries))
    except OSError:
        pass


def find_unreadable_images(paths: list[Path], cache: Path | None = None) -> list[tuple[Path, str]]:
    """(path, problem) for every file of `paths` whose header cannot be read, in the order given. `cache`: a JSON
    file (in the run's folder, never the dataset's) remembering the files that passed, by size and
    modification time, so that a rerun checks only what changed."""
    paths = [Path(path) for path in paths]
    remembered = _read_cache(cache)
    # Each file stated once; what passes is remembered with the signature it had when it was checked.
    keys = {path: str(path.absolute()) for path in paths}
    signatures = {path: _signature(path) for path in paths}
    to_check = [path for path in paths if signatures[path] is None or remembered.get(keys[path]) != signatures[path]]
    with ThreadPoolExecutor(THREADS) as pool:
        problems = dict(zip(to_check, pool.map(header_problem, to_check)))
    for path, problem in problems.items():
        if problem is None:
            remembered[keys[path]] = signatures[path]
        else:
            remembered.pop(keys[path], None)
    if problems and cache:
        _write_cache(cache, remembered)
    return [(path, problems[path]) for path in paths if problems.get(path)]


def require_readable_images(paths: list[Path], cache: Path | None = None, shown: int = 5) -> None:
    """ValueError naming the unreadable files among `paths` (the first `shown` of them) and the way out."""
    unreadable = find_unreadable_images(paths, cache)
    if unreadable:
        listing = "; ".join(f"{path}: {problem}" for path, problem in unreadable[:shown])
        more = f" and {len(unreadable) - shown} more" if len(unreadable) > shown else ""
        raise ValueError(f"{len(unreadable)} image(s) cannot be read ({listing}{more}). Replace them (for VOC, "
                         f"`make download` verifies and re-extracts the archives) or {LEAVE_OUT_OF_SPLIT}.")
