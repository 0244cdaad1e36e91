"""The README's command lines, run as a user runs them: found in its shell blocks, run in a scratch checkout, and
(`python tests/command_lines.py`) a runner that forks each from one interpreter that has imported torch once.

The runner's child does what `python SCRIPT ...` does: it changes to the command's folder, takes the command's
arguments as sys.argv, puts the script's real folder first on sys.path and runs the script as __main__; its exit
status is the script's, after the interpreter's usual shutdown. The runner itself computes nothing, so no thread
pool exists when it forks. A command then costs its own work, not seconds of importing torch.

Runner protocol: one JSON object per line on stdin, {"argv": [...], "cwd": "...", "stop_at": "regex" or null,
"timeout": seconds}; one per line on stdout, {"returncode": int, "output": "...", "cpu_seconds": the child's}.
With stop_at, the child gets SIGTERM once its output matches a line (a training run stopped once it has
started, as Ctrl-C would).
"""
import importlib
import json
import os
import re
import runpy
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHONS = ("python", "python3", ".venv/bin/python")
FENCE = re.compile(r"^\s*```(\S*)\s*$")
SHELL_BLOCKS = ("bash", "sh", "shell", "console")


def without_comment(line: str) -> str:
    """The line up to a `#` that starts a shell comment (outside quotes, at the start or after a space)."""
    quote = None
    for index, character in enumerate(line):
        if quote:
            quote = None if character == quote else quote
        elif character in "'\"":
            quote = character
        elif character == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index]
    return line


def readme_commands(text: str) -> list[str]:
    """Every command line of the shell blocks, comments dropped, `\\` continuations joined, runs of spaces made
    one, in the README's order."""
    commands, language, pending = [], None, ""
    for line in text.splitlines():
        fence = FENCE.match(line)
        if fence:
            language = None if language is not None else fence.group(1)
            continue
        if language not in SHELL_BLOCKS:
            continue
        code = without_comment(line).strip()
        if code.endswith("\\"):
            pending += code[:-1] + " "
            continue
        code, pending = " ".join((pending + code).split()), ""
        if code:
            commands.append(code)
    return commands


def scratch_checkout(folder: Path) -> Path:
    """`folder` laid out like a checkout, for commands written to run from the repository's root without
    writing into it: the top-level scripts and configs/ linked, and data/ a folder of its own with the data
    scripts linked (the commands write datasets there)."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in [*ROOT.glob("*.py"), ROOT / "configs"]:
        (folder / path.name).symlink_to(path)
    (folder / "data").mkdir(exist_ok=True)
    for path in (ROOT / "data").glob("*.py"):
        (folder / "data" / path.name).symlink_to(path)
    return folder


def run_in_child(argv: list[str], cwd: str, output: int) -> None:
    """The child's side: never returns; the script's exit (or its uncaught exception) ends the process."""
    os.chdir(cwd)
    os.dup2(output, 1)
    os.dup2(output, 2)
    if argv[0] not in PYTHONS or len(argv) < 2:
        sys.exit(f"command_lines: not a `python SCRIPT ...` command: {argv}")
    script = argv[1]
    sys.argv = argv[1:]
    sys.path[0] = os.path.dirname(os.path.realpath(script))
    runpy.run_path(script, run_name="__main__")
    sys.exit(0)


def read(path: str) -> str:
    with open(path, errors="replace") as file:
        return file.read()


def run(request: dict) -> dict:
    output, path = tempfile.mkstemp(prefix="command_output_")
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        run_in_child(request["argv"], request["cwd"], output)
    os.close(output)
    stop_at = re.compile(request["stop_at"], re.MULTILINE) if request.get("stop_at") else None
    deadline = time.monotonic() + request.get("timeout", 600)
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if stop_at and stop_at.search(read(path)):
            os.kill(pid, signal.SIGTERM)
            stop_at = None
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    text = read(path)
    os.unlink(path)
    return {"returncode": os.waitstatus_to_exitcode(status), "output": text,
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1)}


def serve() -> None:
    import matplotlib
    matplotlib.use("Agg")
    # What the scripts import, paid for once here rather than by every command.
    for module in ("av", "matplotlib.pyplot", "pandas", "PIL.Image", "pycocotools.cocoeval", "torch", "torchvision",
                   "tqdm", "yaml"):
        importlib.import_module(module)
    for line in sys.stdin:
        print(json.dumps(run(json.loads(line))), flush=True)


class Runner:
    """The runner in a process of its own (and its own process group, which `close` ends with every child)."""

    def __init__(self):
        self.process = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, cwd=ROOT, start_new_session=True)

    def __call__(self, command: str, cwd: Path, stop_at: str | None = None, timeout: float = 600) -> dict:
        request = {"argv": shlex.split(command), "cwd": str(cwd), "stop_at": stop_at, "timeout": timeout}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the command runner ended while running {command!r}")
        return json.loads(line)

    def close(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


if __name__ == "__main__":
    serve()
