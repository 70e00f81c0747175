"""What values each setting takes (read from ``Config``'s annotations), and turning what a
user typed or a YAML file held into them."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass
from typing import Any

from deepcluster.settings.schema import FIELDS, Config, ConfigError


def unknown_key_message(key: str) -> str:
    from deepcluster.settings.retired import RETIRED

    if key in RETIRED:
        return f"setting {key!r} was removed ({RETIRED[key]})"
    close = difflib.get_close_matches(key, FIELDS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown setting {key!r}{hint}"


@dataclass(frozen=True)
class SettingType:
    """What values a setting takes, read from its annotation.

    Attributes:
        kind: ``bool``, ``int``, ``float``, ``str`` or ``tuple`` (a list setting).
        optional: ``None`` is allowed (``none``/``null`` on the command line).
        items: for a list setting, the type of each item (``int`` or ``float``).
        length: for a list setting, the number of items it must have (None: one or more).
    """

    kind: type
    optional: bool = False
    items: type | None = None
    length: int | None = None

    @classmethod
    def of(cls, annotation: Any) -> SettingType:
        """``int | None`` -> ``(int, optional)``; ``tuple[int, ...]`` -> a list of ints of any
        length; ``tuple[float, float, float]`` -> a list of three floats."""
        origin = typing.get_origin(annotation)
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            return dataclasses.replace(cls.of(args[0]), optional=True)
        if origin is tuple:
            args = typing.get_args(annotation)
            if len(args) == 2 and args[1] is Ellipsis:
                return cls(tuple, items=args[0])
            return cls(tuple, items=args[0], length=len(args))
        return cls(annotation)

    def describe(self) -> str:
        """What a value must be, for error messages."""
        if self.kind is tuple:
            count = {None: "one or more", 3: "three"}.get(self.length, str(self.length))
            noun = "integers" if self.items is int else "finite numbers"
            return f"{count} comma-separated {noun}"
        return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}[self.kind]

    def parse(self, value: Any) -> Any:
        """``value`` (from YAML or a command-line string) as this type.

        Raises:
            ValueError, TypeError, OverflowError: it is not one.
        """
        if self.optional and (value is None or (isinstance(value, str) and value.lower() in ("none", "null", ""))):
            return None
        kind = self.kind
        if kind is tuple:
            items = value if isinstance(value, (list, tuple)) else str(value).split(",")
            parsed = tuple(SettingType(self.items).parse(item) for item in items)
            if not parsed or (self.length is not None and len(parsed) != self.length):
                raise ValueError
            return parsed
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in ("true", "yes", "1", "on"):
                return True
            if text in ("false", "no", "0", "off"):
                return False
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            if isinstance(value, str):
                number = float(value)
                if not number.is_integer():
                    raise ValueError
                return int(number)
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not math.isfinite(number):  # nan or inf would poison every later computation
                raise ValueError
            return number
        if kind is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        raise TypeError(f"unsupported setting type {kind!r}")


TYPES = {name: SettingType.of(hint) for name, hint in typing.get_type_hints(Config).items()}


# Folders and files a run reads, stored as absolute paths (the run folder itself is named anew by
# every command that uses it).
FOLDER_SETTINGS = ("data", "val", "init")


def coerce(key: str, value: Any) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to the type of ``key``.

    Raises:
        ConfigError: unknown key or a value of the wrong type.
    """
    if key not in FIELDS:
        raise ConfigError(unknown_key_message(key))
    try:
        parsed = TYPES[key].parse(value)
        if key in FOLDER_SETTINGS and parsed and "\0" not in parsed:
            # Stored absolute: the run reads the same folder from wherever it is resumed or
            # reported, and the folder typed relatively or absolutely is the same setting.
            parsed = os.path.abspath(parsed)
        return parsed
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"setting {key!r} must be {TYPES[key].describe()}, got {short_repr(value)}") from None


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` bounded in size and in the work it takes (nested containers are cut
    after a few items and levels), for error messages."""
    import reprlib

    bounded = reprlib.Repr()
    bounded.maxstring = bounded.maxother = limit
    bounded.maxlist = bounded.maxtuple = bounded.maxdict = bounded.maxset = 4
    bounded.maxlevel = 3
    text = bounded.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


__all__ = ["FOLDER_SETTINGS", "SettingType", "TYPES", "coerce", "short_repr", "unknown_key_message"]
