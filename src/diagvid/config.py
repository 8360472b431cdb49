"""Recipe files (TOML under configs/) loaded into typed dataclasses, rejecting unknown keys and wrong types.

A recipe may name a `base` recipe (a path relative to itself) and change some fields; nested dataclass
fields are tables. Command-line overrides use dotted keys: `--set train.lr=3e-4`.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def read_recipe(path: str | Path) -> dict[str, Any]:
    """A recipe file as a dict, with its `base` chain merged in (base first)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no recipe file at {path}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"recipe {path} is not valid TOML: {err}") from err
    base = data.pop("base", None)
    if base is not None:
        data = _merge(read_recipe(path.parent / base), data)
    return data


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except (TypeError, ValueError) as err:
                errors.append(str(err))
        raise TypeError(f"{where}={value!r} matches none of {tp}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise TypeError(f"{where} must be a table, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin in (tuple,):
        if not isinstance(value, list | tuple):
            raise TypeError(f"{where}={value!r} must be a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise TypeError(f"{where}={value!r} must have {len(args)} entries")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin in (list,):
        if not isinstance(value, list | tuple):
            raise TypeError(f"{where}={value!r} must be a list")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin in (dict,):
        if not isinstance(value, dict):
            raise TypeError(f"{where} must be a table")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{where}={value!r} must be a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{where}={value!r} must be an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{where}={value!r} must be true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise TypeError(f"{where}={value!r} must be a string")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a dict: unknown keys and wrong types raise, naming the key."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - fields)
    prefix = f"{where}." if where else ""
    if unknown:
        raise ValueError(f"unknown config keys {[prefix + k for k in unknown]}; allowed: {sorted(fields)}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as plain JSON/TOML-friendly data."""
    return dataclasses.asdict(obj)


def parse_override(text: str) -> tuple[list[str], Any]:
    """ "train.lr=3e-4" -> (["train", "lr"], 0.0003), the value read as a TOML value (strings may be bare)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {text!r} must look like key.sub=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted `key=value` overrides to a recipe dict (types are checked later by `from_dict`)."""
    data = _merge({}, data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {text!r}: {part!r} is not a table")
        node[path[-1]] = value
    return data


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Recipe file (or defaults when None) + overrides -> a validated `cls`."""
    data = read_recipe(path) if path is not None else {}
    return from_dict(cls, apply_overrides(data, overrides or []))
