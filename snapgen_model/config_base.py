"""Typed, frozen configuration dataclasses: validation, dict round trips and `key=value` overrides.

Every component config subclasses `ConfigBase`. Fields are type-checked when a config is built from
a dict or from override strings, and each config validates its own ranges in `__post_init__`, with
messages that name the field and the allowed values (STYLE.md 1).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T", bound="ConfigBase")


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the field and what is allowed."""


def check(condition: bool, field: str, message: str) -> None:
    """Raise `ConfigError` naming `field` unless `condition` holds."""
    if not condition:
        raise ConfigError(f"{field}: {message}")


def check_choice(value: Any, field: str, allowed: typing.Iterable[Any]) -> None:
    """Raise `ConfigError` unless `value` is one of `allowed`, listing the allowed values."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(f"{field}: {value!r} is not allowed; choose one of {list(allowed)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConfigBase:
    """Base of every component config: frozen, keyword-only, with strict dict conversion."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def content_hash(self) -> str:
        """Stable sha256 of the config's canonical JSON (first 16 hex digits)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any], *, prefix: str = "") -> T:
        """Build from a dict, rejecting unknown keys and coercing/validating every field's type."""
        if not isinstance(data, dict):
            raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            where = f"{prefix}." if prefix else ""
            raise ConfigError(
                f"{where}{unknown[0]}: unknown key for {cls.__name__}; allowed keys: {sorted(fields)}"
            )
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for name, value in data.items():
            path = f"{prefix}.{name}" if prefix else name
            kwargs[name] = coerce(value, hints[name], path)
        return cls(**kwargs)

    def with_overrides(self: T, overrides: typing.Iterable[str]) -> T:
        """Apply `dotted.key=value` strings (values parsed as JSON, else as plain strings)."""
        data = self.to_dict()
        for item in overrides:
            key, value = parse_override(item)
            set_dotted(data, key, value)
        return type(self).from_dict(data)


def parse_override(item: str) -> tuple[str, Any]:
    """Split `a.b=value`; the value is JSON when it parses (numbers, lists, true/null), else a string
    (surrounding spaces removed). The project's one override grammar: library configs
    (`with_overrides`) and the pipeline config (`flows.pipeline_config.apply_override`) both use it."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected the form key=value (e.g. unet.ffn_ratio=4)")
    key, raw = (part.strip() for part in item.split("=", 1))
    if not key:
        raise ConfigError(f"override {item!r}: empty key")
    return key, parse_value(raw)


def parse_value(raw: str) -> Any:
    """An override's value: JSON when it parses, else the text itself."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set `data[a][b] = value` for key `a.b`, naming the first unknown component."""
    parts = key.split(".")
    node = data
    for depth, part in enumerate(parts):
        here = ".".join(parts[: depth + 1])
        if not isinstance(node, dict) or part not in node:
            allowed = sorted(node) if isinstance(node, dict) else []
            raise ConfigError(f"{here}: unknown key; allowed keys here: {allowed}")
        if depth == len(parts) - 1:
            node[part] = value
        else:
            node = node[part]


def coerce(value: Any, hint: Any, path: str) -> Any:
    """Check `value` against a type hint, converting lists to tuples and dicts to configs."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{path}: invalid value {value!r}")
    if origin is typing.Literal:
        check_choice(value, path, args)
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}")
        return tuple(coerce(v, a, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if isinstance(hint, type) and issubclass(hint, ConfigBase):
        if isinstance(value, hint):
            return value
        return hint.from_dict(value, prefix=path)
    return coerce_scalar(value, hint, path)


def coerce_scalar(value: Any, hint: Any, path: str) -> Any:
    """Scalars: bool is strict, ints are accepted for floats, nothing else is converted."""
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ConfigError(f"{path}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
