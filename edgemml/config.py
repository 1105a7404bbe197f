"""The schema of pipeline.yaml (pydantic v2); the YAML with line numbers and readable errors is
yamlfile.py, and pipeline/loader.py validates a file against this schema.

Every model forbids unknown keys: a typo must fail, with a did-you-mean, instead of silently doing
nothing (Olive warns and ignores them). Stage options are validated in a second pass against the config
class that the stage type registered, so new stage types plug in without touching this module.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)



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
    """Every torchvision classification builder as `torchvision/<name>`, sorted.

    Listing them imports torchvision (2.5 s of the quickstart's ~4.5 s cached re-run, measured), and
    every pipeline load checks its architectures, so the list is kept per torchvision version in the
    user's cache folder (machine.cache_dir). An unreadable, foreign or unwritable cache is ignored:
    the list is then taken from torchvision itself."""
    import json

    from edgemml.artifacts import write_json_atomic
    from edgemml.machine import cache_dir, dist_version

    version = dist_version("torchvision")
    path = cache_dir() / f"torchvision-models-{re.sub(r'[^A-Za-z0-9.+_-]', '_', str(version))}.json"
    try:
        with open(path, "rb") as fh:
            names = json.loads(fh.read(1 << 20))
        if isinstance(names, list) and names and all(
                isinstance(n, str) and n.startswith(TORCHVISION_PREFIX) for n in names):
            return names
    except (OSError, ValueError):
        pass
    import torchvision

    names = [TORCHVISION_PREFIX + n
             for n in sorted(torchvision.models.list_models(module=torchvision.models))]
    if version is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, names)
        except OSError:
            pass
    return names


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
