"""Run a checkpoint on an image, a folder of images or a video; write annotated media and the detections.

    python detect.py --checkpoint=runs/resnet18_voc2012val/last.pt --source=photos/ --out_dir=detections

Writes out_dir/<file name> annotated for each image (out_dir/<name>.mp4 for a video), and
out_dir/detections.csv and out_dir/detections.json with one entry per detection (VOC pixel coordinates,
1-based inclusive; a box under one pixel is widened to one pixel, so x1 <= x2 and y1 <= y2).

Images are read by their content (JPEG, PNG, GIF, WebP, BMP, TIFF), whatever their extension says. An
image that cannot be read is skipped with a warning naming it, and the others are processed and written.
Exit status: 0 when every input was processed; 1 on an error (one `error:` line, nothing detected) or when
images were skipped (everything else written).
"""
import csv
import json
import sys
from pathlib import Path

import av
import numpy as np
import torch

from yolo.boxes import at_least_one_pixel
from yolo.checkpoint import CheckpointError, load_model
from yolo.config import at_least, between, format_config, one_of, resolve_config, writable_folder
from yolo.data import ImageDecodeError, decode_image
from yolo.device import DTYPES, inference_dtype, resolve_device
from yolo.imagecheck import IMAGE_SUFFIXES
from yolo.inference import Detector
from yolo.postprocess import DISPLAY_SCORE_THRESHOLD, MAX_DETECTIONS, NMS_IOU
from yolo.visualize import draw_boxes, save_image

checkpoint = "runs/resnet18_voc2012val/last.pt"  # a train.py checkpoint
source = "data/examples"       # an image (.jpg, .png, .gif, .webp, .bmp, .tif), a folder of images, or a video file
out_dir = "detections"         # annotated media, detections.csv and detections.json go here
score_threshold = DISPLAY_SCORE_THRESHOLD  # keep detections with class score at least this (0..1)
nms_iou = NMS_IOU              # class-wise NMS IoU (0..1)
max_detections = MAX_DETECTIONS  # detections kept per image
batch_size = 8                 # images (or video frames) per forward pass, at least 1
device = "auto"                # auto (cuda if available) | cpu | cuda
dtype = "auto"                 # auto (fastest the device computes natively) | fp32 | bf16 | fp16

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")
CSV_COLUMNS = ("source", "frame", "x1", "y1", "x2", "y2", "score", "class_id", "class_name")
RULES = {"device": resolve_device, "dtype": one_of("auto", *DTYPES), "batch_size": at_least(1),
         "score_threshold": between(0.0, 1.0), "nms_iou": between(0.0, 1.0), "max_detections": at_least(1),
         "out_dir": writable_folder}


def load_detector(path: Path, config: dict) -> tuple[Detector, list[str]]:
    model, state = load_model(path)
    device = resolve_device(config["device"])
    detector = Detector(model.to(device), inference_dtype(config["dtype"], device), device,
                        score_threshold=config["score_threshold"], nms_iou=config["nms_iou"],
                        max_detections=config["max_detections"])
    return detector, state["class_names"]


def batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def video_frames(path: Path):
    """(uint8 (3, H, W) frames, frames per second) of a video file."""
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            frames = [torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)
                      for frame in container.decode(stream)]
            rate = float(stream.average_rate or 25)
    except (av.FFmpegError, IndexError) as error:
        raise ImageDecodeError(f"{path}: cannot read video ({error})") from None
    return frames, rate


def write_video(path: Path, frames: list[torch.Tensor], rate: float) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=round(rate))
        stream.height, stream.width = frames[0].shape[1] // 2 * 2, frames[0].shape[2] // 2 * 2
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            array = frame[:, :stream.height, :stream.width].permute(1, 2, 0).contiguous().numpy()
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())


def widen_sub_pixel_boxes(detections: np.ndarray) -> np.ndarray:
    """The detections with boxes under one pixel widened to one pixel (x1 <= x2, y1 <= y2)."""
    detections = detections.copy()
    detections[:, :4] = at_least_one_pixel(torch.from_numpy(detections[:, :4])).numpy()
    return detections


def detection_rows(source: str, frame: int, detections: np.ndarray, class_names: list[str]) -> list[dict]:
    return [{"source": source, "frame": frame, "x1": round(float(x1), 1), "y1": round(float(y1), 1),
             "x2": round(float(x2), 1), "y2": round(float(y2), 1), "score": round(float(score), 4),
             "class_id": int(label), "class_name": class_names[int(label)]}
            for x1, y1, x2, y2, score, label in detections]


def annotate(image: torch.Tensor, detections: np.ndarray, class_names: list[str]) -> torch.Tensor:
    return draw_boxes(image, detections[:, :4], detections[:, 5].astype(int), class_names, scores=detections[:, 4])


def detect_images(images: list[Path], detector: Detector, class_names: list[str], config: dict,
                  out_dir: Path) -> tuple[list[dict], list[Path]]:
    """(detection rows, skipped images) for the images, writing each annotated image to out_dir."""
    rows, skipped = [], []
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
        for (path, image), detections in zip(decoded.items(), detector(list(decoded.values()))):
            detections = widen_sub_pixel_boxes(detections)
            save_image(annotate(image, detections, class_names), out_dir / path.name)
            rows += detection_rows(str(path), 0, detections, class_names)
    return rows, skipped


def detect_video(video: Path, detector: Detector, class_names: list[str], config: dict, out_dir: Path) -> list[dict]:
    """Detection rows for every frame, writing the annotated video to out_dir."""
    frames, rate = video_frames(video)
    rows, annotated = [], []
    for start, group in enumerate(batches(frames, config["batch_size"])):
        for offset, (frame, detections) in enumerate(zip(group, detector(group))):
            detections = widen_sub_pixel_boxes(detections)
            annotated.append(annotate(frame, detections, class_names))
            rows += detection_rows(str(video), start * config["batch_size"] + offset, detections, class_names)
    write_video(out_dir / f"{video.stem}.mp4", annotated, rate)
    return rows


def main(config: dict) -> None:
    print(f"detect.py\n{format_config(config)}", flush=True)
    source, out_dir = Path(config["source"]), Path(config["out_dir"])
    if source.is_dir():
        images = sorted(path for path in source.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            sys.exit(f"error: {source} holds no {'/'.join(IMAGE_SUFFIXES)} images.")
        if out_dir.resolve() == source.resolve():
            sys.exit(f"error: --out_dir={out_dir} is the source folder: the annotated images would replace "
                     "the originals; choose another out_dir.")
    elif source.is_file() and source.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES:
        images = [source] if source.suffix.lower() in IMAGE_SUFFIXES else []
    else:
        sys.exit(f"error: --source={source} is not an image ({', '.join(IMAGE_SUFFIXES)}), a folder of images "
                 f"or a video ({', '.join(VIDEO_SUFFIXES)}).")
    try:
        detector, class_names = load_detector(Path(config["checkpoint"]), config)
    except CheckpointError as error:
        sys.exit(f"error: {error}")
    out_dir.mkdir(parents=True, exist_ok=True)

    skipped = []
    if images:
        rows, skipped = detect_images(images, detector, class_names, config, out_dir)
    else:
        try:
            rows = detect_video(source, detector, class_names, config, out_dir)
        except ImageDecodeError as error:
            sys.exit(f"error: {error}")

    with open(out_dir / "detections.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "detections.json").write_text(json.dumps(rows, indent=1) + "\n")
    done = f"{len(images) - len(skipped)} image(s)" if images else "the video"
    print(f"{len(rows)} detections in {done}; wrote {out_dir}")
    if skipped:
        sys.exit(f"warning: skipped {len(skipped)} of {len(images)} image(s) that could not be read: "
                 f"{', '.join(path.name for path in skipped)}")


if __name__ == "__main__":
    main(resolve_config(globals(), rules=RULES))
