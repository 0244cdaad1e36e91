"""yolo.run's stop signals and tqdm's threads: what a process forks its loader workers beside."""
import os
import signal
import threading

from tqdm import tqdm

from yolo import engine  # noqa: F401  (its import sets tqdm's monitor off)
from yolo.run import StopRequest


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
