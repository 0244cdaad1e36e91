"""Export a checkpoint as one self-contained ONNX file, which detect.py, evaluate.py and yolo.load_detector run in
ONNX Runtime as they run the checkpoint in PyTorch.

    python export.py --checkpoint=runs/resnet18_voc2012val/last.pt --out=model.onnx
    python evaluate.py --checkpoint=model.onnx --model_name=resnet18_onnx

The graph takes a batch of images already at the model's input size (uint8 pixels, or floats in [0, 1] with
--input_type=float32) and returns the network's output, every box (normalised x1, y1, x2, y2) and its
class-specific scores; NMS comes after it, the project's, so that the detections are PyTorch's (--nms=true adds
ONNX's NonMaxSuppression for runtimes that want one graph). The file's metadata holds the class names, the input
size, the grid, the checkpoint's settings and the commits that trained and exported it (yolo/onnx_model.py says
all). After writing, the file runs in ONNX Runtime beside the checkpoint in PyTorch (fp32) on random images, and
the largest differences are printed. A bad checkpoint, an --out that cannot be written or a model over ONNX's
2 GB limit is one `error:` line; a file already at --out stays until the new one replaces it whole.
"""
import sys
from pathlib import Path

import torch

from yolo.checkpoint import CheckpointError, load_model
from yolo.config import at_least, between, format_config, one_of, requirement, resolve_config, writable_folder
from yolo.inference import Detector
from yolo.onnx_model import INPUT_TYPES, MAX_OPSET, OPSET, OUTPUT_NAMES, ExportError, OnnxDetector, export_onnx
from yolo.postprocess import EVAL_SCORE_THRESHOLD, MAX_DETECTIONS, NMS_IOU

checkpoint = "runs/resnet18_voc2012val/last.pt"  # a train.py checkpoint or an export_weights.py file
out = ""                       # the .onnx file written; empty: beside the checkpoint, <checkpoint name>.onnx
opset = OPSET                  # ONNX opset of the graph: 18 (torch.onnx's own) to the newest onnx knows (1.23: 28)
dynamic_batch = True           # the graph takes any batch size; false: batch_size images only
batch_size = 1                 # images per batch of a graph without dynamic_batch
input_type = "uint8"           # uint8: pixels 0..255 (divided by 255 in the graph) | float32: values in [0, 1]
nms = False                    # also ONNX's NonMaxSuppression in the graph (outputs detection_boxes, _scores, _labels)
score_threshold = EVAL_SCORE_THRESHOLD  # nms=true: keep (box, class) pairs scoring above this (0..1)
nms_iou = NMS_IOU              # nms=true: class-wise NMS IoU (0..1)
max_detections = MAX_DETECTIONS  # nms=true: detections kept per image
check_batch_sizes = (1, 3)     # after writing, compare ONNX Runtime with PyTorch on random batches of these sizes

RULES = {"out": requirement(lambda value: value == "" or value.endswith(".onnx"), "a path ending in .onnx"),
         "opset": between(OPSET, MAX_OPSET), "batch_size": at_least(1), "input_type": one_of(*INPUT_TYPES),
         "score_threshold": between(0.0, 1.0), "nms_iou": between(0.0, 1.0), "max_detections": at_least(1),
         "check_batch_sizes": at_least(1)}


def largest_differences(onnx_detector: OnnxDetector, detector: Detector, batch_size: int) -> dict[str, float]:
    """The largest absolute difference of each graph output between ONNX Runtime and PyTorch on random pixels."""
    generator = torch.Generator().manual_seed(batch_size)
    pixels = torch.randint(0, 256, (batch_size, 3, detector.image_size, detector.image_size), dtype=torch.uint8,
                           generator=generator)
    return {name: (actual - expected).abs().max().item()
            for name, actual, expected in zip(OUTPUT_NAMES, onnx_detector.infer(pixels), detector.infer(pixels))}


def main(config: dict) -> None:
    print(f"export.py\n{format_config(config)}", flush=True)
    checkpoint_path = Path(config["checkpoint"])
    out_path = Path(config["out"] or checkpoint_path.with_suffix(".onnx"))
    try:
        model, state = load_model(checkpoint_path)
    except CheckpointError as error:
        sys.exit(f"error: {error}")
    try:
        if out_path.is_dir():
            raise ValueError("a folder is in the way: give a file path ending in .onnx")
        writable_folder(out_path.parent)
    except ValueError as error:
        sys.exit(f"error: --out={out_path}: {error}")
    nms = ({key: config[key] for key in ("score_threshold", "nms_iou", "max_detections")} if config["nms"]
           else None)
    try:
        export_onnx(model, state, out_path, opset=config["opset"], dynamic_batch=config["dynamic_batch"],
                    batch_size=config["batch_size"], input_type=config["input_type"], nms=nms)
    except ExportError as error:
        sys.exit(f"error: {checkpoint_path}: {error}")
    print(f"wrote {out_path} ({out_path.stat().st_size / 1e6:.1f} MB)")

    onnx_detector, detector = OnnxDetector(out_path), Detector(model, torch.float32, "cpu")
    batch_sizes = config["check_batch_sizes"] if config["dynamic_batch"] else (config["batch_size"],)
    for size in batch_sizes:
        differences = largest_differences(onnx_detector, detector, size)
        print(f"ONNX Runtime vs PyTorch (fp32), batch {size} of random images, largest |difference|: "
              + ", ".join(f"{name} {value:.2e}" for name, value in differences.items()))


if __name__ == "__main__":
    main(resolve_config(globals(), rules=RULES))
