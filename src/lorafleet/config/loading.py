"""From a YAML file and ``--set`` overrides to a validated :class:`ExperimentConfig`.

A file is read strictly (UTF-8, a key given twice is an error), overrides are parsed as
YAML values, and pydantic's first error becomes one :class:`~lorafleet.errors.ConfigError`
line naming the field and what is allowed.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from lorafleet.config.tree import ExperimentConfig
from lorafleet.errors import ConfigError

__all__ = ["apply_overrides", "load_config", "read_config_file", "validate_config"]


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The config section a field holds, looking through ``X | None`` and ``list[X]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType, list):
        for arg in get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def _format_validation_error(err: ValidationError, model: type[BaseModel]) -> ConfigError:
    """Turn pydantic's first error into one line naming the field and what is allowed."""
    first = err.errors()[0]
    loc = [str(x) for x in first["loc"]]
    field = ".".join(loc)
    if first["type"] == "extra_forbidden":
        allowed = _fields_at(model, loc[:-1])
        return ConfigError(field, f"unknown key (allowed: {', '.join(allowed)})")
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "literal_error":
        msg = msg.replace("Input should be", "must be one of")
    if not field:  # a cross-field check: its message names the fields itself
        field, _, msg = msg.partition(": ") if ": " in msg else ("config", "", msg)
    return ConfigError(field, msg)


def _fields_at(model: type[BaseModel], path: list[str]) -> list[str]:
    """The keys allowed at ``path`` (e.g. ``["fleet", "profiles", "0"]``: a device profile's)."""
    cur: type[BaseModel] | None = model
    for name in path:
        if cur is None:
            return []
        if name.isdigit():  # a list index: the items are the section the list holds
            continue
        info = cur.model_fields.get(name)
        cur = None if info is None else _model_in(info.annotation)
    return list(cur.model_fields) if cur is not None else []


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (plain
    YAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if isinstance(key, list | dict):
                continue  # unhashable: the base class reports it
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice in one mapping",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line for a YAML error: where (line, column) and what (PyYAML prints five)."""
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        return f"{where}{err.problem or err.context or 'invalid YAML'}"
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _parse_value(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.constructor.ConstructorError:
        raise
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a raw config dict."""
    out = dict(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "an override must look like key=value, e.g. train.lr=3e-4")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(item, "an override must look like key=value, e.g. train.lr=3e-4")
        try:
            parsed = _parse_value(value)
        except yaml.YAMLError as err:
            raise ConfigError(key.strip(), f"--set value: {_yaml_problem(err)}") from None
        node = out
        for p in parts[:-1]:
            child = node.get(p)
            child = dict(child) if isinstance(child, dict) else {}
            node[p] = child
            node = child
        node[parts[-1]] = parsed
    return out


def validate_config(raw: dict[str, Any]) -> ExperimentConfig:
    """Validate a raw dict into an ExperimentConfig, raising a one-line ConfigError."""
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise _format_validation_error(err, ExperimentConfig) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_config_file(Path(path))
    return validate_config(apply_overrides(raw, overrides or []))


def read_config_file(p: Path) -> dict[str, Any]:
    """The raw mapping of a YAML config file.

    Raises:
        ConfigError: no such file, not UTF-8 text, not YAML (with line and column), a key
            given twice, empty, or not a mapping.
    """
    if p.is_dir():
        raise ConfigError("CONFIG", f"{p} is a directory, not a YAML file")
    if not p.is_file():
        raise ConfigError("CONFIG", f"no such file: {p}")
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError("CONFIG", f"{p} is not UTF-8 text (byte 0x{data[err.start]:02x} at "
                          f"offset {err.start}); save it as UTF-8") from None
    try:
        loaded = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as err:
        raise ConfigError("CONFIG", f"{p} is not valid YAML: {_yaml_problem(err)}") from None
    if loaded is None:
        # An empty file is a mistake more often than a wish for the demo: say so.
        raise ConfigError("CONFIG", f"{p} is empty; give a config (see configs/), or omit "
                          "CONFIG to run the default demo")
    if not isinstance(loaded, dict):
        raise ConfigError("CONFIG", f"{p} must hold a mapping of config sections, not a "
                          f"{type(loaded).__name__}")
    return loaded
