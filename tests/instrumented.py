"""Runs train.py or pretrain.py with instruments that put an interruption at a chosen event, not at a time:

    python tests/instrumented.py [--send_signal=SIGTERM:STEP[:RANK]] [--slow_disk] [--kill_during_write=NAME:N] \
        script.py --name=value ...

--send_signal=NAME:STEP[:RANK]  the process sends itself the signal at the start of the STEP-th optimizer step
    it runs (from 1), once every checkpoint handed to its writer before then is on disk; under torchrun, only
    the process of that RANK does.
--to_launcher  that signal goes to the process's parent instead (torchrun, which passes it on to every process),
    and the sender goes on once its own copy has arrived.
--check_forks  every fork the process makes (its loader workers) is checked for other Python threads running
    beside it (a fork copies only the thread that makes it); the names of any found are printed at the end,
    after "forked beside threads:", and the exit status is then 1.
--slow_disk  a checkpoint write starts only when the training waits for it (the writer's `wait`, or its next
    `save`): the slowest a disk can be. A run that marks itself finished while one of its writes has not started
    stops with an error.
--kill_during_write=NAME:N  the N-th write of the file NAME (last.pt, best.pt) is killed with SIGKILL once its
    bytes are written, before the write is complete.
"""
import argparse
import os
import runpy
import signal
import sys
import threading
import time
from pathlib import Path


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--send_signal", help="NAME:STEP[:RANK]")
    parser.add_argument("--slow_disk", action="store_true")
    parser.add_argument("--kill_during_write", help="NAME:N")
    parser.add_argument("--to_launcher", action="store_true")
    parser.add_argument("--check_forks", action="store_true")
    parser.add_argument("script")
    parser.add_argument("script_arguments", nargs=argparse.REMAINDER)
    return parser.parse_args(argv)


def main(argv):
    arguments = parse_arguments(argv)
    script = Path(arguments.script).resolve()
    sys.path[0] = str(script.parent)  # the script's imports, as when it runs itself

    import torch
    import yolo.checkpoint
    import yolo.engine
    import yolo.run

    writers, unwaited, gates, writes, lock = [], set(), {}, {}, threading.Lock()
    original_save, original_wait = yolo.checkpoint.CheckpointWriter.save, yolo.checkpoint.CheckpointWriter.wait
    save_checkpoint, torch_save = yolo.checkpoint.save_checkpoint, torch.save
    original_mark_finished, original_set_learning_rate = yolo.run.mark_finished, yolo.engine.set_learning_rate

    def gate(path):  # made by whichever comes first: the write, or the wait that lets it start
        with lock:
            return gates.setdefault(path, threading.Event())

    def save(writer, state, path):
        if writer not in writers:
            writers.append(writer)
        original_save(writer, state, path)  # waits for the previous write first
        writer.held_path = str(path)
        unwaited.add(str(path))

    def wait(writer):
        path = getattr(writer, "held_path", None)
        if path is not None and arguments.slow_disk:
            writer.held_path = None
            unwaited.discard(path)
            gate(path).set()
        original_wait(writer)

    def instrumented_save_checkpoint(state, path):
        if arguments.slow_disk:
            gate(str(path)).wait()
            with lock:
                gates.pop(str(path))
        name = Path(path).name
        writes[name] = writes.get(name, 0) + 1
        if arguments.kill_during_write == f"{name}:{writes[name]}":
            def save_then_die(obj, file, *args, **kwargs):
                torch_save(obj, file, *args, **kwargs)
                file.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            torch.save = save_then_die
        save_checkpoint(state, path)

    def mark_finished(*args, **kwargs):
        if arguments.slow_disk and unwaited:
            for path in unwaited:
                gate(path).set()  # the process can then end
            raise RuntimeError(f"the run marked itself finished with checkpoint writes not started: {sorted(unwaited)}")
        original_mark_finished(*args, **kwargs)

    signal_name, signal_step, *signal_rank = arguments.send_signal.split(":") if arguments.send_signal else ("", "0")
    steps = [0]

    def set_learning_rate(*args, **kwargs):  # called at the start of each optimizer step
        steps[0] += 1
        if steps[0] == int(signal_step) and (not signal_rank or os.environ.get("RANK") == signal_rank[0]):
            for writer in writers:
                writer.wait()
            signum = getattr(signal, signal_name)
            if not arguments.to_launcher:
                os.kill(os.getpid(), signum)
            else:
                os.kill(os.getppid(), signum)
                while not stop_requests[-1]():  # until torchrun's copy of the signal has been handled here
                    time.sleep(0.01)
        return original_set_learning_rate(*args, **kwargs)

    stop_requests, original_stop_request = [], yolo.run.StopRequest.__init__

    def stop_request(self):
        original_stop_request(self)
        stop_requests.append(self)

    yolo.run.StopRequest.__init__ = stop_request
    yolo.checkpoint.CheckpointWriter.save, yolo.checkpoint.CheckpointWriter.wait = save, wait
    yolo.checkpoint.save_checkpoint, yolo.run.mark_finished = instrumented_save_checkpoint, mark_finished
    yolo.engine.set_learning_rate = set_learning_rate

    forked_beside = set()
    if arguments.check_forks:
        os.register_at_fork(before=lambda: forked_beside.update(
            thread.name for thread in threading.enumerate() if thread is not threading.main_thread()))
    sys.argv = [str(script), *arguments.script_arguments]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        if forked_beside:
            print(f"forked beside threads: {sorted(forked_beside)}", file=sys.stderr, flush=True)
    if forked_beside:
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
