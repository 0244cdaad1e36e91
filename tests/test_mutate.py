"""tools/mutate.py, make mutate's driver: which tests it runs for a file, and its copy of the checkout."""
import subprocess
import tomllib
from pathlib import Path

from tools import mutate

ROOT = Path(__file__).resolve().parents[1]


def test_a_files_tests_are_those_that_import_or_run_it():
    files = mutate.tracked_files()
    assert Path("tools/mutate.py") in files and Path("README.md") in files
    formats, wider = mutate.tests_of(Path("yolo/formats.py"), files)
    assert Path("tests/test_formats.py") in formats and Path("tests/test_loss.py") not in formats
    assert set(formats) <= set(wider) and Path("tests/test_train.py") in wider  # train.py imports yolo.formats
    detect, _ = mutate.tests_of(Path("detect.py"), files)
    assert Path("tests/test_evaluate_detect.py") in detect and Path("tests/test_formats.py") not in detect
    # No test imports yolo.distributed: the tests of the modules and scripts that do (train.py among them).
    distributed, wider = mutate.tests_of(Path("yolo/distributed.py"), files)
    assert distributed == wider and Path("tests/test_train.py") in distributed
    assert not {Path("tests/test_readme.py"), Path("tests/test_reproduce.py")} & set(wider)
    assert mutate.module_name(Path("yolo/formats.py")) == "yolo.formats"
    assert mutate.module_name(Path("data/make_synthetic.py")) == "data.make_synthetic"


def test_the_scratch_copy_is_a_repository_of_the_checkouts_files_with_mutmuts_settings(tmp_path):
    files = [Path("pyproject.toml"), Path("yolo/boxes.py"), Path("tests/test_postprocess.py")]
    mutate.copy_tree(files, tmp_path / "tree")
    assert (tmp_path / "tree/yolo/boxes.py").read_bytes() == (ROOT / "yolo/boxes.py").read_bytes()
    listed = subprocess.run(["git", "ls-files"], cwd=tmp_path / "tree", capture_output=True, text=True, check=True)
    assert sorted(listed.stdout.split()) == sorted(map(str, files))
    # Twice, as a copy of a copy (make mutate run on tools/mutate.py) does: one table, the latest settings.
    for target in ("yolo/boxes.py", "yolo/postprocess.py"):
        mutate.write_mutmut_config(tmp_path / "tree", [Path(target)], [Path("tests/test_postprocess.py")], files)
    settings = tomllib.loads((tmp_path / "tree/pyproject.toml").read_text())
    assert settings["project"]["name"] == "yolov1-repro"
    assert settings["tool"]["mutmut"]["only_mutate"] == ["yolo/postprocess.py"]
    assert settings["tool"]["mutmut"]["source_paths"] == ["yolo"]
    assert settings["tool"]["mutmut"]["pytest_add_cli_args_test_selection"] == ["tests/test_postprocess.py"]
    assert "tools.mutmut_in_process" in settings["tool"]["mutmut"]["pytest_add_cli_args"]


def test_pass_2_runs_only_the_tests_that_start_python_processes():
    files = mutate.tracked_files()
    tests = [Path("tests") / name for name in ("test_training_loop.py", "test_checkpoint_writer.py", "test_config.py",
                                               "test_readme.py", "test_train.py", "test_metrics.py")]
    # test_config starts table.py itself, test_readme through tests/command_lines.py, test_train through the
    # conftest fixture that trains the shared model (and itself); the others run in the test process alone.
    assert [test.name for test in mutate.starting_processes(tests, files)] == [
        "test_config.py", "test_readme.py", "test_train.py"]


def test_decorated_functions_are_rewritten_so_that_mutmut_mutates_them():
    """mutmut skips decorated functions: in the scratch copy each decorator is applied after the definition, which
    is what a decorator does, so the rewritten code behaves the same."""
    source = '''import functools
from contextlib import contextmanager


def twice(function):
    return lambda *args: 2 * function(*args)


@functools.cache
@twice
def square(x):
    return x * x


class Box:
    @staticmethod
    def kind():
        return "box"

    @contextmanager
    def opened(self, log):
        log.append("open")
        yield self
        log.append("closed")


    @property
    def size(self):
        return 3
'''
    rewritten = mutate.undecorate(source)
    assert "@functools.cache" not in rewritten and "@contextmanager" not in rewritten
    assert "square = (functools.cache)((twice)(square))" in rewritten
    assert "    opened = (contextmanager)(opened)\n" in rewritten
    assert "@staticmethod" in rewritten and "@property" in rewritten
    for text in (source, rewritten):
        namespace, log = {}, []
        exec(compile(text, "<test>", "exec"), namespace)
        assert namespace["square"](3) == 18 and namespace["square"].cache_info().currsize == 1
        box = namespace["Box"]()
        with box.opened(log) as inside:
            assert inside is box and log == ["open"]
        assert log == ["open", "closed"] and box.size == 3 and box.kind() == "box"
    # The project's decorated functions, rewritten, still import and run as before.
    assert "evaluate = (torch.inference_mode())(evaluate)" in mutate.undecorate(
        (ROOT / "yolo/engine.py").read_text())
