"""Download, verify and extract PASCAL VOC2007 trainval, VOC2007 test and VOC2012 trainval.

    python data/download_voc.py --data-dir data [--mirror URL] [--archives-dir DIR] [--checksums FILE]
                                [--test-archive FILE] [--stall-timeout SECONDS] [--deadline SECONDS]

Archives go to <data-dir>/archives/ and are extracted into <data-dir>/ (VOCdevkit/VOC2007, VOCdevkit/VOC2012).
Every archive is checked against its MD5 before extraction. An interrupted download resumes from its
.part file. A wrong checksum moves the downloaded file aside to *.bad and stops. Extraction goes to a
temporary folder first and refuses members that would land outside it; once everything is in place a
marker <data-dir>/archives/<archive>.extracted is written, so a rerun skips finished archives and a
half-extracted one is redone. The .tar files may be deleted after extraction; keep the markers.

The historical host is often down: --mirror URL (or the VOC_MIRROR environment variable) names another
base URL serving the same file names, and --archives-dir DIR uses .tar files you already have. A host
that sends nothing for --stall-timeout seconds, or has not delivered an archive within --deadline
seconds, is given up on; the .part file stays, and a rerun resumes from it. --checksums FILE replaces the
official MD5s by the lines of FILE (`md5sum`'s format: "<md5>  <archive name>"), for archives of your own
in the VOC layout, such as a miniature set that rehearses the whole chain.
"""
import argparse
import hashlib
import http.client
import json
import os
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple

from tqdm import tqdm

CHUNK = 1 << 20
STALL_TIMEOUT_S = 60  # give up on a URL that sends no byte for this long
DEADLINE_S = 4 * 3600  # give up on an archive not downloaded within this (2 GB at 140 kB/s); 0: never


class Archive(NamedTuple):
    filename: str
    md5: str
    url: str


# The archives both protocols need, as torchvision/datasets/voc.py (DATASET_YEAR_DICT) lists them.
# Copied rather than imported: importing torchvision imports torch, seconds of start-up for every rerun
# of a download script; tests/test_download.py checks the copy against torchvision's.
VOC_ARCHIVES = (
    Archive("VOCtrainval_06-Nov-2007.tar", "c52e279531787c972589f7e41ab4ae64",
            "https://thor.robots.ox.ac.uk/pascal/VOC/voc2007/VOCtrainval_06-Nov-2007.tar"),
    Archive("VOCtest_06-Nov-2007.tar", "b6e924de25625d8de591ea690078ad9f",
            "https://thor.robots.ox.ac.uk/pascal/VOC/voc2007/VOCtest_06-Nov-2007.tar"),
    Archive("VOCtrainval_11-May-2012.tar", "6cd6e144f989b92b3379bac3b3de84fd",
            "https://thor.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"),
)


# The list of images the VOC2012 test server scores, inside its test archive.
TEST_LIST = "VOCdevkit/VOC2012/ImageSets/Main/test.txt"


class DownloadError(RuntimeError):
    """A download, checksum or extraction failure; the message says what to do."""


def md5sum(path):
    digest = hashlib.md5()
    with open(path, "rb") as file, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                        desc=f"md5 {path.name}", leave=False) as progress:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
            progress.update(len(chunk))
    return digest.hexdigest()


def _network_hint(url):
    return (f"Could not download {url}. The host may be down: set --mirror URL (or VOC_MIRROR) to a base URL "
            "serving the same file names, or put the .tar files in a folder and pass --archives-dir DIR")


def fetch(url, destination, stall_timeout=STALL_TIMEOUT_S, deadline=DEADLINE_S):
    """Download url to destination, resuming from destination.part when present.

    Gives up (DownloadError, the .part file kept) when no byte arrives for stall_timeout seconds or the
    download has taken more than deadline seconds (0: no deadline).
    """
    started = time.monotonic()
    partial = destination.with_name(destination.name + ".part")
    offset = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        # The timeout bounds each wait on the socket, so it is the stall deadline: connecting, then every read.
        response = urllib.request.urlopen(request, timeout=stall_timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:
            # Nothing left past our offset: the .part file is already whole; the checksum will tell.
            partial.rename(destination)
            return
        raise DownloadError(f"HTTP {error.code} {error.reason}: {_network_hint(url)}") from None
    except (OSError, http.client.HTTPException) as error:  # URLError, timeouts, refused or reset connections
        # A timeout while connecting comes wrapped in a URLError, one while waiting for the answer bare.
        if isinstance(error, TimeoutError) or isinstance(getattr(error, "reason", None), TimeoutError):
            raise DownloadError(f"no answer within {stall_timeout:g} s (--stall-timeout): "
                                f"{_network_hint(url)}") from None
        raise DownloadError(f"{error}: {_network_hint(url)}") from None
    with response:
        if offset and response.status != 206:
            offset = 0  # the server ignored the Range header and sends the whole file
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        received = offset
        try:
            with open(partial, "ab" if offset else "wb") as file, tqdm(
                    total=total, initial=offset, unit="B", unit_scale=True, desc=destination.name) as progress:
                # read1 returns what has arrived instead of waiting for a whole chunk, so a host trickling
                # a byte at a time still meets the deadline check.
                while chunk := response.read1(CHUNK):
                    file.write(chunk)
                    received += len(chunk)
                    progress.update(len(chunk))
                    if deadline and time.monotonic() - started > deadline:
                        raise DownloadError(
                            f"{url}: not downloaded within {deadline:g} s (--deadline), {received} of "
                            f"{total if total is not None else '?'} bytes so far; {partial} is kept, rerun to "
                            f"resume, or raise --deadline. {_network_hint(url)}")
        except TimeoutError:
            raise DownloadError(f"{url}: no data for {stall_timeout:g} s (--stall-timeout) after {received} bytes; "
                                f"{partial} is kept, rerun to resume. {_network_hint(url)}") from None
        except (OSError, http.client.HTTPException) as error:
            raise DownloadError(f"{error!r} after {received} bytes; rerun to resume. {_network_hint(url)}") from None
    if total is not None and received != total:
        raise DownloadError(f"connection closed after {received} of {total} bytes of {url}; rerun to resume, "
                            "or use --mirror / VOC_MIRROR or --archives-dir")
    partial.rename(destination)


def verify(path, md5, move_aside):
    """Raise DownloadError unless path has the expected MD5; a bad download is renamed *.bad."""
    actual = md5sum(path)
    if actual == md5:
        return
    message = f"{path}: MD5 is {actual}, expected {md5}"
    if move_aside:
        bad = path.with_name(path.name + ".bad")
        path.replace(bad)
        message += f"; moved it to {bad}. Rerun to download again, or use --mirror / --archives-dir"
    else:
        message += "; replace this file with a good copy, or drop --archives-dir to download it"
    raise DownloadError(message)


def _merge(source, target):
    """Move the tree at source into target, merging folders that already exist (VOC2007 trainval and test)."""
    if target.is_dir() and source.is_dir() and not source.is_symlink():
        for child in source.iterdir():
            _merge(child, target / child.name)
        source.rmdir()
    else:
        os.replace(source, target)


def extract(archive_path, data_dir, marker):
    """Extract safely into a temporary folder inside data_dir/archives, move into data_dir, then mark done."""
    staging = marker.with_name(marker.name + ".tmp")
    if staging.exists():
        shutil.rmtree(staging)  # left by an interrupted run
    staging.mkdir(parents=True)
    try:
        with tarfile.open(archive_path) as tar:
            # The "data" filter refuses absolute paths, "..", links leading outside and device files.
            tar.extractall(staging, filter="data")
    except tarfile.FilterError as error:
        shutil.rmtree(staging)
        raise DownloadError(f"{archive_path}: refusing an unsafe archive ({error}); nothing was extracted") from None
    except (tarfile.TarError, EOFError, OSError) as error:
        shutil.rmtree(staging)
        raise DownloadError(f"{archive_path}: extraction failed ({error}); the archive may be truncated or "
                            "corrupt: delete it and rerun") from None
    entries = sorted(child.name for child in staging.iterdir())
    for name in entries:
        _merge(staging / name, data_dir / name)
    staging.rmdir()
    marker.write_text(json.dumps({"archive": archive_path.name, "entries": entries}) + "\n")


def is_extracted(marker, data_dir):
    if not marker.is_file():
        return False
    return all((data_dir / name).exists() for name in json.loads(marker.read_text())["entries"])


def download_voc(data_dir, archives, mirror=None, archives_dir=None, stall_timeout=STALL_TIMEOUT_S,
                 deadline=DEADLINE_S):
    """Make sure every (filename, md5, url) archive is downloaded, verified and extracted into data_dir.

    mirror: base URL serving the same file names, replacing each archive's own URL.
    archives_dir: folder already holding the archives; they are verified and extracted, never downloaded.
    stall_timeout, deadline: seconds, as for `fetch`.
    """
    data_dir = Path(data_dir).expanduser()
    download_dir = data_dir / "archives"
    download_dir.mkdir(parents=True, exist_ok=True)
    for archive in map(Archive._make, archives):
        marker = download_dir / f"{archive.filename}.extracted"
        if is_extracted(marker, data_dir):
            print(f"{archive.filename}: already extracted in {data_dir}, nothing to do")
            continue
        if archives_dir is not None:
            path = Path(archives_dir).expanduser() / archive.filename
            if not path.is_file():
                raise DownloadError(f"{path} not found; put {archive.filename} there or drop --archives-dir")
            verify(path, archive.md5, move_aside=False)
        else:
            path = download_dir / archive.filename
            if not path.is_file():
                url = f"{mirror.rstrip('/')}/{archive.filename}" if mirror else archive.url
                print(f"downloading {url}")
                fetch(url, path, stall_timeout, deadline)
            verify(path, archive.md5, move_aside=True)
        print(f"extracting {path} into {data_dir}")
        extract(path, data_dir, marker)
    print(f"VOC data ready in {data_dir}")


def extract_test_archive(data_dir, path):
    """The VOC2012 test archive (from the evaluation server, after registration: it has no public URL or MD5),
    extracted into data_dir beside VOC2012 trainval, once."""
    data_dir, path = Path(data_dir).expanduser(), Path(path).expanduser()
    marker = data_dir / "archives" / f"{path.name}.extracted"
    if is_extracted(marker, data_dir):
        print(f"{path.name}: already extracted in {data_dir}, nothing to do")
        return
    try:
        with tarfile.open(path) as tar:
            tar.getmember(TEST_LIST)
    except (OSError, tarfile.TarError) as error:
        raise DownloadError(f"cannot read --test-archive {path} ({error}): give the VOC2012 test .tar from the "
                            f"evaluation server") from None
    except KeyError:
        raise DownloadError(f"{path} is not the VOC2012 test archive: it holds no {TEST_LIST}") from None
    marker.parent.mkdir(parents=True, exist_ok=True)
    print(f"extracting {path} into {data_dir}")
    extract(path, data_dir, marker)


def with_checksums(archives, path):
    """`archives` with the MD5s that the file at `path` gives (md5sum's "<md5>  <name>" lines) instead of theirs;
    a file that leaves one out, or names another archive, is a DownloadError."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise DownloadError(f"cannot read --checksums {path} ({error.strerror or error})") from None
    checksums = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        md5, _, name = line.strip().partition(" ")
        name = name.strip().lstrip("*")  # md5sum marks binary mode with a '*'
        if len(md5) != 32 or not name:
            raise DownloadError(f"{path}:{number}: expected '<md5>  <archive name>', got {line!r}")
        checksums[name] = md5.lower()
    names = [archive.filename for archive in archives]
    unknown, missing = sorted(set(checksums) - set(names)), [name for name in names if name not in checksums]
    if unknown or missing:
        raise DownloadError(f"{path} must give the MD5 of exactly {', '.join(names)}"
                            + (f"; it lacks {', '.join(missing)}" if missing else "")
                            + (f"; it also names {', '.join(unknown)}" if unknown else ""))
    return tuple(archive._replace(md5=checksums[archive.filename]) for archive in archives)


def seconds(allow_zero):
    """An argparse type: a number of seconds, above zero (or also zero, where allow_zero)."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not (value >= 0 if allow_zero else value > 0):
            bound = ">= 0" if allow_zero else "> 0"
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds {bound}")
        return value
    return parse


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data", help="where archives/ and VOCdevkit/ go (default: data)")
    parser.add_argument("--mirror", default=os.environ.get("VOC_MIRROR"),
                        help="base URL serving the same archive file names (default: $VOC_MIRROR)")
    parser.add_argument("--archives-dir", help="folder holding the .tar files already; no download")
    parser.add_argument("--checksums", metavar="FILE",
                        help="md5sum-format file of the archives' MD5s, replacing the official ones")
    parser.add_argument("--test-archive", metavar="FILE",
                        help="the VOC2012 test .tar from the evaluation server, extracted after the others")
    parser.add_argument("--stall-timeout", type=seconds(allow_zero=False), default=STALL_TIMEOUT_S,
                        metavar="SECONDS",
                        help=f"give up on a host that sends nothing for this long (default: {STALL_TIMEOUT_S})")
    parser.add_argument("--deadline", type=seconds(allow_zero=True), default=DEADLINE_S, metavar="SECONDS",
                        help=f"give up on an archive not downloaded within this; 0: never (default: {DEADLINE_S})")
    args = parser.parse_args(argv)
    try:
        archives = with_checksums(VOC_ARCHIVES, args.checksums) if args.checksums else VOC_ARCHIVES
        download_voc(args.data_dir, archives, mirror=args.mirror, archives_dir=args.archives_dir,
                     stall_timeout=args.stall_timeout, deadline=args.deadline)
        if args.test_archive:
            extract_test_archive(args.data_dir, args.test_archive)
    except DownloadError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
