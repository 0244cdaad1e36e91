"""The parts of a resumable training run that every training script shares: messages, stop signals,
log.csv, the finished-run marker and which checkpoint to resume from."""
import csv
import json
import signal
import sys
from pathlib import Path

from yolo.distributed import is_main_process


def say(*args) -> None:
    if is_main_process():
        print(*args, flush=True)


class StopRequest:
    """Turns SIGINT and SIGTERM into a flag the loop reads at its read points (see train.py's docstring)."""

    def __init__(self):
        self.signal = None
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self.request)

    def request(self, signum, frame) -> None:
        if self.signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum
        say(f"\nreceived {signal.Signals(signum).name}: saving at the end of this optimizer step")

    def __call__(self) -> bool:
        return self.signal is not None

    def exit_code(self) -> int:
        """128 + the signal, as a shell reports it; a process stopping because another one was signalled
        reports SIGTERM."""
        return 128 + (self.signal or signal.SIGTERM)


def read_log(path: Path, up_to_epoch: int) -> list[dict]:
    """The rows of an existing log.csv up to `up_to_epoch` (a resumed run rewrites the rest)."""
    if not path.exists():
        return []
    with open(path, newline="") as file:
        return [row for row in csv.DictReader(file) if int(row["epoch"]) <= up_to_epoch]


def write_log(path: Path, rows: list[dict], columns: tuple[str, ...]) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def append_log(path: Path, row: dict, columns: tuple[str, ...]) -> None:
    with open(path, "a", newline="") as file:
        csv.DictWriter(file, fieldnames=columns).writerow(row)


def mark_finished(out_dir: Path, epochs: int) -> None:
    """out_dir/done: the file the Makefile waits for; it exists only once last.pt is the final model."""
    (out_dir / "done").write_text(json.dumps({"epochs": epochs, "checkpoint": "last.pt"}) + "\n")


def find_checkpoint(config: dict, out_dir: Path) -> Path | None:
    last = out_dir / "last.pt"
    if config["resume"] == "auto":
        return last if last.exists() else None
    if config["resume"] == "never":
        if last.exists():
            sys.exit(f"error: {last} exists and resume=never would overwrite it: choose another out_dir, "
                     f"delete the old run, or use --resume=auto.")
        return None
    return Path(config["resume"])
