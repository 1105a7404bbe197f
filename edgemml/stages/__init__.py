"""The registry of stage types: one dict from type name to "module:Class", imported lazily.

Lazy because `edgemml --help`, `edgemml check` and config errors must not pay for importing torch,
onnxruntime and openvino. Plugins (a pipeline's `plugins:` list, or the `edgemml.stages` entry point
group) add types with `register()`; the runner never needs to change when a type is added.
"""

from __future__ import annotations

import importlib
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from edgemml.errors import ConfigError

if TYPE_CHECKING:
    from edgemml.stages.base import Stage


def _builtin_types() -> dict[str, str]:
    """Built-in stage types, found by file name without importing anything: each module
    `edgemml/stages/<type>.py` (other than base and helper modules starting with `_`) defines
    `STAGE`, its Stage class. Adding a stage is adding a file."""
    here = Path(__file__).parent
    order = ["migrate", "finetune", "rewrite", "prune", "quantize", "export", "validate"]
    found = sorted((p.stem for p in here.glob("*.py")
                    if not p.stem.startswith("_") and p.stem not in _NOT_STAGES),
                   key=lambda n: (order.index(n) if n in order else len(order), n))
    return {name: f"edgemml.stages.{name}:STAGE" for name in found}


_NOT_STAGES = {"base", "common"}
_BUILTIN: dict[str, str] = _builtin_types()

_registry: dict[str, str | type[Stage]] = dict(_BUILTIN)
_entry_points_loaded = False


def register(stage_cls: type[Stage]) -> type[Stage]:
    """Register a stage class under its `type` (usable as a decorator in plugin modules)."""
    existing = _registry.get(stage_cls.type)
    if existing is not None and existing is not stage_cls and not isinstance(existing, str):
        if f"{existing.__module__}.{existing.__qualname__}" != (
            f"{stage_cls.__module__}.{stage_cls.__qualname__}"
        ):
            raise ConfigError(f"stage type {stage_cls.type!r} is registered twice "
                              f"({existing.__module__} and {stage_cls.__module__})")
    _registry[stage_cls.type] = stage_cls
    return stage_cls


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in metadata.entry_points(group="edgemml.stages"):
        _registry.setdefault(ep.name, ep.value)


def names() -> list[str]:
    """Known stage type names, built-ins first."""
    _load_entry_points()
    return list(_registry)


def get(type_name: str) -> type[Stage]:
    """The stage class of a type; imports its module on first use. KeyError when unknown."""
    _load_entry_points()
    entry = _registry[type_name]
    if isinstance(entry, str):
        module_name, _, attr = entry.partition(":")
        cls = getattr(importlib.import_module(module_name), attr)
        _registry[type_name] = cls
        return cls
    return entry


def import_plugin(module: str, *, file: str | None = None, line: int | None = None) -> None:
    """Import a user-named module that registers stage types (explicit opt-in to user code)."""
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"cannot import plugin module {module!r}: {exc}", file=file, line=line,
                          key="plugins",
                          hint="install the module or put its folder on PYTHONPATH") from None
