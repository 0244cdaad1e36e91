"""pytest plugin of tools/mutate.py's first pass: the processes that tests start run the unmutated code.

mutmut selects its mutant through the MUTANT_UNDER_TEST variable, which child processes inherit; in a child that
runs outside the scratch copy its tracing then fails to find its settings. The first pass judges what the test
process itself sees; the second pass writes each remaining mutant into the file, which every process then runs.
"""
import os
import subprocess

_start = subprocess.Popen.__init__


def _start_unmutated(self, *args, env=None, **kwargs):
    env = dict(os.environ if env is None else env)
    env.pop("MUTANT_UNDER_TEST", None)
    _start(self, *args, env=env, **kwargs)


subprocess.Popen.__init__ = _start_unmutated
