"""The `yolo` package installed alone: pyproject.toml's dependencies, and nothing else, run the README's Python
example, and torch.hub's entry point declares the same imports."""
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

import hubconf

ROOT = Path(__file__).resolve().parents[1]
IMPORT_NAMES = {"pillow": "PIL", "pyyaml": "yaml"}  # the distributions whose module has another name


def declared_dependencies():
    return [Requirement(text) for text in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
            ["dependencies"]]


def installed_closure(requirements):
    """The installed distributions that `requirements` need, transitively (markers for this platform; no extras)."""
    found, pending = {}, list(requirements)
    while pending:
        requirement = pending.pop()
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        if name in found or (requirement.marker and not requirement.marker.evaluate({"extra": ""})):
            continue
        found[name] = importlib.metadata.distribution(requirement.name)
        pending += [Requirement(text) for text in found[name].requires or []]
    return found.values()


def test_the_package_alone_with_its_declared_dependencies_predicts_and_loads_through_torch_hub(overfit_run,
                                                                                             tmp_path):
    """A fresh environment whose site-packages hold the project's wheel and links to the installed files of its
    declared dependencies' closure, and nothing else: an import the package makes without declaring it fails."""
    data_dir, run_dir = overfit_run
    source = tmp_path / "source"  # a copy: building in the checkout would leave build/ and *.egg-info there
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "yolo"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "wheel"), str(source)], check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "env")], check=True)
    (site_packages,) = (tmp_path / "env" / "lib").glob("python3*/site-packages")
    for distribution in installed_closure(declared_dependencies()):
        for entry in {file.parts[0] for file in distribution.files if file.parts[0] != ".."}:
            if not (site_packages / entry).exists():
                (site_packages / entry).symlink_to(distribution.locate_file(entry))
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                    str(site_packages), str(wheel)], check=True, capture_output=True)
    image = sorted((data_dir / "JPEGImages").glob("*.jpg"))[0]
    example = f"""
import torch, yolo
detector = yolo.load_detector({str(run_dir / "last.pt")!r})
print(len(detector.predict({str(image)!r}).boxes) > 0)
hub = torch.hub.load({str(ROOT)!r}, "yolov1", source="local", checkpoint={str(run_dir / "last.pt")!r})
print(type(hub).__name__)
"""
    # -I: the environment's own paths only (no PYTHONPATH, no user site, not the current folder).
    result = subprocess.run([str(tmp_path / "env" / "bin" / "python"), "-I", "-c", example], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "ImageDetector"]


def test_torch_hub_checks_every_module_the_package_needs():
    needed = {IMPORT_NAMES.get(requirement.name, requirement.name) for requirement in declared_dependencies()}
    assert needed - {"matplotlib", "pandas"} <= set(hubconf.dependencies)  # the plots and CSVs only, not the hub's
    assert set(hubconf.dependencies) <= needed
