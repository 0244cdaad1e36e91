"""The README's command lines, run as a user runs them: found in its shell blocks, run in a scratch checkout, and
(`python tests/command_lines.py`) a runner that forks each from one interpreter that has imported torch once.

The runner's child does what `python SCRIPT ...` does: it changes to the command's folder, takes the command's
arguments as sys.argv, puts the script's real folder first on sys.path and runs the script as __main__; its exit
status is the script's, after the interpreter's usual shutdown. The runner itself computes nothing, so no thread
pool exists when it forks. A command then costs its own work, not seconds of importing torch.

Runner protocol: one JSON object per line on stdin, {"argv": [...], "cwd": "...", "stop_at": "regex" or null,
"timeout": seconds, "env": {...} or absent (the runner's), "separate": false}; one per line on stdout,
{"returncode": int, "output": "...", "cpu_seconds": the child's, "timed_out": bool}, with "stdout" and "stderr"
in place of "output" when `separate`. With stop_at, the child gets SIGTERM once its output matches a line (a
training run stopped once it has started, as Ctrl-C would). `run_python` is subprocess.run for the tests' own
`python SCRIPT ...` commands, through a runner of the test process's.
"""
import atexit
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
import threading
import time
import traceback
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


def run_in_child(argv: list[str], cwd: str, stdout: int, stderr: int, environment: dict | None) -> None:
    """The child's side: never returns; the script's exit (or its uncaught exception) ends the process."""
    os.chdir(cwd)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # not the runner's requests
    os.dup2(stdout, 1)
    os.dup2(stderr, 2)
    if argv[0] not in PYTHONS or len(argv) < 2:
        sys.exit(f"command_lines: not a `python SCRIPT ...` command: {argv}")
    script = argv[1]
    sys.argv = argv[1:]
    sys.path[0] = os.path.dirname(os.path.realpath(script))
    if environment is not None:
        os.environ.clear()
        os.environ.update(environment)
        sys.path[1:1] = [path for path in environment.get("PYTHONPATH", "").split(os.pathsep) if path]
        if "OMP_NUM_THREADS" in environment:  # OpenMP read it when torch loaded, in the runner: set it again
            import torch
            torch.set_num_threads(int(environment["OMP_NUM_THREADS"]))
    try:
        runpy.run_path(script, run_name="__main__")
        status = 0
    except SystemExit as exit:
        status = exit.code if isinstance(exit.code, int) else 0 if exit.code is None else 1
        if not isinstance(exit.code, (int, type(None))):
            print(exit.code, file=sys.stderr)
    except KeyboardInterrupt:
        traceback.print_exc()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:
        traceback.print_exc()
        status = 1
    # The interpreter's exit but its teardown of every module, which with torch loaded takes most of a second:
    # non-daemon threads joined, atexit functions run (multiprocessing's ends the DataLoader workers), output
    # flushed.
    threading._shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def read(path: str) -> str:
    with open(path, errors="replace") as file:
        return file.read()


def run(request: dict) -> dict:
    """One command: its output (stdout and stderr together, or apart when `separate`), exit status, CPU time."""
    separate = request.get("separate", False)
    files = [tempfile.mkstemp(prefix="command_output_") for _ in range(2 if separate else 1)]
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        run_in_child(request["argv"], request["cwd"], files[0][0], files[-1][0], request.get("env"))
    for descriptor, _ in files:
        os.close(descriptor)
    stop_at = re.compile(request["stop_at"], re.MULTILINE) if request.get("stop_at") else None
    deadline = time.monotonic() + request.get("timeout", 600)
    timed_out = False
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if stop_at and stop_at.search(read(files[0][1])):
            os.kill(pid, signal.SIGTERM)
            stop_at = None
        if time.monotonic() > deadline and not timed_out:
            os.kill(pid, signal.SIGKILL)
            timed_out = True
        time.sleep(0.05)
    texts = [read(path) for _, path in files]
    for _, path in files:
        os.unlink(path)
    result = {"returncode": os.waitstatus_to_exitcode(status), "timed_out": timed_out,
              "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1)}
    return {**result, "stdout": texts[0], "stderr": texts[1]} if separate else {**result, "output": texts[0]}


# What the scripts import, paid for once in the runner rather than by every command. Not onnxruntime: its
# threads, started at import, are not in a forked child, whose exit then waits for them forever.
PRELOADED = ("av", "matplotlib.pyplot", "pandas", "PIL.Image", "pycocotools.cocoeval", "torch", "torchvision", "tqdm",
             "yaml", "onnx", "fastapi", "uvicorn")


def serve() -> None:
    import matplotlib
    matplotlib.use("Agg")
    for module in PRELOADED:
        importlib.import_module(module)
    for line in sys.stdin:
        print(json.dumps(run(json.loads(line))), flush=True)


class Runner:
    """The runner in a process of its own (and its own process group, which `close` ends with every child)."""

    def __init__(self):
        self.process = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, cwd=ROOT, start_new_session=True)

    def __call__(self, command: str, cwd: Path, stop_at: str | None = None, timeout: float = 600) -> dict:
        return self.request({"argv": shlex.split(command), "cwd": str(cwd), "stop_at": stop_at, "timeout": timeout})

    def request(self, request: dict) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the command runner ended while running {request['argv']!r}")
        return json.loads(line)

    def close(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


_shared_runner = None


def run_python(command: list, cwd=None, env: dict | None = None, timeout: float = 600, check: bool = False,
               capture_output: bool = True, text: bool = True) -> subprocess.CompletedProcess:
    """subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=check), with
    a command `[sys.executable, "SCRIPT.py", ...]` forked from this test process's runner (started at its first
    call) instead of a new interpreter: the same result without seconds of imports. Any other command runs as a
    subprocess."""
    assert capture_output and text, "run_python captures the output as text"
    command = [str(word) for word in command]
    if len(command) < 2 or command[0] != sys.executable or not command[1].endswith(".py"):
        result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    else:
        global _shared_runner
        if _shared_runner is None:
            _shared_runner = Runner()
            atexit.register(_shared_runner.close)
        answer = _shared_runner.request({"argv": ["python", *command[1:]], "cwd": str(cwd or os.getcwd()),
                                         "timeout": timeout, "env": dict(os.environ if env is None else env),
                                         "separate": True})
        if answer["timed_out"]:
            raise subprocess.TimeoutExpired(command, timeout, answer["stdout"], answer["stderr"])
        result = subprocess.CompletedProcess(command, answer["returncode"], answer["stdout"], answer["stderr"])
    if check:
        result.check_returncode()
    return result

if __name__ == "__main__":
    serve()
