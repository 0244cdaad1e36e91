import csv
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import benchmark
from command_lines import run_python
from yolo import transforms
from yolo.config import resolve_config
from yolo.model import YOLOv1
from yolo.postprocess import EVAL_SCORE_THRESHOLD, MAX_DETECTIONS, NMS_IOU, decode_predictions, to_voc_arrays

ROOT = Path(__file__).resolve().parents[1]
# A tiny model (64 px, 2 x 2 grid, narrow head) and a handful of runs: the schema, not the speed, is tested.
TINY = ["--device=cpu", "--backbones=resnet18", "--image_size=64", "--grid_size=2", "--head_channels=8",
        "--fc_dim=16", "--warmup=0", "--iters=2"]


def read_rows(path):
    with path.open(newline="") as file:
        return list(csv.reader(file))


def test_rows_follow_the_schema_and_a_rerun_replaces_its_own(tmp_path):
    out = tmp_path / "results" / "benchmark.csv"

    def run(*settings):
        # One thread (part of device_name, so of the key): on a busy machine, synchronising two threads
        # costs more than these tiny ops.
        run_python([sys.executable, "benchmark.py", *TINY, *settings, "--threads=1", f"--out={out}"], cwd=ROOT,
                       check=True, capture_output=True, text=True)

    run("--batch_sizes=1,2", "--dtypes=fp32,bf16", "--emulated_dtypes=true")
    _, *first = read_rows(out)
    run("--batch_sizes=1", "--dtypes=fp32")

    header, *rows = read_rows(out)
    assert tuple(header) == benchmark.CSV_COLUMNS
    # 2 batch sizes x (2 dtypes x forward, end_to_end + the fp32 baseline); the rerun measured 3 of them again
    # and replaced those rows where they stood.
    assert len(rows) == 10
    key = [benchmark.CSV_COLUMNS.index(name) for name in benchmark.CSV_KEY]
    assert [[row[i] for i in key] for row in rows] == [[row[i] for i in key] for row in first]
    rows = [dict(zip(header, row)) for row in rows]
    changed = {(row["batch_size"], row["dtype"], row["mode"]) for row, old in zip(rows, first)
               if list(row.values()) != old}
    assert changed <= {("1", "fp32", mode) for mode in ("forward", "end_to_end", "baseline_end_to_end")}
    assert {row["mode"] for row in rows} == {"forward", "end_to_end", "baseline_end_to_end"}
    assert {row["dtype"] for row in rows} == {"fp32", "bf16"}
    model = YOLOv1("resnet18", grid_size=2, image_size=64, head_channels=8, fc_dim=16)
    for row in rows:
        assert row["backbone"] == "resnet18" and row["device"] == "cpu" and row["device_name"]
        assert row["image_size"] == "64" and row["compile"] == "False"
        assert 0 < float(row["latency_ms_median"]) <= float(row["latency_ms_p90"])
        assert float(row["throughput_img_s"]) == pytest.approx(int(row["batch_size"]) * 1e3
                                                               / float(row["latency_ms_median"]), rel=1e-3)
        assert float(row["params_m"]) == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6, abs=1e-3)
        assert float(row["gflops"]) > 0
        assert row["torch_version"] == torch.__version__ and row["date"]


def test_onnx_runtime_is_timed_beside_pytorch_into_a_file_written_before_runtimes(tmp_path, capsys):
    out = tmp_path / "benchmark.csv"
    old_columns = [name for name in benchmark.CSV_COLUMNS if name != "runtime"]
    old_row = ["resnet18", "cpu", "an older CPU", "fp32", "1", "64", "forward", "False", "9.0", "9.5", "111.1", "11.2",
               "0.1", "2.14.1", "d0"]
    out.write_text(",".join(old_columns) + "\n" + ",".join(old_row) + "\n")
    benchmark.main(resolve_config(vars(benchmark), [*TINY, "--modes=forward,end_to_end", "--batch_sizes=1",
                                                    "--dtypes=fp32,bf16", "--emulated_dtypes=true",
                                                    "--runtimes=pytorch,onnxruntime", "--threads=1", f"--out={out}"]))
    header, *rows = read_rows(out)
    assert tuple(header) == benchmark.CSV_COLUMNS
    rows = [dict(zip(header, row)) for row in rows]
    assert rows[0] == {**dict(zip(old_columns, old_row)), "runtime": "pytorch"}  # kept, as PyTorch's
    assert sorted((row["runtime"], row["dtype"], row["mode"], row["compile"]) for row in rows[1:]) == [
        ("onnxruntime", "fp32", "end_to_end", "False"), ("onnxruntime", "fp32", "forward", "False"),
        ("pytorch", "bf16", "end_to_end", "False"), ("pytorch", "bf16", "forward", "False"),
        ("pytorch", "fp32", "end_to_end", "False"), ("pytorch", "fp32", "forward", "False")]
    assert len({tuple(row[name] for name in benchmark.CSV_KEY) for row in rows}) == len(rows)
    printed = capsys.readouterr().out
    for mode in ("forward", "end_to_end"):
        assert re.search(rf"resnet18 batch 1: {mode} onnxruntime fp32 [\d.]+ img/s = [\d.]+ x pytorch fp32, [\d.]+ x "
                         rf"pytorch bf16", printed), printed


def test_a_file_with_other_columns_is_refused_before_timing(tmp_path):
    out = tmp_path / "old.csv"
    out.write_text("backbone,fps\nresnet18,97.88\n")
    result = run_python([sys.executable, "benchmark.py", *TINY, "--batch_sizes=1", f"--out={out}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [f"error: --out: {out} has the columns backbone, fps, not these "
                                                  f"rows' {', '.join(benchmark.CSV_COLUMNS)}; move it aside or "
                                                  f"write to another file."]
    assert "device:" not in result.stdout
    assert out.read_text() == "backbone,fps\nresnet18,97.88\n"


def test_flops_are_counted_from_the_model():
    narrow, wide = (YOLOv1("resnet18", grid_size=2, image_size=64, head_channels=8, fc_dim=fc_dim).eval()
                    for fc_dim in (16, 48))
    outputs = 2 * 2 * (5 * 2 + 20)
    extra_multiply_adds = (2 * 2 * 8) * 32 + 32 * outputs  # the wider hidden layer's two matrix products
    cpu = torch.device("cpu")
    difference = benchmark.forward_gflops(wide, cpu) - benchmark.forward_gflops(narrow, cpu)
    assert difference * 1e9 == pytest.approx(2 * extra_multiply_adds)


@pytest.mark.parametrize("seed", range(2))
def test_the_baselines_cell_by_cell_decoding_matches_decode_predictions(seed):
    generator = torch.Generator().manual_seed(seed)
    num_classes = 3
    pred = torch.rand(2, 4, 4, 5 * 2 + num_classes, generator=generator)
    pred[..., [2, 3, 7, 8]] *= 0.5
    for cells, detection in zip(pred, decode_predictions(pred, num_classes)):
        (expected,) = to_voc_arrays([detection], [(375, 500)])
        actual = benchmark.decode_cells(cells.numpy(), num_classes, 500, 375, score_threshold=EVAL_SCORE_THRESHOLD,
                                        nms_iou=NMS_IOU, max_detections=MAX_DETECTIONS)
        assert actual.shape == expected.shape
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-4)


def test_train_step_mode_writes_rows_of_the_same_schema(tmp_path):
    out = tmp_path / "train_step.csv"
    benchmark.main(resolve_config(vars(benchmark), [*TINY, "--modes=train_step", "--batch_sizes=1,2",
                                                    "--dtypes=fp32", "--threads=1", f"--out={out}"]))
    header, *rows = read_rows(out)
    assert tuple(header) == benchmark.CSV_COLUMNS
    rows = [dict(zip(header, row)) for row in rows]
    assert [(row["mode"], row["batch_size"], row["dtype"]) for row in rows] == [
        ("train_step", "1", "fp32"), ("train_step", "2", "fp32")]
    for row in rows:
        assert float(row["throughput_img_s"]) == pytest.approx(int(row["batch_size"]) * 1e3
                                                               / float(row["latency_ms_median"]), rel=1e-3)


def test_a_run_stopped_during_a_later_backbone_keeps_the_rows_it_measured(tmp_path, monkeypatch):
    out = tmp_path / "stopped.csv"
    measure = benchmark.benchmark_backbone

    def stopped_at_resnet50(backbone, *args):
        if backbone == "resnet50":
            raise KeyboardInterrupt  # as a Ctrl-C or a time limit would stop it
        return measure(backbone, *args)

    monkeypatch.setattr(benchmark, "benchmark_backbone", stopped_at_resnet50)
    with pytest.raises(KeyboardInterrupt):
        benchmark.main(resolve_config(vars(benchmark), [*TINY, "--backbones=resnet18,resnet50", "--modes=forward",
                                                        "--batch_sizes=1", "--dtypes=fp32", "--threads=1",
                                                        f"--out={out}"]))
    header, *rows = read_rows(out)
    assert [dict(zip(header, row))["backbone"] for row in rows] == ["resnet18"]


def test_a_train_step_lowers_the_loss_of_its_batch():
    config = {"image_size": 64, "grid_size": 2}
    torch.manual_seed(0)
    model = YOLOv1("resnet18", grid_size=2, image_size=64, head_channels=8, fc_dim=16).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batch = benchmark.random_training_batch(4, config, torch.device("cpu"))
    assert batch.images.dtype == torch.uint8 and batch.grids.shape == (4, 2, 2, 25) and batch.grids[..., 4].sum() >= 1

    def loss():
        return sum(benchmark.yolo_loss_terms(model(batch.images.float() / 255), batch.grids).values()).item()

    before = loss()
    for _ in range(5):
        benchmark.train_step(model, optimizer, scaler, batch, torch.float32)
    assert loss() < before


def test_loader_modes_time_both_pipelines_on_a_generated_set_in_the_same_schema(tmp_path, capsys):
    out = tmp_path / "loader.csv"
    benchmark.main(resolve_config(vars(benchmark), [
        "--device=cpu", "--modes=loader,baseline_loader", "--image_size=64", "--grid_size=2", "--batch_sizes=2",
        "--num_workers=0,1", "--warmup=0", "--iters=2", f"--out={out}"]))
    header, *rows = read_rows(out)
    rows = [dict(zip(header, row)) for row in rows]
    assert [(row["mode"], row["dtype"], row["device_name"].rsplit(", ", 1)[1]) for row in rows] == [
        ("loader", "uint8", "0 loader workers"), ("baseline_loader", "fp32", "0 loader workers"),
        ("loader", "uint8", "1 loader workers"), ("baseline_loader", "fp32", "1 loader workers")]
    for row in rows:
        assert row["backbone"] == "none" and row["batch_size"] == "2" and row["image_size"] == "64"
        assert float(row["throughput_img_s"]) == pytest.approx(2e3 / float(row["latency_ms_median"]), rel=1e-3)
    assert "x the baseline's" in capsys.readouterr().out


def test_loader_modes_name_a_missing_data_dir(tmp_path):
    result = run_python([sys.executable, "benchmark.py", "--device=cpu", "--modes=loader", "--protocol=voc2007test",
                             f"--data_dir={tmp_path}", f"--out={tmp_path / 'x.csv'}"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode != 0 and "error: split list" in result.stderr and "VOC2007" in result.stderr


def test_loader_modes_refuse_more_batches_than_dev_shm_holds_in_one_line(tmp_path, monkeypatch):
    mb = 2 ** 20
    monkeypatch.setattr(transforms.shutil, "disk_usage", lambda path: SimpleNamespace(total=64 * mb, used=0,
                                                                                       free=32 * mb))
    settings = ["--device=cpu", "--modes=loader", "--num_workers=2", "--batch_sizes=16", "--image_size=448",
                f"--out={tmp_path / 'x.csv'}"]
    with pytest.raises(SystemExit) as exited:  # train.py's loader: 2 workers x (2 batches ahead + 2 held)
        benchmark.main(resolve_config(vars(benchmark), settings))
    assert str(exited.value.code).startswith(f"error: /dev/shm has 32 MB free, and the loader needs about "
                                             f"{2 * (2 + 2) * 16 * 3 * 448 ** 2 / mb:.0f} MB")
