"""Strict `--name=value` overrides for the constants at the top of each script.

A script lists its constants as plain module-level names with defaults; `resolve_config` turns them into
a dict, applies the command-line overrides and rejects anything it does not know or cannot convert.
"""
import sys

SCALAR_TYPES = (bool, int, float, str)
TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")


class ConfigError(ValueError):
    """A command-line override that names no constant or has a value of the wrong type."""


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


def apply_overrides(defaults: dict, argv: list[str]) -> dict:
    """A copy of `defaults` with each `--name=value` of argv applied."""
    config = dict(defaults)
    for argument in argv:
        name, equals, text = argument.removeprefix("--").partition("=")
        if not argument.startswith("--") or not equals:
            raise ConfigError(f"{argument!r}: overrides are written --name=value.")
        name = name.replace("-", "_")
        if name not in defaults:
            raise ConfigError(f"--{name}: unknown setting. Valid names: {', '.join(defaults)}.")
        config[name] = convert(name, text, defaults[name])
    return config


def resolve_config(namespace: dict, argv: list[str] | None = None) -> dict:
    """The script's constants with the command line's overrides; exits with the message on a bad override."""
    try:
        return apply_overrides(constants(namespace), sys.argv[1:] if argv is None else argv)
    except ConfigError as error:
        sys.exit(f"error: {error}")


def format_config(config: dict) -> str:
    width = max(map(len, config))
    return "\n".join(f"  {name:<{width}} = {value!r}" for name, value in config.items())
