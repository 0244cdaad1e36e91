"""Settings: the constants at the top of each script, presets from configs/, and strict `--name=value` overrides.

A script lists its settings as plain module-level names with defaults; `resolve_config` turns them into a
dict, applies the command line in order (preset files such as `configs/demo.py`, then or between them
`--name=value` overrides), checks each value's type and the script's rules, and rejects anything it does
not know. A preset is a small Python file of `name = literal` lines, read without executing it.
"""
import ast
import sys
import tempfile
from pathlib import Path
from typing import Callable

SCALAR_TYPES = (bool, int, float, str)
TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")


class ConfigError(ValueError):
    """A setting that names no constant, has a value of the wrong type, or breaks the script's rules."""


# A rule checks one value (each element of a tuple setting) and raises ValueError saying what is allowed.
Rule = Callable[[object], None]


def requirement(accepts: Callable[[object], bool], allowed: str) -> Rule:
    def check(value) -> None:
        if not accepts(value):
            raise ValueError(f"must be {allowed}")
    return check


def at_least(minimum) -> Rule:
    return requirement(lambda value: value >= minimum, f"at least {minimum}")


def between(low, high) -> Rule:
    return requirement(lambda value: low <= value <= high, f"between {low} and {high}")


def one_of(*choices) -> Rule:
    return requirement(lambda value: value in choices, "one of " + ", ".join(map(str, choices)))


def writable_folder(value) -> None:
    """The rule of an output folder: created when missing, then a file is written and removed there, so a
    path that is a file, a read-only folder or a read-only disk is refused before any work starts."""
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise ValueError("a file is in the way: give a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise ValueError(f"cannot write there ({error.strerror or error}): give a writable folder") from None


def resolve_out_dir(config: dict, default: Path) -> Path:
    """The script's out_dir, or `default` where it is empty, checked by `writable_folder` (a bad one exits with
    an `error:` line)."""
    out_dir = config["out_dir"] or str(default)
    try:
        writable_folder(out_dir)
    except ValueError as error:
        sys.exit(f"error: --out_dir={out_dir!r}: {error}")
    return Path(out_dir)


def convert(name: str, text: str, default):
    """Convert `text` to the type of `default` (tuples: comma-separated elements of the default's type)."""
    if isinstance(default, tuple):
        element = default[0] if default else ""
        return tuple(convert(name, part.strip(), element) for part in text.split(",") if part.strip())
    if isinstance(default, bool):
        if text.lower() in TRUE_WORDS:
            return True
        if text.lower() in FALSE_WORDS:
            return False
        raise ConfigError(f"--{name}={text}: expected true or false.")
    try:
        return type(default)(text)
    except ValueError:
        raise ConfigError(f"--{name}={text}: expected a value of type {type(default).__name__} "
                          f"(default {default!r}).") from None


def constants(namespace: dict) -> dict:
    """The lower-case, public constants of a script's global namespace, in definition order."""
    return {name: value for name, value in namespace.items()
            if name.islower() and not name.startswith("_")
            and (isinstance(value, SCALAR_TYPES) or isinstance(value, tuple))}


def unknown_setting(what: str, defaults: dict) -> ConfigError:
    return ConfigError(f"{what}: unknown setting. Valid names: {', '.join(defaults)}.")


def read_preset(path: str | Path, defaults: dict) -> dict:
    """The `name = literal` assignments of a preset file, each checked against `defaults` (names and types)."""
    path = Path(path)
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except (OSError, SyntaxError, ValueError) as error:
        raise ConfigError(f"{path}: cannot read this preset ({error}).") from None
    values = {}
    for statement in tree.body:
        where = f"{path}:{statement.lineno}"
        if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
            continue  # the docstring
        if not (isinstance(statement, ast.Assign) and len(statement.targets) == 1
                and isinstance(statement.targets[0], ast.Name)):
            raise ConfigError(f"{where}: a preset holds only `name = value` lines.")
        name = statement.targets[0].id
        if name not in defaults:
            raise unknown_setting(f"{where}: {name}", defaults)
        try:
            value = ast.literal_eval(statement.value)
        except ValueError:
            raise ConfigError(f"{where}: the value of {name} must be a literal (number, string, bool, tuple).") \
                from None
        values[name] = checked_type(name, value, defaults[name], where)
    return values


def checked_type(name: str, value, default, where: str):
    """`value` as the type of `default` (an int where a float is expected becomes a float)."""
    if isinstance(default, tuple):
        value = value if isinstance(value, tuple) else (value,)
        element = default[0] if default else value[0] if value else ""
        return tuple(checked_type(name, item, element, where) for item in value)
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not type(default):
        raise ConfigError(f"{where}: {name} = {value!r} is a {type(value).__name__}; expected a "
                          f"{type(default).__name__} (default {default!r}).")
    return value


def apply_overrides(defaults: dict, argv: list[str]) -> dict:
    """A copy of `defaults` with argv applied in order: preset files (`*.py`) and `--name=value` overrides."""
    config = dict(defaults)
    for argument in argv:
        if not argument.startswith("-") and argument.endswith(".py"):
            config.update(read_preset(argument, defaults))
            continue
        name, equals, text = argument.removeprefix("--").partition("=")
        if not argument.startswith("--") or not equals:
            raise ConfigError(f"{argument!r}: overrides are written --name=value (presets: a configs/*.py path).")
        name = name.replace("-", "_")
        if name not in defaults:
            raise unknown_setting(f"--{name}", defaults)
        config[name] = convert(name, text, defaults[name])
    return config


def check_rules(config: dict, rules: dict[str, Rule]) -> None:
    """Raise ConfigError for the first setting whose value (or any element of it) breaks its rule."""
    for name, rule in rules.items():
        values = config[name] if isinstance(config[name], tuple) else (config[name],)
        for value in values:
            try:
                rule(value)
            except ValueError as error:
                raise ConfigError(f"--{name}={config[name]!r}: {error}") from None


def resolve_config(namespace: dict, argv: list[str] | None = None, rules: dict[str, Rule] | None = None) -> dict:
    """The script's constants with the command line's presets and overrides, checked against `rules`.

    A bad setting exits with one `error:` line naming it and what is allowed.
    """
    try:
        config = apply_overrides(constants(namespace), sys.argv[1:] if argv is None else argv)
        check_rules(config, rules or {})
    except ConfigError as error:
        sys.exit(f"error: {error}")
    return config


def format_config(config: dict) -> str:
    width = max(map(len, config))
    return "\n".join(f"  {name:<{width}} = {value!r}" for name, value in config.items())
