"""Two-process torchrun runs of train.py and pretrain.py, many times over on a busy machine, to find the rare
hang that one run never shows (a loader worker forked beside a thread that holds a lock, a collective that one
process never joins).

    python tools/stress_torchrun.py                                  # 30 runs of each script
    python tools/stress_torchrun.py --runs=5 --scripts=pretrain.py --busy_cores=0

Makes the synthetic detection and classification sets the tests use, starts `busy_cores` processes that spin on
the CPU (another job on the machine), then runs `torchrun --standalone --nproc_per_node=2 <script>` with the
tests' short settings: two epochs of two steps of two accumulated micro-batches, a loader worker per process,
validation after each epoch (a second loader). Each run starts in a fresh output folder, in its own session, with
PYTHONFAULTHANDLER=1: one that outlives `timeout_s` gets SIGABRT, on which every Python process in it prints
each thread's stack into the run's log (out_dir/<script>_<n>.log), and then SIGKILL. Prints a line per run and a
summary; exits 1 when any run failed or hung.
"""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data import make_synthetic  # noqa: E402
from yolo.config import at_least, one_of, resolve_config  # noqa: E402

runs = 30                      # runs of each script
scripts = ("train.py", "pretrain.py")  # the scripts run, in turn: train.py, pretrain.py or both
busy_cores = 2                 # processes spinning on the CPU during the runs (0: none)
timeout_s = 300.0              # seconds a run may take before it counts as hung (one takes about 20 s on 2 cores)
out_dir = "runs/stress"        # the data sets, each run's output folder and log

RULES = {"runs": at_least(1), "scripts": one_of("train.py", "pretrain.py"), "busy_cores": at_least(0),
         "timeout_s": at_least(0.1)}
SETTINGS = {  # the tests' resumable runs (tests/test_train.py, tests/test_pretrain.py), with validation
    "train.py": ["configs/tiny_model.py", "configs/tiny.py", "--epochs=2", "--batch_size=8", "--micro_batch_size=4",
                 "--num_workers=1", "--eval_every=1"],
    "pretrain.py": ["--backbone=fast", "--image_size=64", "--epochs=2", "--batch_size=8", "--micro_batch_size=4",
                    "--num_workers=1", "--device=cpu", "--lr=0.05"],
}
# One thread per process, as the tests run them: two processes do not oversubscribe two cores.
ENVIRONMENT = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}


def run_once(command: list[str], log: Path, timeout: float) -> int | None:
    """Run `command` from the repository root with its output in `log`; its exit status, or None when it ran past
    `timeout` seconds and was stopped: SIGABRT to each of its processes (the Python ones print their stacks),
    then SIGKILL to whatever is left."""
    with log.open("w") as output:
        process = subprocess.Popen(command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT, env=ENVIRONMENT,
                                   start_new_session=True)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # All of them frozen, then one at a time, the newest first, so that their stacks do not interleave in
            # the log and none sees another end before it has printed its own; SIGKILL to anything left.
            os.killpg(process.pid, signal.SIGSTOP)
            for pid in session_processes(process.pid):
                stop_with_stacks(pid)
            if session_processes(process.pid):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return None


def session_of(pid: int) -> int | None:
    """The session of a running process, from Linux's /proc; None once it has ended (a zombie included)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in "ZX" else int(fields[3])


def session_processes(session: int) -> list[int]:
    """The live processes of `session`, newest first."""
    pids = (int(path.name) for path in Path("/proc").iterdir() if path.name.isdigit())
    return sorted((pid for pid in pids if session_of(pid) == session), reverse=True)


def stop_with_stacks(pid: int) -> None:
    """SIGABRT to the stopped process `pid`, then SIGCONT: its faulthandler (PYTHONFAULTHANDLER) prints its
    threads' stacks as it dies. Waits for that up to 10 s."""
    try:
        os.kill(pid, signal.SIGABRT)
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while session_of(pid) is not None and time.monotonic() < deadline:
        time.sleep(0.05)


def command_for(script: str, data: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script,
            f"--data_dir={data}", f"--out_dir={run_dir}", *SETTINGS[script]]


def main(config: dict) -> int:
    out = Path(config["out_dir"]).resolve()
    data = {"train.py": out / "detection", "pretrain.py": out / "classification"}
    shutil.rmtree(out, ignore_errors=True)
    make_synthetic.generate(data["train.py"], train=16, val=4, seed=3)
    make_synthetic.generate_classification(data["pretrain.py"], train=16, val=10, seed=0, size=64)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(config["busy_cores"])]
    failed = {script: [] for script in config["scripts"]}
    try:
        for index in range(1, config["runs"] + 1):
            for script in config["scripts"]:
                run_dir, log = out / f"{Path(script).stem}_{index}", out / f"{Path(script).stem}_{index}.log"
                started = time.perf_counter()
                status = run_once(command_for(script, data[script], run_dir), log, config["timeout_s"])
                outcome = "ok" if status == 0 else "HUNG (stacks in the log)" if status is None else f"exit {status}"
                print(f"{script} run {index}: {outcome} in {time.perf_counter() - started:.1f} s ({log})", flush=True)
                if status != 0:
                    failed[script].append(index)
                shutil.rmtree(run_dir, ignore_errors=True)
    finally:
        for process in busy:
            process.kill()
            process.wait()
    for script, runs_failed in failed.items():
        print(f"{script}: {config['runs'] - len(runs_failed)} of {config['runs']} runs ended normally"
              + (f"; failed or hung: runs {', '.join(map(str, runs_failed))}" if runs_failed else ""))
    return 1 if any(failed.values()) else 0


if __name__ == "__main__":
    sys.exit(main(resolve_config(globals(), rules=RULES)))
