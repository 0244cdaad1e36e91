"""Run a checkpoint on an image, a folder of images, a video or a live source; write annotated media and the
detections.

    python detect.py --checkpoint=runs/resnet18_voc2012val/last.pt --source=photos/
    python detect.py --checkpoint=runs/resnet18_voc2012val/last.pt --source=0    # the first camera; Ctrl-C stops
    python detect.py --checkpoint=model.onnx --source=photos/   # export.py's file, run by ONNX Runtime

Writes out_dir/<file name> annotated for each image (out_dir/<name>.mp4 for a video, out_dir/live.mp4 for a
live source), and out_dir/detections.csv and out_dir/detections.json with one entry per detection (VOC pixel
coordinates, 1-based inclusive; a box under one pixel is widened to one pixel, so x1 <= x2 and y1 <= y2; `frame`
is the frame's index in the video or stream). out_dir defaults to a new folder beside the checkpoint (detect/,
then detect2/, ...). The video and detections.csv grow as the frames are processed.

A live source (a camera index, a capture device such as /dev/video0, a stream URL such as rtsp://..., or
anything FFmpeg reads given --source_format) is read by FFmpeg through PyAV on a thread of its own, and the
model takes the newest frame each time it is ready: the frames that came meanwhile are dropped, not queued, so
the output keeps up with the source. The frames processed per second and the frames dropped are printed once a
second. Ctrl-C (SIGINT) or SIGTERM stops it after the current frame, with the video and the detection files
closed and complete; so does the end of the stream.

Images are decoded by their content (JPEG, PNG, GIF, WebP, BMP, TIFF; a PNG named .jpg reads); a folder is
scanned for those extensions (.jpg .jpeg .png .gif .webp .bmp .tif .tiff). An image that cannot be read is
skipped with a warning naming it, and the others are processed and written.
Exit status: 0 when every input was processed; 1 on an error (one `error:` line; a video that fails part-way
keeps the frames before) or when images were skipped (everything else written).
"""
import csv
import itertools
import json
import signal
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from yolo.api import open_detector
from yolo.checkpoint import CheckpointError
from yolo.config import at_least, between, format_config, one_of, resolve_config, resolve_out_dir
from yolo.data import ImageDecodeError, decode_image
from yolo.device import DTYPES, resolve_device
from yolo.imagecheck import IMAGE_SUFFIXES
from yolo.inference import Detector
from yolo.postprocess import DISPLAY_SCORE_THRESHOLD, MAX_DETECTIONS, NMS_IOU, detection_rows, widen_sub_pixel_boxes
from yolo.visualize import draw_boxes, save_image

checkpoint = "runs/resnet18_voc2012val/last.pt"  # a train.py checkpoint, or an export.py .onnx (ONNX Runtime, CPU)
source = "data/examples"       # image, image folder, video file, camera index (0), device (/dev/video0), stream URL
source_format = ""             # FFmpeg input format of a live source (v4l2, lavfi, ...), then read as given
out_dir = ""                   # annotated media, detections.csv and .json; empty: detect/ beside the checkpoint,
                               # or detect2/, detect3/, ...: the first that does not exist, so each run keeps its own
score_threshold = DISPLAY_SCORE_THRESHOLD  # keep detections with class score at least this (0..1)
nms_iou = NMS_IOU              # class-wise NMS IoU (0..1)
max_detections = MAX_DETECTIONS  # detections kept per image
batch_size = 8                 # images (or video frames) per forward pass, at least 1
device = "auto"                # auto (cuda if available; an .onnx: cpu) | cpu | cuda
dtype = "fp32"                 # fp32 (evaluate.py's: the same scores) | bf16 | fp16 | auto (fastest the device
                               # computes natively); an .onnx: fp32

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")
LIVE_OPEN_TIMEOUT = 15.0       # seconds a live source may take to open (an unreachable stream URL)
CSV_COLUMNS = ("source", "frame", "x1", "y1", "x2", "y2", "score", "class_id", "class_name")
RULES = {"device": resolve_device, "dtype": one_of("auto", *DTYPES), "batch_size": at_least(1),
         "score_threshold": between(0.0, 1.0), "nms_iou": between(0.0, 1.0), "max_detections": at_least(1)}


def load_detector(path: Path, config: dict) -> tuple[Detector, list[str]]:
    detector, state = open_detector(path, config["device"], config["dtype"], score_threshold=config["score_threshold"],
                                    nms_iou=config["nms_iou"], max_detections=config["max_detections"])
    return detector, state["class_names"]


def batches(items, size: int):
    """Lists of up to `size` consecutive items of any iterable."""
    group = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def rgb_image(frame: av.VideoFrame) -> torch.Tensor:
    """A decoded video frame as a uint8 (3, H, W) RGB image."""
    return torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)


def video_frames(path: Path):
    """(frame index, uint8 (3, H, W) frame) of a video file, as they are decoded."""
    try:
        with av.open(str(path)) as container:
            for index, frame in enumerate(container.decode(video=0)):
                yield index, rgb_image(frame)
    except (av.FFmpegError, IndexError) as error:
        raise ImageDecodeError(f"{path}: cannot read video ({error})") from None


def frame_rate(path: Path) -> float:
    """A video file's frames per second (25 where it does not say)."""
    try:
        with av.open(str(path)) as container:
            return float(container.streams.video[0].average_rate or 25)
    except (av.FFmpegError, IndexError) as error:
        raise ImageDecodeError(f"{path}: cannot read video ({error})") from None


class VideoWriter:
    """An MPEG-4 video written frame by frame, each at its own time (in seconds), so that frames come as they
    are processed and a run stopped early leaves a playable file once closed."""

    TIME_BASE = Fraction(1, 1000)

    def __init__(self, path: Path, rate: float):
        self.path, self.rate = path, rate
        self.container = self.stream = self.start = self.last_pts = None

    def write(self, frame: torch.Tensor, seconds: float) -> None:
        if self.container is None:
            self.container = av.open(str(self.path), "w")
            self.stream = self.container.add_stream("mpeg4", rate=round(self.rate))
            self.stream.height, self.stream.width = frame.shape[1] // 2 * 2, frame.shape[2] // 2 * 2
            self.stream.pix_fmt = "yuv420p"
            self.stream.codec_context.time_base = self.TIME_BASE
            self.start = seconds
        array = frame[:, :self.stream.height, :self.stream.width].permute(1, 2, 0).contiguous().numpy()
        picture = av.VideoFrame.from_ndarray(array, format="rgb24")
        pts = round((seconds - self.start) / self.TIME_BASE)
        # Times may repeat (a clock's resolution) but the encoder needs them increasing.
        picture.pts = self.last_pts = pts if self.last_pts is None else max(pts, self.last_pts + 1)
        picture.time_base = self.TIME_BASE
        self.container.mux(self.stream.encode(picture))

    def close(self) -> None:
        if self.container is not None:
            self.container.mux(self.stream.encode())
            self.container.close()

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()


class DetectionWriter:
    """detections.csv, a flushed line per detection as it comes, and detections.json of them all on close."""

    def __init__(self, out_dir: Path):
        self.rows, self.json_path = [], out_dir / "detections.json"
        self.file = open(out_dir / "detections.csv", "w", newline="")
        self.csv = csv.DictWriter(self.file, fieldnames=CSV_COLUMNS)
        self.csv.writeheader()

    def add(self, rows: list[dict]) -> None:
        self.csv.writerows(rows)
        self.file.flush()
        self.rows += rows

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.file.close()
        self.json_path.write_text(json.dumps(self.rows, indent=1) + "\n")


def detect(detector: Detector, images: list[torch.Tensor]) -> list[np.ndarray]:
    """Each image's detections, boxes under one pixel widened to one: every path's call of the model."""
    return [widen_sub_pixel_boxes(detections) for detections in detector(images)]


def annotate(image: torch.Tensor, detections: np.ndarray, class_names: list[str]) -> torch.Tensor:
    return draw_boxes(image, detections[:, :4], detections[:, 5].astype(int), class_names, scores=detections[:, 4])


def detect_images(images: list[Path], detector: Detector, class_names: list[str], config: dict, out_dir: Path,
                  writer: DetectionWriter) -> list[Path]:
    """The images that could not be read; writes each other one annotated to out_dir, its rows to `writer`."""
    skipped = []
    for group in batches(images, config["batch_size"]):
        decoded = {}
        for path in group:
            try:
                decoded[path] = decode_image(path)
            except ImageDecodeError as error:
                print(f"warning: skipping {error}", file=sys.stderr, flush=True)
                skipped.append(path)
        if not decoded:
            continue
        for (path, image), found in zip(decoded.items(), detect(detector, list(decoded.values()))):
            save_image(annotate(image, found, class_names), out_dir / path.name)
            writer.add(detection_rows(str(path), 0, found, class_names))
    return skipped


def detect_video(path: Path, detector: Detector, class_names: list[str], config: dict, out_dir: Path,
                 writer: DetectionWriter) -> None:
    """Every frame's rows to `writer` and the annotated video to out_dir, a batch of frames at a time."""
    rate = frame_rate(path)
    with VideoWriter(out_dir / f"{path.stem}.mp4", rate) as video:
        for group in batches(video_frames(path), config["batch_size"]):
            for (index, frame), found in zip(group, detect(detector, [frame for _, frame in group])):
                video.write(annotate(frame, found, class_names), index / rate)
                writer.add(detection_rows(str(path), index, found, class_names))


def live_input(source: str, source_format: str) -> tuple[str, str | None] | None:
    """(what FFmpeg opens, its input format) of a live source; None for a file or folder.

    A camera index is /dev/video<N> through v4l2 on Linux and AVFoundation's device <N> on macOS."""
    if source_format:
        return source, source_format
    if source.isdigit():
        return (source, "avfoundation") if sys.platform == "darwin" else (f"/dev/video{source}", "v4l2")
    if source.startswith("/dev/"):
        return source, "v4l2"
    if "://" in source:
        return source, None
    return None


class NewestFrame:
    """A live source decoded on a thread of its own that keeps only the newest frame: one the model had no
    time for is replaced by the next (dropped) instead of queued behind it."""

    def __init__(self, container):
        self.condition = threading.Condition()
        self.frame = None  # (index, seconds, av.VideoFrame) not taken yet
        self.ended, self.error = False, None
        threading.Thread(target=self.read, args=(container,), daemon=True).start()

    def read(self, container) -> None:
        try:
            for index, frame in enumerate(container.decode(video=0)):
                seconds = time.monotonic() if frame.time is None else frame.time
                with self.condition:
                    self.frame = (index, seconds, frame)
                    self.condition.notify()
        except av.FFmpegError as error:
            self.error = error
        finally:
            with self.condition:
                self.ended = True
                self.condition.notify()

    def frames(self, stop: threading.Event):
        """The newest frame each time one is asked for, until the source ends or `stop` is set (checked at least
        every 0.1 s, however long the source takes to send a frame)."""
        while not stop.is_set():
            with self.condition:
                self.condition.wait_for(lambda: self.frame is not None or self.ended, timeout=0.1)
                taken, self.frame, ended = self.frame, None, self.ended
            if taken is not None:
                yield taken
            elif ended:
                return


class RateReport:
    """Prints the frames processed per second, the frame reached and the frames dropped so far, once a second."""

    def __init__(self):
        self.start, self.count, self.dropped, self.last_index = time.monotonic(), 0, 0, -1

    def processed(self, index: int) -> None:
        self.count += 1
        self.dropped += index - self.last_index - 1
        self.last_index = index
        elapsed = time.monotonic() - self.start
        if elapsed >= 1:
            print(f"{self.count / elapsed:.1f} FPS at frame {index}, {self.dropped} dropped so far", flush=True)
            self.start, self.count = time.monotonic(), 0


def open_live(source: str, url: str, input_format: str | None):
    """The opened live source (no read timeout: a camera or stream may pause); exits if it cannot be read."""
    try:
        container = av.open(url, format=input_format, timeout=(LIVE_OPEN_TIMEOUT, None))
    except av.FFmpegError as error:
        sys.exit(f"error: --source={source}: cannot read {url}{f' as {input_format}' if input_format else ''} "
                 f"({error}).")
    if not container.streams.video:
        sys.exit(f"error: --source={source}: {url} has no video stream.")
    return container


def detect_live(source: str, container, detector: Detector, class_names: list[str], out_dir: Path,
                writer: DetectionWriter) -> av.FFmpegError | None:
    """Detects the newest frame of a live source, one frame at a time, into out_dir/live.mp4 and `writer` until
    the source ends or SIGINT / SIGTERM; returns the error that ended the source, if one did."""
    stop = threading.Event()
    previous = {number: signal.signal(number, lambda *_: stop.set()) for number in (signal.SIGINT, signal.SIGTERM)}
    newest, report = NewestFrame(container), RateReport()
    print(f"reading {source}: Ctrl-C stops, keeping what was written", flush=True)
    try:
        with VideoWriter(out_dir / "live.mp4", float(container.streams.video[0].average_rate or 25)) as video:
            for index, seconds, frame in newest.frames(stop):
                image = rgb_image(frame)
                found = detect(detector, [image])[0]
                video.write(annotate(image, found, class_names), seconds)
                writer.add(detection_rows(source, index, found, class_names))
                report.processed(index)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    print("stopped" if stop.is_set() else "the source ended", flush=True)
    return newest.error


def file_inputs(source: Path) -> list[Path]:
    """The images to read (none for a video file); exits on a source that is neither."""
    if source.is_dir():
        images = sorted(path for path in source.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            sys.exit(f"error: {source} holds no {'/'.join(IMAGE_SUFFIXES)} images.")
        return images
    if source.is_file() and source.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES:
        return [source] if source.suffix.lower() in IMAGE_SUFFIXES else []
    sys.exit(f"error: --source={source} is not an image ({', '.join(IMAGE_SUFFIXES)}), a folder of images, "
             f"a video ({', '.join(VIDEO_SUFFIXES)}) or a live source (a camera index, a device under /dev/, a "
             "stream URL, or --source_format).")


def first_free_folder(base: Path) -> Path:
    """`base`, or base2, base3, ...: the first that does not exist yet."""
    return next(folder for folder in (base.with_name(f"{base.name}{number if number > 1 else ''}")
                                      for number in itertools.count(1)) if not folder.exists())


def main(config: dict) -> None:
    print(f"detect.py\n{format_config(config)}", flush=True)
    source = Path(config["source"])
    live = live_input(config["source"], config["source_format"])
    container = open_live(config["source"], *live) if live else None
    images = [] if live else file_inputs(source)
    checkpoint_path = Path(config["checkpoint"])
    try:
        detector, class_names = load_detector(checkpoint_path, config)
    except CheckpointError as error:
        sys.exit(f"error: {error}")
    runtime = "ONNX Runtime" if checkpoint_path.suffix == ".onnx" else "PyTorch"
    dtype = str(detector.dtype).removeprefix("torch.")
    print(f"running {checkpoint_path} in {runtime} on {detector.device} in {dtype}", flush=True)
    out_dir = resolve_out_dir(config, first_free_folder(checkpoint_path.parent / "detect"))
    if source.is_dir() and out_dir.resolve() == source.resolve():
        sys.exit(f"error: --out_dir={out_dir} is the source folder: the annotated images would replace "
                 "the originals; choose another out_dir.")

    skipped, live_error = [], None
    with DetectionWriter(out_dir) as writer:
        if container is not None:
            live_error = detect_live(config["source"], container, detector, class_names, out_dir, writer)
        elif images:
            skipped = detect_images(images, detector, class_names, config, out_dir, writer)
        else:
            try:
                detect_video(source, detector, class_names, config, out_dir, writer)
            except ImageDecodeError as error:
                sys.exit(f"error: {error}")
    done = "the live source" if live else f"{len(images) - len(skipped)} image(s)" if images else "the video"
    print(f"{len(writer.rows)} detections in {done}; wrote {out_dir}")
    if live_error:
        sys.exit(f"error: --source={config['source']} failed ({live_error}); what came before is written.")
    if skipped:
        sys.exit(f"warning: skipped {len(skipped)} of {len(images)} image(s) that could not be read: "
                 f"{', '.join(path.name for path in skipped)}")


if __name__ == "__main__":
    main(resolve_config(globals(), rules=RULES))
