import re
import runpy
import sys
from pathlib import Path

import pytest
import torch

from command_lines import run_python
from yolo.checkpoint import ARCHITECTURE_KEYS
from yolo.config import (ConfigError, apply_overrides, at_least, between, check_rules, commented_settings, constants,
                         format_config, one_of, read_preset, resolve_config, resolve_out_dir, settings_help,
                         writable_folder, OVERRIDES_HELP)
from yolo.model import YOLOv1
from yolo.optim import build_optimizer
from yolo.sampling import GlobalBatchSampler
from yolo.device import resolve_device

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

DEFAULTS = {"backbone": "resnet18", "epochs": 145, "lr": 1e-2, "pretrained": True, "milestones": (85, 115)}


def test_overrides_are_converted_to_the_default_type():
    config = apply_overrides(DEFAULTS, ["--epochs=3", "--lr=5e-3", "--pretrained=false",
                                        "--milestones=2,3", "--backbone=darknet"])
    assert config == {"backbone": "darknet", "epochs": 3, "lr": 5e-3, "pretrained": False, "milestones": (2, 3)}
    assert DEFAULTS["epochs"] == 145


def test_a_float_setting_accepts_an_integer():
    assert apply_overrides(DEFAULTS, ["--lr=1"])["lr"] == 1.0


@pytest.mark.parametrize("arguments, message", [
    (["--epoch=3"], "--epoch: unknown setting. Valid names: backbone, epochs, lr, pretrained, milestones."),
    (["--epochs=three"], "--epochs=three: expected a value of type int (default 145)."),
    (["--epochs", "three"], "--epochs=three: expected a value of type int (default 145)."),
    (["--pretrained=maybe"], "--pretrained=maybe: expected true or false."),
    (["--epochs"], "--epochs: no value given; overrides are written --name=value or --name value."),
    (["epochs=3"], "'epochs=3': overrides are written --name=value or --name value (presets: a configs/*.py path)."),
    (["-e.py"], "'-e.py': overrides are written --name=value or --name value (presets: a configs/*.py path)."),
    (["--milestones=1,x"], "--milestones=x: expected a value of type int (default 85)."),
])
def test_bad_overrides_are_clear_errors(arguments, message):
    with pytest.raises(ConfigError) as raised:
        apply_overrides(DEFAULTS, arguments)
    assert str(raised.value) == message


@pytest.mark.parametrize("spaced, joined", [
    (["--lr", "0.01"], ["--lr=0.01"]),
    (["--epochs", "3", "--milestones", "2,3", "--backbone", "darknet"], ["--epochs=3", "--milestones=2,3",
                                                                         "--backbone=darknet"]),
    (["--lr", "-1", "--pretrained", "false"], ["--lr=-1", "--pretrained=false"]),
    (["--pretrained"], ["--pretrained=true"]),
    (["--pretrained", "--epochs", "3"], ["--pretrained=true", "--epochs=3"]),
])
def test_an_override_may_give_its_value_as_the_next_argument(spaced, joined):
    assert apply_overrides(DEFAULTS, spaced) == apply_overrides(DEFAULTS, joined)
    assert apply_overrides(DEFAULTS, ["--pretrained=false", *spaced]) == apply_overrides(
        DEFAULTS, ["--pretrained=false", *joined])


def test_a_bool_flag_alone_before_a_preset_leaves_the_preset_positional(tmp_path):
    preset = tmp_path / "preset.py"
    preset.write_text("epochs = 3\n")
    assert apply_overrides(DEFAULTS, ["--pretrained=false", "--pretrained", str(preset)]) == {
        **DEFAULTS, "pretrained": True, "epochs": 3}


@pytest.mark.parametrize("arguments, message", [
    (["--epochs"], "--epochs: no value given; overrides are written --name=value or --name value"),
    (["--epochs", "--lr=1"], "--epochs: no value given"),
    (["--epoch", "3"], "--epoch: unknown setting"),
    (["--pretrained", "maybe"], "expected true or false"),
    (["--epochs", "3", "4"], "'4': overrides are written --name=value"),
])
def test_spaced_overrides_keep_the_errors_clear(arguments, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(DEFAULTS, arguments)


SCRIPTS = sorted(path.name for path in ROOT.glob("*.py") if "resolve_config(globals()" in path.read_text())


def script_help(script, capsys):
    """(settings, source, --help output) of a script."""
    namespace = runpy.run_path(str(ROOT / script), run_name="not_main")
    with pytest.raises(SystemExit, match="^0$"):
        resolve_config(namespace, ["--epochs=3", "--help"])
    return constants(namespace), (ROOT / script).read_text(), capsys.readouterr().out


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_setting_with_its_default_and_comment(script, capsys):
    settings, source, output = script_help(script, capsys)
    assert output.startswith(f"usage: python {script} [PRESET.py ...] [--name=value ...]\n")
    commented = re.findall(r"^([a-z_]+) = .*?  # (.+)$", source, re.MULTILINE)
    assert [name for name, _ in commented] == list(settings)
    for name, comment in commented:
        # A long default puts the comment on the next line.
        assert re.search(rf"^  --{name}=\S*\s+{re.escape(comment)}$", output, re.MULTILINE), name
    assert "--name value" in output and "configs/demo.py" in output


def test_help_reads_headings_and_comments_of_top_level_settings_only():
    source = ('"""Doc."""\n# --- model\nsize = 3  # side\nnames = ("a",\n         "b")  # the classes\n'
              'plain = 1\n\n\ndef main():\n    # --- not a heading\n    local = 2  # not a setting\n')
    assert commented_settings(source) == [(None, "model"), ("size", "side"), ("names", "the classes"), ("plain", "")]


def test_help_shows_the_usage_the_defaults_and_the_headings(capsys):
    _, source, output = script_help("train.py", capsys)
    assert output.startswith("usage: python train.py [PRESET.py ...] [--name=value ...]\n\n"
                             "Train YOLOv1 with the paper's recipe, on one device or many.\n")
    assert "  --lr=0.01 " in output and "  --pretrained=true " in output and "--lr_milestones=85.0,115.0 " in output
    headings = re.findall(r"^# --- (.+)$", source, re.MULTILINE)
    assert headings and [line[:-1] for line in output.splitlines() if line.endswith(":")][1:-1] == headings


def test_help_exits_0_from_the_command_line():
    result = run_python([sys.executable, "table.py", "-h"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stderr
    assert result.stdout.startswith("usage: python table.py") and "--results=results " in result.stdout


def test_constants_reads_only_lower_case_public_settings():
    namespace = {"epochs": 3, "_private": 1, "CONSTANT": 2, "module": pytest, "names": ("a",), "flag": False}
    assert constants(namespace) == {"epochs": 3, "names": ("a",), "flag": False}


def test_resolve_config_exits_with_the_message():
    with pytest.raises(SystemExit, match="unknown setting"):
        resolve_config({"epochs": 1}, ["--nope=1"])


def test_a_preset_file_is_read_before_later_overrides(tmp_path):
    preset = tmp_path / "preset.py"
    preset.write_text('"""A preset."""\nepochs = 3  # short\nlr = 1\nmilestones = (4, 5)\nbackbone = "darknet"\n')
    config = apply_overrides(DEFAULTS, [str(preset), "--epochs=7"])
    assert config == {"backbone": "darknet", "epochs": 7, "lr": 1.0, "pretrained": True, "milestones": (4, 5)}
    assert apply_overrides(DEFAULTS, ["--epochs=7", str(preset)])["epochs"] == 3


@pytest.mark.parametrize("text, message", [
    ("epoch = 3\n", r"preset.py:1: epoch: unknown setting"),
    ("epochs = 'three'\n", r"preset.py:1: epochs = 'three' is a str; expected a int"),
    ("\npretrained = 1\n", r"preset.py:2: pretrained = 1 is a int; expected a bool"),
    ("import os\n", "only `name = value` lines"),
    ("epochs = 2 * 3\n", "must be a literal"),
    ("epochs = (\n", "cannot read this preset"),
])
def test_bad_presets_name_the_file_and_line(tmp_path, text, message):
    preset = tmp_path / "preset.py"
    preset.write_text(text)
    with pytest.raises(ConfigError, match=message):
        apply_overrides(DEFAULTS, [str(preset)])


def test_a_missing_preset_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read this preset"):
        apply_overrides(DEFAULTS, [str(tmp_path / "nope.py")])


def check_preset(preset: Path) -> None:
    """The preset, after its model preset as the Makefile and the tests give them, keeps every rule of each
    script it names, and builds that script's model, optimizer and batch sampler."""
    scripts = ["train.py", "benchmark.py"] if preset.name.endswith("_model.py") else ["train.py"]
    model_presets = [path for path in [CONFIGS / f"{preset.stem.removesuffix('_model')}_model.py"] if path.exists()]
    for script in scripts:
        namespace = runpy.run_path(str(ROOT / script), run_name="not_main")
        assert read_preset(preset, constants(namespace)), script
        config = apply_overrides(constants(namespace), [*map(str, model_presets), str(preset)])
        check_rules(config, {name: rule for name, rule in namespace["RULES"].items() if name != "out_dir"})
        model = YOLOv1(**{key: config[key] for key in ARCHITECTURE_KEYS if key in config}, num_classes=5,
                       pretrained=False)
        if script == "train.py":
            build_optimizer(model, config["optimizer"], config["lr"], config["momentum"], config["weight_decay"])
            GlobalBatchSampler(64, config["batch_size"], config["micro_batch_size"], 0, 1, config["seed"])


@pytest.mark.parametrize("preset", sorted(CONFIGS.glob("*.py")), ids=lambda path: path.name)
def test_the_repositorys_presets_fit_the_scripts_they_name(preset):
    check_preset(preset)


@pytest.mark.parametrize("line", ["lr = -3e-4", 'optimizer = "adam"', "micro_batch_size = 0", "batch_size = 24",
                                  "image_size = 100"])
def test_a_broken_preset_fails_that_check(tmp_path, line):
    preset = tmp_path / "demo.py"
    preset.write_text((CONFIGS / "demo.py").read_text() + line + "\n")
    with pytest.raises(ValueError):  # ConfigError is one
        check_preset(preset)


@pytest.mark.parametrize("argument, message", [
    ("--epochs=0", r"--epochs=0: must be at least 1"),
    ("--lr=-0.01", r"--lr=-0.01: must be at least 0.0"),
    ("--milestones=5,-1", r"--milestones=\(5, -1\): must be at least 0"),
    ("--backbone=vgg", r"--backbone='vgg': must be one of resnet18, resnet50"),
])
def test_rules_name_the_setting_and_what_is_allowed(argument, message):
    rules = {"epochs": at_least(1), "lr": at_least(0.0), "milestones": at_least(0),
             "backbone": one_of("resnet18", "resnet50")}
    with pytest.raises(SystemExit, match=message):
        resolve_config(DEFAULTS, [argument], rules=rules)
    assert resolve_config(DEFAULTS, [], rules=rules) == DEFAULTS


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_missing_gpu_is_a_setting_error():
    with pytest.raises(SystemExit, match=r"--device='cuda': no CUDA GPU is available here: use --device=cpu"):
        resolve_config({"device": "auto"}, ["--device=cuda"], rules={"device": resolve_device})
    with pytest.raises(SystemExit, match=r"--device='tpu': not a device"):
        resolve_config({"device": "auto"}, ["--device=tpu"], rules={"device": resolve_device})


def test_dashes_in_a_name_are_underscores():
    assert apply_overrides({"num_workers": 2}, ["--num-workers=3"]) == {"num_workers": 3}


@pytest.mark.parametrize("default", [(), ("x",)])
def test_a_list_setting_takes_its_elements_type_from_its_default_or_its_first_value(tmp_path, default):
    defaults = {"names": default, "sizes": (), "milestones": (85, 115)}
    assert apply_overrides(defaults, ["--names=a,b,"])["names"] == ("a", "b")
    preset = tmp_path / "preset.py"
    preset.write_text("names = ('a', 'b')\nsizes = (1, 2)\nmilestones = 7\n")
    assert apply_overrides(defaults, [str(preset)]) == {"names": ("a", "b"), "sizes": (1, 2), "milestones": (7,)}
    preset.write_text("sizes = ()\n")
    assert apply_overrides(defaults, [str(preset)])["sizes"] == ()
    preset.write_text("milestones = (1, 2)\n")
    assert apply_overrides(defaults, [str(preset)])["milestones"] == (1, 2)
    for line, message in (("milestones = (1.5, 2)", "milestones = 1.5 is a float; expected a int (default 85)."),
                          ("sizes = (1, 'x')", "sizes = 'x' is a str; expected a int (default 1).")):
        preset.write_text(line + "\n")
        with pytest.raises(ConfigError) as raised:
            apply_overrides(defaults, [str(preset)])
        assert str(raised.value) == f"{preset}:1: {message}"


def test_a_preset_that_does_not_parse_is_named_with_its_line(tmp_path):
    preset = tmp_path / "preset.py"
    preset.write_text("epochs = (\n")
    with pytest.raises(ConfigError) as raised:
        apply_overrides(DEFAULTS, [str(preset)])
    assert str(raised.value) == f"{preset}: cannot read this preset ('(' was never closed ({preset.name}, line 1))."


def test_between_includes_both_ends():
    rule = between(0.0, 1.0)
    rule(0.0)
    rule(1.0)
    with pytest.raises(ValueError) as raised:
        rule(1.5)
    assert str(raised.value) == "must be between 0.0 and 1.0"


def test_the_resolved_settings_are_printed_aligned():
    assert format_config({"lr": 0.01, "backbone": "resnet18"}) == "  lr       = 0.01\n  backbone = 'resnet18'"


def test_an_output_folder_is_made_or_refused_with_the_reason(tmp_path):
    nested = tmp_path / "a" / "b"
    writable_folder(nested)
    writable_folder(nested)  # again: it exists
    assert nested.is_dir() and not any(nested.iterdir())
    (tmp_path / "file").write_text("")
    for path, message in ((tmp_path / "file", "a file is in the way: give a folder path"),
                          ("/proc/yolo_test", "cannot write there (No such file or directory): give a writable folder"),
                          ("/sys", "cannot write there (Permission denied): give a writable folder")):  # even as root
        with pytest.raises(ValueError) as raised:
            writable_folder(path)
        assert str(raised.value) == message
    assert resolve_out_dir({"out_dir": ""}, tmp_path / "default") == tmp_path / "default"
    assert (tmp_path / "default").is_dir()
    assert resolve_out_dir({"out_dir": str(nested)}, tmp_path / "other") == nested
    with pytest.raises(SystemExit) as raised:
        resolve_out_dir({"out_dir": str(tmp_path / "file")}, tmp_path)
    assert str(raised.value) == f"error: --out_dir='{tmp_path / 'file'}': a file is in the way: give a folder path"


def test_help_of_a_small_script_line_by_line(tmp_path):
    script = tmp_path / "script.py"
    script.write_text('"""Do one thing.\n\nMore about it."""\n# --- data\nsize = 3  # pixels\n'
                      'names = ("a", "b")  # the classes\n# --- run\nlong_folder_name = "' + "x" * 40 + '"  # where\n')
    namespace = {**runpy.run_path(str(script)), "__file__": str(script), "extra": 1.5}
    assert settings_help(namespace) == "\n".join([
        "usage: python script.py [PRESET.py ...] [--name=value ...]",
        "",
        "Do one thing.",
        "",
        "settings (default, then what it does):",
        "data:",
        "  --size=3     pixels",
        "  --names=a,b  the classes",
        "run:",
        "  --long_folder_name=" + "x" * 40,
        "               where",
        "  --extra=1.5",
        "",
        OVERRIDES_HELP,
    ])
    # No docstring: an empty summary.
    assert settings_help({"size": 3}).startswith("usage: python  [PRESET.py ...] [--name=value ...]\n\n\n\nsettings")


@pytest.mark.parametrize("length, lines", [
    (40, ["  --folder=" + "x" * 31 + "  where", "  --size=3                                  pixels"]),
    (41, ["  --folder=" + "x" * 32, "            where", "  --size=3  pixels"]),
])
def test_help_aligns_the_defaults_up_to_40_characters(tmp_path, length, lines):
    script = tmp_path / "script.py"
    script.write_text(f'folder = "{"x" * (length - 9)}"  # where\nsize = 3  # pixels\n')
    namespace = {**runpy.run_path(str(script)), "__file__": str(script)}
    assert settings_help(namespace).splitlines()[5:5 + len(lines)] == lines


def test_help_with_no_default_short_enough_to_align_on(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(f'folder = "{"x" * 40}"  # where\n')
    namespace = {**runpy.run_path(str(script)), "__file__": str(script)}
    assert settings_help(namespace).splitlines()[5:7] == ["  --folder=" + "x" * 40, "    where"]
