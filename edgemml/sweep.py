"""`sweep:` on a stage: run it (and the stages after it) once per value, e.g. an accuracy-latency front.

    - type: prune
      sweep: {target_macs: [0.7, 0.5, 0.35]}        # one option, several values
      # or: sweep: {points: [{target_macs: 0.5}, {target_speedup: 12}], through: export}

The loader expands the swept stage and the stages after it — up to the first stage that gathers
every earlier stage without an input of its own (validate), or up to `through:` — into one branch
per point, with derived names (`prune-macs0_7`, `quantize-macs0_7`, `export-macs0_7` ...). Each
branch is made of ordinary stages, so each is fingerprinted, cached and listed by `edgemml check`
like any stage; the branch's first stage reads what the swept stage read, references inside a
branch (`input:`, `stage:`, export's `quantized:`) point at the branch's own stages, and the stage
that gathers them (validate) sees every branch.

Pure functions over the parsed YAML (no stage registry): what a stage type provides is asked of the
caller (the loader), which keeps the result as `LoadedPipeline.sweeps` for the stages that present
it (validate's front).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from edgemml.errors import ConfigError

SWEEP_KEY = "sweep"
#: keys whose string value names another stage (rewritten inside a branch)
REFERENCE_KEYS = ("input", "stage", "quantized")
_TAG_RE = re.compile(r"[^A-Za-z0-9_]")


@dataclass
class Point:
    """One point of a sweep: the options it sets on the swept stage, and its branch's stage names."""

    tag: str
    overrides: dict[str, Any]
    names: dict[str, str] = field(default_factory=dict)  # original stage name -> derived name


@dataclass
class Sweep:
    stage: str                  # the swept stage's name in the file
    index: int                  # its position in the file's stages
    branch: list[str]           # the stages repeated per point (original names, in order)
    source: str | None          # the stage the swept stage reads (None: none / its own model)
    points: list[Point]

    def stage_of(self, point: Point) -> str:
        """The derived name of the swept stage in a point."""
        return point.names[self.stage]

    def as_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "source": self.source, "branch": self.branch,
                "points": [{"tag": p.tag, "options": p.overrides, "stages": p.names}
                           for p in self.points]}


def _name(item: dict[str, Any]) -> str:
    return str(item.get("name") or item.get("type"))


def _slug(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        value = f"{value:g}"
    text = str(value).replace(".", "_").replace("-", "m")
    return _TAG_RE.sub("", text)


def tag_of(overrides: dict[str, Any]) -> str:
    """`{target_macs: 0.7}` -> "macs0_7"; `{target_speedup: 12}` -> "speedup12"."""
    parts = []
    for key, value in overrides.items():
        short = key[len("target_"):] if key.startswith("target_") else key
        parts.append(f"{_slug(short)}{_slug(value)}" if not isinstance(value, (dict, list))
                     else _slug(short))
    return "-".join(parts) or "point"


def parse_points(spec: Any, where: str) -> tuple[list[dict[str, Any]], str | None]:
    """(the points' option mappings, `through:`) of a `sweep:` value."""
    if not isinstance(spec, dict) or not spec:
        raise ConfigError(f"{where}: a sweep is a mapping: {{option: [values]}} or "
                          f"{{points: [{{option: value}}, ...]}}")
    spec = dict(spec)
    through = spec.pop("through", None)
    if through is not None and not isinstance(through, str):
        raise ConfigError(f"{where}.through: give the name of the last stage of each branch")
    if "points" in spec:
        points = spec.pop("points")
        if spec:
            raise ConfigError(f"{where}: give either points: or one option with a list of values, "
                              f"not both (also got {', '.join(map(str, spec))})")
        if not isinstance(points, list) or not all(isinstance(p, dict) and p for p in points):
            raise ConfigError(f"{where}.points: a list of mappings, one per point, e.g. "
                              f"[{{target_macs: 0.5}}, {{target_speedup: 12}}]")
    else:
        if len(spec) != 1:
            raise ConfigError(f"{where}: sweep one option (got {', '.join(map(str, spec))}); for "
                              f"points that differ in several options use points: [...]")
        (option, values), = spec.items()
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.{option}: give a list of values, e.g. [0.7, 0.5, 0.35]")
        points = [{option: v} for v in values]
    if len(points) < 1:
        raise ConfigError(f"{where}: a sweep needs at least one point")
    return [dict(p) for p in points], through


def _rename(node: Any, names: dict[str, str]) -> Any:
    """References to branch stages inside a stage's options, pointed at the branch's copies."""
    if isinstance(node, dict):
        return {k: (names[v] if k in REFERENCE_KEYS and isinstance(v, str) and v in names
                    else _rename(v, names)) for k, v in node.items()}
    if isinstance(node, list):
        return [_rename(v, names) for v in node]
    return node


def expand(stages: list[Any], *, provides_model: Callable[[dict[str, Any]], bool],
           gathers: Callable[[dict[str, Any]], bool]) -> tuple[list[tuple[int, Any]], list[Sweep]]:
    """The stage list with every sweep expanded: [(index in the file, stage mapping)], and the
    sweeps. `provides_model(item)`: whether a stage writes a model (a later stage's default
    input); `gathers(item)`: whether it reads every earlier stage without an input of its own (a
    branch ends before it)."""
    swept = [i for i, s in enumerate(stages) if isinstance(s, dict) and SWEEP_KEY in s]
    if not swept:
        return list(enumerate(stages)), []
    if len(swept) > 1:
        raise ConfigError(f"stages[{swept[1]}]: one sweep per pipeline (stages[{swept[0]}] has "
                          f"one already)")
    i = swept[0]
    item = stages[i]
    where = f"stages[{i}].{SWEEP_KEY}"
    points, through = parse_points(item[SWEEP_KEY], where)
    names = [_name(s) if isinstance(s, dict) else "" for s in stages]
    end = len(stages)
    if through is not None:
        if through not in names[i:]:
            raise ConfigError(f"{where}.through: no stage {through!r} at or after "
                              f"{names[i]!r}")
        end = names.index(through, i) + 1
    else:
        for j in range(i + 1, len(stages)):
            if isinstance(stages[j], dict) and gathers(stages[j]):
                end = j
                break
    branch_items = stages[i:end]
    branch = names[i:end]
    for j, s in enumerate(stages[end:], end):
        if isinstance(s, dict) and SWEEP_KEY not in s:
            bad = [b for b in branch if _refers_to(s, b)]
            if bad and not gathers(s):
                raise ConfigError(f"stages[{j}] ({names[j]}) refers to {bad[0]!r}, which the sweep "
                                  f"repeats per point",
                                  hint=f"end the branches after it with {where}.through, or refer "
                                       f"to one point's stage by its derived name")
    source = item.get("input")
    if source is None:
        for s in reversed(stages[:i]):
            if isinstance(s, dict) and provides_model(s):
                source = _name(s)
                break
    out: list[tuple[int, Any]] = list(enumerate(stages[:i]))
    sweep = Sweep(names[i], i, branch, source, [])
    tags: set[str] = set()
    for overrides in points:
        tag = tag_of(overrides)
        if tag in tags:
            raise ConfigError(f"{where}: two points give the same stage names ({tag}); give "
                              f"distinct values")
        tags.add(tag)
        point = Point(tag, overrides, {b: f"{b}-{tag}" for b in branch})
        for k, (orig, s) in enumerate(zip(branch, branch_items)):
            copy_ = _rename(copy.deepcopy({kk: v for kk, v in s.items() if kk != SWEEP_KEY}),
                            point.names)
            copy_["name"] = point.names[orig]
            if k == 0:
                copy_.update(copy.deepcopy(overrides))
                if copy_.get("input") is None and source is not None:
                    copy_["input"] = source
            elif copy_.get("type") == "export" and copy_.get("quantized", "auto") == "auto":
                own = [point.names[b] for b, bs in zip(branch[:k], branch_items[:k])
                       if bs.get("type") == "quantize"]
                if own:  # this branch's quantize stage, not the nearest one of another branch
                    copy_["quantized"] = own[-1]
            out.append((i + k, copy_))
        sweep.points.append(point)
    out += list(enumerate(stages[end:], end))
    return out, [sweep]


def _refers_to(item: dict[str, Any], name: str) -> bool:
    found = False

    def walk(node: Any) -> None:
        nonlocal found
        if isinstance(node, dict):
            for k, v in node.items():
                if k in REFERENCE_KEYS and v == name:
                    found = True
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(item)
    return found
