"""The pipeline file as YAML: parsed with a line number for every value (so every error names its
line), `--set KEY=VALUE` overrides applied with their origin, and the context that turns a pydantic
error into one line naming the file, the line and a fix. The schema it is checked against is in
config.py; pipeline/loader.py puts the two together.
"""

from __future__ import annotations

import copy
import difflib
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ValidationError,
)

from edgemml.errors import ConfigError
from edgemml.yamlsafe import YamlLimit, compose



_SHARED_MERGE_KEYS = ("data", "preprocess")

def _node_lines(node: yaml.Node, prefix: tuple[Any, ...], out: dict[tuple[Any, ...], int],
                seen: set[int] | None = None) -> None:
    """Map every key path in a composed YAML tree to its 1-based line number. A node reached again
    through an alias is not walked again (its paths fall back to the alias's own line)."""
    seen = set() if seen is None else seen
    out.setdefault(prefix, node.start_mark.line + 1)
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            path = prefix + (key,)
            out[path] = key_node.start_mark.line + 1
            _node_lines(value_node, path, out, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            path = prefix + (i,)
            out[path] = item.start_mark.line + 1
            _node_lines(item, path, out, seen)


def parse_yaml(text: str, file: str) -> tuple[Any, dict[tuple[Any, ...], int]]:
    """safe_load the text and return it with a path -> line map. Syntax errors name the line."""
    try:
        data, node = compose(text)
    except YamlLimit as exc:
        mark = exc.problem_mark
        raise ConfigError(f"refused: {exc.problem}", file=file,
                          line=mark.line + 1 if mark is not None else None,
                          hint="pipeline files are limited in size, nesting and alias expansion; "
                               "write the values out plainly") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(f"invalid YAML: {exc.problem}", file=file, line=line,
                          hint="check indentation and quoting near that line") from None
    except yaml.YAMLError as exc:  # ReaderError: a NUL or other control character (a binary file)
        position = getattr(exc, "position", None)
        line = text.count("\n", 0, position) + 1 if isinstance(position, int) else None
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"not a YAML text file: {reason}", file=file, line=line,
                          hint="give a pipeline.yaml (plain UTF-8 text)") from None
    lines: dict[tuple[Any, ...], int] = {}
    if node is not None:
        _node_lines(node, (), lines)
    return data, lines


def parse_override(text: str) -> tuple[list[str], Any]:
    """`stages.prune.ratio=0.4` -> (['stages', 'prune', 'ratio'], 0.4); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. stages.prune.target_macs=0.4")
    key, value = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        parsed = compose(value)[0] if value.strip() else None
    except YamlLimit as exc:
        raise ConfigError(f"--set {text!r}: refused: {exc.problem}") from None
    except yaml.YAMLError:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML") from None
    return parts, parsed


def _find_stage_index(stages: list[Any], ref: str, override: str) -> int:
    if ref.isdigit():
        idx = int(ref)
        if idx >= len(stages):
            raise ConfigError(f"--set {override}: there are only {len(stages)} stages")
        return idx
    by_name = [i for i, s in enumerate(stages) if isinstance(s, dict) and s.get("name") == ref]
    by_type = [i for i, s in enumerate(stages)
               if isinstance(s, dict) and not s.get("name") and s.get("type") == ref]
    matches = by_name or by_type
    if len(matches) == 1:
        return matches[0]
    names = [str(s.get("name") or s.get("type")) for s in stages if isinstance(s, dict)]
    if not matches:
        hint = _did_you_mean(ref, names)
        raise ConfigError(f"--set {override}: no stage named {ref!r} (stages: {', '.join(names)})",
                          hint=hint)
    raise ConfigError(f"--set {override}: {ref!r} matches several stages; give them names or use "
                      f"the index (stages.N.key)")


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[tuple[Any, ...], str]:
    """Apply `--set` overrides in place; returns {path: override text} for error messages."""
    origins: dict[tuple[Any, ...], str] = {}
    for text in overrides:
        parts, value = parse_override(text)
        node: Any = raw
        path: list[Any] = []
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            key: Any = part
            if isinstance(node, list):
                if path == ["stages"]:
                    key = _find_stage_index(node, part, text)
                elif part.isdigit() and int(part) < len(node):
                    key = int(part)
                else:
                    raise ConfigError(f"--set {text}: {'.'.join(map(str, path))} is a list; "
                                      f"use an index")
            elif not isinstance(node, dict):
                raise ConfigError(f"--set {text}: {'.'.join(map(str, path))} is not a mapping")
            path.append(key)
            if last:
                node[key] = value
            else:
                if isinstance(node, dict) and (key not in node or node[key] is None):
                    node[key] = {}
                node = node[key]
        origins[tuple(path)] = text
    return origins


def _did_you_mean(word: str, choices: list[str]) -> str | None:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else None


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _model_for_path(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """Follow a pydantic error location through nested models (and lists / dicts of them) to the
    model that owns its last key."""
    model: Any = root
    keyed = False  # the previous field was a mapping: this part is one of its keys
    for part in loc[:-1]:
        if isinstance(part, int) or keyed:
            keyed = False
            continue
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return None
        ann = fields[part].annotation
        keyed = _is_mapping(ann)
        model = _first_model(ann)
        if model is None:
            return None
    return model if hasattr(model, "model_fields") else None


def _is_mapping(ann: Any) -> bool:
    import typing

    for candidate in (ann, *(getattr(ann, "__args__", ()) or ())):
        if typing.get_origin(candidate) is dict or candidate is dict:
            return True
    return False


def _first_model(ann: Any) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()) or ():
        found = _first_model(arg)
        if found is not None:
            return found
    return None


class ErrorContext:
    """Turns pydantic errors into `file:LINE: dotted.key: message` with a did-you-mean hint."""

    def __init__(self, file: str, lines: dict[tuple[Any, ...], int],
                 origins: dict[tuple[Any, ...], str]) -> None:
        self.file = file
        self.lines = lines
        self.origins = origins

    def line_for(self, path: tuple[Any, ...], fallbacks: tuple[tuple[Any, ...], ...] = ()) -> int | None:
        for candidate in (path, *fallbacks):
            p = candidate
            while p:
                if p in self.lines:
                    return self.lines[p]
                p = p[:-1]
        return None

    def origin_for(self, path: tuple[Any, ...]) -> str | None:
        for n in range(len(path), 0, -1):
            if path[:n] in self.origins:
                return self.origins[path[:n]]
        return None

    def raise_for(self, exc: ValidationError, root: type[BaseModel], raw_prefix: tuple[Any, ...],
                  display_prefix: str, fallback_prefix: tuple[Any, ...] | None = None) -> None:
        messages: list[str] = []
        first_line: int | None = None
        first_key: str | None = None
        hints: list[str] = []
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
            path = raw_prefix + loc
            fallbacks = ((fallback_prefix + loc),) if fallback_prefix is not None else ()
            line = self.line_for(path, fallbacks)
            key = display_prefix + "".join(
                f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc
            )
            key = key.lstrip(".") or "(top level)"
            msg = err["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
            if err["type"] == "extra_forbidden" and loc:
                owner = _model_for_path(root, loc)
                valid = sorted(owner.model_fields) if owner is not None else []
                msg = "unknown key"
                hint = _did_you_mean(str(loc[-1]), valid)
                if valid:
                    msg += f" (valid keys: {', '.join(valid)})"
                if hint:
                    hints.append(f"{key}: {hint}")
            elif err["type"] == "missing":
                msg = "required key is missing"
            elif "input" in err and err["type"] not in ("missing",):
                shown = repr(err["input"])
                if len(shown) > 60:
                    shown = shown[:57] + "..."
                msg = f"{msg} (got {shown})"
            origin = self.origin_for(path)
            where = f"--set {origin}: " if origin else (
                f"{self.file}:{line}: " if line else f"{self.file}: ")
            messages.append(f"{where}{key}: {msg}")
            if first_line is None:
                first_line, first_key = line, key
        text = messages[0] if len(messages) == 1 else (
            f"{len(messages)} errors:\n  " + "\n  ".join(messages))
        # The text already carries file:line and key for each error; keep them for callers too.
        err = ConfigError(text, hint="; ".join(hints) or None)
        err.error_line, err.error_key = first_line, first_key  # type: ignore[attr-defined]
        raise err
