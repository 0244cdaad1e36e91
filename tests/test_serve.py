"""serve.py: the JSON API against detect.py and `predict`, concurrent clients, every bad input answered with its 4xx
while the server goes on, the batching of concurrent images, and the page in a real browser (Chromium)."""
import asyncio
import errno
import functools
import http.client
import io
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import warnings
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import ANY

import numpy as np
import pytest
import torch
import uvicorn
from fastapi import HTTPException
from PIL import Image

import detect
import serve
from command_lines import run_python
from tools import load_test, page_screenshot
from tools.page_screenshot import open_browser
from tools.serve_process import start_server
from yolo.api import load_detector, open_detector
from yolo.config import resolve_config
from yolo.data import decode_image
from yolo.postprocess import DISPLAY_SCORE_THRESHOLD, MAX_DETECTIONS, NMS_IOU
from yolo.serving import DISCARD_LIMIT, PAGE, BatchedDetector, create_app, read_body

ROOT = Path(__file__).resolve().parents[1]
BOUNDARY = "test-boundary-7d1f"


def form(*parts: tuple[bytes, bytes | None, bytes]) -> tuple[bytes, str]:
    """A multipart/form-data body of (field name, file name or None for a plain field, content) parts, names as
    raw bytes, as a browser's FormData sends it (a file part with its own content type), and its content type."""
    body = b""
    for field, file_name, content in parts:
        head = b'Content-Disposition: form-data; name="' + field + b'"'
        if file_name is not None:
            head += b'; filename="' + file_name + b'"\r\nContent-Type: application/octet-stream'
        body += b"--" + BOUNDARY.encode() + b"\r\n" + head + b"\r\n\r\n" + content + b"\r\n"
    return body + b"--" + BOUNDARY.encode() + b"--\r\n", f"multipart/form-data; boundary={BOUNDARY}"


def post(target, body: bytes, content_type: str | None = "application/octet-stream",
         query: str = "") -> tuple[int, dict]:
    """POST /predict to a server's URL, or to an InProcess app."""
    if isinstance(target, InProcess):
        return target.request("POST", "/predict", body, content_type, query)
    request = urllib.request.Request(f"{target}/predict{query}", data=body, headers={"Content-Type": content_type},
                                     method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def get(target, path: str) -> tuple[int, dict]:
    if isinstance(target, InProcess):
        return target.request("GET", path)
    try:
        with urllib.request.urlopen(f"{target}{path}", timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


class InProcess:
    """A new app for each request, called in the test's own thread inside its lifespan: what the server does for
    a request, with nothing left running between tests (a mutation run forks a process per mutant, which a server
    thread started earlier would not follow)."""

    def __init__(self, make_app):
        self.make_app = make_app

    def request(self, method: str, path: str, body: bytes = b"", content_type: str | None = "", query: str = ""):
        status, answer, _ = self.exchange(method, path, body, content_type, query)
        return status, json.loads(answer)

    def exchange(self, method: str, path: str, body: bytes = b"", content_type: str | None = "",
                 query: str = "") -> tuple[int, bytes, str]:
        """The answer's status, body and content type."""
        messages, requests = [], [{"type": "http.request", "body": body, "more_body": False}]
        answered = None  # an asyncio.Event, made inside the loop

        async def receive():
            if requests:
                return requests.pop()
            await answered.wait()  # as a server does, the client disconnects once its answer is complete
            return {"type": "http.disconnect"}

        async def send(message):
            messages.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                answered.set()

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
                 "query_string": query.removeprefix("?").encode(), "client": ("127.0.0.1", 1),
                 "server": ("127.0.0.1", 80),
                 "headers": [(b"content-length", str(len(body)).encode())]
                 + ([] if content_type is None else [(b"content-type", content_type.encode())])}

        app = self.make_app()

        async def run():
            nonlocal answered
            answered = asyncio.Event()
            async with app.router.lifespan_context(app):
                await app(scope, receive, send)

        asyncio.run(run())
        start = next(message for message in messages if message["type"] == "http.response.start")
        headers = dict(start["headers"])
        return start["status"], b"".join(message.get("body", b"") for message in messages
                                         if message["type"] == "http.response.body"), \
            headers.get(b"content-type", b"").decode()


@pytest.fixture(scope="module")
def model(overfit_run):
    """(checkpoint, its validation images, the PyTorch detector serve.py runs on the CPU in fp32)."""
    data_dir, run_dir = overfit_run
    checkpoint = run_dir / "last.pt"
    images = sorted((data_dir / "JPEGImages").glob("*.jpg"))
    detector, state = open_detector(checkpoint, "cpu", "fp32", score_threshold=DISPLAY_SCORE_THRESHOLD)
    return checkpoint, images, detector, state


def serving_app(model):
    """The app with limits small enough to test: 1 MB bodies, 1 megapixel images."""
    checkpoint, _, detector, state = model
    return create_app(detector, serve.model_description(checkpoint, state, detector), max_batch_size=4,
                      batch_window_ms=5, max_upload_mb=1, max_megapixels=1)


@pytest.fixture
def server(model):
    return InProcess(lambda: serving_app(model))


@pytest.fixture(scope="module")
def http_server(model):
    """The app served by uvicorn on 127.0.0.1 in a thread: for concurrent clients and raw HTTP."""
    listener = socket.create_server(("127.0.0.1", 0))  # listening already: requests wait for the server's start
    server = uvicorn.Server(uvicorn.Config(serving_app(model), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=60)


def detect_py_rows(model, path: Path, source: str) -> list[dict]:
    """detect.py's detections.json rows for the image (its functions, at its default settings)."""
    _, _, detector, state = model
    return detect.detection_rows(source, 0, detect.detect(detector, [decode_image(path)])[0], state["class_names"])


def assert_same_rows(answer: list[dict], expected: list[dict]) -> None:
    assert [(row["class_id"], row["class_name"], row["source"]) for row in answer] == \
           [(row["class_id"], row["class_name"], row["source"]) for row in expected]
    numbers = ["x1", "y1", "x2", "y2", "score"]
    np.testing.assert_allclose([[row[key] for key in numbers] for row in answer],
                               [[row[key] for key in numbers] for row in expected], rtol=1e-5, atol=1e-4)


def test_an_image_gets_detect_pys_rows_and_predicts_boxes(server, model):
    checkpoint, images, _, _ = model
    path = images[0]
    body, content_type = form((b"image", b"photo 1.jpg", path.read_bytes()))
    status, answer = post(server, body, content_type)
    assert status == 200, answer
    expected = detect_py_rows(model, path, "photo 1.jpg")
    assert expected, "the test model detects nothing on its training image: nothing would be compared"
    assert_same_rows(answer["detections"], expected)
    width, height = Image.open(path).size
    assert (answer["source"], answer["width"], answer["height"], answer["batch_size"]) == \
        ("photo 1.jpg", width, height, 1)
    assert {row["frame"] for row in answer["detections"]} == {0}
    # predict's boxes are continuous 0-based pixels: the VOC rows are x1 + 1, y1 + 1, x2, y2.
    predicted = load_detector(checkpoint, "cpu", "fp32").predict(path)
    voc = predicted.boxes.double() + torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    np.testing.assert_allclose([[row[key] for key in ("x1", "y1", "x2", "y2")] for row in answer["detections"]],
                               voc.numpy(), rtol=1e-5, atol=1e-3)
    assert [row["class_name"] for row in answer["detections"]] == predicted.names

    # The raw body is the same image, named "upload"; the query parameters are the request's own NMS settings.
    status, raw = post(server, path.read_bytes())
    assert status == 200 and [row["source"] for row in raw["detections"]] == ["upload"] * len(expected)
    assert post(server, path.read_bytes(), content_type=None) == (200, {**raw, "milliseconds": ANY})
    status, strict = post(server, path.read_bytes(), query="?score_threshold=0.9&max_detections=1")
    assert status == 200
    assert [row["score"] for row in strict["detections"]] == \
           [row["score"] for row in raw["detections"] if row["score"] >= 0.9][:1]
    status, loose = post(server, path.read_bytes(), query="?score_threshold=0.01&nms_iou=1")
    assert status == 200 and len(loose["detections"]) > len(raw["detections"])


def test_the_model_and_health_endpoints(server, model):
    checkpoint, _, detector, state = model
    status, described = get(server, "/model")
    assert status == 200
    assert described["class_names"] == state["class_names"] and described["image_size"] == detector.image_size
    assert described["name"] == f"{checkpoint.parent.name}/last.pt" and described["runtime"] == "pytorch"
    assert (described["device"], described["dtype"]) == ("cpu", "float32")
    assert get(server, "/health") == (200, {"status": "ok"})


def test_the_page_and_its_files_are_served_and_the_api_described_without_the_cdn_docs(server):
    assert server.exchange("GET", "/") == (200, (PAGE / "index.html").read_bytes(), "text/html; charset=utf-8")
    assert server.exchange("GET", "/page/page.js")[:2] == (200, (PAGE / "page.js").read_bytes())
    assert server.exchange("GET", "/page/page.css")[:2] == (200, (PAGE / "page.css").read_bytes())
    assert get(server, "/page/index.html") == (404, {"detail": "no page file 'index.html'"})
    status, schema = get(server, "/openapi.json")
    assert status == 200 and schema["info"]["title"] == "YOLOv1"
    assert set(schema["paths"]) == {"/health", "/model", "/predict"}  # the page's routes are not API
    assert get(server, "/docs")[0] == get(server, "/redoc")[0] == 404


def test_the_answer_gives_the_requests_milliseconds_on_the_servers_clock(server, model, monkeypatch):
    clock = iter([100.0, 100.25046])
    monkeypatch.setattr("yolo.serving.time", SimpleNamespace(perf_counter=lambda: next(clock)))
    status, answer = post(server, model[1][0].read_bytes(), "image/jpeg")
    assert status == 200 and answer["milliseconds"] == 250.5  # to a tenth of a millisecond


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels, followed by a few bytes of image data: what a
    decompression bomb looks like before it is decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def jpeg(width: int, height: int) -> bytes:
    data = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(data, "JPEG")
    return data.getvalue()


BAD_INPUTS = {
    # name: (body, content type, query, status, what the detail says)
    "not an image": (b"%PDF-1.7 not an image", "application/pdf", "", 415, "upload is not an image"),
    "a truncated JPEG": (jpeg(300, 200)[:-200], "image/jpeg", "", 422, "upload: cannot decode image (Image is "
                         "incomplete or truncated); send the complete file"),
    "an image over the pixel limit": (png_header(1200, 1000), "image/png", "", 413,
                                      "upload is 1200 x 1000 pixels, over this server's limit of 1 megapixels"),
    "a decompression bomb": (png_header(100_000, 100_000), "image/png", "", 413,
                             "upload: Image size (10000000000 pixels) exceeds limit"),
    "a damaged header": (b"BM" + bytes(20), "image/bmp", "", 422,
                         "upload: cannot read the image's header (Unsupported BMP header type (0))"),
    "a body over the size limit": (b"\xff" * (2**20 + 1), "image/jpeg", "", 413,
                                   "the request's body is over this server's limit of 1 MB"),
    "an empty body": (b"", "image/jpeg", "", 400, "no image: the request's body is empty"),
    "an unknown parameter": (jpeg(30, 20), "image/jpeg", "?score=0.5", 422, "unknown query parameter 'score': the "
                             "parameters are score_threshold, nms_iou, max_detections"),
    "a value out of range": (jpeg(30, 20), "image/jpeg", "?nms_iou=1.5", 422, "nms_iou=1.5: must be between 0.0"),
    "a value of the wrong type": (jpeg(30, 20), "image/jpeg", "?max_detections=ten", 422,
                                  "max_detections=ten: must be a whole number"),
    "a repeated parameter": (jpeg(30, 20), "image/jpeg", "?nms_iou=0.3&nms_iou=0.4", 422,
                             "query parameter nms_iou given more than once"),
    "a form without the image field": (*form((b"file", b"photo.jpg", jpeg(30, 20))), "", 400,
                                       "the form must hold one file in the field 'image' (files found in: file)"),
    "a damaged form": (b"--nothing", f"multipart/form-data; boundary={BOUNDARY}", "", 400,
                       "the multipart form cannot be read"),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_gets_its_4xx_and_the_next_request_is_served(server, model, name):
    body, content_type, query, status, detail = BAD_INPUTS[name]
    answer_status, answer = post(server, body, content_type, query)
    assert (answer_status, len(answer["detail"].splitlines())) == (status, 1), answer
    assert answer["detail"].startswith(detail), answer["detail"]
    status, good = post(server, model[1][1].read_bytes())
    assert status == 200 and good["detections"]


def test_a_body_without_its_length_is_cut_off_at_the_limit(http_server):
    """A chunked upload declares no size: it is refused once the bytes received pass the limit."""
    host, port = http_server.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request("POST", "/predict", body=iter([b"\xff" * 2**16] * 20), encode_chunked=True,
                       headers={"Content-Type": "image/jpeg"})
    response = connection.getresponse()
    assert response.status == 413 and "over this server's limit" in json.load(response)["detail"]
    connection.close()


def test_concurrent_clients_get_the_answers_of_single_requests(http_server, model):
    """8 clients, 40 requests in all, every one answered with its image's detections."""
    images = model[1]
    expected = {path.name: detect_py_rows(model, path, "upload") for path in images}

    def ask(index: int) -> tuple[str, int, dict]:
        path = images[index % len(images)]
        return (path.name, *post(http_server, path.read_bytes()))

    with ThreadPoolExecutor(8) as clients:
        answers = list(clients.map(ask, range(40)))
    for name, status, answer in answers:
        assert status == 200, answer
        assert_same_rows(answer["detections"], expected[name])
    assert all(1 <= answer["batch_size"] <= 4 for _, _, answer in answers)


def test_images_waiting_together_run_as_one_batch_and_each_gets_its_own_settings(model):
    """The images queued before a batch starts go through the network together (up to the maximum), and each
    is post-processed with its own request's settings: the same detections as one at a time."""
    _, images, detector, state = model
    decoded = [decode_image(path) for path in images]
    settings = [{"score_threshold": threshold, "nms_iou": NMS_IOU, "max_detections": MAX_DETECTIONS}
                for threshold in (0.2, 0.6, 0.9, 0.05, 0.2, 0.3, 0.5)]

    async def run(max_batch_size: int):
        batched = BatchedDetector(detector, max_batch_size, batch_window_s=0)
        jobs = [asyncio.ensure_future(batched(image, setting)) for image, setting in zip(decoded, settings)]
        await asyncio.sleep(0)  # every image is queued
        loop = asyncio.create_task(batched.run())
        done = await asyncio.gather(*jobs)
        loop.cancel()
        batched.network_thread.shutdown()
        return done

    for max_batch_size, sizes in ((8, [7] * 7), (3, [3, 3, 3, 3, 3, 3, 1])):
        jobs = asyncio.run(run(max_batch_size))
        assert [job.batch_size for job in jobs] == sizes
        for job, image, setting in zip(jobs, decoded, settings):
            alone = BatchedDetector(detector, 1, 0).detect([type(job)(image, setting, None)])[0]
            np.testing.assert_allclose(job.future.result(), alone, rtol=1e-5, atol=1e-4)
            assert (job.future.result()[:, 4] >= setting["score_threshold"]).all()


def test_a_body_declared_far_over_the_limit_is_refused_before_it_is_sent(http_server):
    host, port = http_server.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.putrequest("POST", "/predict")
    connection.putheader("Content-Type", "image/jpeg")
    connection.putheader("Content-Length", str(2**40))
    connection.endheaders()  # and not a byte of the body
    response = connection.getresponse()
    assert response.status == 413 and "over this server's limit of 1 MB" in json.load(response)["detail"]
    connection.close()


@pytest.fixture
def serve_py(model):
    """serve.py on the test model, started as a user starts it, on a free port: its URL."""
    process, url = start_server(model[0], "--device=cpu")
    yield url
    process.terminate()
    process.wait(timeout=60)


def test_the_page_shows_an_uploaded_images_detections_and_filters_them_by_score(serve_py, model):
    from playwright.sync_api import sync_playwright
    _, images, _, state = model
    chosen = images[:2]
    with sync_playwright() as playwright:
        try:
            browser = open_browser(playwright)
        except FileNotFoundError as missing:
            pytest.skip(str(missing))
        try:
            page = browser.new_page()
            page.goto(serve_py)
            page.wait_for_function("document.getElementById('model-details').textContent.includes('classes')")
            assert all(name in page.text_content("#model-details") for name in state["class_names"])
            page.set_input_files("#files", [str(path) for path in chosen])
            page.wait_for_function("document.querySelectorAll('.result.done').length === 2")
            shown = {}
            for card in page.query_selector_all(".result.done"):
                name = card.query_selector("h2").text_content().split()[0]
                rows = [[cell.text_content() for cell in row.query_selector_all("td")]
                        for row in card.query_selector_all("tbody tr")]
                shown[name] = (rows, len(card.query_selector_all(".box")))
            for path in chosen:
                expected = [row for row in detect_py_rows(model, path, path.name)
                            if row["score"] >= DISPLAY_SCORE_THRESHOLD]
                assert expected
                rows, boxes = shown[path.name]
                assert rows == [[row["class_name"], f"{row['score']:.3f}",
                                 *(f"{row[key]:.1f}" for key in ("x1", "y1", "x2", "y2"))] for row in expected]
                assert boxes == len(expected)
            # The slider filters what was answered: above every score, nothing is left drawn.
            page.fill("#threshold", "1")
            page.wait_for_function("document.querySelectorAll('.result.done .box').length === 0")
            assert page.query_selector_all(".result.done tbody tr") == []
        finally:
            browser.close()


def serve_settings(checkpoint, *arguments: str) -> dict:
    """serve.py's settings as its command line resolves them, on any free port of 127.0.0.1, on the CPU."""
    return resolve_config(vars(serve), [f"--checkpoint={checkpoint}", "--port=0", "--device=cpu", *arguments],
                          rules=serve.RULES)


def test_serve_main_says_where_it_listens_and_serves_the_checkpoint_there(model, monkeypatch, capsys):
    checkpoint, images, detector, state = model
    servers, started = [], threading.Event()

    class StartedServer(uvicorn.Server):  # uvicorn's server, which the test can see start and can stop
        def __init__(self, config):
            super().__init__(config)
            servers.append(self)

        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            started.set()

    def run_main(settings):
        try:
            serve.main(settings)
        except BaseException as error:
            stopped.append(error)
        finally:
            started.set()  # a main that stops ends the wait too

    monkeypatch.setattr(serve.uvicorn, "Server", StartedServer)
    stopped = []
    thread = threading.Thread(target=run_main, args=(serve_settings(checkpoint, "--max_upload_mb=1"),), daemon=True)
    thread.start()
    try:
        assert started.wait(timeout=300) and not stopped, stopped
        printed = re.fullmatch(r"serving (\S+) \(cpu, float32\) at (http://127\.0\.0\.1:(\d+)) \(Ctrl-C stops\)\n",
                               capsys.readouterr().out)
        assert printed and printed[1] == str(checkpoint) and printed[3] != "0"
        url = printed[2]
        assert get(url, "/model") == (200, serve.model_description(checkpoint, state, detector))
        status, answer = post(url, images[0].read_bytes())
        assert status == 200 and answer["detections"]
        status, refused = post(url, bytes(2**20 + 1))  # over --max_upload_mb=1, under the default 20
        assert status == 413 and "limit of 1 MB" in refused["detail"]
    finally:
        for server in servers:
            server.should_exit = True
        thread.join(timeout=60)
    assert not thread.is_alive()
    assert capsys.readouterr() == ("", "")  # uvicorn logs warnings only: no line per request


def ipv6_loopback() -> bool:
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
def test_serve_main_listens_on_an_ipv6_address_and_prints_its_url_in_brackets(model, monkeypatch, capsys):
    servers = []

    class NotRun(uvicorn.Server):  # the address is printed before the server runs: no need to run it
        def run(self, sockets=None):
            servers.append(sockets)

    monkeypatch.setattr(serve.uvicorn, "Server", NotRun)
    serve.main(serve_settings(model[0], "--host=::1"))
    printed = re.fullmatch(r"serving \S+ \(cpu, float32\) at http://\[::1\]:(\d+) \(Ctrl-C stops\)\n",
                           capsys.readouterr().out)
    ((listener,),) = servers
    with listener:
        assert printed and listener.family == socket.AF_INET6 and int(printed[1]) == listener.getsockname()[1]


def test_the_model_description_names_the_runtime_and_the_training_run(model):
    checkpoint, _, detector, state = model
    assert state["epoch"] is not None and state["git_commit"]
    assert serve.model_description(checkpoint, state, detector) == {
        "name": f"{checkpoint.parent.name}/last.pt", "checkpoint": str(checkpoint), "runtime": "pytorch",
        "device": "cpu", "dtype": "float32", "backbone": state["model_args"]["backbone"],
        "image_size": detector.image_size, "grid_size": detector.grid_size, "class_names": state["class_names"],
        "epoch": state["epoch"], "git_commit": state["git_commit"]}
    onnx = checkpoint.with_name("model.onnx")
    assert serve.model_description(onnx, state, detector)["runtime"] == "onnxruntime"


def test_a_bad_checkpoint_or_a_taken_port_is_one_error_line(model, tmp_path):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as exited:
        serve.main(serve_settings(bad))
    assert str(exited.value.code).startswith(f"error: {bad}") and "\n" not in str(exited.value.code)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as exited:
            serve.main(serve_settings(model[0], f"--port={port}"))
    assert exited.value.code.startswith(f"error: cannot listen on 127.0.0.1:{port} ({os.strerror(errno.EADDRINUSE)}")
    assert exited.value.code.endswith("); choose another --port (0: any free one) or --host")


def test_serve_py_checks_its_settings_before_it_loads_the_model(tmp_path):
    result = run_python([sys.executable, "serve.py", f"--checkpoint={tmp_path / 'missing.pt'}", "--port=65536"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and result.stderr.startswith("error: --port=65536") and \
        len(result.stderr.splitlines()) == 1, result.stderr


class Upload:
    """What read_body reads of a request: its headers and its body's chunks as they arrive."""

    def __init__(self, chunks: list[bytes], declared: int | None = None):
        self.headers = {} if declared is None else {"content-length": str(declared)}
        self.chunks, self.read = chunks, 0

    async def stream(self):
        for chunk in self.chunks:
            self.read += 1
            yield chunk


def test_a_body_is_read_up_to_its_limit_and_an_over_limit_one_refused_once_read_or_declared():
    def read(upload: Upload, limit: int):
        return asyncio.run(read_body(upload, limit))

    assert read(Upload([b"ab", b"cd"], declared=4), 4) == b"abcd"
    with pytest.raises(HTTPException) as refused:
        read(Upload([b"ab", b"cde"]), 4)
    assert refused.value.status_code == 413
    # Read to its end (the client then gets the answer), up to DISCARD_LIMIT bytes past the limit.
    upload = Upload([b"x" * 3] * 5, declared=15)
    with pytest.raises(HTTPException):
        read(upload, 4)
    assert upload.read == 5
    upload = Upload([b"x"] * 3, declared=4 + DISCARD_LIMIT + 1)
    with pytest.raises(HTTPException):
        read(upload, 4)
    assert upload.read == 0  # refused on its declared size, before a byte is read
    upload = Upload([b"x" * (DISCARD_LIMIT // 2)] * 3 + [b"x"] * 3)
    with pytest.raises(HTTPException):
        read(upload, 4)
    assert upload.read == 3  # past the limit and what is dropped: the rest is not waited for


def test_a_body_of_exactly_the_limit_and_what_is_dropped_is_read_to_its_end(monkeypatch):
    monkeypatch.setattr("yolo.serving.DISCARD_LIMIT", 10)
    for declared in (14, None):  # 4 + 10 bytes, declared or not: read to the end (an empty last chunk too)
        upload = Upload([b"x" * 7, b"x" * 7, b""], declared=declared)
        with pytest.raises(HTTPException) as refused:
            asyncio.run(read_body(upload, 4))
        assert refused.value.status_code == 413 and upload.read == 3, declared


def test_the_pixel_limit_is_inclusive_and_a_form_part_without_a_file_name_is_no_image(server):
    status, answer = post(server, png_header(1000, 1000), "image/png")  # exactly 1 megapixel: decoded, and damaged
    assert status == 422 and "cannot decode image" in answer["detail"]
    body = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"\r\n\r\nnot a file\r\n'
            f"--{BOUNDARY}--\r\n").encode()
    status, answer = post(server, body, f"multipart/form-data; boundary={BOUNDARY}")
    assert status == 400 and answer["detail"].endswith("(files found in: none)")
    assert get(server, "/page/other.js") == (404, {"detail": "no page file 'other.js'"})


def test_a_forms_other_fields_are_ignored_and_its_names_read_whatever_their_bytes(server, model):
    image = model[1][0].read_bytes()
    status, answer = post(server, *form((b"note", None, b"from a browser"), (b"image", b"\xff\xfe.jpg", image)))
    assert status == 200 and answer["source"] == "\ufffd\ufffd.jpg"  # not UTF-8: replaced, as the page shows it
    status, answer = post(server, *form((b"image", b"", image)))
    assert status == 200 and answer["source"] == "upload"
    status, answer = post(server, *form((b"\xff", b"photo.jpg", image)))
    assert (status, answer["detail"]) == (400, "the form must hold one file in the field 'image' (files found in: "
                                               "\ufffd)")
    status, answer = post(server, *form((b"b", b"1.jpg", image), (b"a", b"2.jpg", image), (b"b", b"3.jpg", image)))
    assert answer["detail"].endswith("(files found in: a, b)")
    # One pixel over the limit: 101 x 9,901 is 1,000,001 pixels.
    status, answer = post(server, png_header(101, 9901), "image/png")
    assert (status, answer["detail"]) == (413, "upload is 101 x 9901 pixels, over this server's limit of 1 "
                                               "megapixels (max_megapixels): send a smaller image")


def test_a_header_read_prints_no_warning(server):
    """A TIFF whose EXIF block is cut short: Pillow warns when it reads the header; the answer says enough."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status, answer = post(server, b"II*\x00\x08\x00\x00\x00" + b"\xff" * 4, "image/tiff")
    assert status == 415 and answer["detail"].startswith("upload is not an image")
    assert [str(warning.message) for warning in caught] == []


class RecordingDetector:
    """A detector that records the batches it is given and the threads that run it, and finds nothing."""

    def __init__(self, input_dtype=torch.float32, device=torch.device("cpu")):
        self.image_size, self.input_dtype, self.device = 32, input_dtype, device
        self.batches, self.threads = [], []

    def infer(self, batch):
        self.batches.append(batch)
        self.threads.append(threading.current_thread().name)
        count = len(batch)
        return None, torch.zeros(count, 4, 4), torch.zeros(count, 4, 2)


def test_the_network_gets_the_detectors_input_type_on_its_device_on_one_thread_of_its_own():
    """A uint8 graph on another device (the meta device stands in for a GPU): the batch is made for it."""
    recording = RecordingDetector(torch.uint8, torch.device("meta"))
    batched = BatchedDetector(recording, 4, batch_window_s=0)
    image = torch.zeros(3, 40, 30, dtype=torch.uint8)
    settings = {"score_threshold": 0.2, "nms_iou": NMS_IOU, "max_detections": MAX_DETECTIONS}

    async def run():
        loop = asyncio.create_task(batched.run())
        first = await batched(image, settings)
        second = await batched(image, settings)
        loop.cancel()
        return first, second

    assert [job.batch_size for job in asyncio.run(run())] == [1, 1]
    for batch in recording.batches:
        assert (batch.dtype, batch.device.type, tuple(batch.shape)) == (torch.uint8, "meta", (1, 3, 32, 32))
    assert len(set(recording.threads)) == 1 and recording.threads[0].startswith("network")
    batched.network_thread.shutdown()


def test_the_batch_window_waits_for_a_lone_image_only_and_a_job_whose_client_left_is_skipped(monkeypatch):
    """A fake sleep stands for the window: a second image arrives while the first waits in it."""
    recording = RecordingDetector()
    image = torch.zeros(3, 20, 20, dtype=torch.uint8)
    settings = {"score_threshold": 0.2, "nms_iou": NMS_IOU, "max_detections": MAX_DETECTIONS}
    real_sleep, slept = asyncio.sleep, []

    async def run(window: float, queued_first: int):
        batched = BatchedDetector(recording, 4, batch_window_s=window)

        async def window_sleep(seconds):
            slept.append(seconds)
            arriving.append(asyncio.ensure_future(batched(image, settings)))
            await real_sleep(0)  # the arrival is queued

        monkeypatch.setattr(asyncio, "sleep", window_sleep)
        arriving = [asyncio.ensure_future(batched(image, settings)) for _ in range(queued_first)]
        await real_sleep(0)
        loop = asyncio.create_task(batched.run())
        first = await asyncio.wait_for(asyncio.gather(*arriving[:queued_first]), timeout=60)
        loop.cancel()
        monkeypatch.setattr(asyncio, "sleep", real_sleep)
        batched.network_thread.shutdown()
        return [job.batch_size for job in first]

    assert asyncio.run(run(0.25, 1)) == [2] and slept == [0.25]  # alone: it waited, and the arrival joined it
    slept.clear()
    assert asyncio.run(run(0.25, 2)) == [2, 2] and slept == []  # not alone: no wait
    assert asyncio.run(run(0, 1)) == [1] and slept == []  # no window: no wait at all

    async def client_left():
        batched = BatchedDetector(recording, 4, batch_window_s=0)
        left = asyncio.ensure_future(batched(image, settings))
        await real_sleep(0)
        left.cancel()  # its future is cancelled with it: the batch leaves it out
        loop = asyncio.create_task(batched.run())
        await real_sleep(0)
        served = await asyncio.wait_for(batched(image, settings), timeout=60)  # the loop goes on
        loop.cancel()
        batched.network_thread.shutdown()
        return served.batch_size

    recording.batches.clear()
    assert asyncio.run(client_left()) == 1 and len(recording.batches) == 1


class FailingDetector:
    """The test model, whose network fails while `failing` is set."""
    input_dtype, device = torch.float32, torch.device("cpu")

    def __init__(self, detector):
        self.detector, self.image_size, self.failing = detector, detector.image_size, True

    def infer(self, batch):
        if self.failing:
            raise RuntimeError("out of memory")
        return self.detector.infer(batch)


def test_a_failed_batch_fails_its_requests_and_the_next_batch_runs(model):
    _, images, detector, _ = model
    image = decode_image(images[0])
    settings = {"score_threshold": 0.2, "nms_iou": NMS_IOU, "max_detections": MAX_DETECTIONS}
    failing = FailingDetector(detector)

    async def run():
        batched = BatchedDetector(failing, 4, batch_window_s=0)
        loop = asyncio.create_task(batched.run())
        with pytest.raises(RuntimeError, match="out of memory"):
            await batched(image, settings)
        failing.failing = False
        job = await batched(image, settings)
        loop.cancel()
        batched.network_thread.shutdown()
        return job

    job = asyncio.run(run())
    assert job.batch_size == 1 and len(job.future.result())


def load_test_settings(checkpoint, images, *arguments: str) -> dict:
    return resolve_config(vars(load_test), [f"--checkpoint={checkpoint}", f"--images={images}", *arguments],
                          rules=load_test.RULES)


@pytest.fixture
def one_image_folder(model, tmp_path):
    """A folder of one of the test images, its suffix in capitals as some cameras write it, beside a text file."""
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "A.JPG").write_bytes(model[1][0].read_bytes())
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_the_load_test_compares_concurrent_requests_with_a_loop_of_predict(model, one_image_folder, monkeypatch,
                                                                            capsys):
    """Its rates on a clock that reads 100 and 102 s around the loop of predict, 200 and 204 s around the
    requests; the server it starts, and what each request sends."""
    readings = iter([100.0, 102.0, 200.0, 204.0])
    monkeypatch.setattr(load_test.time, "perf_counter", lambda: next(readings))
    started, sent = [], []

    def recording_start_server(checkpoint, *settings):
        started.append((checkpoint, settings))
        return start_server(checkpoint, *settings)

    def recording_send(url, data, timeout):
        sent.append((threading.current_thread(), data, timeout))
        return send(url, data, timeout)

    send = load_test.send
    monkeypatch.setattr(load_test, "start_server", recording_start_server)
    monkeypatch.setattr(load_test, "send", recording_send)
    load_test.main(load_test_settings(model[0], one_image_folder, "--requests=4", "--clients=2", "--timeout_s=30"))
    assert capsys.readouterr().out == ("serve.py: 4 requests from 2 clients: 1.0 images/s, 0 failed, 0 with detections "
                                       "unlike predict's\npredict, one image a call: 2.0 images/s (0.50x)\n")
    assert started == [(str(model[0]), ("--device=cpu",))]
    image = (one_image_folder / "A.JPG").read_bytes()
    assert [(data, timeout) for _, data, timeout in sent] == [(image, 30.0)] * 5  # a warm-up, then the 4
    assert sent[0][0] is threading.main_thread() and len({thread for thread, _, _ in sent[1:]}) <= 2


def test_the_load_test_fails_when_the_server_disagrees_with_predict(model, one_image_folder, monkeypatch, capsys):
    def strict_detector(*arguments):  # the loop keeps only scores of 0.99 and above; the server is as it is
        detector = load_detector(*arguments)
        detector.predict = functools.partial(detector.predict, score_threshold=0.99)
        return detector

    monkeypatch.setattr(load_test, "load_detector", strict_detector)
    with pytest.raises(SystemExit) as exited:
        load_test.main(load_test_settings(model[0], one_image_folder, "--requests=1", "--clients=1"))
    assert exited.value.code == 1
    assert ", 0 failed, 1 with detections unlike predict's\n" in capsys.readouterr().out


def test_the_load_tests_requests_count_refusals_and_lost_connections_as_failed(http_server, model, tmp_path):
    assert load_test.send(http_server, b"not an image", 60) == (415, [])
    status, rows = load_test.send(http_server, model[1][0].read_bytes(), 60)
    assert status == 200 and rows == post(http_server, model[1][0].read_bytes())[1]["detections"]
    with socket.create_server(("127.0.0.1", 0)) as listener:
        # Listening but never answering (the connection waits in its queue): the request's timeout ends it.
        assert load_test.send(f"http://127.0.0.1:{listener.getsockname()[1]}", b"", 0.1) == (0, [])
        closed = f"http://127.0.0.1:{listener.getsockname()[1]}"
    assert load_test.send(closed, b"", 60) == (0, [])
    with pytest.raises(SystemExit) as exited:
        load_test.main(load_test_settings(model[0], tmp_path))
    assert exited.value.code == f"error: no images in {tmp_path}"


def test_the_load_tests_comparison_allows_float_rounding_only():
    rows = [{"x1": 10.0, "y1": 20.0, "x2": 30.0, "y2": 40.0, "score": 0.5, "class_id": 2}]
    expected = np.array([[10.0, 20.0, 30.0, 40.0, 0.5, 2]])
    assert load_test.same_detections(rows, expected)
    assert load_test.same_detections(rows, expected + [[0.001, 0, 0, 0, 0, 0]])
    assert load_test.same_detections(rows, expected + [[0, 0, 0, 0, 0.0009, 0]])  # 1e-3 absolute
    assert load_test.same_detections(rows, expected + [[0, 0, 0.0035, 0, 0, 0]])  # and 1e-4 relative: 0.004 at 30
    assert not load_test.same_detections(rows, expected + [[0, 0, 0.0045, 0, 0, 0]])
    assert not load_test.same_detections(rows, expected + [[0.01, 0, 0, 0, 0, 0]])
    assert not load_test.same_detections(rows, expected + [[0, 0, 0, 0, 0, 1]])
    assert not load_test.same_detections(rows + rows, expected)
    assert load_test.same_detections([], np.zeros((0, 6))) and not load_test.same_detections([], expected)


def test_the_page_screenshot_is_the_page_with_its_images_boxes(model, tmp_path, capsys, monkeypatch):
    if page_screenshot.find_chromium() is None:
        pytest.skip("no Chromium")
    out, started = tmp_path / "page.png", []

    def recording_start_server(checkpoint, *settings):
        started.append(settings)
        return start_server(checkpoint, *settings)

    monkeypatch.setattr(page_screenshot, "start_server", recording_start_server)
    page_screenshot.main(resolve_config(vars(page_screenshot), [f"--checkpoint={model[0]}",
                                                                 f"--images={model[1][0]},{model[1][1]}",
                                                                 f"--out={out}", "--width=700"]))
    assert capsys.readouterr().out == f"wrote {out}\n" and started == [("--device=cpu",)]
    with Image.open(out) as screenshot:
        assert screenshot.format == "PNG" and screenshot.width == 700 and screenshot.height > 600


def test_chromium_is_found_on_the_path_or_named_and_launched_offline(monkeypatch, tmp_path):
    monkeypatch.delenv("CHROMIUM", raising=False)
    monkeypatch.setenv("PATH", "")
    with pytest.raises(FileNotFoundError, match=r"^no Chromium: install Debian's chromium package "
                                                r"\(apt-get install chromium\), or set CHROMIUM to"):
        page_screenshot.open_browser(None)
    chromium = tmp_path / "chromium"
    chromium.write_text("#!/bin/sh\n")
    chromium.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert page_screenshot.find_chromium() == str(chromium)
    monkeypatch.setenv("CHROMIUM", "/opt/chrome/chrome")
    assert page_screenshot.find_chromium() == "/opt/chrome/chrome"
    launched = []
    playwright = SimpleNamespace(chromium=SimpleNamespace(launch=lambda **options: launched.append(options)))
    page_screenshot.open_browser(playwright)
    assert launched == [{"executable_path": "/opt/chrome/chrome", "args": page_screenshot.CHROMIUM_FLAGS}]
    assert {"--disable-background-networking", "--disable-component-update"} <= set(page_screenshot.CHROMIUM_FLAGS)


def test_a_server_that_prints_no_address_in_time_is_stopped_and_an_error(tmp_path):
    fifo = tmp_path / "last.pt"
    os.mkfifo(fifo)  # opening it waits for a writer that never comes: serve.py never gets to listen
    with pytest.raises(RuntimeError, match=r"^serve\.py printed no address within 1 s and was stopped:\n"):
        start_server(fifo, "--device=cpu", timeout=1)


def test_a_server_that_stops_before_serving_is_an_error_with_its_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # serve.py is found from anywhere
    with pytest.raises(RuntimeError, match=r"(?s)^serve\.py stopped before serving \(exit status 1\):\n.*error: "):
        start_server(tmp_path / "missing.pt", "--device=cpu")


def test_the_server_is_started_without_pythonunbuffered_as_a_users_pipe_gets_it(monkeypatch):
    """The tests' own environment has PYTHONUNBUFFERED=1 (so their output arrives as it is printed); serve.py must
    not inherit it, or an address line it forgot to flush would still arrive and no test would see the hang a
    user's pipe meets."""
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")
    monkeypatch.setenv("YOLO_SERVE_TEST", "kept")
    started = []

    class RecordingPopen(subprocess.Popen):
        def __init__(self, command, **options):
            started.append((command, options["env"]))
            announce = "print('serving a model at http://127.0.0.1:1 (Ctrl-C stops)')"
            super().__init__([sys.executable, "-c", announce], **options)

    monkeypatch.setattr("tools.serve_process.subprocess.Popen", RecordingPopen)
    process, url = start_server("last.pt", "--device=cpu")
    process.wait()
    assert url == "http://127.0.0.1:1"
    (command, environment), = started
    assert command[1:] == ["serve.py", "--checkpoint=last.pt", "--port=0", "--device=cpu"]
    assert "PYTHONUNBUFFERED" not in environment and environment["YOLO_SERVE_TEST"] == "kept"
