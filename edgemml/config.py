"""The schema of pipeline.yaml (pydantic v2) and the loader that reports errors by file and line.

Every model forbids unknown keys: a typo must fail, with a did-you-mean, instead of silently doing
nothing (Olive warns and ignores them). Stage options are validated in a second pass against the config
class that the stage type registered, so new stage types plug in without touching this module.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from edgemml.errors import ConfigError
from edgemml.yamlsafe import YamlLimit, compose


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


# --------------------------------------------------------------------------------------------------
# Shared sections: one preprocessing spec, one data section, one model section per pipeline.
# --------------------------------------------------------------------------------------------------


class PreprocessConfig(StrictModel):
    """How an image becomes the model's input tensor. Declared once, used by training, calibration,
    validation and the exported bundle, so that deployment sees exactly what training saw."""

    size: tuple[int, int] = Field((32, 32), description="Input height and width in pixels.")
    resize: Literal["stretch", "shorter_center_crop", "letterbox"] = Field(
        "stretch",
        description="stretch: resize to size ignoring aspect; shorter_center_crop: resize the shorter "
        "side then center-crop; letterbox: fit inside and pad with zeros.",
    )
    interpolation: Literal["nearest", "bilinear", "bicubic"] = Field(
        "bilinear", description="Resampling filter used when resizing."
    )
    channels: Literal["gray", "rgb", "bgr"] = Field(
        "rgb", description="Channels and their order fed to the model (gray = 1 channel)."
    )
    mean: list[float] = Field([0.5], description="Per-channel mean subtracted after scaling to [0, 1].")
    std: list[float] = Field([0.5], description="Per-channel std divided after subtracting the mean.")
    layout: Literal["NCHW", "NHWC"] = Field("NCHW", description="Tensor layout of the model input.")
    dtype: Literal["float32"] = Field("float32", description="Input dtype.")

    @property
    def num_channels(self) -> int:
        return 1 if self.channels == "gray" else 3

    @model_validator(mode="after")
    def _check_stats(self) -> PreprocessConfig:
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) not in (1, self.num_channels):
                raise ValueError(
                    f"{name} has {len(values)} values but channels={self.channels!r} has "
                    f"{self.num_channels}; give 1 value or {self.num_channels}"
                )
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be > 0")
        if min(self.size) < 1:
            raise ValueError("size must be positive")
        return self


class SplitConfig(StrictModel):
    """Fractions of a single source used for each split (stratified by class, seeded)."""

    train: float = Field(0.7, ge=0, le=1, description="Fraction of samples for training.")
    val: float = Field(0.15, ge=0, le=1, description="Fraction for validation (early stopping, budgets).")
    test: float = Field(0.15, ge=0, le=1, description="Fraction held out for the validate stage.")
    stratify: bool = Field(True, description="Keep class proportions equal across splits.")

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitConfig:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1.0, got {total:g}")
        return self


# Characters a class name may not hold: labels.txt has one name per line, and readers split lines
# on more than "\n" (Python's str.splitlines also on \v \f \x1c-\x1e \x85 U+2028 U+2029).
_LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"


def class_name_problem(name: str) -> str | None:
    """Why `name` cannot be a class name (it is written one per line into labels.txt, drawn into
    sample grids and printed), or None."""
    if not name or not name.strip():
        return "is empty"
    if any(c in _LINE_BREAKS for c in name):
        return "contains a line break"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "contains a control character"
    return None


class DataConfig(StrictModel):
    """Where samples come from. Stage-level `data:` keys override the pipeline-level section."""

    source: str = Field(
        ...,
        description="builtin:digits, builtin:printed-digits, an image-folder path (root/<class>/*.png) "
        "or an .npz file with x and y arrays.",
    )
    split: SplitConfig = Field(default_factory=SplitConfig, description="Split fractions of one source.")
    splits: dict[Literal["train", "val", "test"], Path] | None = Field(
        None, description="Explicit folders per split instead of fractions (image folders)."
    )
    classes: list[str] | None = Field(
        None, description="Class names in label order (default: from the source)."
    )
    samples: int | None = Field(
        None, ge=1, description="Number of samples to generate (generated sources) or to keep."
    )
    train_per_class: int | None = Field(
        None, ge=1, description="Keep only this many labelled training samples per class."
    )
    calibration: Path | None = Field(
        None, description="Folder of calibration images (default: the train split)."
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="Source-specific options (e.g. fonts of printed-digits)."
    )

    @field_validator("classes")
    @classmethod
    def _class_names(cls, value: list[str] | None) -> list[str] | None:
        for name in value or []:
            problem = class_name_problem(name)
            if problem:
                raise ValueError(f"class name {name!r} {problem}")
        if value is not None and len(set(value)) != len(value):
            raise ValueError("class names must be unique")
        return value

    @field_validator("source")
    @classmethod
    def _source_form(cls, value: str) -> str:
        if value.startswith("builtin:"):
            return value
        if "://" in value:
            raise ValueError("remote data sources are not supported; give a local path")
        return value


TORCHVISION_PREFIX = "torchvision/"


def known_architectures() -> list[str]:
    """Every torchvision classification builder as `torchvision/<name>`, sorted."""
    import torchvision

    return [TORCHVISION_PREFIX + n
            for n in sorted(torchvision.models.list_models(module=torchvision.models))]


def canonical_arch(arch: str) -> str:
    """`resnet18` and `torchvision/resnet18` both name torchvision's resnet18."""
    return arch if "/" in arch else TORCHVISION_PREFIX + arch


class ModelConfig(StrictModel):
    """A model architecture: a torchvision builder or, explicitly, the user's own factory."""

    arch: str | None = Field(
        None, description="Architecture, e.g. torchvision/resnet18 or torchvision/mobilenet_v3_small."
    )
    python: str | None = Field(
        None,
        description="package.module:factory of the user's own architecture (imports user code; "
        "explicit opt-in).",
    )
    num_classes: int | None = Field(None, ge=1, description="Output classes (default: from data).")
    in_chans: int | None = Field(None, ge=1, description="Input channels (default: from preprocess).")
    options: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments for the builder (e.g. width_mult)."
    )

    @model_validator(mode="after")
    def _one_of(self) -> ModelConfig:
        if (self.arch is None) == (self.python is None):
            raise ValueError("give exactly one of arch (torchvision/NAME) or python (module:factory)")
        return self


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------

STAGE_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


class StageConfig(StrictModel):
    """Options every stage has. Each stage type subclasses this with `type: Literal[...]`."""

    type: str = Field(..., description="Stage type.")
    name: str | None = Field(None, description="Unique name (default: the type).")
    input: str | None = Field(
        None, description="Name of the earlier stage whose model this stage reads (default: the "
        "nearest earlier stage that produces a model)."
    )

    @field_validator("name", "input")
    @classmethod
    def _valid_name(cls, value: str | None) -> str | None:
        if value is not None and not STAGE_NAME_RE.match(value):
            raise ValueError("use letters, digits, '_' and '-', starting with a letter")
        return value


class PipelineConfig(StrictModel):
    """The top level of pipeline.yaml. `stages` holds validated stage configs after loading."""

    name: str = Field(..., description="Pipeline name; the run directory is runs/<name> by default.")
    seed: int = Field(0, description="Seed for every random choice (splits, init, training order).")
    output_dir: Path | None = Field(None, description="Run directory (default: runs/<name>).")
    plugins: list[str] = Field(
        default_factory=list,
        description="Python modules to import that register extra stage types (imports user code).",
    )
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    data: DataConfig | None = Field(None, description="Data shared by every stage.")
    model: ModelConfig | None = Field(None, description="Model architecture shared by every stage.")
    stages: list[Any] = Field(..., min_length=1, description="Ordered list of stages.")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not STAGE_NAME_RE.match(value):
            raise ValueError("use letters, digits, '_' and '-', starting with a letter")
        return value


class LoadedPipeline:
    """A validated pipeline: its config, its stage configs in order, and where it came from."""

    def __init__(self, config: PipelineConfig, stages: list[StageConfig], path: Path,
                 raw: dict[str, Any]) -> None:
        self.config = config
        self.stages = stages
        self.path = path
        self.raw = raw

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def stage_names(self) -> list[str]:
        return [stage_name(s) for s in self.stages]

    def resolve_path(self, value: str | Path) -> Path:
        """Paths in a pipeline file are relative to the file's folder."""
        p = Path(os.path.expanduser(str(value)))
        return p if p.is_absolute() else (self.base_dir / p)

    def run_dir(self, override: str | Path | None = None) -> Path:
        if override is not None:
            return Path(override)
        if self.config.output_dir is not None:
            return self.resolve_path(self.config.output_dir)
        return Path("runs") / self.config.name


def stage_name(cfg: StageConfig) -> str:
    return cfg.name or cfg.type


# --------------------------------------------------------------------------------------------------
# Loading: YAML with line numbers, --set overrides, two-pass validation, readable errors.
# --------------------------------------------------------------------------------------------------

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
