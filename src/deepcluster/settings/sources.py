"""Reading settings: YAML files, applying overrides to a ``Config``, and refusing what the
other method would silently ignore."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from pathlib import Path
from typing import Any

import yaml

from deepcluster.settings.retired import convert
from deepcluster.settings.schema import FIELDS, METHOD_SECTIONS, Config, ConfigError
from deepcluster.settings.values import coerce, unknown_key_message


def apply_overrides(config: Config, overrides: dict[str, Any]) -> Config:
    """A copy of ``config`` with ``overrides`` coerced and applied (unknown keys rejected,
    retired ones converted: ``retired.convert``)."""
    overrides = convert(overrides)
    unknown = [key for key in overrides if key not in FIELDS]
    if unknown:
        raise ConfigError("; ".join(unknown_key_message(key) for key in unknown))
    return dataclasses.replace(config, **{key: coerce(key, value) for key, value in overrides.items()})


# A settings file is a flat mapping of a few dozen lines; anything far larger is a mistake.
MAX_CONFIG_BYTES = 1 << 20


def _refuse_aliases(text: str, path: Path) -> None:
    """Raise ``ConfigError`` at the first YAML alias (``*name``): nested aliases expand
    exponentially (a 1.5 KB file can stand for gigabytes once printed or walked), and a
    settings file never needs one."""
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            raise ConfigError(f"config file {str(path)!r} uses a YAML alias (*{event.anchor[:40]}) at line "
                              f"{event.start_mark.line + 1}; write each value out instead")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping of settings; a clear ``ConfigError`` for any problem (aliases
    and files over ``MAX_CONFIG_BYTES`` are refused)."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise ConfigError(f"cannot read config file {str(path)!r}: {error.strerror or error}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {str(path)!r} is larger than {MAX_CONFIG_BYTES // 2**20} MiB; a settings "
                          "file is a short mapping of setting: value")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text") from None
    try:
        _refuse_aliases(text, path)
        content = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as error:
        # PyYAML's constructors raise these for values such as the date 2024-13-45.
        raise ConfigError(f"config file {str(path)!r} holds a value YAML cannot read ({error})") from None
    if content is None:
        return {}
    if not isinstance(content, dict) or not all(isinstance(k, str) for k in content):
        raise ConfigError(f"config file {str(path)!r} must be a mapping of setting: value")
    return content


def section_of(key: str) -> str:
    """The section (``SECTIONS``) of setting ``key``."""
    return FIELDS[key].metadata["section"]


def refuse_other_method(config: Config, given: dict[str, Any], overrides: Collection[str] | None) -> None:
    """Refuse a setting of the other method's section (``v1`` in a v2 run and the reverse)
    that ``given`` states explicitly: it would be silently ignored. A config file may hold
    such a key at its default, as the files a run or ``--print-config`` writes hold every
    setting; the command line and ``overrides`` (the settings given there, by name) may not
    hold it at all.

    Raises:
        ConfigError: one line naming the key, its section and the run's method.
    """
    if config.method not in METHOD_SECTIONS:
        return  # ``validate`` names the bad method
    for key, value in given.items():
        section = section_of(key)
        if section not in METHOD_SECTIONS or section == config.method:
            continue
        from_file = key not in (overrides or {})
        if from_file and coerce(key, value) == FIELDS[key].default:
            continue
        where = " of the config file" if from_file else ""
        raise ConfigError(f"setting {key!r} is a {section} setting; this run is {config.method} (method "
                          f"{config.method}): leave it out{where}, or set method: {section}")


__all__ = ["MAX_CONFIG_BYTES", "apply_overrides", "load_yaml", "refuse_other_method", "section_of"]
