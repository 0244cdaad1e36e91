"""Settings: the constants at the top of each script, presets from configs/, and strict `--name=value` overrides.

A script lists its settings as plain module-level names with defaults, each with a comment saying what it
does; `resolve_config` turns them into a dict, applies the command line in order (preset files such as
`configs/demo.py`, then or between them `--name=value` or `--name value` overrides), checks each value's
type and the script's rules, and rejects anything it does not know. A bool setting given alone, `--name`,
is true. A preset is a small Python file of `name = literal` lines, read without executing it. `--help`
(or `-h`) prints the settings with their defaults and comments, read from the script's source.
"""
import ast
import io
import shlex
import sys
import tempfile
import tokenize
from pathlib import Path
from typing import Callable

SCALAR_TYPES = (bool, int, float, str)
TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")
OVERRIDES_HELP = """The arguments apply in order, a later one winning:
  PRESET.py     a preset (a path ending in .py, such as configs/demo.py) sets the names it assigns
  --name=value  sets one setting; so does --name value
  --name        a true/false setting given alone is true
  --name=1,2    list settings take comma-separated values
An unknown name, or a value of the wrong type or outside what the setting allows, is an error."""


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


def is_preset(argument: str) -> bool:
    return not argument.startswith("-") and argument.endswith(".py")


def apply_overrides(defaults: dict, argv: list[str]) -> dict:
    """A copy of `defaults` with argv applied in order: preset files (`*.py`) and `--name=value` or
    `--name value` overrides; a bool setting followed by no value (the end, an option or a preset) is true."""
    config = dict(defaults)
    position = 0
    while position < len(argv):
        argument = argv[position]
        position += 1
        if is_preset(argument):
            config.update(read_preset(argument, defaults))
            continue
        if not argument.startswith("--"):
            raise ConfigError(f"{argument!r}: overrides are written --name=value or --name value "
                              f"(presets: a configs/*.py path).")
        name, equals, text = argument.removeprefix("--").partition("=")
        name = name.replace("-", "_")
        if name not in defaults:
            raise unknown_setting(f"--{name}", defaults)
        if not equals:
            following = argv[position] if position < len(argv) else "--"
            if not (following.startswith("--") or is_preset(following)):
                text = following
                position += 1
            elif isinstance(defaults[name], bool):
                text = "true"
            else:
                raise ConfigError(f"--{name}: no value given; overrides are written --name=value or --name value.")
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

    A bad setting exits with one `error:` line naming it and what is allowed; `--help` or `-h` prints
    `settings_help(namespace)` and exits.
    """
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(settings_help(namespace))
        sys.exit(0)
    try:
        config = apply_overrides(constants(namespace), argv)
        check_rules(config, rules or {})
    except ConfigError as error:
        sys.exit(f"error: {error}")
    return config


def format_config(config: dict) -> str:
    width = max(map(len, config))
    return "\n".join(f"  {name:<{width}} = {value!r}" for name, value in config.items())


def as_argument(value) -> str:
    """A setting's value as it is written on a command line (`--name=<this>`)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(as_argument, value))
    return shlex.quote(value) if isinstance(value, str) else repr(value)


def commented_settings(source: str) -> list[tuple[str | None, str]]:
    """The script's settings block as it reads: (None, heading) for each `# --- heading` line and
    (name, comment) for each top-level `name = value  # comment` assignment, in source order."""
    comments = {token.start[0]: token for token in tokenize.generate_tokens(io.StringIO(source).readline)
                if token.type == tokenize.COMMENT}
    entries = {line: (None, token.string.removeprefix("# ---").strip())
               for line, token in comments.items() if token.start[1] == 0 and token.string.startswith("# ---")}
    for statement in ast.parse(source).body:
        if (isinstance(statement, ast.Assign) and len(statement.targets) == 1
                and isinstance(statement.targets[0], ast.Name)):
            token = comments.get(statement.end_lineno)
            comment = token.string.removeprefix("#").strip() if token else ""
            entries[statement.lineno] = (statement.targets[0].id, comment)
    return [entries[line] for line in sorted(entries)]


def settings_help(namespace: dict) -> str:
    """`--help`: the script's usage (its docstring's first paragraph), then each setting with its default and
    comment under its heading, as the settings block at the top of the script lists them."""
    defaults = constants(namespace)
    path = Path(namespace.get("__file__", ""))
    entries, listed = [], set()
    for name, text in commented_settings(path.read_text() if path.is_file() else ""):
        if name is None or (name in defaults and name not in listed):
            entries.append((name, text))
            listed.add(name)
    entries += [(name, "") for name in defaults if name not in listed]
    arguments = {name: f"--{name}={as_argument(value)}" for name, value in defaults.items()}
    width = max((len(argument) for argument in arguments.values() if len(argument) <= 40), default=0)
    summary = (namespace.get("__doc__") or "").strip().split("\n\n")[0]
    lines = [f"usage: python {path.name} [PRESET.py ...] [--name=value ...]", "", summary, "",
             "settings (default, then what it does):"]
    for name, text in entries:
        if name is None:
            lines.append(f"{text}:")
        elif len(arguments[name]) > width:
            lines += [f"  {arguments[name]}", f"  {'':<{width}}  {text}"]
        else:
            lines.append(f"  {arguments[name]:<{width}}  {text}")
    return "\n".join(line.rstrip() for line in [*lines, "", OVERRIDES_HELP])
