import pytest

from yolo.config import ConfigError, apply_overrides, constants, resolve_config

DEFAULTS = {"backbone": "resnet18", "epochs": 145, "lr": 1e-2, "pretrained": True, "milestones": (85, 115)}


def test_overrides_are_converted_to_the_default_type():
    config = apply_overrides(DEFAULTS, ["--epochs=3", "--lr=5e-3", "--pretrained=false",
                                        "--milestones=2,3", "--backbone=darknet"])
    assert config == {"backbone": "darknet", "epochs": 3, "lr": 5e-3, "pretrained": False, "milestones": (2, 3)}
    assert DEFAULTS["epochs"] == 145


def test_a_float_setting_accepts_an_integer():
    assert apply_overrides(DEFAULTS, ["--lr=1"])["lr"] == 1.0


@pytest.mark.parametrize("argument, message", [
    ("--epoch=3", "unknown setting. Valid names: backbone, epochs, lr, pretrained, milestones"),
    ("--epochs=three", "expected a value of type int"),
    ("--pretrained=maybe", "expected true or false"),
    ("--epochs", "--name=value"),
    ("epochs=3", "--name=value"),
    ("--milestones=1,x", "expected a value of type int"),
])
def test_bad_overrides_are_clear_errors(argument, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(DEFAULTS, [argument])


def test_constants_reads_only_lower_case_public_settings():
    namespace = {"epochs": 3, "_private": 1, "CONSTANT": 2, "module": pytest, "names": ("a",), "flag": False}
    assert constants(namespace) == {"epochs": 3, "names": ("a",), "flag": False}


def test_resolve_config_exits_with_the_message():
    with pytest.raises(SystemExit, match="unknown setting"):
        resolve_config({"epochs": 1}, ["--nope=1"])
