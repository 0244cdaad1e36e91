"""Result CSVs keyed by what was measured: rerunning a measurement replaces its rows instead of adding more.

A key is a tuple of columns naming the measurement (for example the model, or the device, backbone, dtype and
batch size of a timing). `write_keyed` drops every earlier row whose key equals a new row's, puts the new rows
in the place of the first one it dropped (at the end when there was none) and keeps all other rows as they
were written, so a rerun changes only its own lines. Values are compared as the CSV text they become.
A column added after rows were written is empty in those rows, unless COLUMN_DEFAULTS says what they measured.
"""
import csv
from pathlib import Path

from yolo.files import atomic_write

# Columns added to the results files after rows were written, and the value those rows hold there.
COLUMN_DEFAULTS = {"runtime": "pytorch"}  # benchmark.csv: every row before the column timed PyTorch


class ResultsError(ValueError):
    """A results file whose columns do not fit the rows being written to it."""


def as_text(value) -> str:
    return "" if value is None else str(value)


def read_table(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The header and rows of a CSV file as text; an absent or empty file has neither."""
    if not path.exists():
        return [], []
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        return list(reader.fieldnames or []), list(reader)


def check_header(path: Path, header: list[str], key: tuple[str, ...], columns: tuple[str, ...]) -> None:
    if header and (set(header) - set(columns) or set(key) - set(header) - set(COLUMN_DEFAULTS)):
        raise ResultsError(f"{path} has the columns {', '.join(header)}, not these rows' {', '.join(columns)}; "
                           f"move it aside or write to another file.")


def check_writable(path: str | Path, key: tuple[str, ...], columns: tuple[str, ...]) -> None:
    """Raise ResultsError now if `write_keyed` would refuse the file: before a long run, not after it."""
    check_header(Path(path), read_table(Path(path))[0], key, columns)


def write_keyed(path: str | Path, rows: list[dict], key: tuple[str, ...], columns: tuple[str, ...]) -> int:
    """Write `rows` into the CSV at `path` in place of the earlier rows with the same key; returns how many
    earlier rows they replaced.

    `columns` is the file's header. A file written before a column existed is accepted and its rows get an
    empty value there (table.py shows "-"), or the column's COLUMN_DEFAULTS value, which may complete their key;
    a file with a column `columns` lacks, or without any other key column, is another kind of file and raises
    ResultsError, leaving it untouched. The file is replaced atomically.
    """
    path = Path(path)
    header, old_rows = read_table(path)
    check_header(path, header, key, columns)
    defaults = {name: value for name, value in COLUMN_DEFAULTS.items() if name in columns and name not in header}
    old_rows = [{**row, **defaults} for row in old_rows]
    unlisted = {name for row in rows for name in row} - set(columns)
    if unlisted:
        raise ValueError(f"the rows' fields {sorted(unlisted)} are not among the columns of {path}: {columns}")
    new_rows = [{name: as_text(row.get(name)) for name in columns} for row in rows]
    replacing: dict[tuple, list[dict]] = {}
    for row in new_rows:
        replacing.setdefault(tuple(row[name] for name in key), []).append(row)
    merged, placed, replaced = [], set(), 0
    for row in old_rows:
        row_key = tuple(row[name] for name in key)
        if row_key not in replacing:
            merged.append(row)
            continue
        replaced += 1
        if row_key not in placed:
            merged += replacing[row_key]
            placed.add(row_key)
    merged += [row for row_key, group in replacing.items() if row_key not in placed for row in group]

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w", newline="", shared=True) as file:
        writer = csv.DictWriter(file, columns)  # an absent field is written empty
        writer.writeheader()
        writer.writerows(merged)
    return replaced
