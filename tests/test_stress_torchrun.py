"""tools/stress_torchrun.py: a run that hangs is stopped with every Python process's stacks in its log, and the
summary and exit status count the runs that did not end normally. (The runs it repeats are the torchrun runs of
test_train.py and test_pretrain.py.)"""
import os
import subprocess
import sys
import time

import pytest

from tools import stress_torchrun
from yolo.config import resolve_config


def test_a_run_past_its_timeout_is_a_hang_with_the_stacks_of_its_processes_in_the_log(tmp_path, monkeypatch):
    """A parent waiting on a child that waits on nothing, as a hung torchrun waits on its workers: both print
    their stacks on the SIGABRT and neither outlives the run. The timeout is made to expire once the child has
    started (it says so in the log), whatever the time that took."""
    log, pid_file = tmp_path / "run.log", tmp_path / "pid"

    class TimesOutOnceStarted(subprocess.Popen):
        def wait(self, timeout=None):
            if timeout is None:
                return super().wait()
            for _ in range(6000):
                if "started" in log.read_text():
                    raise subprocess.TimeoutExpired(self.args, timeout)
                time.sleep(0.01)
            raise AssertionError(f"the child did not start within a minute: {log.read_text()}")

    monkeypatch.setattr(stress_torchrun.subprocess, "Popen", TimesOutOnceStarted)
    hanging = (f"import os, subprocess, sys\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
               "def wait_for_the_child():\n"
               "    subprocess.run([sys.executable, '-c', 'import signal\\ndef wait_in_the_child(): signal.pause()\\n"
               "print(\"started\", flush=True)\\nwait_in_the_child()'])\n"
               "wait_for_the_child()\n")
    assert stress_torchrun.run_once([sys.executable, "-c", hanging], log, timeout=300) is None
    text = log.read_text()
    assert "in wait_for_the_child" in text and "in wait_in_the_child" in text, text
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


def test_a_run_that_ends_gives_its_exit_status_and_output(tmp_path):
    log = tmp_path / "run.log"
    assert stress_torchrun.run_once([sys.executable, "-c", "print('done'); raise SystemExit(3)"], log, 60) == 3
    assert log.read_text() == "done\n"


def test_each_script_runs_under_torchrun_as_often_as_asked_and_a_failure_sets_the_exit_status(tmp_path, monkeypatch,
                                                                                            capsys):
    issued = []

    def fake_run(command, log, timeout):
        issued.append(command)
        run = int(log.stem.rpartition("_")[2])
        return {"train": 0, "pretrain": None if run == 2 else 0}[log.stem.rpartition("_")[0]]

    monkeypatch.setattr(stress_torchrun, "run_once", fake_run)
    config = resolve_config(vars(stress_torchrun), ["--runs=3", "--busy_cores=1", f"--out_dir={tmp_path}"],
                            rules=stress_torchrun.RULES)
    assert stress_torchrun.main(config) == 1
    assert [command[5] for command in issued] == ["train.py", "pretrain.py"] * 3
    assert all(command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
               for command in issued)
    assert f"--data_dir={tmp_path / 'detection'}" in issued[0] and "--eval_every=1" in issued[0]
    assert f"--data_dir={tmp_path / 'classification'}" in issued[1]
    out = capsys.readouterr().out
    assert "pretrain.py run 2: HUNG (stacks in the log)" in out
    assert "train.py: 3 of 3 runs ended normally\n" in out
    assert "pretrain.py: 2 of 3 runs ended normally; failed or hung: runs 2" in out
