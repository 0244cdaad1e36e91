"""A detector behind HTTP: serve.py's page and JSON API, as a FastAPI app (the `serve` extra).

    GET  /          the page: choose or drop images, see their boxes, filter them by score
    POST /predict   one image, as the form field `image` (multipart/form-data) or as the raw body; query
                    parameters score_threshold, nms_iou, max_detections -> its detections as JSON
    GET  /model     the model: name, class names, input size, runtime, where it came from
    GET  /health    {"status": "ok"}

The images of requests that arrive together go through the network together: a batch takes every image
waiting (up to `max_batch_size`), after waiting `batch_window_ms` for company when it would run one alone. The
network runs on a thread of its own, one batch at a time, so the server keeps accepting and decoding requests
meanwhile; each image gets its own request's NMS settings. Bad input is answered with a 4xx and a one-line
`detail`, and the next request is served as usual.
"""
import asyncio
import io
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse
from python_multipart import parse_form
from python_multipart.exceptions import FormParserError

from yolo.config import at_least, between
from yolo.data import ImageDecodeError, decode_image_bytes
from yolo.inference import Detector, preprocess
from yolo.postprocess import (DISPLAY_SCORE_THRESHOLD, MAX_DETECTIONS, NMS_IOU, detection_rows, select_detections,
                              to_voc_arrays, widen_sub_pixel_boxes)

PAGE = Path(__file__).resolve().parent / "page"
FORM_FIELD = "image"
# The query parameters of POST /predict: (type, rule, default).
PARAMETERS = {"score_threshold": (float, between(0.0, 1.0), DISPLAY_SCORE_THRESHOLD),
              "nms_iou": (float, between(0.0, 1.0), NMS_IOU),
              "max_detections": (int, at_least(1), MAX_DETECTIONS)}
DISCARD_LIMIT = 256 * 2**20  # bytes of an over-limit body read and dropped so that its client gets the 413
TYPE_WORDS = {float: "a number", int: "a whole number"}
READABLE_FORMATS = "JPEG, PNG, GIF, WebP, BMP, TIFF"


def detection_settings(query: list[tuple[str, str]]) -> dict:
    """POST /predict's query parameters, each checked (422 naming it), defaults for those not given."""
    settings = {name: default for name, (_, _, default) in PARAMETERS.items()}
    seen = set()
    for name, text in query:
        if name not in PARAMETERS:
            raise HTTPException(422, f"unknown query parameter {name!r}: the parameters are "
                                     f"{', '.join(PARAMETERS)}")
        if name in seen:
            raise HTTPException(422, f"query parameter {name} given more than once")
        seen.add(name)
        kind, rule, _ = PARAMETERS[name]
        try:
            value = kind(text)
        except ValueError:
            raise HTTPException(422, f"{name}={text}: must be {TYPE_WORDS[kind]}") from None
        try:
            rule(value)
        except ValueError as error:
            raise HTTPException(422, f"{name}={text}: {error}") from None
        settings[name] = value
    return settings


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body; one over `limit` bytes is a 413. An over-limit body of up to DISCARD_LIMIT bytes is
    read to its end and dropped before the answer, since a client still sending when the server closes the
    connection sees a broken pipe instead of the 413; a larger one is refused as soon as it is known."""
    too_large = HTTPException(413, f"the request's body is over this server's limit of {limit / 2**20:g} MB "
                                   f"(max_upload_mb): send a smaller image")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + DISCARD_LIMIT:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit + DISCARD_LIMIT:
            raise too_large
        if size <= limit:
            chunks.append(chunk)
    if size > limit:
        raise too_large
    return b"".join(chunks)


def uploaded_file(body: bytes, content_type: str) -> tuple[bytes, str]:
    """(the image's bytes, its name) of a multipart form's `image` field, or of a raw body (named "upload")."""
    if not content_type.startswith("multipart/form-data"):
        return body, "upload"
    files = []
    try:
        parse_form({"Content-Type": content_type.encode()}, io.BytesIO(body), on_field=None, on_file=files.append)
        images = [file for file in files if file.field_name == FORM_FIELD.encode()]
        if len(images) != 1:
            found = ", ".join(sorted({file.field_name.decode(errors="replace") for file in files})) or "none"
            raise HTTPException(400, f"the form must hold one file in the field {FORM_FIELD!r} (files found in: "
                                     f"{found})")
        images[0].file_object.seek(0)
        return images[0].file_object.read(), (images[0].file_name or b"upload").decode(errors="replace")
    except FormParserError as error:
        raise HTTPException(400, f"the multipart form cannot be read ({error})") from None
    finally:
        for file in files:
            file.close()


def decode_upload(data: bytes, name: str, max_pixels: int) -> torch.Tensor:
    """The uploaded image as displayed (uint8 (3, H, W)), its size checked from the header before decoding."""
    if not data:
        raise HTTPException(400, "no image: the request's body is empty")
    try:
        with warnings.catch_warnings():
            # The pixel limit below decides, not Pillow's bomb warning; a damaged EXIF block, which Pillow warns
            # of, only loses the orientation (decode_image_bytes reads it as none), so nothing is printed.
            warnings.simplefilter("ignore")
            with PIL.Image.open(io.BytesIO(data)) as header:
                width, height = header.size
    except PIL.Image.DecompressionBombError as error:
        raise HTTPException(413, f"{name}: {error}") from None
    except PIL.UnidentifiedImageError:
        raise HTTPException(415, f"{name} is not an image in a format this reads ({READABLE_FORMATS})") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise HTTPException(422, f"{name}: cannot read the image's header ({error})") from None
    if width * height > max_pixels:
        raise HTTPException(413, f"{name} is {width} x {height} pixels, over this server's limit of "
                                 f"{max_pixels / 1e6:g} megapixels (max_megapixels): send a smaller image")
    try:
        return decode_image_bytes(data, name, advice="send the complete file")
    except ImageDecodeError as error:
        raise HTTPException(422, error.reason) from None


@dataclass
class Job:
    image: torch.Tensor
    settings: dict
    future: asyncio.Future
    batch_size: int = 0  # the images its batch held, once run


class BatchedDetector:
    """The detector, fed the images of concurrent requests in batches by a task on the event loop."""

    def __init__(self, detector: Detector, max_batch_size: int, batch_window_s: float):
        self.detector, self.max_batch_size, self.batch_window_s = detector, max_batch_size, batch_window_s
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        # One thread runs the network, batch after batch (run awaits each), so its thread-local state stays warm.
        self.network_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="network")

    async def __call__(self, image: torch.Tensor, settings: dict) -> Job:
        job = Job(image, settings, asyncio.get_running_loop().create_future())
        self.queue.put_nowait(job)
        await job.future
        return job

    async def run(self) -> None:
        """Batch after batch, for the app's lifetime."""
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            if self.queue.empty() and self.batch_window_s > 0:
                await asyncio.sleep(self.batch_window_s)
            while len(jobs) < self.max_batch_size and not self.queue.empty():
                jobs.append(self.queue.get_nowait())
            jobs = [job for job in jobs if not job.future.done()]  # a client gone while its image waited
            if not jobs:
                continue
            try:
                results = await loop.run_in_executor(self.network_thread, self.detect, jobs)
            except Exception as error:  # the batch's requests fail; the server goes on
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(error)
                continue
            for job, result in zip(jobs, results):
                job.batch_size = len(jobs)
                if not job.future.done():
                    job.future.set_result(result)

    def detect(self, jobs: list[Job]) -> list[np.ndarray]:
        """Each job's (K, 6) VOC-pixel detections, the network run once on them all."""
        detector = self.detector
        batch = preprocess([job.image for job in jobs], detector.image_size, detector.input_dtype, detector.device)
        _, boxes, scores = detector.infer(batch)
        # Each image with its own request's settings; the batch's detections then cross to the host in one copy.
        found = [select_detections(boxes[index, None], scores[index, None], **job.settings)[0]
                 for index, job in enumerate(jobs)]
        return [widen_sub_pixel_boxes(array) for array in to_voc_arrays(found, [job.image.shape[1:] for job in jobs])]


def create_app(detector: Detector, model: dict, *, max_batch_size: int, batch_window_ms: float, max_upload_mb: float,
               max_megapixels: float) -> FastAPI:
    """The app serving `detector`; `model` is what GET /model answers, its `class_names` among it. The limits are
    serve.py's settings of the same names."""
    batched = BatchedDetector(detector, max_batch_size, batch_window_ms / 1000)
    class_names = model["class_names"]

    @asynccontextmanager
    async def lifespan(_):
        batches = asyncio.create_task(batched.run())
        yield
        batches.cancel()
        batched.network_thread.shutdown()

    # The interactive API docs load their scripts from a CDN: left out, since the server must work offline.
    app = FastAPI(title="YOLOv1", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(PAGE / "index.html")

    @app.get("/page/{name}", include_in_schema=False)
    async def page_file(name: str) -> FileResponse:
        if name not in ("page.js", "page.css"):
            raise HTTPException(404, f"no page file {name!r}")
        return FileResponse(PAGE / name)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/model")
    async def model_info() -> dict:
        return model

    @app.post("/predict")
    async def predict(request: Request) -> dict:
        started = time.perf_counter()
        settings = detection_settings(request.query_params.multi_items())
        body = await read_body(request, int(max_upload_mb * 2**20))
        data, name = uploaded_file(body, request.headers.get("content-type", ""))
        image = await asyncio.to_thread(decode_upload, data, name, int(max_megapixels * 1e6))
        job = await batched(image, settings)
        height, width = image.shape[1:]
        return {"source": name, "width": width, "height": height,
                "detections": detection_rows(name, 0, job.future.result(), class_names),
                "batch_size": job.batch_size, "milliseconds": round((time.perf_counter() - started) * 1000, 1)}

    return app
