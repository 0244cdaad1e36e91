import hashlib
import io
import os
import re
import sys
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from command_lines import run_python
from data import download_voc
from data import make_synthetic
from data.download_voc import DownloadError, download_voc as download
from yolo.formats import read_splits

HANG_S = 60  # a download that has not given up by then hangs: the test fails instead of waiting on
NAME = "VOCtrainval_06-Nov-2007.tar"  # a real archive name, so the CLI test meets it too
SCRIPT = Path(__file__).resolve().parents[1] / "data" / "download_voc.py"


class RangeHandler(BaseHTTPRequestHandler):
    """Serves server.files by name, honours "Range: bytes=N-", and logs (name, Range header) per request.

    A name in server.trickle is sent one byte per that many seconds, as a failing mirror does (None: one byte,
    then nothing); the answer to a name in server.silent does not start. Neither ever sends the last byte:
    they go on until the client gives up or the test ends (server.test_ended), so a download that does not
    give up cannot pass.
    """

    def do_GET(self):
        name = self.path.lstrip("/")
        self.server.log.append((name, self.headers.get("Range")))
        if name in self.server.silent:
            self.server.test_ended.wait()
            return
        data = self.server.files.get(name)
        if data is None:
            self.send_error(404)
            return
        requested = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        start = int(requested.group(1)) if requested else 0
        if start >= len(data):
            self.send_error(416)
            return
        body = data[start:]
        self.send_response(206 if requested else 200)
        self.send_header("Content-Length", str(len(body)))
        if requested:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if name in self.server.cut_short:  # a connection dropping mid-transfer
            self.server.cut_short.discard(name)
            body = body[: len(body) // 2]
        if name in self.server.trickle:
            self.send_slowly(body[:-1], self.server.trickle[name])
            return
        self.wfile.write(body)

    def send_slowly(self, body, seconds_per_byte):
        try:
            for index in range(len(body)):
                self.wfile.write(body[index:index + 1])
                self.wfile.flush()
                if self.server.test_ended.wait(HANG_S if seconds_per_byte is None else seconds_per_byte):
                    return
        except (BrokenPipeError, ConnectionResetError):  # the client gave up, as it should
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    httpd.files, httpd.log, httpd.cut_short, httpd.trickle, httpd.silent = {}, [], set(), {}, set()
    httpd.test_ended = threading.Event()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def voc_tar(tmp_path_factory):
    """Bytes of a small VOC-format tar: VOCdevkit/VOC2007 with 3 synthetic images."""
    source = tmp_path_factory.mktemp("voc_source")
    make_synthetic.generate(source / "VOCdevkit" / "VOC2007", train=3, val=0, seed=0)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(source / "VOCdevkit", arcname="VOCdevkit")
    return buffer.getvalue()


@pytest.fixture
def serve(server):
    """Serve bytes under NAME; returns the archive list for download_voc."""
    server.log.clear()
    server.cut_short.clear()
    server.trickle.clear()
    server.silent.clear()
    server.test_ended = threading.Event()

    def serve_bytes(data, md5=None):
        server.files[NAME] = data
        return [(NAME, md5 or hashlib.md5(data).hexdigest(), f"{server.url}/{NAME}")]
    yield serve_bytes
    server.test_ended.set()  # ends the answers still held


def download_or_hang(*args, **kwargs):
    """download(), failing the test if it has not returned within HANG_S (it should have given up)."""
    outcome = {}

    def run():
        try:
            outcome["result"] = download(*args, **kwargs)
        except BaseException as error:  # re-raised in the test's thread
            outcome["error"] = error
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(HANG_S)
    assert not thread.is_alive(), f"download did not give up within {HANG_S} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def assert_extracted(data_dir):
    assert (data_dir / "archives" / f"{NAME}.extracted").is_file()
    _, samples, _ = read_splits("voc", [(data_dir / "VOCdevkit" / "VOC2007", "train")], make_synthetic.CLASS_NAMES)
    assert len(samples) == 3


def test_download_extract_then_second_run_is_a_noop(tmp_path, server, serve, voc_tar, capsys):
    archives = serve(voc_tar)
    download(tmp_path, archives)
    assert_extracted(tmp_path)
    assert (tmp_path / "archives" / NAME).read_bytes() == voc_tar
    assert sorted(p.name for p in (tmp_path / "archives").iterdir()) == [NAME, f"{NAME}.extracted"]
    assert server.log == [(NAME, None)]
    capsys.readouterr()
    download(tmp_path, archives)
    assert server.log == [(NAME, None)]
    assert "nothing to do" in capsys.readouterr().out


def test_resume_asks_only_for_the_rest(tmp_path, server, serve, voc_tar):
    archives = serve(voc_tar)
    half = len(voc_tar) // 2
    (tmp_path / "archives").mkdir()
    (tmp_path / "archives" / f"{NAME}.part").write_bytes(voc_tar[:half])
    download(tmp_path, archives)
    assert server.log == [(NAME, f"bytes={half}-")]
    assert_extracted(tmp_path)


def test_part_already_whole_is_used(tmp_path, server, serve, voc_tar):
    archives = serve(voc_tar)
    (tmp_path / "archives").mkdir()
    (tmp_path / "archives" / f"{NAME}.part").write_bytes(voc_tar)
    download(tmp_path, archives)  # the server answers 416: nothing left to send
    assert server.log == [(NAME, f"bytes={len(voc_tar)}-")]
    assert_extracted(tmp_path)


def test_dropped_connection_keeps_part_then_resumes(tmp_path, server, serve, voc_tar):
    archives = serve(voc_tar)
    server.cut_short.add(NAME)
    with pytest.raises(DownloadError, match=r"connection closed after \d+ of \d+ bytes.*rerun to resume"):
        download(tmp_path, archives)
    assert not (tmp_path / "VOCdevkit").exists()
    kept = (tmp_path / "archives" / f"{NAME}.part").stat().st_size
    download(tmp_path, archives)
    assert server.log[-1] == (NAME, f"bytes={kept}-")
    assert_extracted(tmp_path)


# The stalling host sends one byte and then nothing; the trickling one a byte every 0.05 s, never the whole file.
@pytest.mark.parametrize("seconds_per_byte, settings, message", [
    (None, {"stall_timeout": 0.3, "deadline": 0}, r"no data for 0\.3 s \(--stall-timeout\) after [1-9]\d* bytes"),
    (0.05, {"stall_timeout": 30, "deadline": 0.5},
     r"not downloaded within 0\.5 s \(--deadline\), [1-9]\d* of \d+ bytes so far"),
], ids=["stall", "deadline"])
def test_stalling_or_trickling_host_is_given_up_and_the_part_resumes(tmp_path, server, serve, voc_tar,
                                                                     seconds_per_byte, settings, message):
    archives = serve(voc_tar)
    server.trickle[NAME] = seconds_per_byte
    with pytest.raises(DownloadError, match=rf"{message}; .*\.part is kept, rerun to resume.*--mirror"):
        download_or_hang(tmp_path, archives, **settings)
    kept = (tmp_path / "archives" / f"{NAME}.part").read_bytes()
    assert kept and voc_tar.startswith(kept)
    server.trickle.clear()
    download(tmp_path, archives, **settings)
    assert server.log[-1] == (NAME, f"bytes={len(kept)}-")
    assert_extracted(tmp_path)


def test_host_that_never_answers_is_given_up(tmp_path, server, serve, voc_tar):
    archives = serve(voc_tar)
    server.silent.add(NAME)
    with pytest.raises(DownloadError, match=r"no answer within 0\.2 s \(--stall-timeout\): Could not download"):
        download_or_hang(tmp_path, archives, stall_timeout=0.2)


def test_cli_gives_up_on_a_trickling_mirror_without_traceback(tmp_path, server, serve, voc_tar):
    serve(voc_tar)
    server.trickle[NAME] = 0.05
    result = run_python([sys.executable, str(SCRIPT), "--data-dir", str(tmp_path), "--mirror", server.url,
                             "--stall-timeout", "5", "--deadline", "0.3"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"error: {server.url}/{NAME}: not downloaded within 0.3 s (--deadline)" in result.stderr
    result = run_python([sys.executable, str(SCRIPT), "--data-dir", str(tmp_path), "--stall-timeout", "0"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "argument --stall-timeout: '0' is not a number of seconds > 0" in result.stderr


def test_wrong_checksum_moves_file_aside_and_extracts_nothing(tmp_path, serve, voc_tar):
    with pytest.raises(DownloadError, match=rf"{NAME}: MD5 is [0-9a-f]+, expected 0+; moved it to .*\.bad"):
        download(tmp_path, serve(voc_tar, md5="0" * 32))
    assert (tmp_path / "archives" / f"{NAME}.bad").read_bytes() == voc_tar
    assert sorted(p.name for p in tmp_path.iterdir()) == ["archives"]
    assert sorted(p.name for p in (tmp_path / "archives").iterdir()) == [f"{NAME}.bad"]


def test_truncated_archive_is_not_marked_extracted(tmp_path, voc_tar):
    # Its checksum matches (as for a file truncated before its MD5 was taken), so extraction must catch it.
    truncated = voc_tar[: len(voc_tar) // 2]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / NAME).write_bytes(truncated)
    archives = [(NAME, hashlib.md5(truncated).hexdigest(), "http://127.0.0.1:9/unused")]
    with pytest.raises(DownloadError, match=rf"{NAME}: extraction failed .*truncated or corrupt"):
        download(tmp_path / "data", archives, archives_dir=mine)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["archives"]
    assert list((tmp_path / "data" / "archives").iterdir()) == []


def unsafe_tar(kind):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        member = tarfile.TarInfo("VOCdevkit/VOC2007/ok.txt")
        tar.addfile(member, io.BytesIO(b""))
        if kind == "parent":
            member = tarfile.TarInfo("VOCdevkit/../../escape.txt")
            member.size = 4
            tar.addfile(member, io.BytesIO(b"oops"))
        else:
            member = tarfile.TarInfo("VOCdevkit/escape")
            member.type = tarfile.SYMTYPE
            member.linkname = "../../escape.txt"
            tar.addfile(member)
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["parent", "symlink"])
def test_archive_escaping_the_target_is_rejected(tmp_path, serve, kind):
    data_dir = tmp_path / "a" / "data"
    with pytest.raises(DownloadError, match=rf"{NAME}: refusing an unsafe archive"):
        download(data_dir, serve(unsafe_tar(kind)))
    assert not list(tmp_path.rglob("escape*"))
    assert not (data_dir / "VOCdevkit").exists()
    assert not (data_dir / "archives" / f"{NAME}.extracted").exists()


def test_archives_dir_and_mirror(tmp_path, server, serve, voc_tar, monkeypatch):
    archives = serve(voc_tar)
    mine = tmp_path / "my archives"
    mine.mkdir()
    (mine / NAME).write_bytes(voc_tar)
    offline = [(name, md5, "http://127.0.0.1:9/unreachable") for name, md5, _ in archives]
    monkeypatch.setenv("HOME", str(tmp_path))  # a shell leaves ~ unexpanded inside quotes
    download(tmp_path / "from_dir", offline, archives_dir="~/my archives")
    assert_extracted(tmp_path / "from_dir")
    assert server.log == [] and (mine / NAME).is_file()
    assert not (tmp_path / "from_dir" / "archives" / NAME).exists()  # used in place, not copied

    download(tmp_path / "from_mirror", offline, mirror=server.url + "/")
    assert_extracted(tmp_path / "from_mirror")
    assert server.log == [(NAME, None)]


def test_network_error_names_url_and_remedies(tmp_path, server):
    archives = [(NAME, "0" * 32, f"{server.url}/missing/{NAME}")]
    with pytest.raises(DownloadError, match=rf"HTTP 404.*{re.escape(archives[0][2])}.*--mirror.*VOC_MIRROR.*--archives-dir"):
        download(tmp_path, archives)


def test_cli_reports_a_failing_mirror_without_traceback(tmp_path, server):
    environment = {**os.environ, "VOC_MIRROR": f"{server.url}/nowhere"}
    result = run_python([sys.executable, str(SCRIPT), "--data-dir", str(tmp_path)], env=environment,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert f"error: HTTP 404 Not Found: Could not download {server.url}/nowhere/{NAME}" in result.stderr
    assert "--archives-dir" in result.stderr and "Traceback" not in result.stderr


def test_archive_list_matches_torchvision():
    from torchvision.datasets.voc import DATASET_YEAR_DICT

    expected = [(DATASET_YEAR_DICT[key]["filename"], DATASET_YEAR_DICT[key]["md5"], DATASET_YEAR_DICT[key]["url"])
                for key in ("2007", "2007-test", "2012")]
    assert [tuple(archive) for archive in download_voc.VOC_ARCHIVES] == expected


def test_the_voc2012_test_archive_is_checked_then_extracted_once(tmp_path, capsys):
    from data.download_voc import TEST_LIST, extract_test_archive
    source = tmp_path / "source"
    (source / Path(TEST_LIST).parent).mkdir(parents=True)
    (source / TEST_LIST).write_text("2008_000001\n")
    archive, wrong = tmp_path / "VOC2012test.tar", tmp_path / "other.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(source / "VOCdevkit", arcname="VOCdevkit")
    with tarfile.open(wrong, "w") as tar:
        tar.add(source / "VOCdevkit" / "VOC2012" / "ImageSets", arcname="ImageSets")
    data_dir = tmp_path / "data"
    with pytest.raises(DownloadError, match="is not the VOC2012 test archive: it holds no VOCdevkit/VOC2012/"):
        extract_test_archive(data_dir, wrong)
    extract_test_archive(data_dir, archive)
    assert (data_dir / TEST_LIST).read_text() == "2008_000001\n"
    assert (data_dir / "archives" / "VOC2012test.tar.extracted").is_file()
    extract_test_archive(data_dir, archive)
    assert "already extracted" in capsys.readouterr().out
