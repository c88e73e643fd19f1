"""Loading configs: YAML files with `_base_` inheritance, `key=value` overrides, and conversion
to and from the plain dicts stored in checkpoints. Every key is checked against the schema: an
unknown key or a value of the wrong type is an error that names the key and the file (or
override) it came from."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
import warnings
from pathlib import Path
from typing import Any

import yaml

from .schema import Config
from .validation import ConfigError, validate


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML file merged over its `_base_` files (paths relative to the file)."""
    path = path.resolve()
    if path in chain:
        raise ConfigError(f"{path}: _base_ inheritance forms a cycle")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of keys, got {type(data).__name__}"
        )
    data = _moved_to_current_keys(data, str(path), warn=True)
    bases = data.pop("_base_", [])
    bases = [bases] if isinstance(bases, str) else bases
    merged: dict[str, Any] = {}
    for base in bases:
        merged = _deep_merge(merged, _read_yaml(path.parent / base, chain + (path,)))
    return _deep_merge(merged, _tag_source(data, str(path)))


class _Sourced(dict):
    """A mapping that remembers where each of its keys came from (a file or an override), for
    error messages: after merging, one section can hold keys from several."""

    def __init__(self, data: Any = (), key_sources: dict[str, str] | None = None) -> None:
        super().__init__(data)
        self.key_sources = key_sources or {}


def _tag_source(data: dict, source: str) -> dict:
    tagged = {k: _tag_source(v, source) if isinstance(v, dict) else v for k, v in data.items()}
    return _Sourced(tagged, dict.fromkeys(data, source))


def _deep_merge(base: dict, override: dict) -> dict:
    merged = _Sourced(base, {k: _key_source(base, k) for k in base})
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
        merged.key_sources[key] = _key_source(override, key)
    return merged


def _key_source(data: dict, key: str) -> str:
    """Where `key` of `data` came from ("" for a mapping given as an override's value)."""
    return data.key_sources.get(key, "") if isinstance(data, _Sourced) else ""


# Keys that moved between sections. Configs and checkpoints written before the move (and
# overrides in the old spelling) are read with their values moved, with a warning for files and
# overrides; a value given under the new name wins.
MOVED_KEYS = {"train.amp": "precision.amp", "train.channels_last": "precision.channels_last"}


def _moved_to_current_keys(data: dict[str, Any], source: str, warn: bool) -> dict[str, Any]:
    """A plain config dict (one file's, or a checkpoint's) with `MOVED_KEYS` moved to where
    they live now; a value given under the new name wins."""
    for old, new in MOVED_KEYS.items():
        (old_section, old_key), (new_section, new_key) = old.split("."), new.split(".")
        section = data.get(old_section)
        if not (isinstance(section, dict) and old_key in section):
            continue
        if warn:
            warnings.warn(f"config key '{old}' ({source}) is now '{new}'", stacklevel=4)
        data = copy.deepcopy(data)
        value = data[old_section].pop(old_key)
        target = data.setdefault(new_section, {})
        if isinstance(target, dict):
            target.setdefault(new_key, value)
    return data


def _unknown_key(key: str, prefix: str, known: list[str], source: str) -> ConfigError:
    full = f"{prefix}{key}"
    close = difflib.get_close_matches(key, known, n=1)
    hint = (
        f" (did you mean '{prefix}{close[0]}'?)" if close else f"; known keys: {', '.join(known)}"
    )
    where = f" in {source}" if source else ""
    return ConfigError(f"unknown config key '{full}'{where}{hint}")


def _coerce(value: Any, annotation: Any, key: str, source: str) -> Any:
    """Check (and gently convert) `value` against a field's type annotation."""
    where = f" ({source})" if source else ""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        # An empty value is "none" too: `key=` on the command line, and older configs and
        # checkpoints, which wrote "" for none.
        if (value is None or value == "") and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key, source)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        if value in choices:
            return value
        raise ConfigError(
            f"config key '{key}'{where} must be one of {list(choices)}, got {value!r}"
        )
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        items = value if isinstance(value, (list, tuple)) else [value]
        return [_coerce(v, item_type, f"{key}[{i}]", source) for i, v in enumerate(items)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads 1e-4 (no dot) as a string; users type it all the time.
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, str):
            return value
        if value is None:
            return ""
    else:
        raise ConfigError(f"config key '{key}' has an unsupported type {annotation}")
    type_name = getattr(annotation, "__name__", str(annotation))
    raise ConfigError(f"config key '{key}'{where} must be {type_name}, got {value!r}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.')}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        source = _key_source(data, key)
        if key not in fields:
            raise _unknown_key(str(key), prefix, sorted(fields), source)
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            kwargs[key] = _build(annotation, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, annotation, f"{prefix}{key}", source)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.base_lr=0.02' -> (['train', 'base_lr'], 0.02); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(
            f"override {text!r} is not of the form key=value (e.g. train.max_iter=1000)"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: cannot parse the value: {err}") from err
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set each `key=value` of `overrides` in the nested mapping `data` (in place), remembering
    the override as the source of the key for error messages."""
    for text in overrides:
        path, value = parse_override(text)
        source = f"command-line override {text!r}"
        if ".".join(path) in MOVED_KEYS:
            new = MOVED_KEYS[".".join(path)]
            warnings.warn(f"config key '{'.'.join(path)}' ({source}) is now '{new}'", stacklevel=2)
            path = new.split(".")
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = _tag_source({}, source)
                node[part] = child
                _set_key_source(node, part, source)
            node = child
        node[path[-1]] = value
        _set_key_source(node, path[-1], source)
    return data


def _set_key_source(node: dict, key: str, source: str) -> None:
    if isinstance(node, _Sourced):
        node.key_sources[key] = source


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """The config of a YAML file (or the defaults when `path` is None) with overrides applied."""
    data = _read_yaml(Path(path)) if path else _Sourced()
    data = apply_overrides(data, list(overrides or []))
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


def config_from_dict(
    data: dict, source: str = "checkpoint", overrides: list[str] | None = None
) -> Config:
    """Rebuild a Config from `config_to_dict` output (e.g. the copy stored in a checkpoint,
    named by `source` in error messages), with overrides applied."""
    data = _tag_source(_moved_to_current_keys(data, source, warn=False), source)
    cfg = _build(Config, apply_overrides(data, list(overrides or [])))
    validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The config as nested plain dicts (stored in checkpoints)."""
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg: Config) -> str:
    """The config as YAML text that `load_config` reads back (written to config.yaml)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
