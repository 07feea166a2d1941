"""Strict conversion of plain YAML data into frozen dataclasses.

``from_dict(Cls, data, where)`` rejects unknown keys, wrong types and missing fields with a
``ConfigError`` naming the file, the key path and what was expected. Defaults live on the
dataclass fields (one place), each with a one-line why in a comment.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from cropbench.errors import ConfigError

T = TypeVar("T")


def _fail(where: str, path: str, msg: str) -> ConfigError:
    loc = f"{where}: " if where else ""
    return ConfigError(f"{loc}{path or '<root>'}: {msg}")


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def convert(tp: Any, value: Any, where: str, path: str) -> Any:
    """Convert ``value`` to type ``tp`` or raise ConfigError at ``path``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return convert(a, value, where, path)
            except ConfigError as e:
                errors.append(str(e))
        raise _fail(where, path, f"expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise _fail(where, path, f"expected one of {list(get_args(tp))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where, path)
    if origin in (tuple,):
        args = get_args(tp)
        if not isinstance(value, list | tuple):
            raise _fail(where, path, f"expected a list, got {type(value).__name__} {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(convert(args[0], v, where, f"{path}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise _fail(where, path, f"expected a list of {len(args)} items, got {len(value)}")
        return tuple(convert(a, v, where, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if origin in (list,):
        (a,) = get_args(tp)
        if not isinstance(value, list | tuple):
            raise _fail(where, path, f"expected a list, got {type(value).__name__} {value!r}")
        return [convert(a, v, where, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin in (dict,):
        ka, va = get_args(tp)
        if not isinstance(value, dict):
            raise _fail(where, path, f"expected a mapping, got {type(value).__name__} {value!r}")
        return {convert(ka, k, where, path): convert(va, v, where, f"{path}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _fail(where, path, f"expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(where, path, f"expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise _fail(where, path, f"expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _fail(where, path, f"expected {_type_name(tp)}, got {value!r}")


def from_dict(cls: type[T], data: Any, where: str = "", path: str = "") -> T:
    """Build dataclass ``cls`` from ``data`` strictly (unknown keys and missing fields are errors)."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise _fail(where, path, f"expected a mapping for {cls.__name__}, got {type(data).__name__} {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        p = f"{path}." if path else ""
        raise _fail(where, f"{p}{unknown[0]}", f"unknown key; valid keys of {cls.__name__}: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        sub = f"{path}.{name}" if path else name
        if name in data:
            kwargs[name] = convert(hints[name], data[name], where, sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _fail(where, sub, f"missing required field ({_type_name(hints[name])})")
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Plain-data view of a (nested) dataclass, for records and hashing."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def deep_merge(base: dict, override: dict) -> dict:
    """Recursively merge ``override`` onto ``base`` (mappings merge, everything else replaces)."""
    out = dict(base)
    for k, v in (override or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


__all__ = ["from_dict", "to_dict", "deep_merge", "convert", "check_kwargs", "typing"]


def check_kwargs(fn: Callable[..., Any], kwargs: Mapping[str, Any], what: str, skip: int = 0) -> None:
    """Reject a keyword ``fn`` does not declare (a typo in ``backbone_args`` or a dataset argument):
    a ``ConfigError`` naming ``what``, the key and the valid keys. ``skip``: leading positional
    parameters that are not settings (a dataset builder's ``folder, split``)."""
    params = list(inspect.signature(fn).parameters.values())[skip:]
    valid = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        listed = ", ".join(valid) or "(none)"
        raise ConfigError(f"{what}: unknown argument {unknown[0]!r}; valid arguments: {listed}")
