"""Regenerate the README's results tables, the per-class AP tables and the training curves from results/.

    python table.py

Everything comes from the CSV files that evaluate.py, benchmark.py and the training logs wrote; the
reference rows are other works' figures as their authors reported them. Running it twice changes nothing.
"""
import math
import re
from pathlib import Path

import pandas as pd

from yolo.config import resolve_config
from yolo.plots import plot_training_curve

readme = "README.md"           # the file holding the table markers
results = "results"            # metrics.csv, per_class_ap.csv, benchmark.csv and <model>_log.csv of the VOC runs
demo_results = "results/demo"  # the same files of `make demo`

START, END = "<!-- results-table:start -->", "<!-- results-table:end -->"
# SPEC section 8: figures reported by their authors, not measured here.
REFERENCE_ROWS = (
    ("YOLOv1 (seed repository)", "ResNet18", "VOC2012 val", "-", "48.10", "23.18", "97.88 (RTX 2070 Super)",
     "reported by its author: 11-point mAP with non-devkit matching and a 0.1 score cut; FPS unsynchronised"),
    ("YOLOv1 (seed repository)", "ResNet50", "VOC2012 val", "-", "49.87", "23.95", "58.40 (RTX 2070 Super)",
     "reported by its author, as above"),
    ("YOLO (Redmon et al. 2016)", "Darknet (24 conv)", "VOC2007 test", "63.4", "-", "-", "45 (Titan X)",
     "reported by the paper; 57.9 on VOC2012 test"),
    ("Fast YOLO (Redmon et al. 2016)", "9 conv", "VOC2007 test", "52.7", "-", "-", "155 (Titan X)",
     "reported by the paper"),
)


def percent(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path) if path.exists() else pd.DataFrame()


def fastest_batch1(benchmark: pd.DataFrame, backbone: str, image_size: int) -> str:
    """End-to-end images per second at batch 1 (the best dtype), with the device and dtype named."""
    if benchmark.empty:
        return "-"
    rows = benchmark[(benchmark["backbone"] == backbone) & (benchmark["mode"] == "end_to_end")
                     & (benchmark["batch_size"] == 1) & (benchmark["image_size"] == image_size)]
    if rows.empty:
        return "-"
    best = rows.loc[rows["throughput_img_s"].idxmax()]
    return f"{best['throughput_img_s']:.1f} ({best['dtype']}, {best['device_name']})"


def accuracy_rows(folder: Path, source: str) -> list[str]:
    metrics = read_csv(folder / "metrics.csv")
    benchmark = read_csv(folder / "benchmark.csv")
    lines = []
    for _, row in metrics.iterrows():
        lines.append(f"| {row['model']} | {row['backbone']} | {row['split']} ({row['n_images']} images) | "
                     f"{percent(row['voc07_map'])} | {percent(row['voc12_map'])} | {percent(row['coco_map'])} | "
                     f"{percent(row['coco_ap50'])} | {percent(row['coco_ap75'])} | "
                     f"{fastest_batch1(benchmark, row['backbone'], row['image_size'])} | "
                     f"{source}: epoch {row['epoch']}, {row['device']}, {row['dtype']} |")
    return lines


def speed_rows(folder: Path, source: str) -> list[str]:
    benchmark = read_csv(folder / "benchmark.csv")
    if benchmark.empty:
        return []
    key = ["backbone", "device_name", "dtype", "batch_size", "image_size", "mode", "compile"]
    latest = benchmark.drop_duplicates(subset=key, keep="last").sort_values(key)
    return [f"| {row['backbone']} | {row['image_size']} | {row['mode']} | {row['dtype']} | {row['batch_size']} | "
            f"{row['latency_ms_median']:.1f} | {row['latency_ms_p90']:.1f} | {row['throughput_img_s']:.1f} | "
            f"{row['device_name']}, torch {row['torch_version']} | {source} |" for _, row in latest.iterrows()]


def results_section(folders: list[tuple[Path, str, str]]) -> str:
    accuracy = [line for folder, source, _ in folders for line in accuracy_rows(folder, source)]
    references = [f"| {' | '.join(row[:3])} | {row[3]} | {row[4]} | {row[5]} | - | - | {row[6]} | {row[7]} |"
                  for row in REFERENCE_ROWS]
    speed = [line for folder, _, source in folders for line in speed_rows(folder, source)]
    return "\n".join([
        "Accuracy (mAP at IoU 0.5 in %, VOC devkit rules; COCO AP@[.5:.95] by pycocotools' rules) and",
        "end-to-end speed at batch 1. Rows without a reference are measured by this repository's code.",
        "",
        "| model | backbone | test split | VOC2007 11-point mAP | VOC2012 mAP | COCO mAP | COCO AP50 | COCO AP75 "
        "| FPS, batch 1, end to end | how it was obtained |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *(accuracy or ["| (no results yet: run `make demo` or `make reproduce`) | | | | | | | | | |"]),
        *references,
        "",
        "Speed (latency per batch in ms, median and 90th percentile; end to end = resize + forward + decoding + NMS):",
        "",
        "| backbone | input | mode | dtype | batch | median ms | p90 ms | images/s | device | source |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *(speed or ["| (no benchmark yet) | | | | | | | | | |"]),
    ])


def write_per_class_table(folder: Path) -> None:
    per_class = read_csv(folder / "per_class_ap.csv")
    if per_class.empty:
        return
    table = per_class.pivot(index="class", columns="model", values="voc12_ap")
    table = table.reindex(per_class["class"].drop_duplicates())
    lines = ["VOC2012-style AP (%) per class, from per_class_ap.csv (generated by table.py).", "",
             "| class | " + " | ".join(table.columns) + " |", "|---|" + "---|" * len(table.columns)]
    lines += [f"| {name} | " + " | ".join(percent(value) for value in values) + " |"
              for name, values in table.iterrows()]
    (folder / "per_class_ap.md").write_text("\n".join(lines) + "\n")


def plot_training_curves(folder: Path) -> None:
    for log in sorted(folder.glob("*_log.csv")):
        model = log.name.removesuffix("_log.csv")
        plot_training_curve(log, folder / f"{model}_training_curve.png", title=model)


def main(config: dict) -> None:
    # (folder, what made its accuracy rows, what made its speed rows)
    folders = [(Path(config["results"]), "`make reproduce`", "`make benchmark`"),
               (Path(config["demo_results"]), "`make demo`", "`make demo`")]
    for folder, _, _ in folders:
        if folder.exists():
            write_per_class_table(folder)
            plot_training_curves(folder)
    path = Path(config["readme"])
    text = path.read_text()
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"error: {path} has no {START} ... {END} markers to put the table between.")
    updated = pattern.sub(lambda _: f"{START}\n{results_section(folders)}\n{END}", text)
    if updated != text:
        path.write_text(updated)
    print(f"{'updated' if updated != text else 'unchanged'}: {path}")


if __name__ == "__main__":
    main(resolve_config(globals()))
