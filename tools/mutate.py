"""Mutation testing: plant one plausible bug at a time in the named files and run the tests that should catch it.

    make mutate FILES="yolo/formats.py yolo/boxes.py"              (a developer's tool, not part of make test)
    python tools/mutate.py yolo/formats.py [--tests tests/test_formats.py ...] [--workdir runs/mutate]

The mutants are mutmut's (a comparison flipped, a number off by one, an argument dropped, a string changed, ...),
made and run in a scratch copy of the checkout (the working tree, uncommitted changes included, is copied to
WORKDIR/tree; nothing is written into the checkout). Two passes:
1. mutmut: each mutant runs against those of the chosen tests that call the mutated function in the test process,
   forked from a process that imported torch once (a few mutants a second).
2. Each mutant that pass 1 did not catch (a failing test, a hang past mutmut's limit, a crash) is written into the
   scratch copy's file and those of the chosen test files that start Python processes (themselves, through a
   helper module of tests/ or through a conftest.py fixture) run in a fresh interpreter until their first
   failure. Only this pass sees those processes (train.py, evaluate.py, ... run as scripts), which mutmut's
   switch, read in the test process, does not reach; a forked DataLoader worker is the test process's copy and
   is mutated in pass 1 already. Without such a test, pass 2 has nothing to add and is skipped.
The chosen tests are the test files that import the file's module or name the script (or one that imports the
module); --tests replaces them. WORKDIR/report.md lists, per file, the mutants, how many each pass killed, and
each survivor with its diff; docs/mutation.md keeps the project's record of them.
"""
import argparse
import ast
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from mutmut.stats import status_by_exit_code

ROOT = Path(__file__).resolve().parents[1]
# mutmut's verdicts that need no second look: a test failed, hung past mutmut's limit, or the process died
CAUGHT_BY_MUTMUT = {"killed", "timeout", "segfault", "caught by type check"}
WHOLE_CHAIN_TESTS = {"test_readme.py", "test_reproduce.py", "test_make_chain.py"}
TIMEOUT_FACTOR, TIMEOUT_SLACK = 3, 60  # pass 2 gives up on a mutant after this many times the clean run, plus s
STARTS_PROCESSES = re.compile(r"\bsubprocess\b|\bsys\.executable\b|\bPopen\b")  # a Python process of its own


def tracked_files():
    """The checkout's files as git sees them: tracked, and untracked but not ignored (work in progress)."""
    listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True).stdout.decode()
    return sorted({Path(name) for name in listing.split("\0") if name and (ROOT / name).is_file()})


def module_name(path):
    """How the tests import a file, and mutmut names it: yolo/formats.py as yolo.formats, train.py as train."""
    return ".".join(path.with_suffix("").parts)


@functools.cache
def imported_modules(path):
    """The modules a Python file imports by name (`from yolo import data` gives yolo and yolo.data)."""
    names = set()
    for node in ast.walk(ast.parse(source_text(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@functools.cache
def source_text(path):
    return path.read_text(encoding="utf-8")


def tests_of(path, files):
    """(test files that use path directly, test files that use it or a module or script that imports it).

    A test file uses a module when it imports it (`import yolo` counts for what yolo/__init__.py imports), and a
    script (any file outside yolo/) also when it names its file (scripts are run as subprocesses). The tests that
    run the whole chain through make (WHOLE_CHAIN_TESTS) are left out: minutes each, and what they catch a
    narrower test should."""
    sources = [file for file in files if file.suffix == ".py" and file.parts[0] != "tests"]
    imports = {file: imported_modules(ROOT / file) for file in sources}
    package = imports.get(Path("yolo/__init__.py"), set())

    def users_of(modules, scripts):
        chosen = []
        for test in files:
            if (test.parts[0] != "tests" or not test.name.startswith("test_") or test.suffix != ".py"
                    or test.name in WHOLE_CHAIN_TESTS):
                continue
            text, imported = source_text(ROOT / test), imported_modules(ROOT / test)
            if "yolo" in imported:
                imported = imported | package
            named = any(re.search(rf"(?<![\w.]){re.escape(name)}\b", text) for name in scripts)  # not pretrain.py
            if modules & imported or named:
                chosen.append(test)
        return chosen

    module = module_name(path)
    importers = [file for file in sources if module in imports[file]]
    script = {path.name} if path.parts[0] != "yolo" else set()
    direct = users_of({module}, script)
    wider = users_of({module, *map(module_name, importers)},
                     script | {file.name for file in importers if file.parts[0] != "yolo"})
    return direct or wider, wider


def starting_processes(tests, files):
    """The test files among `tests` that start Python processes: by their own code, through a helper module of
    tests/ whose code does, or through a conftest.py fixture whose code does (by naming it)."""
    helpers, fixtures = set(), set()
    for file in files:
        if file.parts[0] != "tests" or file.suffix != ".py" or file.name.startswith("test_"):
            continue
        text = source_text(ROOT / file)
        if file.name == "conftest.py":
            fixtures |= {node.name for node in ast.parse(text).body if isinstance(node, ast.FunctionDef)
                         and STARTS_PROCESSES.search(ast.get_source_segment(text, node))}
        elif STARTS_PROCESSES.search(text):
            helpers.add(file.stem)
    return [test for test in tests if STARTS_PROCESSES.search(source_text(ROOT / test))
            or helpers & imported_modules(ROOT / test)
            or any(re.search(rf"\b{name}\b", source_text(ROOT / test)) for name in fixtures)]


def copy_tree(files, destination):
    if destination.exists():
        shutil.rmtree(destination)
    for file in files:
        (destination / file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / file, destination / file)
    # Some tests read the commit (the checkpoints' and .onnx files' metadata): the copy is a repository of its own.
    git = ["git", "-c", "user.name=mutate", "-c", "user.email=mutate@localhost"]
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "scratch copy for mutation testing"]):
        subprocess.run([*git, *command], cwd=destination, check=True, capture_output=True)


def undecorate(source):
    """The source with each decorated function's decorators applied after its definition instead (`f = deco(f)`),
    which is what a decorator does. mutmut leaves decorated functions unmutated (their copies for its trampoline
    would run the decorators again); written this way they are mutated like the others. staticmethod,
    classmethod (which mutmut handles) and property accessors stay as they are."""
    lines = source.splitlines(keepends=True)
    edits = []  # (first line to remove, one past the last, line to insert after, text): applied bottom-up
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or not node.decorator_list:
            continue
        texts = [ast.get_source_segment(source, decorator) for decorator in node.decorator_list]
        if any(text in ("staticmethod", "classmethod", "property") or text.endswith((".setter", ".getter",
                                                                                     ".deleter"))
               for text in texts):
            continue
        indent = " " * node.col_offset
        applied = node.name
        for text in reversed(texts):  # the decorator nearest the definition applies first
            applied = f"({text})({applied})"
        first = node.decorator_list[0].lineno - 1
        edits.append((first, node.lineno - 1, node.end_lineno, f"{indent}{node.name} = {applied}\n"))
    for first, definition, end, text in sorted(edits, reverse=True):
        lines[end:end] = [text]
        del lines[first:definition]
    return "".join(lines)


def write_mutmut_config(tree, targets, tests, files):
    """mutmut reads [tool.mutmut] from the pyproject.toml of its working folder: the scratch copy's, whose own
    table (a copy of a scratch copy has one) is replaced."""
    sources = sorted({file.parts[0] for file in files if file.suffix == ".py" and file.parts[0] != "tests"})
    others = sorted({file.parts[0] for file in files} - set(sources))
    settings = {"source_paths": sources, "only_mutate": sorted(map(str, targets)), "also_copy": others,
                "pytest_add_cli_args_test_selection": sorted(map(str, tests)),
                "pytest_add_cli_args": ["-p", "no:cacheprovider", "-p", "no:xdist",
                                        "-p", "tools.mutmut_in_process"],
                "process_isolation": "forkserver"}  # torch's threads do not survive a plain fork of the runner
    pyproject = tree / "pyproject.toml"
    kept = re.sub(r"^\[tool\.mutmut\]\n(?:(?!\[).*\n?)*", "", pyproject.read_text(encoding="utf-8"),
                  flags=re.MULTILINE)
    lines = [kept.rstrip("\n"), "", "[tool.mutmut]", *(f"{key} = {json.dumps(value)}" for key, value in
                                                       settings.items())]
    pyproject.write_text("\n".join(lines) + "\n", encoding="utf-8")


def run_mutmut(tree, log):
    # the cores this process may use (taskset and cgroup limits included), not all the machine's
    command = [sys.executable, "-m", "mutmut", "run", "--max-children", str(len(os.sched_getaffinity(0)))]
    with open(log, "w", encoding="utf-8") as output:
        result = subprocess.run(command, cwd=tree, stdout=output, stderr=subprocess.STDOUT)
    if result.returncode != 0:  # its tracing run of the tests failed, or it did
        sys.exit(f"error: mutmut failed (exit {result.returncode}); its output is in {log} (set debug = true in "
                 f"{tree / 'pyproject.toml'} and run `mutmut run` there to see the failing test)")


def mutmut_verdicts(tree, target):
    meta = tree / "mutants" / (str(target) + ".meta")
    return json.loads(meta.read_text(encoding="utf-8"))["exit_code_by_key"]


def mutant_diff(tree, name):
    return subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=tree, capture_output=True,
                          text=True).stdout.split("\n", 1)[-1].strip()


def run_tests(tree, tests, timeout):
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
               *map(str, tests)]
    try:
        return subprocess.run(command, cwd=tree, capture_output=True, text=True, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        return "timeout"


def second_pass(tree, target, tests, names, clean_seconds):
    """Each mutant written into the file in turn, the tests run in a fresh interpreter; the names it kills."""
    original = (tree / target).read_text(encoding="utf-8")
    timeout = TIMEOUT_FACTOR * clean_seconds + TIMEOUT_SLACK
    killed = set()
    try:
        for number, name in enumerate(names, start=1):
            subprocess.run([sys.executable, "-m", "mutmut", "apply", name], cwd=tree, check=True,
                           capture_output=True)
            outcome = run_tests(tree, tests, timeout)
            (tree / target).write_text(original, encoding="utf-8")
            if outcome != 0:
                killed.add(name)
            print(f"  pass 2 {number}/{len(names)} {name}: {'killed' if outcome != 0 else 'survived'}"
                  f"{' (timeout)' if outcome == 'timeout' else ''}", flush=True)
    finally:
        (tree / target).write_text(original, encoding="utf-8")
    return killed


@functools.cache
def clean_run_seconds(tree, tests):
    """How long the tests take on the unmutated copy, run as pass 2 runs them (once per set of tests). mutmut's
    own timings leave out the fixtures' set-up, which can be most of it (the trained test model)."""
    start = time.monotonic()
    if run_tests(tree, tests, timeout=None) != 0:
        sys.exit(f"error: the tests fail on the unmutated copy ({' '.join(map(str, tests))}); fix them first")
    return time.monotonic() - start


def mutate(targets, tests_by_target, files, workdir):
    """Both passes over the targets in one scratch copy (mutmut traces the tests once for all of them)."""
    tree = workdir / "tree"
    copy_tree(files, tree)
    for target in targets:
        (tree / target).write_text(undecorate(source_text(ROOT / target)), encoding="utf-8")
    wider = {test for _, tests in tests_by_target.values() for test in tests}
    write_mutmut_config(tree, targets, wider, files)
    run_mutmut(tree, workdir / "mutmut.log")
    results = []
    for target in targets:
        start = time.monotonic()
        tests = tests_by_target[target][0]
        second_tests = starting_processes(tests, files)
        verdicts = mutmut_verdicts(tree, target)
        first_survivors = sorted(name for name, code in verdicts.items()
                                 if status_by_exit_code[code] not in CAUGHT_BY_MUTMUT)
        print(f"{target}: {len(verdicts)} mutants, pass 1 (mutmut) left {len(first_survivors)}; pass 2 runs "
              f"{' '.join(map(str, second_tests)) or 'nothing (no test starts a Python process)'}", flush=True)
        killed_later = set()
        if first_survivors and second_tests:
            killed_later = second_pass(tree, target, second_tests, first_survivors,
                                       clean_run_seconds(tree, tuple(second_tests)))
        survivors = [name for name in first_survivors if name not in killed_later]
        results.append({"file": str(target), "tests": [str(test) for test in tests],
                        "pass_2_tests": [str(test) for test in second_tests], "mutants": len(verdicts),
                        "killed_by_pass_1": len(verdicts) - len(first_survivors),
                        "killed_by_pass_2": len(killed_later),
                        "survivors": {name: mutant_diff(tree, name) for name in survivors},
                        "pass_2_seconds": round(time.monotonic() - start)})
    return results


def report(results):
    lines = ["# Mutation testing report", ""]
    for result in results:
        share = len(result["survivors"]) / max(result["mutants"], 1)
        lines += [f"## {result['file']}", "",
                  f"{result['mutants']} mutants: {result['killed_by_pass_1']} killed in pass 1, "
                  f"{result['killed_by_pass_2']} in pass 2, {len(result['survivors'])} survived ({share:.1%}), "
                  f"pass 2 {result['pass_2_seconds']} s.", "", "Tests: " + ", ".join(result["tests"]),
                  "Pass 2 (the tests that start Python processes): " + (", ".join(result["pass_2_tests"]) or "none"),
                  ""]
        for name, diff in result["survivors"].items():
            lines += [f"### {name}", "", "```diff", diff, "```", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="the Python files to mutate, relative to the checkout")
    parser.add_argument("--tests", nargs="+", type=Path, help="test files to run (default: those that use the file)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "mutate", help="scratch folder")
    args = parser.parse_args()
    files = tracked_files()
    targets = [target.resolve() for target in args.files]
    for target in targets:
        if not target.is_relative_to(ROOT) or target.relative_to(ROOT) not in files or target.suffix != ".py":
            sys.exit(f"error: {target} is not a Python file of this checkout (give paths like yolo/formats.py)")
    targets = [target.relative_to(ROOT) for target in targets]
    args.workdir.mkdir(parents=True, exist_ok=True)
    tests_by_target = {target: (args.tests, args.tests) if args.tests else tests_of(target, files)
                       for target in targets}
    for target, (tests, _) in tests_by_target.items():
        if not tests:
            sys.exit(f"error: no test file imports or runs {target}; name the tests with --tests (TESTS=...)")
    # The tests' trained model (conftest.py's overfit_run) is trained once for the whole run, by the unmutated
    # code (the first test process to need it is mutmut's tracing run), instead of once in each mutant's process.
    shared = (args.workdir / "shared").resolve()
    shutil.rmtree(shared, ignore_errors=True)
    os.environ["YOLO_TEST_SHARED_DIR"] = str(shared)
    results = mutate(targets, tests_by_target, files, args.workdir)
    text = report(results)
    (args.workdir / "report.md").write_text(text, encoding="utf-8")
    (args.workdir / "report.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    print(text)
    print(f"report: {args.workdir / 'report.md'}")


if __name__ == "__main__":
    main()
