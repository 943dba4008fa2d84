"""Settings from three layers: a TOML file, FEDMQ_* environment variables, command-line flags.

Later layers win: defaults < TOML < environment < flags. A settings class is a frozen
dataclass whose fields are plain scalars; this module reads the layers, converts strings
to each field's type, and lets the dataclass validate the result.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from fedmq.importspec import DataSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

T = TypeVar("T")
ENV_PREFIX = "FEDMQ_"
# Every TOML table and the settings class it configures ("module:Class", imported when a
# config is checked). A TOML file or an environment may serve several roles, so a key at
# the top level or a FEDMQ_* variable is valid when any of these classes has it; a new
# command with settings of its own adds its table here.
SECTIONS: dict[str, str] = {
    "aggregator": "aggregator.settings:AggregatorSettings",
    "agent": "edge_agent.settings:AgentSettings",
    "status": "fedmq.cli:StatusSettings",
    "monitor": "fedmq.cli:StatusSettings",  # fedmq monitor: [status], then [monitor]
}
# FEDMQ_* variables that are not settings of any role (none today)
OTHER_ENV: frozenset[str] = frozenset()


class ConfigError(ValueError):
    """A setting that cannot be read or has the wrong type; the message names its source."""


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML config file; ConfigError with the file name on failure."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from err


def known_settings() -> dict[str, frozenset[str]]:
    """Each TOML table of SECTIONS and the setting names its class takes."""
    known = {}
    for section, where in SECTIONS.items():
        module, _, name = where.partition(":")
        cls = getattr(importlib.import_module(module), name)
        known[section] = frozenset(f.name for f in dataclasses.fields(cls) if f.init)
    return known


def _unknown(what: str, name: str, valid: frozenset[str] | set[str]) -> str:
    """'unknown <what> <name>' with the closest valid name, when one is close."""
    close = difflib.get_close_matches(name, sorted(valid), n=1, cutoff=0.6)
    return f"unknown {what} {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


def check_names(
    doc: Mapping[str, Any], environ: Mapping[str, str], *, source: str,
    known: Mapping[str, frozenset[str]] | None = None,
) -> None:  # fmt: skip
    """ConfigError for a TOML table, a top-level key or a FEDMQ_* variable no role knows."""
    known = known_settings() if known is None else known
    every = frozenset().union(*known.values())
    for key, value in doc.items():
        name = key.replace("-", "_")
        if isinstance(value, dict):
            if key not in known:
                raise ConfigError(f"{source}: unknown table [{key}]{_closest_table(key, known)}")
        elif name not in every:
            raise ConfigError(f"{source}: {_unknown('setting', key, every)} at the top level")
    for var in sorted(environ):
        if var.startswith(ENV_PREFIX) and var not in OTHER_ENV:
            name = var[len(ENV_PREFIX):].lower()
            if name not in every:
                valid = {ENV_PREFIX + n.upper() for n in every}
                raise ConfigError(f"environment: {_unknown('variable', var, valid)}")


def _closest_table(key: str, known: Mapping[str, frozenset[str]]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    if close:
        return f" (did you mean [{close[0]}]?)"
    return f"; tables: {', '.join(f'[{k}]' for k in sorted(known))}"


def _base_type(tp: Any) -> Any:
    """The non-None member of Optional[X] / X | None, else tp itself."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def _convert(value: Any, tp: Any, source: str, base: Path | None = None) -> Any:
    """value as type tp; a relative path from a TOML file is relative to that file (base)."""
    tp = _base_type(tp)
    if value is None:
        return None
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"{value!r} is not a boolean")
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"{value!r} is not an integer")
            return int(value)
        if tp is float:
            return float(value)
        if tp is DataSpec:  # a path in it is relative to the TOML file too
            return DataSpec.at(str(value), base)
        if tp is Path:
            path = Path(value).expanduser()
            return base / path if base is not None and not path.is_absolute() else path
        if tp is str:
            return str(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: {err}") from err
    return value


def load_settings(
    cls: type[T],
    *,
    sections: tuple[str, ...] = (),
    config_file: Path | None = None,
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    check: bool = True,
) -> T:
    """Build cls from defaults, then the TOML file's top level and sections, env, flags;
    with check, a table, key or FEDMQ_* variable that no role knows is a ConfigError."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    values: dict[str, Any] = {}
    env = os.environ if environ is None else environ
    doc = read_toml(Path(config_file)) if config_file is not None else {}
    if check:
        check_names(doc, env, source=str(config_file))
    if config_file is not None:
        layers = [doc] + [doc.get(s, {}) for s in sections]
        for section, layer in zip(("", *sections), layers, strict=True):
            if not isinstance(layer, dict):
                raise ConfigError(f"{config_file}: [{section}] must be a table")
            unknown = sorted(k for k in layer if k.replace("-", "_") not in fields)
            if section and unknown:  # the top level is shared by every role: checked above
                raise ConfigError(f"{config_file}: {_unknown('key', unknown[0], fields)} in "
                                  f"[{section}]")  # fmt: skip
            for key, raw in layer.items():
                name = key.replace("-", "_")
                if name in fields and not isinstance(raw, dict):
                    values[name] = _convert(
                        raw, hints[name], f"{config_file}: {key}", Path(config_file).parent
                    )
    for name in fields:
        var = ENV_PREFIX + name.upper()
        if var in env:
            values[name] = _convert(env[var], hints[name], f"environment {var}")
    for name, raw in (flags or {}).items():
        if name in fields and raw is not None:
            values[name] = _convert(raw, hints[name], f"--{name.replace('_', '-')}")
    try:
        return cls(**values)
    except ValueError as err:
        raise ConfigError(str(err)) from err
