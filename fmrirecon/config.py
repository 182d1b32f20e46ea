"""Typed experiment configs: dataclasses filled from YAML override files and dotted ``key=value`` overrides.

A method's ``Config`` dataclass holds the paper's defaults; a YAML file under ``configs/<method>/`` and
command-line overrides change only what they name (STYLE.md §3, nanoGPT's configurator). Every key is checked
against the dataclass: an unknown key or a value of the wrong type raises
:class:`~fmrirecon.errors.ConfigError` naming the key, the expected type and the value got. The fully resolved
config is a plain dict (:func:`config_to_dict`) written as
``RUN/config.json`` and into every checkpoint.

Example::

    @dataclass
    class Config:
        lr: float = 1e-4
        train: TrainConfig = field(default_factory=TrainConfig)

    cfg = load_config(Config, "configs/mymethod/world.yaml", ["lr=3e-4", "train.epochs=2"])
"""

from __future__ import annotations

import dataclasses
import os
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from fmrirecon.errors import ConfigError

T = TypeVar("T")

__all__ = [
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "diff_configs",
    "load_config",
    "parse_overrides",
    "read_yaml",
    "type_name",
]


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        args = ", ".join("..." if a is Ellipsis else _type_name(a) for a in get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


type_name = _type_name  # public: how an annotation reads in an error message ("float | None")


def _wrong(key: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in canonical form (tuples, nested
    dataclasses)."""
    if tp is Any:
        return value
    origin = get_origin(tp)
    if origin is Literal:
        if value in get_args(tp) and type(value) in {type(a) for a in get_args(tp)}:
            return value
        raise _wrong(key, tp, value)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _wrong(key, tp, value)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, arg, value)
            except ConfigError:
                continue
        raise _wrong(key, tp, value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise _wrong(key, tp, value)
        return config_from_dict(tp, value, prefix=f"{key}.")
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, list | tuple):
            raise _wrong(key, tp, value)
        args = get_args(tp)
        if origin is tuple and args and (len(args) != 2 or args[1] is not Ellipsis):
            if len(args) != len(value):
                raise ConfigError(
                    f"config key '{key}' expects {len(args)} values ({_type_name(tp)}), "
                    f"got {len(value)}: {value!r}"
                )
            items = [_coerce(f"{key}[{i}]", a, v) for i, (a, v) in enumerate(zip(args, value))]
        else:
            item_tp = args[0] if args else Any
            items = [_coerce(f"{key}[{i}]", item_tp, v) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else list(items)
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise _wrong(key, tp, value)
        args = get_args(tp) or (str, Any)
        return {_coerce(key, args[0], k): _coerce(f"{key}.{k}", args[1], v) for k, v in value.items()}
    if tp is float:
        # YAML reads "1e-4" as a string and "3" as an int; both are meant as floats.
        if isinstance(value, bool):
            raise _wrong(key, tp, value)
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise _wrong(key, tp, value) from None
        raise _wrong(key, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value)
        raise _wrong(key, tp, value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _wrong(key, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _wrong(key, tp, value)
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _wrong(key, tp, value)
    raise ConfigError(f"config key '{key}' has an unsupported annotation {tp!r}")


def _fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls) if f.init}


def config_from_dict(cls: type[T], data: Mapping[str, Any], *, prefix: str = "") -> T:
    """Build ``cls`` (a dataclass) from a nested dict; missing keys keep their defaults.

    Raises:
        ConfigError: on an unknown key (the message lists the known ones) or a value of the wrong type.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}"
        )
    fields = _fields(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key '{prefix}{key}' for {cls.__name__}; known keys: {known}")
        kwargs[key] = _coerce(f"{prefix}{key}", fields[key][1], value)
    try:
        cfg = cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"invalid {cls.__name__} config{' at ' + prefix.rstrip('.') if prefix else ''}: {err}"
        ) from err
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict of a dataclass config (tuples become lists, so the result is JSON/YAML-able)."""

    def convert(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, list | tuple):
            return [convert(v) for v in value]
        if isinstance(value, Mapping):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        return value

    if not dataclasses.is_dataclass(cfg):
        raise TypeError(f"{cfg!r} is not a dataclass instance")
    return convert(cfg)


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["a.b=3", "c=[1, 2]"]`` → ``{"a": {"b": 3}, "c": [1, 2]}``; values are parsed as YAML."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"config override must look like key=value (dotted keys allowed), got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"config override {item!r}: value is not valid YAML ({err})") from err
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"config override {item!r} conflicts with an earlier override of '{part}'")
            node = child
        node[parts[-1]] = value
    return nested


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def apply_overrides(cfg: T, overrides: Mapping[str, Any] | Sequence[str]) -> T:
    """Return a copy of the dataclass ``cfg`` with nested-dict or dotted ``key=value`` overrides applied."""
    if not isinstance(overrides, Mapping):
        overrides = parse_overrides(overrides)
    return config_from_dict(type(cfg), _merge(config_to_dict(cfg), overrides))


BASE_KEY = "base"


def read_yaml(path: str | os.PathLike, *, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config file (a mapping at top level; an empty file is an empty mapping).

    A top-level ``base: other.yaml`` (relative to this file) is read first and this file's keys are merged
    over it, nested sections key by key, so a profile file states only what differs from its base.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file {path} does not exist (expected a YAML file, e.g. configs/<method>/*.yaml)"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of keys to values, got {type(data).__name__}"
        )
    if BASE_KEY in data:
        base_name = data.pop(BASE_KEY)
        if not isinstance(base_name, str):
            raise ConfigError(f"config file {path}: '{BASE_KEY}' must name a YAML file, got {base_name!r}")
        base_path = (path.parent / base_name).resolve()
        if base_path in _seen or base_path == path.resolve():
            raise ConfigError(f"config file {path}: its '{BASE_KEY}' chain loops back to {base_path}")
        data = _merge(read_yaml(base_path, _seen=(*_seen, path.resolve())), data)
    return data


def load_config(
    cls: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] | Mapping[str, Any] = ()
) -> T:
    """Defaults of ``cls`` ← YAML file ``path`` (if given) ← dotted overrides; validated at every level."""
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    if not isinstance(overrides, Mapping):
        overrides = parse_overrides(overrides)
    return config_from_dict(cls, _merge(data, overrides))


def diff_configs(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved config dicts (for 'resumed with another
    config')."""
    keys = sorted(set(old) | set(new))
    out = []
    for key in keys:
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out.extend(diff_configs(a, b, f"{prefix}{key}."))
        elif _normalise(a) != _normalise(b):
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def _normalise(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [_normalise(v) for v in value]
    return value
