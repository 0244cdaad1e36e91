"""Evaluate a checkpoint on its protocol's test split: VOC and COCO metrics, per-class AP, plots, examples.

    python evaluate.py --checkpoint=runs/resnet18_voc2012val/last.pt
    python evaluate.py --checkpoint=runs/resnet18_voc2012val/last.onnx   # export.py's file, in ONNX Runtime

Writes (rerunning replaces the model's rows and files): a row of out_dir/metrics.csv, its rows of
out_dir/per_class_ap.csv, the detections it scored as a COCO results file out_dir/<model>_detections.json (the
dataset's own image and category ids, unrounded boxes: pycocotools and other tools score it as they are),
out_dir/<model>_pr.png, out_dir/<model>_ap.png and out_dir/<model>_examples.png;
with --submission=true also the VOC test-server files under out_dir/submission/<model>/ and their .tar.gz.
protocol=voc2012test (the test server's: its annotations stay there) writes those files alone.
out_dir defaults to evaluate/ in the checkpoint's folder, so an evaluation of one's own model stays with its
run: the repository's results/ hold only what the Makefile writes there. Prints the per-class AP table and the
paths written; `python table.py --results=<out_dir>` prints the folder's tables again.
"""
import datetime
import json
import shlex
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from table import per_class_table
from yolo.api import open_detector
from yolo.box_formats import voc_to_coco
from yolo.checkpoint import CheckpointError
from yolo.config import at_least, between, format_config, one_of, resolve_config, resolve_out_dir
from yolo.data import ImageDecodeError, build_dataset, decode_image, has_test_annotations
from yolo.device import DTYPES, device_name, resolve_device
from yolo.engine import evaluate
from yolo.files import atomic_write
from yolo.formats import DATA_FORMATS
from yolo.imagecheck import CACHE_NAME, require_readable_images
from yolo.metrics import voc_precision_recall
from yolo.plots import plot_per_class_ap, plot_precision_recall
from yolo.postprocess import DISPLAY_SCORE_THRESHOLD, EVAL_SCORE_THRESHOLD, MAX_DETECTIONS, NMS_IOU
from yolo.results import ResultsError, check_writable, write_keyed
from yolo.sampling import IndexedSamples
from yolo.transforms import (EvalTransform, SharedMemoryError, build_loader, check_num_workers,
                             num_loader_workers)
from yolo.visualize import draw_boxes, save_image

checkpoint = "runs/resnet18_voc2012val/last.pt"  # a train.py checkpoint (last.pt is the reported one), or an .onnx
model_name = ""                # row key in the CSVs; empty: the checkpoint's folder name (an .onnx: with _onnx added)
protocol = ""                  # voc2012val | voc2007test | voc2012test | custom; empty: the checkpoint's
data_dir = ""                  # dataset folder; empty: the checkpoint's
data_format = ""               # custom: auto | voc | coco | yolo (yolo/formats.py); empty: the checkpoint's
val_split = ""                 # custom: the split evaluated; empty: the checkpoint's val_split
batch_size = 32                # images per forward pass
num_workers = "auto"           # data-loading processes: auto (the cores less one) | N
device = "auto"                # auto (cuda if available; an .onnx: cpu) | cpu | cuda
dtype = "fp32"                 # fp32 | bf16 | fp16 | auto (fastest the device computes natively); an .onnx: fp32
score_threshold = EVAL_SCORE_THRESHOLD  # keep (box, class) pairs scoring above this (0..1); mAP wants nearly all
nms_iou = NMS_IOU              # class-wise NMS IoU (0..1)
max_detections = MAX_DETECTIONS  # detections kept per image
out_dir = ""                   # where the CSVs and figures go; empty: evaluate/ in the checkpoint's folder
made_by = ""                   # the rows' record of what made them (the Makefile: its target); empty: the command line
num_examples = 6               # test images drawn with detections beside ground truth; 0: none
submission = False             # also write the VOC test-server files (comp4_det_test_<class>.txt) and a .tar.gz

RULES = {"device": resolve_device, "batch_size": at_least(1), "num_workers": check_num_workers,
         "dtype": one_of("auto", *DTYPES), "score_threshold": between(0.0, 1.0), "nms_iou": between(0.0, 1.0),
         "max_detections": at_least(1), "num_examples": at_least(0),
         "data_format": one_of("", "auto", *DATA_FORMATS)}
METRIC_COLUMNS = ("voc07_map", "voc12_map", "coco_map", "coco_ap50", "coco_ap75")
TEST_SPLITS = {"voc2012val": "VOC2012 val", "voc2007test": "VOC2007 test"}  # custom: "<protocol> <val_split>"
# The CSVs written in out_dir, by their columns; rerunning a model replaces its rows (the key), others stay.
RESULT_CSVS = {
    "metrics.csv": ("model", "backbone", "protocol", "split", "n_images", *METRIC_COLUMNS, "image_size", "dtype",
                    "checkpoint", "epoch", "git_commit", "torch_version", "device", "date", "made_by"),
    "per_class_ap.csv": ("model", "class", "voc07_ap", "voc12_ap"),
}
CSV_KEY = ("model",)


def write_submission(folder: Path, image_ids: list[str], detections: list[np.ndarray], class_names: list[str],
                     server_ids: list[str] | None = None) -> Path:
    """The VOC test server's comp4 files, one per class ('<image_id> <score> <x1> <y1> <x2> <y2>', 1-based
    pixels), under folder/results/VOC2012/Main/, and folder's .tar.gz of them, as the server takes it.

    With `server_ids` (the test set's ImageSets/Main/test.txt) the files must cover exactly those images: an
    id the server does not list, or a listed one without its detections, is a ValueError naming them.
    """
    if server_ids is not None:
        unlisted = sorted(set(image_ids) - set(server_ids))
        missing = sorted(set(server_ids) - set(image_ids))
        if unlisted or missing:
            raise ValueError(f"the test server scores exactly the {len(server_ids)} images of its test.txt: "
                             + "; ".join(f"{what} {len(ids)} ({', '.join(ids[:5])}{', ...' if len(ids) > 5 else ''})"
                                         for what, ids in (("not listed there:", unlisted),
                                                           ("listed but not evaluated:", missing)) if ids))
    main = folder / "results" / "VOC2012" / "Main"
    main.mkdir(parents=True, exist_ok=True)
    for class_id, name in enumerate(class_names):
        lines = [f"{image_id} {det[4]:.6f} {det[0]:.1f} {det[1]:.1f} {det[2]:.1f} {det[3]:.1f}\n"
                 for image_id, image_detections in zip(image_ids, detections)
                 for det in image_detections if int(det[5]) == class_id]
        (main / f"comp4_det_test_{name}.txt").write_text("".join(lines))
    archive = folder.with_name(folder.name + ".tar.gz")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder / "results", arcname="results")
    return archive


def write_coco_results(path: Path, image_ids: list, detections: list[np.ndarray], class_ids: list) -> None:
    """The detections scored, as a COCO results file (pycocotools' loadRes reads it): image_id and category_id as
    the dataset gives them, bbox [x, y, w, h] in 0-based continuous pixels, unrounded."""
    results = [{"image_id": image_id, "category_id": class_ids[int(label)], "bbox": box, "score": float(score)}
               for image_id, rows in zip(image_ids, detections)
               for box, score, label in zip(voc_to_coco(rows[:, :4]).tolist(), rows[:, 4], rows[:, 5])]
    with atomic_write(path, "w") as file:
        file.write(json.dumps(results))


def draw_examples(dataset, indices, detections, path: Path, count: int) -> None:
    """Ground truth (left) beside detections above the display threshold (right), one row per image."""
    rows = []
    for index, image_detections in list(zip(indices, detections))[:count]:
        image, annotation = decode_image(dataset.image_path(index)), dataset.annotations[index]
        confident = image_detections[image_detections[:, 4] >= DISPLAY_SCORE_THRESHOLD]
        truth = draw_boxes(image, annotation["boxes"], annotation["labels"], dataset.class_names)
        found = draw_boxes(image, confident[:, :4], confident[:, 5].astype(int), dataset.class_names,
                           scores=confident[:, 4])
        rows.append(torch.cat([truth, torch.full((3, image.shape[1], 8), 255, dtype=torch.uint8), found], dim=2))
    if rows:
        width = max(row.shape[2] for row in rows)
        padded = [torch.nn.functional.pad(row, (0, width - row.shape[2]), value=255) for row in rows]
        save_image(torch.cat(padded, dim=1), path)


def main(config: dict) -> None:
    print(f"evaluate.py\n{format_config(config)}", flush=True)
    checkpoint_path = Path(config["checkpoint"])
    try:
        detector, state = open_detector(checkpoint_path, config["device"], config["dtype"],
                                        score_threshold=config["score_threshold"], nms_iou=config["nms_iou"],
                                        max_detections=config["max_detections"])
    except CheckpointError as error:
        sys.exit(f"error: {error}")
    saved = state["config"]
    protocol_name = config["protocol"] or saved["protocol"]
    data_dir = config["data_dir"] or saved["data_dir"]
    # Checkpoints saved before these settings existed hold none: their runs read the defaults.
    data_format = config["data_format"] or saved.get("data_format", "auto")
    val_split = config["val_split"] or saved.get("val_split", "val")
    runtime_suffix = "_onnx" if checkpoint_path.suffix == ".onnx" else ""  # beside the checkpoint's own row
    model_name = config["model_name"] or checkpoint_path.parent.name + runtime_suffix
    class_names = state["class_names"]
    out_dir = resolve_out_dir(config, checkpoint_path.parent / "evaluate")
    try:
        for name, columns in RESULT_CSVS.items():
            check_writable(out_dir / name, CSV_KEY, columns)
    except ResultsError as error:
        sys.exit(f"error: --out_dir: {error}")

    transform = EvalTransform(detector.image_size, detector.grid_size, detector.num_classes)
    try:
        dataset = build_dataset(protocol_name, data_dir, train=False, transforms=transform, class_names=class_names,
                                data_format=data_format, split=val_split)
        require_readable_images([dataset.image_path(index) for index in range(len(dataset))], out_dir / CACHE_NAME)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
    if list(dataset.class_names) != list(class_names):
        sys.exit(f"error: the checkpoint's classes {class_names} differ from the dataset's {dataset.class_names}.")
    print(f"{dataset.classes_line()}\n{dataset.summary(val_split)}", flush=True)
    try:
        loader = build_loader(IndexedSamples(dataset), config["batch_size"], shuffle=False,
                              num_workers=num_loader_workers(config["num_workers"]),
                              image_bytes=3 * detector.image_size ** 2)
    except SharedMemoryError as error:
        sys.exit(f"error: {error}")
    try:
        result = evaluate(detector, loader, dataset, loss_weights={}, desc=f"evaluate {model_name}")
    except ImageDecodeError as error:  # its header read, its pixels do not
        sys.exit(f"error: {error.reason}. An evaluation needs every image of the split: replace the file.")
    image_ids = [dataset.image_ids[index] for index in result["indices"]]
    out_dir.mkdir(parents=True, exist_ok=True)
    if not has_test_annotations(protocol_name):  # the server scores it: its files are all there is to write
        try:
            archive = write_submission(out_dir / "submission" / model_name, image_ids, result["detections"],
                                       class_names, server_ids=list(dataset.image_ids))
        except ValueError as error:
            sys.exit(f"error: {error}")
        print(f"{len(image_ids)} test images detected; upload {archive} to the VOC evaluation server "
              f"(comp4: trained on VOC07 trainval + test and VOC12 trainval)\nwrote:\n  {archive}")
        return
    metrics = result["metrics"]
    row = {"model": model_name, "backbone": state["model_args"]["backbone"], "protocol": protocol_name,
           "split": TEST_SPLITS.get(protocol_name, f"{protocol_name} {val_split}"), "n_images": len(dataset),
           **{name: round(float(metrics[name]), 6) for name in METRIC_COLUMNS},
           "image_size": detector.image_size, "dtype": str(detector.dtype).removeprefix("torch."),
           "checkpoint": str(checkpoint_path), "epoch": state.get("epoch"),
           "git_commit": state.get("git_commit", "unknown"), "torch_version": torch.__version__,
           "device": device_name(detector.device), "date": datetime.date.today().isoformat(),
           "made_by": config["made_by"] or shlex.join(["python", *sys.argv])}
    per_class = [{"model": model_name, "class": name, **{column: round(float(metrics[column][i]), 6)
                                                         for column in ("voc07_ap", "voc12_ap")}}
                 for i, name in enumerate(class_names)]
    write_keyed(out_dir / "metrics.csv", [row], CSV_KEY, RESULT_CSVS["metrics.csv"])
    write_keyed(out_dir / "per_class_ap.csv", per_class, CSV_KEY, RESULT_CSVS["per_class_ap.csv"])
    pr_figure, ap_figure, examples_figure = (out_dir / f"{model_name}_{kind}.png" for kind in ("pr", "ap", "examples"))
    detections_path = out_dir / f"{model_name}_detections.json"
    write_coco_results(detections_path, [dataset.file_ids[index] for index in result["indices"]],
                       result["detections"], dataset.class_ids)
    written = [*(out_dir / name for name in RESULT_CSVS), detections_path, pr_figure, ap_figure]

    curves = voc_precision_recall(result["detections"], result["ground_truths"], len(class_names))
    plot_precision_recall({name: (curve.recall, curve.precision) for name, curve in zip(class_names, curves)
                           if curve is not None}, pr_figure, f"{model_name}: precision-recall at IoU 0.5")
    plot_per_class_ap({name: float(np.nan_to_num(ap)) for name, ap in zip(class_names, metrics["voc12_ap"])},
                      ap_figure, f"{model_name}: VOC2012-style AP per class")
    if config["num_examples"] > 0:
        draw_examples(dataset, result["indices"], result["detections"], examples_figure, config["num_examples"])
        written.append(examples_figure)
    if config["submission"]:
        written.append(write_submission(out_dir / "submission" / model_name, image_ids, result["detections"],
                                        class_names))
    print("\n".join(per_class_table(pd.DataFrame(per_class))))
    print(" | ".join(f"{name} {metrics[name]:.4f}" for name in METRIC_COLUMNS) + f" | {len(dataset)} images")
    print("wrote:\n" + "\n".join(f"  {path}" for path in written))


if __name__ == "__main__":
    main(resolve_config(globals(), rules=RULES))
