"""serve.py started as a user starts it, on a free port of 127.0.0.1, for the tools and tests that talk to it."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_server(checkpoint, *settings: str) -> tuple[subprocess.Popen, str]:
    """(the serve.py process, its URL) once it listens: it prints its address then. `settings`: more of its
    --name=value settings. A server that stops first is a RuntimeError with its output."""
    # Its output block-buffered, as a pipe gets it by default: the address line must be flushed to arrive.
    environment = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    process = subprocess.Popen([sys.executable, "serve.py", f"--checkpoint={checkpoint}", "--port=0", *settings],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment)
    output = []
    for line in process.stdout:
        output.append(line)
        address = re.search(r"^serving .* at (http://\S+) ", line)
        if address:
            return process, address.group(1)
    process.wait()
    raise RuntimeError(f"serve.py stopped before serving (exit status {process.returncode}):\n" + "".join(output))
