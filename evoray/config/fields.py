"""The machinery under the config sections: typed fields with help strings, value coercion and
the checks every section runs in ``__post_init__``."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import field
from typing import Any, ClassVar, Literal

from evoray.errors import ConfigError, did_you_mean

__all__ = ["config_from_dict", "unknown_key"]  # and, for the sections, _f and _Stage


def _f(default: Any, help: str) -> Any:
    """A dataclass field with its documentation in ``metadata["help"]`` (shown by the CLI)."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Return ``value`` checked against annotation ``tp`` (ints and numeric strings to float)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _coerce(value, arg, name)
            except ConfigError:
                continue
    elif origin is Literal:
        if value in args:
            return value
        hint = did_you_mean(str(value), map(str, args))
        raise ConfigError(f"{name}: {value!r} is not valid{hint}")
    elif origin is list:
        if isinstance(value, list):
            return [_coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            return dict(value)
    elif tp is type(None):
        if value is None:
            return None
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return config_from_dict(tp, value, prefix=f"{name}.")
    elif isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{name}: wrong type {type(value).__name__} ({value!r}); expected "
                      f"{_type_name(tp)}")


class _Stage:
    """Mixin: type-check every field, then run the stage's own range checks (``_check``)."""

    section: ClassVar[str] = ""

    def _name(self, field_name: str) -> str:
        return f"{self.section}.{field_name}" if self.section else field_name

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(getattr(self, f.name), hints[f.name], self._name(f.name)))
        self._check()

    def _check(self) -> None:
        """Range checks; overridden by stages."""

    def _require(self, ok: bool, field_name: str, what: str) -> None:
        if not ok:
            raise ConfigError(f"{self._name(field_name)}: {getattr(self, field_name)!r} is out "
                              f"of range; {what}")


def config_from_dict(cls: type, data: dict, *, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict; unknown keys name the closest valid one."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got "
                          f"{type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(unknown_key(cls, str(key), names, prefix))
    return cls(**data)


def unknown_key(cls: type, key: str, names, prefix: str = "") -> str:
    """The error for a key ``cls`` does not have: where a removed key's settings went (the
    class's ``moved``), else the closest valid name."""
    head = key.split(".")[0]
    moved = getattr(cls, "moved", {})
    if head in moved:
        return f"'{prefix}{head}' is gone: {moved[head]}"
    close = did_you_mean(head, names).replace("'", f"'{prefix}", 1)
    return f"unknown key '{prefix}{key}'{close}"
