"""Typed command lines for every entry point: preset < --config FILE < field overrides.

The command line is generated from a dataclass by tyro. Two options are read before tyro sees the
arguments, because they choose the *defaults* tyro shows and fills in:

  --preset NAME   a named preset from the dict that lives next to the dataclass
  --config FILE   a JSON (or YAML) file with some or all fields, merged over the preset

Every remaining ``--field value`` overrides both. ``save_config`` writes the fully resolved
config as JSON so a run can be reproduced with ``--config run_dir/config.json``.

This lives in ``ldm`` (not ``launch``) because ``ldm-generate`` is an entry point too and nothing
may import ``launch``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from foundation import write_json_atomic

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or preset that does not fit the dataclass it is meant for."""


def _pop_option(args: list[str], name: str) -> str | None:
    """Remove ``--name VALUE`` or ``--name=VALUE`` from ``args`` and return VALUE (last wins)."""
    value = None
    out: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a == name:
            if i + 1 >= len(args):
                raise ConfigError(f"{name} needs a value")
            value = args[i + 1]
            i += 2
            continue
        if a.startswith(name + "="):
            value = a.split("=", 1)[1]
            i += 1
            continue
        out.append(a)
        i += 1
    args[:] = out
    return value


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:  # pragma: no cover - pyyaml ships with datasets/transformers
            raise ConfigError("reading a YAML config needs pyyaml: pip install pyyaml") from e
        data = yaml.safe_load(text) or {}
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--config {path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of field names to values")
    return data


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Turn a JSON value into the field's declared type (nested dataclasses, tuples, paths)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return merge_into(tp(), value, where) if _has_defaults(tp) else from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except (TypeError, ValueError, ConfigError):
                continue
        raise ConfigError(f"{where}: {value!r} fits none of {tp}")
    if origin is tuple and isinstance(value, list):
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, where) for v in value)
        return tuple(_coerce(a, v, where) for a, v in zip(args, value))
    if origin is list and isinstance(value, list):
        (arg,) = typing.get_args(tp) or (Any,)
        return [_coerce(arg, v, where) for v in value]
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{where}: expected a path, got {value!r}")
        return Path(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, bool) and (not isinstance(value, tp) or (tp is not bool and isinstance(value, bool))):
        # A value of another type would pass through to the loop ("10" steps, true as a learning rate).
        # (str fields are left to their config: DataConfig.sources turns {...} entries into strings.)
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    if dataclasses.is_dataclass(tp) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
    return value


def _has_defaults(cls: type) -> bool:
    return all(
        f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        for f in dataclasses.fields(cls)
    )


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build ``cls`` from a dict, refusing unknown keys (a typo must not be silently ignored)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown} for {cls.__name__}; known: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def merge_into(base: T, data: dict[str, Any], where: str = "config") -> T:
    """Return a copy of dataclass ``base`` with ``data`` merged over it (nested dicts merge too)."""
    cls = type(base)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown} for {cls.__name__}; known: {sorted(names)}")
    changes = {}
    for k, v in data.items():
        current = getattr(base, k)
        if dataclasses.is_dataclass(current) and isinstance(v, dict):
            changes[k] = merge_into(current, v, f"{where}.{k}")
        elif dataclasses.is_dataclass(current):
            raise ConfigError(f"{where}.{k}: expected a mapping of {type(current).__name__} fields, got {v!r}")
        else:
            changes[k] = _coerce(hints[k], v, f"{where}.{k}")
    return dataclasses.replace(base, **changes)


def to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-ready dict of a dataclass (paths become strings, tuples lists)."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {str(k): conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    write_json_atomic(path, to_dict(cfg))


def _expand_data_shorthand(cls: type, args: list[str]) -> None:
    """``--data SPEC`` means ``--data.source SPEC`` for configs with a ``data`` section (every entry point);
    ``--data A --data B`` means ``--data.sources A B`` (never silently only B)."""
    field = next((f for f in dataclasses.fields(cls) if f.name == "data"), None)
    if field is None or not dataclasses.is_dataclass(typing.get_type_hints(cls)["data"]):
        return
    from data.mix import expand_data_flags  # here, so that ldm-generate never loads the data layer

    args[:] = expand_data_flags(args)


def parse_config(
    cls: type[T],
    presets: dict[str, T] | None = None,
    args: list[str] | None = None,
    default_preset: str | None = None,
    description: str | None = None,
) -> T:
    """Parse ``args`` (default ``sys.argv[1:]``) into ``cls``: preset, then --config, then overrides."""
    args = list(sys.argv[1:] if args is None else args)
    preset_name = _pop_option(args, "--preset") or default_preset
    config_path = _pop_option(args, "--config")
    _expand_data_shorthand(cls, args)
    if presets and preset_name is not None:
        if preset_name not in presets:
            raise ConfigError(f"unknown preset {preset_name!r}; choose one of {sorted(presets)}")
        default = presets[preset_name]
    else:
        default = cls()
    if config_path:
        try:
            default = merge_into(default, load_config_file(config_path), where=str(config_path))
        except ConfigError:
            raise
        except (TypeError, ValueError) as e:  # a field's __post_init__ refused a value from the file
            raise ConfigError(f"--config {config_path}: {e}") from e

    import tyro

    doc = description or (cls.__doc__ or "")
    if presets:
        doc += f"\n\n--preset NAME chooses the defaults: {', '.join(presets)}"
        if default_preset:
            doc += f" (default {default_preset})"
        doc += ". --config FILE (JSON/YAML) is merged over the preset; --field flags override both."
    return tyro.cli(cls, default=default, args=args, description=doc)
