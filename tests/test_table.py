"""table.py regenerates the README tables from the CSVs alone, and only when they change."""
import sys
from pathlib import Path

import pandas as pd

import benchmark
import table
from command_lines import run_python
from yolo.results import write_keyed

ROOT = Path(__file__).resolve().parents[1]
README = """# Title

Intro text that must survive.

<!-- results-table:start -->
old table
<!-- results-table:end -->

Closing text.
"""


def write_results(folder: Path, voc12_map: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([{"model": "resnet18", "backbone": "resnet18", "protocol": "synthetic", "split": "synthetic val",
                   "n_images": 128, "voc07_map": 0.5, "voc12_map": voc12_map, "coco_map": 0.2, "coco_ap50": 0.5,
                   "coco_ap75": 0.1, "image_size": 128, "dtype": "float32", "checkpoint": "x/last.pt", "epoch": 3,
                   "git_commit": "abc", "torch_version": "2.14.1", "device": "CPU (x86_64, 2 threads)",
                   "date": "2026-11-25"}]).to_csv(folder / "metrics.csv", index=False)
    pd.DataFrame([{"model": "resnet18", "class": name, "voc07_ap": 0.5, "voc12_ap": 0.25 * i}
                  for i, name in enumerate(["circle", "square"])]).to_csv(folder / "per_class_ap.csv", index=False)
    pd.DataFrame([{"backbone": "resnet18", "device": "cpu", "device_name": "AMD EPYC", "dtype": "fp32",
                   "batch_size": 1, "image_size": 128, "mode": "end_to_end", "compile": False,
                   "latency_ms_median": 20.0, "latency_ms_p90": 25.0, "throughput_img_s": 50.0, "params_m": 12.0,
                   "gflops": 1.0, "torch_version": "2.14.1", "date": "2026-11-25"}]).to_csv(folder / "benchmark.csv",
                                                                                        index=False)
    pd.DataFrame({"epoch": [1, 2], "lr": [0.1, 0.1], "coord": [1, 1], "obj": [1, 1], "noobj": [1, 1], "cls": [1, 1],
                  "train_loss": [4.0, 3.0], "val_loss": [None, 3.5], "val_voc07_map": [None, 0.4],
                  "val_voc12_map": [None, 0.45], "images_per_s": [10, 10], "seconds": [1, 1]}
                 ).to_csv(folder / "resnet18_log.csv", index=False)


def make_table(tmp_path):
    result = run_python([sys.executable, "table.py", f"--readme={tmp_path / 'README.md'}",
                             f"--results={tmp_path / 'voc'}", f"--demo_results={tmp_path / 'demo'}",
                             f"--gpu_results={tmp_path / 'voc' / 'gpu'}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return (tmp_path / "README.md").read_text()


def test_the_table_comes_from_the_csvs_and_is_stable(tmp_path):
    (tmp_path / "README.md").write_text(README)
    write_results(tmp_path / "demo", voc12_map=0.4567)
    first = make_table(tmp_path)
    assert first.startswith("# Title\n\nIntro text that must survive.") and first.endswith("Closing text.\n")
    assert "old table" not in first
    assert "| resnet18 | resnet18 | synthetic val (128 images) | 50.00 | 45.67 |" in first
    assert "50.0 (fp32, AMD EPYC)" in first
    assert "reported by the paper" in first and "48.10" in first
    assert "44.38 | 21.41 | - | - | 213.19 | reported by its author (seed README, first revision)" in first
    assert "49.87 | 23.95 | - | - | 58.40 (RTX 2070 Super) | reported by its author (seed README, later" in first
    assert (tmp_path / "demo/per_class_ap.md").read_text().count("| circle | 0.00 |") == 1
    assert (tmp_path / "demo/resnet18_training_curve.png").stat().st_size > 0

    assert make_table(tmp_path) == first

    write_results(tmp_path / "demo", voc12_map=0.5)
    assert "| 50.00 | 50.00 |" in make_table(tmp_path)


def test_a_readme_without_markers_is_a_clear_error(tmp_path):
    (tmp_path / "README.md").write_text("# No markers\n")
    result = run_python([sys.executable, "table.py", f"--readme={tmp_path / 'README.md'}",
                             f"--results={tmp_path}", f"--demo_results={tmp_path}", f"--gpu_results={tmp_path}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "markers" in result.stderr


def speed_table(readme: str, title: str) -> list[str]:
    """The rows of the speed table under the line `title:`."""
    lines = readme.splitlines()
    start = lines.index(f"{title}:") + 4  # the title, a blank line, the header and the rule
    return lines[start:next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))]


def test_one_speed_table_per_kind_of_device(tmp_path):
    (tmp_path / "README.md").write_text(README)
    write_results(tmp_path / "demo", voc12_map=0.4)
    gpu = {"backbone": "resnet50", "device": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "dtype": "bf16",
           "batch_size": 64, "image_size": 448, "mode": "forward", "compile": True, "latency_ms_median": 80.0,
           "latency_ms_p90": 81.0, "throughput_img_s": 800.0, "params_m": 282.0, "gflops": 43.0,
           "torch_version": "2.14.1", "date": "2026-11-26"}
    (tmp_path / "voc" / "gpu").mkdir(parents=True)
    pd.DataFrame([gpu, {**gpu, "backbone": "resnet18"}, {**gpu, "mode": "end_to_end"},
                  {**gpu, "device_name": "NVIDIA H200", "mode": "end_to_end"}]
                 ).to_csv(tmp_path / "voc" / "benchmark.csv", index=False)
    pd.DataFrame([{**gpu, "mode": "train_step", "batch_size": 1, "compile": False}]
                 ).to_csv(tmp_path / "voc" / "gpu" / "benchmark.csv", index=False)
    readme = make_table(tmp_path)
    # The README keeps the end-to-end rows of every folder; each folder's speed.md has every mode it measured.
    assert readme.index("CPU:") < readme.index("NVIDIA H100 80GB HBM3:") < readme.index("NVIDIA H200:")
    assert speed_table(readme, "CPU") == [
        "| resnet18 | 128 | fp32 | pytorch | 1 | False | 20.0 | 25.0 | 50.0 | AMD EPYC, torch 2.14.1 | `make demo` |"]
    assert speed_table(readme, "NVIDIA H100 80GB HBM3") == [
        "| resnet50 | 448 | bf16 | pytorch | 64 | True | 80.0 | 81.0 | 800.0 | NVIDIA H100 80GB HBM3, torch 2.14.1 "
        "| `make benchmark` |"]
    assert len(speed_table(readme, "NVIDIA H200")) == 1
    assert "| forward |" not in readme and "| train_step |" not in readme
    assert (f"Every mode measured (the forward pass alone, the straightforward baseline and, on a GPU, training "
            f"steps): `{tmp_path / 'voc/speed.md'}`, `{tmp_path / 'demo/speed.md'}`, `{tmp_path / 'voc/gpu/speed.md'}`."
            in readme)
    voc = (tmp_path / "voc/speed.md").read_text()
    assert speed_table(voc, "NVIDIA H100 80GB HBM3") == [
        "| resnet18 | 448 | forward | bf16 | pytorch | 64 | True | 80.0 | 81.0 | 800.0 | NVIDIA H100 80GB HBM3, torch 2.14.1 "
        "| `make benchmark` |"] + [
        f"| resnet50 | 448 | {mode} | bf16 | pytorch | 64 | True | 80.0 | 81.0 | 800.0 | NVIDIA H100 80GB HBM3, torch 2.14.1 "
        f"| `make benchmark` |" for mode in ("end_to_end", "forward")]
    assert "CPU:" not in voc and len(speed_table(voc, "NVIDIA H200")) == 1
    assert speed_table((tmp_path / "voc/gpu/speed.md").read_text(), "NVIDIA H100 80GB HBM3") == [
        "| resnet50 | 448 | train_step | bf16 | pytorch | 1 | False | 80.0 | 81.0 | 800.0 | NVIDIA H100 80GB HBM3, torch 2.14.1 "
        "| `make gpu-check` |"]
    assert speed_table((tmp_path / "demo/speed.md").read_text(), "CPU") == [
        "| resnet18 | 128 | end_to_end | fp32 | pytorch | 1 | False | 20.0 | 25.0 | 50.0 | AMD EPYC, torch 2.14.1 "
        "| `make demo` |"]


def test_a_column_an_older_csv_lacks_shows_a_dash(tmp_path):
    (tmp_path / "README.md").write_text(README)
    write_results(tmp_path / "demo", voc12_map=0.4)
    for name, dropped in (("metrics.csv", ["coco_ap75", "n_images"]), ("benchmark.csv", ["compile"])):
        frame = pd.read_csv(tmp_path / "demo" / name)
        frame.drop(columns=dropped).to_csv(tmp_path / "demo" / name, index=False)
    readme = make_table(tmp_path)
    assert ("| resnet18 | resnet18 | synthetic val (- images) | 50.00 | 40.00 | 20.00 | 50.00 | - | 50.0 (fp32, "
            in readme)
    assert speed_table(readme, "CPU")[0].startswith("| resnet18 | 128 | fp32 | pytorch | 1 | - | 20.0 |")


def test_rows_of_a_file_without_runtimes_are_pytorchs_beside_onnx_runtimes(tmp_path):
    """A benchmark.csv written before the runtime column: its rows read as PyTorch's, and a row of ONNX Runtime added
    to it (by benchmark.py, which keeps them) sits beside them and is named in the FPS column when fastest."""
    (tmp_path / "README.md").write_text(README)
    write_results(tmp_path / "demo", voc12_map=0.4)
    old = pd.read_csv(tmp_path / "demo" / "benchmark.csv").iloc[0].to_dict()
    write_keyed(tmp_path / "demo" / "benchmark.csv", [{**old, "runtime": "onnxruntime", "throughput_img_s": 80.0}],
                benchmark.CSV_KEY, benchmark.CSV_COLUMNS)
    assert list(pd.read_csv(tmp_path / "demo" / "benchmark.csv")["runtime"]) == ["pytorch", "onnxruntime"]
    readme = make_table(tmp_path)
    assert [row.split(" | ")[2:5] for row in speed_table(readme, "CPU")] == [["fp32", "onnxruntime", "1"],
                                                                             ["fp32", "pytorch", "1"]]
    assert "| 80.0 (fp32, onnxruntime, AMD EPYC) |" in readme


def test_reference_rows_name_only_the_tables_columns():
    headers = {header for header, _ in table.ACCURACY_COLUMNS}
    for row in table.REFERENCE_ROWS:
        assert set(row) <= headers, set(row) - headers


def test_a_row_says_what_made_it_and_an_older_row_its_folders_maker(tmp_path):
    (tmp_path / "README.md").write_text(README)
    write_results(tmp_path / "voc", voc12_map=0.4)
    metrics = pd.read_csv(tmp_path / "voc/metrics.csv")
    own = "python evaluate.py --checkpoint=runs/mine/last.pt --out_dir=results"
    pd.concat([metrics, metrics.assign(model="mine", made_by=own)]).to_csv(tmp_path / "voc/metrics.csv", index=False)
    readme = make_table(tmp_path)
    assert "| `make reproduce`: epoch 3, CPU (x86_64, 2 threads), float32 |" in readme
    assert f"| `{own}`: epoch 3, CPU (x86_64, 2 threads), float32 |" in readme
    assert readme.count("`make reproduce`") == 1


def test_one_folders_tables_stand_alone(tmp_path):
    write_results(tmp_path / "mine", voc12_map=0.4567)
    metrics = pd.read_csv(tmp_path / "mine/metrics.csv")
    metrics.assign(made_by="python evaluate.py --checkpoint=x/last.pt").to_csv(tmp_path / "mine/metrics.csv",
                                                                                index=False)
    command = [sys.executable, "table.py", f"--results={tmp_path / 'mine'}"]
    printed = run_python(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0, printed.stderr
    lines = printed.stdout.splitlines()
    assert ("| resnet18 | resnet18 | synthetic val (128 images) | 50.00 | 45.67 | 20.00 | 50.00 | 10.00 | 50.0 (fp32, "
            "AMD EPYC) | `python evaluate.py --checkpoint=x/last.pt`: epoch 3, CPU (x86_64, 2 threads), float32 |"
            in lines)
    assert lines[lines.index("| class | resnet18 |"):][2:4] == ["| circle | 0.00 |", "| square | 25.00 |"]
    assert speed_table(printed.stdout, "CPU")[0].startswith("| resnet18 | 128 | end_to_end | fp32 | pytorch | 1 | "
                                                            "False |")
    assert "seed" not in printed.stdout  # another work's figures belong to the README's table only

    written = run_python([*command, f"--out={tmp_path / 'tables/mine.md'}"], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
    assert written.returncode == 0 and (tmp_path / "tables/mine.md").read_text() == printed.stdout
    assert sorted(path.name for path in (tmp_path / "mine").iterdir()) == [
        "benchmark.csv", "metrics.csv", "per_class_ap.csv", "resnet18_log.csv"]

    empty = run_python([sys.executable, "table.py", f"--results={tmp_path / 'tables'}"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert empty.returncode == 1 and "holds no metrics.csv or benchmark.csv" in empty.stderr


def test_the_fps_column_takes_the_fastest_of_the_dtypes_and_devices():
    rows = pd.DataFrame([{"backbone": "resnet18", "mode": "end_to_end", "batch_size": 1, "image_size": 448,
                          "throughput_img_s": speed, "dtype": dtype, "device_name": "GPU X"}
                         for speed, dtype in ((80.0, "fp32"), (210.5, "bf16"), (150.0, "fp16"))])
    assert table.fastest_batch1(rows, "resnet18", 448) == "210.5 (bf16, GPU X)"
