"""serve.py started as a user starts it, on a free port of 127.0.0.1, for the tools and tests that talk to it."""
import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_server(checkpoint, *settings: str, timeout: float = 300) -> tuple[subprocess.Popen, str]:
    """(the serve.py process, its URL) once it listens: it prints its address then. `settings`: more of its
    --name=value settings. A server that stops first, or prints no address within `timeout` seconds (it is then
    stopped), is a RuntimeError with its output. Its output is read on a thread from then on, so that it never
    fills the pipe."""
    # Its output block-buffered, as a pipe gets it by default: the address line must be flushed to arrive.
    environment = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    process = subprocess.Popen([sys.executable, "serve.py", f"--checkpoint={checkpoint}", "--port=0", *settings],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment)
    lines = queue.Queue()
    threading.Thread(target=_read_lines, args=(process.stdout, lines), name="serve.py output", daemon=True).start()
    output, deadline = [], time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            process.kill()
            process.wait()
            raise RuntimeError(f"serve.py printed no address within {timeout:g} s and was stopped:\n"
                               + "".join(output)) from None
        if line is None:
            break
        output.append(line)
        address = re.search(r"^serving .* at (http://\S+) ", line)
        if address:
            return process, address.group(1)
    process.wait()
    raise RuntimeError(f"serve.py stopped before serving (exit status {process.returncode}):\n" + "".join(output))


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)  # the server closed its output: it has stopped
