"""Find the object a 'module:attr' or 'path/to/file.py:attr' spec names (tasks, data sources).

The working directory goes on sys.path first, as uvicorn does for 'app:main': a console
script (`fedmq agent`) starts with its own bin directory on sys.path, not the directory it
was run from, so `--task examples.digits_cnn:TASK` would otherwise find no `examples`.
A spec ending in '.py:attr' (or naming an existing .py file) is loaded from that file.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["DataSpec", "is_import_spec", "resolve_spec"]


class DataSpec(str):
    """A setting naming a file, a folder, 'file.py:attr' or 'module:attr' (--data): a path
    in it given in a TOML file is relative to that file, like every Path setting."""

    @classmethod
    def at(cls, value: str, base: Path | None) -> DataSpec:
        """value with its path made relative to base (a module spec stays as it is)."""
        head, sep, attr = value.rpartition(":") if is_import_spec(value) else (value, "", "")
        if not value or base is None or (sep and not _is_file_spec(head)):
            return cls(value)
        path = Path(head).expanduser()
        return cls(f"{path if path.is_absolute() else base / path}{sep}{attr}")


def _is_file_spec(head: str) -> bool:
    return head.endswith(".py") or "/" in head or os.sep in head


def is_import_spec(spec: str) -> bool:
    """Whether spec looks like 'module:attr' or 'file.py:attr' (not a Windows drive path)."""
    head, sep, attr = spec.rpartition(":")
    return bool(sep and head and attr and "/" not in attr and "\\" not in attr
                and not (len(head) == 1 and head.isalpha()))  # fmt: skip


def _load_file(path: Path, what: str, spec: str) -> ModuleType:
    resolved = path.expanduser().resolve()
    if not resolved.is_file():
        raise ValueError(f"{what} {spec!r}: no file {path}")
    # one module per file, under a name no import statement would collide with
    name = "fedmq_user_" + hashlib.sha256(str(resolved).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, resolved)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"{what} {spec!r}: cannot load {path} as Python")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up here
    try:
        module_spec.loader.exec_module(module)
    except ImportError as err:
        del sys.modules[name]
        raise ValueError(f"{what} {spec!r}: {path} failed to import: {err}") from err
    except Exception as err:
        del sys.modules[name]
        raise ValueError(f"{what} {spec!r}: {path} failed: {type(err).__name__}: {err}") from err
    return module


def _import(module_name: str, what: str, spec: str) -> ModuleType:
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{what} {spec!r}: cannot import {module_name!r}: {err}") from err


def resolve_spec(spec: str, *, what: str) -> Any:
    """The object 'module:attr' or 'file.py:attr' names (attr may be dotted); ValueError
    naming `what` (e.g. "task spec") and the spec otherwise."""
    head, _, attr_path = spec.rpartition(":")
    if not head or not attr_path:
        raise ValueError(f"bad {what} {spec!r}: give 'package.module:attr' or 'file.py:attr'")
    if _is_file_spec(head):
        obj: Any = _load_file(Path(head), what, spec)
    else:
        obj = _import(head, what, spec)
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what} {spec!r}: {head!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    return obj
