"""Typed settings from plain mappings: the machinery under `service.config`, knowing nothing of
what a run's settings are. Keyword-only dataclasses (nested for sections) are built from a
nested mapping (TOML) and `--set a.b=value` strings, each value coerced to its field's
declared type; every mistake is a `ConfigError` whose message starts with the dotted name of
the field (`optim.lr: ...`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import typing
from typing import Any, Literal

from service.errors import UsageError


class ConfigError(UsageError, ValueError):
    """A config value is invalid (exit code 2). `field` is the dotted name of the offending field."""

    def __init__(self, field_name: str, message: str):
        self.field = field_name
        self.reason = message
        super().__init__(f"{field_name}: {message}" if field_name else message)

    def under(self, prefix: str) -> ConfigError:
        """The same error with its field name qualified by a section prefix."""
        return ConfigError(f"{prefix}.{self.field}" if self.field else prefix, self.reason)


def require(condition: bool, field_name: str, message: str) -> None:
    if not condition:
        raise ConfigError(field_name, message)


def field_names(cls: type, prefix: str = "") -> list[str]:
    """Every settable dotted field name under `cls`, e.g. `optim.lr`."""
    names = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            names.extend(field_names(kind, path + "."))
        else:
            names.append(path)
    return names


def _unknown_key(root: type, path: str) -> ConfigError:
    candidates = field_names(root)
    close = difflib.get_close_matches(path, candidates, n=1, cutoff=0.5)
    if not close:  # a wrong section name still leaves a useful leaf name
        leaf = path.rsplit(".", 1)[-1]
        close = [c for c in candidates if c.rsplit(".", 1)[-1] == leaf][:1]
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(path, f"unknown config key{hint}")


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _coerce(value: Any, kind: Any, path: str) -> Any:
    """Convert a TOML value or a `--set` string to the field's declared type. A `tuple[str,
    ...]` field takes a TOML list of strings or a comma-separated string."""
    if typing.get_origin(kind) is tuple:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
            raise ConfigError(path, f"expected a list of names (or a comma-separated string), got {value!r}")
        return tuple(value)
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(path, f"{value!r} is not one of {', '.join(map(str, choices))}{hint}")
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(path, f"expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(path, f"expected an integer, got {value!r}")
    if kind is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value.strip())
        if number is None:
            raise ConfigError(path, f"expected a number, got {value!r}")
        if not math.isfinite(number):  # inf and nan pass float() but no rate, length or size is infinite
            raise ConfigError(path, f"expected a finite number, got {value!r}")
        return number
    if kind is str:
        if isinstance(value, str):
            return value
        raise ConfigError(path, f"expected a string, got {value!r}")
    raise AssertionError(f"config field {path} has an unsupported type {kind!r}")


def build(cls: type, mapping: dict[str, Any], prefix: str = "", root: type | None = None) -> Any:
    """An instance of the dataclass `cls` from a nested mapping, values coerced to the fields'
    types; `root` is the outermost class (for hints about unknown keys)."""
    root = root or cls
    if not isinstance(mapping, dict):
        raise ConfigError(prefix.rstrip("."), f"expected a table of settings, got {mapping!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in mapping.items():
        path = f"{prefix}{key}"
        if key not in known:
            raise _unknown_key(root, path)
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            kwargs[key] = build(kind, value, path + ".", root)
        else:
            kwargs[key] = _coerce(value, kind, path)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise err.under(prefix.rstrip(".")) if prefix else err from None


def parse_overrides(root: type, overrides: list[str]) -> dict[str, Any]:
    """Turn `["optim.lr=0.1", "method.sampler=random"]` into a nested mapping of strings, the
    keys checked against the fields of `root`."""
    nested: dict[str, Any] = {}
    leaves = set(field_names(root))
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError("", f"--set expects key=value, got {item!r}")
        if key not in leaves:
            raise _unknown_key(root, key)
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged
