"""Markdown results tables: one results folder's, printed, or the README's, regenerated from the project's folders.

    python table.py --results=runs/mine/evaluate                  # print that folder's tables (--out=FILE: write them)
    python table.py --readme=README.md --results=results ...      # what `make table` runs

With --readme, regenerates the README's results section (the accuracy table and the end-to-end speed rows), and
in each of results/, results/demo/ and results/gpu/ the per-class AP table (per_class_ap.md), the speed tables
of every mode (speed.md) and the training curves; the reference rows are other works' figures as their authors
reported them. Without it, prints the accuracy, per-class AP and speed tables of one folder and writes nothing
there. Everything comes from the CSV files that evaluate.py, benchmark.py and the training logs wrote (a column
an older file lacks shows "-", but a benchmark row without a runtime timed PyTorch); a row says what made it
where evaluate.py recorded that, else what makes its folder's rows. Speed has one table for all CPUs and one per
GPU name. It runs nothing else, and running it twice changes nothing.
"""
import math
import re
from pathlib import Path

import pandas as pd

from yolo.config import resolve_config
from yolo.plots import plot_training_curve
from yolo.results import COLUMN_DEFAULTS

readme = ""                    # the file holding the table markers (make table: README.md); empty: print --results
out = ""                       # without --readme: the Markdown file the tables go to; empty: standard output
results = "results"            # metrics.csv, per_class_ap.csv, benchmark.csv and <model>_log.csv of the VOC runs
demo_results = "results/demo"  # the same files of `make demo`
gpu_results = "results/gpu"    # benchmark.csv of `make gpu-check` (speed rows only: it trains nothing to report)

START, END = "<!-- results-table:start -->", "<!-- results-table:end -->"
# Figures reported by their authors, not measured here (SPEC section 8), as {column header: text}; the seed
# README's first revision is the one this project started from.
REFERENCE_ROWS = (
    {"model": "YOLOv1 (seed repository)", "backbone": "ResNet18", "test split": "VOC2012 val",
     "VOC2012 mAP": "44.38", "COCO mAP": "21.41", "FPS, batch 1, end to end": "213.19",
     "how it was obtained": "reported by its author (seed README, first revision); FPS timed only kernel launches"},
    {"model": "YOLOv1 (seed repository)", "backbone": "ResNet50", "test split": "VOC2012 val",
     "VOC2012 mAP": "45.86", "COCO mAP": "22.17", "FPS, batch 1, end to end": "96.16",
     "how it was obtained": "reported by its author (seed README, first revision), as above"},
    {"model": "YOLOv1 (seed repository)", "backbone": "ResNet18", "test split": "VOC2012 val",
     "VOC2012 mAP": "48.10", "COCO mAP": "23.18", "FPS, batch 1, end to end": "97.88 (RTX 2070 Super)",
     "how it was obtained": "reported by its author (seed README, later revision): 11-point mAP with non-devkit "
                            "matching and a 0.1 score cut; FPS unsynchronised"},
    {"model": "YOLOv1 (seed repository)", "backbone": "ResNet50", "test split": "VOC2012 val",
     "VOC2012 mAP": "49.87", "COCO mAP": "23.95", "FPS, batch 1, end to end": "58.40 (RTX 2070 Super)",
     "how it was obtained": "reported by its author (seed README, later revision), as above"},
    {"model": "YOLO (Redmon et al. 2016)", "backbone": "Darknet (24 conv)", "test split": "VOC2007 test",
     "VOC2007 11-point mAP": "63.4", "FPS, batch 1, end to end": "45 (Titan X)",
     "how it was obtained": "reported by the paper; 57.9 on VOC2012 test"},
    {"model": "Fast YOLO (Redmon et al. 2016)", "backbone": "9 conv", "test split": "VOC2007 test",
     "VOC2007 11-point mAP": "52.7", "FPS, batch 1, end to end": "155 (Titan X)",
     "how it was obtained": "reported by the paper"},
)
MISSING = "-"  # the cell of a value the CSV lacks (an older file without that column, or an empty field)


def is_missing(value) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def percent(value) -> str:
    return MISSING if is_missing(value) else f"{100 * value:.2f}"


class Fields(dict):
    """A row's fields as text for str.format_map, with MISSING for absent or empty ones."""

    def __init__(self, row: dict):
        super().__init__({name: MISSING if is_missing(value) else value for name, value in row.items()})

    def __missing__(self, name: str) -> str:
        return MISSING


def text(template: str):
    """A column made of row fields, e.g. "{split} ({n_images} images)"."""
    return lambda row: template.format_map(Fields(row))


def number(name: str, spec: str):
    return lambda row: MISSING if is_missing(row.get(name)) else format(row[name], spec)


def percent_of(name: str):
    return lambda row: percent(row.get(name))


def how_it_was_obtained(row: dict) -> str:
    """What made the row, where known, then the checkpoint's epoch, the device and the dtype."""
    details = text("epoch {epoch}, {device}, {dtype}")(row)
    return details if row["source"] == MISSING else f"{row['source']}: {details}"


# The tables' columns, in order: (header, the cell's text from a row of the CSV, with "source" added).
ACCURACY_COLUMNS = (
    ("model", text("{model}")),
    ("backbone", text("{backbone}")),
    ("test split", text("{split} ({n_images} images)")),
    ("VOC2007 11-point mAP", percent_of("voc07_map")),
    ("VOC2012 mAP", percent_of("voc12_map")),
    ("COCO mAP", percent_of("coco_map")),
    ("COCO AP50", percent_of("coco_ap50")),
    ("COCO AP75", percent_of("coco_ap75")),
    ("FPS, batch 1, end to end", text("{fps_batch1}")),
    ("how it was obtained", how_it_was_obtained),
)
SPEED_COLUMNS = (
    ("backbone", text("{backbone}")),
    ("input", text("{image_size}")),
    ("mode", text("{mode}")),
    ("dtype", text("{dtype}")),
    ("runtime", text("{runtime}")),
    ("batch", text("{batch_size}")),
    ("compiled", text("{compile}")),
    ("median ms", number("latency_ms_median", ".1f")),
    ("p90 ms", number("latency_ms_p90", ".1f")),
    ("images/s", number("throughput_img_s", ".1f")),
    ("device", text("{device_name}, torch {torch_version}")),
    ("source", text("{source}")),
)
SPEED_ORDER = ("backbone", "device_name", "dtype", "batch_size", "image_size", "mode", "compile", "runtime")
# The README's speed rows: what a user of the model gets (resize + forward + decoding + NMS); every mode is in
# each folder's speed.md.
README_SPEED_MODE = "end_to_end"
README_SPEED_COLUMNS = tuple(column for column in SPEED_COLUMNS if column[0] != "mode")


def markdown_table(columns, rows: list[dict], quoted: tuple[dict, ...] = (), empty: str = "") -> list[str]:
    """`rows` through the columns' getters, then `quoted` rows given as {header: text}; `empty` fills the
    first cell of a table with no rows."""
    lines = ["| " + " | ".join(header for header, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row) for _, cell in columns) + " |" for row in rows]
    if not rows and empty:
        lines.append(f"| {empty} |" + " |" * (len(columns) - 1))
    lines += ["| " + " | ".join(row.get(header, MISSING) for header, _ in columns) + " |" for row in quoted]
    return lines


def read_csv(path: Path) -> pd.DataFrame:
    """A results CSV with nullable dtypes (integers stay integers where a value is missing); empty if absent
    or empty."""
    return pd.read_csv(path).convert_dtypes() if path.exists() and path.stat().st_size else pd.DataFrame()


def read_benchmark(folder: Path) -> pd.DataFrame:
    """A folder's benchmark.csv (`read_csv`), a column added since it was written holding its COLUMN_DEFAULTS
    value (an older file's rows all timed PyTorch)."""
    benchmark = read_csv(folder / "benchmark.csv")
    if benchmark.empty:
        return benchmark
    return benchmark.assign(**{name: value for name, value in COLUMN_DEFAULTS.items() if name not in benchmark})


def fastest_batch1(benchmark: pd.DataFrame, backbone: str, image_size) -> str:
    """End-to-end images per second at batch 1 (the best dtype, runtime and device), with the dtype, the runtime
    where it is not PyTorch, and the device named."""
    needed = {"backbone", "mode", "batch_size", "image_size", "throughput_img_s", "dtype", "device_name"}
    if is_missing(image_size) or not needed <= set(benchmark.columns):
        return MISSING
    rows = benchmark[(benchmark["backbone"] == backbone) & (benchmark["mode"] == "end_to_end")
                     & (benchmark["batch_size"] == 1) & (benchmark["image_size"] == image_size)]
    if rows.empty:
        return MISSING
    best = rows.loc[rows["throughput_img_s"].idxmax()]
    runtime = best.get("runtime", COLUMN_DEFAULTS["runtime"])
    named = "" if runtime == COLUMN_DEFAULTS["runtime"] else f"{runtime}, "
    return f"{best['throughput_img_s']:.1f} ({best['dtype']}, {named}{best['device_name']})"


def made_by(row: dict, folder_source: str) -> str:
    """What made an accuracy row: its own record (evaluate.py's made_by column), else what makes its folder's
    rows (a file written before the column existed)."""
    if is_missing(row.get("made_by")):
        return folder_source
    return "`" + str(row["made_by"]).replace("|", "\\|") + "`"


def accuracy_rows(folder: Path, source: str) -> list[dict]:
    benchmark = read_benchmark(folder)
    return [{**row, "source": made_by(row, source),
             "fps_batch1": fastest_batch1(benchmark, row.get("backbone"), row.get("image_size"))}
            for row in read_csv(folder / "metrics.csv").to_dict("records")]


def speed_rows(folder: Path, source: str) -> list[dict]:
    benchmark = read_benchmark(folder)
    order = [name for name in SPEED_ORDER if name in benchmark.columns]
    return [{**row, "source": source} for row in benchmark.sort_values(order, kind="stable").to_dict("records")]


def device_kind(row: dict) -> str:
    """The speed table a row belongs in: one for all CPUs, one per GPU name."""
    return "CPU" if row.get("device") == "cpu" else Fields(row)["device_name"]


ACCURACY_TITLE = ("Accuracy (mAP at IoU 0.5 in %, VOC devkit rules; COCO AP@[.5:.95] by pycocotools' rules) and\n"
                  "end-to-end speed at batch 1.")
SPEED_TITLE = ("Speed (latency per batch in ms, median and 90th percentile; end to end = resize + forward + decoding "
               "+ NMS),\none table per kind of device:")
README_SPEED_TITLE = ("End-to-end speed (resize + forward + decoding + NMS; latency per batch in ms, median and 90th "
                      "percentile),\none table per kind of device.")


def speed_tables(speed: list[dict], columns=SPEED_COLUMNS) -> list[str]:
    """One table per kind of device (CPUs first), each under its name."""
    lines = []
    for kind in sorted({device_kind(row) for row in speed}, key=lambda kind: (kind != "CPU", kind)):
        lines += ["", f"{kind}:", "", *markdown_table(columns, [row for row in speed if device_kind(row) == kind])]
    return lines


def results_section(folders: list[tuple[Path, str, str]]) -> str:
    accuracy = [row for folder, source, _ in folders for row in accuracy_rows(folder, source)]
    speed_by_folder = {folder: speed_rows(folder, source) for folder, _, source in folders}
    end_to_end = [row for rows in speed_by_folder.values() for row in rows if row.get("mode") == README_SPEED_MODE]
    every_mode = ", ".join(f"`{folder / 'speed.md'}`" for folder, rows in speed_by_folder.items() if rows)
    return "\n".join([
        ACCURACY_TITLE + " Rows without a reference are measured by this repository's code.",
        "",
        *markdown_table(ACCURACY_COLUMNS, accuracy, REFERENCE_ROWS,
                        empty="(no results yet: run `make demo` or `make reproduce`)"),
        "",
        README_SPEED_TITLE + (f"\nEvery mode measured (the forward pass alone, the straightforward baseline and, on "
                              f"a GPU, training steps): {every_mode}." if every_mode else ""),
        *(speed_tables(end_to_end, README_SPEED_COLUMNS)
          or ["", "(no benchmark yet: run `make benchmark` or `make demo`)"]),
    ])


def write_speed_tables(folder: Path, source: str) -> None:
    speed = speed_rows(folder, source)
    if not speed:
        return
    lines = ["Speed of every mode measured, from benchmark.csv (generated by table.py).", "", SPEED_TITLE,
             *speed_tables(speed)]
    (folder / "speed.md").write_text("\n".join(lines) + "\n")


def per_class_table(per_class: pd.DataFrame) -> list[str]:
    """VOC2012-style AP (%) of each class (rows, in the file's order) by model (columns), as Markdown lines."""
    table = per_class.pivot(index="class", columns="model", values="voc12_ap")
    table = table.reindex(per_class["class"].drop_duplicates())
    lines = ["| class | " + " | ".join(table.columns) + " |", "|---|" + "---|" * len(table.columns)]
    return lines + [f"| {name} | " + " | ".join(percent(value) for value in values) + " |"
                    for name, values in table.iterrows()]


def write_per_class_table(folder: Path) -> None:
    per_class = read_csv(folder / "per_class_ap.csv")
    if per_class.empty:
        return
    lines = ["VOC2012-style AP (%) per class, from per_class_ap.csv (generated by table.py).", "",
             *per_class_table(per_class)]
    (folder / "per_class_ap.md").write_text("\n".join(lines) + "\n")


def folder_tables(folder: Path) -> str:
    """The accuracy, per-class AP and speed tables of one results folder, each present where its CSV is."""
    accuracy, speed = accuracy_rows(folder, MISSING), speed_rows(folder, MISSING)
    per_class = read_csv(folder / "per_class_ap.csv")
    if not accuracy and not speed:
        raise SystemExit(f"error: --results: {folder} holds no metrics.csv or benchmark.csv with rows "
                         "(evaluate.py and benchmark.py write them).")
    lines = [f"Results in {folder}.", ""]
    if accuracy:
        lines += [ACCURACY_TITLE, "", *markdown_table(ACCURACY_COLUMNS, accuracy), ""]
    if not per_class.empty:
        lines += ["VOC2012-style AP (%) per class:", "", *per_class_table(per_class), ""]
    if speed:
        lines += [SPEED_TITLE, *speed_tables(speed), ""]
    return "\n".join(lines)


def plot_training_curves(folder: Path) -> None:
    for log in sorted(folder.glob("*_log.csv")):
        model = log.name.removesuffix("_log.csv")
        plot_training_curve(log, folder / f"{model}_training_curve.png", title=model)


def print_folder_tables(config: dict) -> None:
    tables = folder_tables(Path(config["results"]))
    if not config["out"]:
        print(tables, end="")
        return
    out = Path(config["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(tables)
    print(f"wrote {out}")


def main(config: dict) -> None:
    if not config["readme"]:
        print_folder_tables(config)
        return
    if config["out"]:
        raise SystemExit("error: --out writes one folder's tables and --readme regenerates a README: give one.")
    path = Path(config["readme"])
    if not path.is_file():
        raise SystemExit(f"error: --readme: {path} does not exist.")
    current = path.read_text()
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.DOTALL)
    if not pattern.search(current):
        raise SystemExit(f"error: {path} has no {START} ... {END} markers to put the table between.")
    # (folder, what made its accuracy rows, what made its speed rows)
    folders = [(Path(config["results"]), "`make reproduce`", "`make benchmark`"),
               (Path(config["demo_results"]), "`make demo`", "`make demo`"),
               (Path(config["gpu_results"]), "`make gpu-check`", "`make gpu-check`")]
    for folder, _, speed_source in folders:
        if folder.exists():
            write_per_class_table(folder)
            write_speed_tables(folder, speed_source)
            plot_training_curves(folder)
    updated = pattern.sub(lambda _: f"{START}\n{results_section(folders)}\n{END}", current)
    if updated != current:
        path.write_text(updated)
    print(f"{'updated' if updated != current else 'unchanged'}: {path}")


if __name__ == "__main__":
    main(resolve_config(globals()))
