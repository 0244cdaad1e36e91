"""Keyed result CSVs: a rerun replaces its own rows, other rows stay as written, foreign files are refused."""
import csv

import pytest

from yolo.results import ResultsError, check_writable, write_keyed

COLUMNS = ("device_name", "backbone", "batch_size", "compile", "latency_ms", "date")
KEY = ("device_name", "backbone", "batch_size", "compile")


def timing(backbone="resnet18", batch_size=1, latency_ms=10.0, device_name="AMD EPYC, 2 threads", date="d1"):
    return {"device_name": device_name, "backbone": backbone, "batch_size": batch_size, "compile": False,
            "latency_ms": latency_ms, "date": date}


def read(path):
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def test_the_same_measurement_twice_leaves_the_file_the_same_length(tmp_path):
    path = tmp_path / "results" / "benchmark.csv"
    rows = [timing(batch_size=1), timing(batch_size=8), timing("resnet50")]
    assert write_keyed(path, rows, KEY, COLUMNS) == 0
    first = path.read_text()
    assert write_keyed(path, rows, KEY, COLUMNS) == 3
    assert path.read_text() == first
    assert [row["batch_size"] for row in read(path)] == ["1", "8", "1"]


def test_a_rerun_replaces_its_rows_in_place_and_a_new_key_is_added(tmp_path):
    path = tmp_path / "benchmark.csv"
    write_keyed(path, [timing(batch_size=1), timing(batch_size=8), timing("resnet50")], KEY, COLUMNS)
    # batch 8 measured again, and the same on a GPU: the first replaces its row, the second is a new key.
    replaced = write_keyed(path, [timing(batch_size=8, latency_ms=12.5, date="d2"),
                                  timing(batch_size=8, device_name="NVIDIA H100", latency_ms=1.5)], KEY, COLUMNS)
    assert replaced == 1
    rows = read(path)
    assert [(row["device_name"], row["backbone"], row["batch_size"], row["latency_ms"]) for row in rows] == [
        ("AMD EPYC, 2 threads", "resnet18", "1", "10.0"),
        ("AMD EPYC, 2 threads", "resnet18", "8", "12.5"),
        ("AMD EPYC, 2 threads", "resnet50", "1", "10.0"),
        ("NVIDIA H100", "resnet18", "8", "1.5")]


def test_every_earlier_row_of_a_key_goes_and_all_its_new_rows_come(tmp_path):
    """A key may name several rows (evaluate.py's per-class rows by model): all of them are replaced."""
    path = tmp_path / "per_class_ap.csv"
    columns, key = ("model", "class", "ap"), ("model",)
    write_keyed(path, [{"model": "a", "class": c, "ap": 0.1} for c in ("cat", "dog", "cow")], key, columns)
    write_keyed(path, [{"model": "b", "class": "cat", "ap": 0.3}], key, columns)
    write_keyed(path, [{"model": "a", "class": c, "ap": 0.2} for c in ("cat", "dog")], key, columns)
    assert [(row["model"], row["class"], row["ap"]) for row in read(path)] == [
        ("a", "cat", "0.2"), ("a", "dog", "0.2"), ("b", "cat", "0.3")]


def test_an_older_file_without_a_column_gets_it_empty(tmp_path):
    path = tmp_path / "benchmark.csv"
    path.write_text("device_name,backbone,batch_size,compile,latency_ms\ncpu,resnet50,1,False,30.0\n")
    write_keyed(path, [timing()], KEY, COLUMNS)
    rows = read(path)
    assert list(rows[0]) == list(COLUMNS)
    assert rows[0]["latency_ms"] == "30.0" and rows[0]["date"] == "" and rows[1]["date"] == "d1"


def test_a_key_column_added_later_takes_its_default_in_older_rows(tmp_path):
    """benchmark.csv's runtime: a file written before it existed holds PyTorch's rows, which a rerun of PyTorch's
    measurement replaces and ONNX Runtime's joins."""
    path = tmp_path / "benchmark.csv"
    path.write_text(",".join(COLUMNS) + "\nAMD EPYC,resnet18,1,False,10.0,d0\nAMD EPYC,resnet50,1,False,30.0,d0\n")
    columns, key = (*COLUMNS, "runtime"), (*KEY, "runtime")
    check_writable(path, key, columns)
    rows = [{**timing(device_name="AMD EPYC", latency_ms=12.0), "runtime": runtime}
            for runtime in ("pytorch", "onnxruntime")]
    assert write_keyed(path, rows, key, columns) == 1
    assert [(row["backbone"], row["runtime"], row["latency_ms"]) for row in read(path)] == [
        ("resnet18", "pytorch", "12.0"), ("resnet50", "pytorch", "30.0"), ("resnet18", "onnxruntime", "12.0")]


@pytest.mark.parametrize("header", ["backbone,fps", "device_name,backbone,batch_size,latency_ms,date",
                                    ",".join(COLUMNS) + ",notes"])
def test_a_file_of_another_kind_is_refused_and_left_alone(tmp_path, header):
    path = tmp_path / "other.csv"
    text = f"{header}\n" + ",".join("x" * (i + 1) for i in range(header.count(",") + 1)) + "\n"
    path.write_text(text)
    message = (f"{path} has the columns {header.replace(',', ', ')}, not these rows' {', '.join(COLUMNS)}; move it "
               f"aside or write to another file.")
    for check in (lambda: check_writable(path, KEY, COLUMNS), lambda: write_keyed(path, [timing()], KEY, COLUMNS)):
        with pytest.raises(ResultsError) as raised:
            check()
        assert str(raised.value) == message
    assert path.read_text() == text
    assert [p.name for p in tmp_path.iterdir()] == ["other.csv"]


def test_a_row_with_a_field_the_columns_lack_is_a_programming_error(tmp_path):
    with pytest.raises(ValueError, match="notes"):
        write_keyed(tmp_path / "x.csv", [{**timing(), "notes": "n"}], KEY, COLUMNS)
    assert not (tmp_path / "x.csv").exists()


def test_an_absent_value_is_written_empty_and_the_folders_are_made(tmp_path):
    path = tmp_path / "results" / "cpu" / "benchmark.csv"
    write_keyed(path, [{**timing(), "latency_ms": None}], KEY, COLUMNS)
    assert path.read_bytes().splitlines()[1] == b"\"AMD EPYC, 2 threads\",resnet18,1,False,,d1"


def test_line_breaks_inside_a_value_survive_a_rewrite(tmp_path):
    path = tmp_path / "benchmark.csv"
    write_keyed(path, [timing(device_name="GPU\r\nsecond line")], KEY, COLUMNS)
    write_keyed(path, [timing(backbone="resnet50")], KEY, COLUMNS)
    assert [row["device_name"] for row in read(path)] == ["GPU\r\nsecond line", "AMD EPYC, 2 threads"]


def test_an_empty_file_takes_the_rows(tmp_path):
    path = tmp_path / "benchmark.csv"
    path.write_text("")
    assert write_keyed(path, [timing()], KEY, COLUMNS) == 0
    assert read(path) == [{name: str(value) for name, value in timing().items()}]
