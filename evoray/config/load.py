"""Configs to and from nested dicts and YAML, and ``section.key=value`` overrides."""

from __future__ import annotations

import dataclasses
from typing import Any

import yaml

from evoray.config.fields import config_from_dict, unknown_key
from evoray.config.sections import Config
from evoray.errors import ConfigError

__all__ = ["load_config", "parse_overrides", "apply_override", "config_from_dict",
           "config_to_dict", "dump_config"]


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """``["select.ratio=0.05"]`` → ``[("select.ratio", 0.05)]`` (values parsed as YAML)."""
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key=value, e.g. select.ratio=0.05")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        out.append((key.strip(), value))
    return out


def apply_override(cfg: Any, key: str, value: Any, *, prefix: str = "") -> Any:
    """Return a copy of ``cfg`` with the dotted ``key`` set to ``value``, re-validated."""
    head, _, rest = key.partition(".")
    names = {f.name for f in dataclasses.fields(cfg)}
    if head not in names:
        raise ConfigError(unknown_key(type(cfg), key, names, prefix))
    current = getattr(cfg, head)
    if rest:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"'{prefix}{head}' has no sub-keys; cannot set '{prefix}{key}'")
        value = apply_override(current, rest, value, prefix=f"{prefix}{head}.")
    elif dataclasses.is_dataclass(current) and isinstance(value, dict):
        value = config_from_dict(type(current), {**config_to_dict(current), **value},
                                 prefix=f"{prefix}{head}.")
    return dataclasses.replace(cfg, **{head: value})


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Load a :class:`Config` from YAML (``None``: defaults), then apply ``key=value`` overrides.

    Raises:
        ConfigError: naming the file (and YAML line) or the override at fault.
    """
    data: dict = {}
    if path is not None:
        from evoray.storage import read_bytes

        text = read_bytes(path).decode("utf-8", errors="replace")
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    try:
        cfg = config_from_dict(Config, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
    for key, value in parse_overrides(overrides or []):
        try:
            cfg = apply_override(cfg, key, value)
        except ConfigError as e:
            raise ConfigError(f"override {key}={value!r}: {e}") from None
    return cfg
