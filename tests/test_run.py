"""yolo.run's stop signals and tqdm's threads: what a process forks its loader workers beside."""
import os
import signal
import threading

from tqdm import tqdm

from yolo import engine  # noqa: F401  (its import sets tqdm's monitor off)
from file_writes import assert_atomic_write, record_file_writes
from yolo.run import StopRequest, append_log, read_log, write_log


def test_a_forked_loader_worker_ignores_the_stop_its_parent_handles(capfd):
    """Ctrl-C reaches the whole process group: one "received SIGINT" from the process that stops, none from
    its loader workers."""
    stop = StopRequest()
    try:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # a loader worker: it only signals itself and reports what it saw
            os.kill(os.getpid(), signal.SIGINT)
            os.write(write, b"1" if stop() else b"0")
            os._exit(0)
        os.waitpid(pid, 0)
        assert os.read(read, 1) == b"0" and not stop()
        assert "received" not in capfd.readouterr().out
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop() and capfd.readouterr().out == "\nreceived SIGTERM: saving at the end of this optimizer step\n"
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_a_progress_bar_starts_no_thread():
    before = set(threading.enumerate())
    with tqdm(range(3), disable=False) as bar:
        list(bar)
        assert set(threading.enumerate()) == before


def test_a_log_row_is_added_by_writing_the_whole_file_anew(tmp_path, monkeypatch):
    path, columns = tmp_path / "log.csv", ("epoch", "loss", "val_loss")
    write_log(path, [{"epoch": 1, "loss": "0.5", "val_loss": ""}, {"epoch": 2, "loss": "0.25", "val_loss": "0.3"}],
              columns)
    append_log(path, {"epoch": 3, "loss": "0.125", "val_loss": ""}, columns)
    assert path.read_bytes() == b"epoch,loss,val_loss\r\n1,0.5,\r\n2,0.25,0.3\r\n3,0.125,\r\n"
    assert [row["epoch"] for row in read_log(path, up_to_epoch=2)] == ["1", "2"]
    events = record_file_writes(monkeypatch, path)
    append_log(path, {"epoch": 4, "loss": "0.1", "val_loss": ""}, columns)
    assert_atomic_write(events, path)
