"""Helpers every stage uses: its data and preprocessing, its input model, writing its outputs.

Kept here (not in each stage) so that every stage reads data and models the same way, and so that a
stage's data files enter its fingerprint the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgemml.artifacts import canonical_json, write_json_atomic
from edgemml.config import DataConfig, LoadedPipeline, PreprocessConfig, StageConfig
from edgemml.errors import ConfigError, InputError

if TYPE_CHECKING:
    from torch import nn

    from edgemml.data import DataSplits
    from edgemml.models import ModelSpec
    from edgemml.stages.base import StageContext

MODEL_DIR = "model"

_data_cache: dict[str, Any] = {}


def data_config(config: StageConfig, pipeline: LoadedPipeline, *,
                required: bool = True) -> DataConfig | None:
    """The stage's own `data:` (already merged over the pipeline's) or the pipeline's."""
    cfg = getattr(config, "data", None) or pipeline.config.data
    if cfg is None and required:
        raise ConfigError(f"stage {config.name or config.type!r} needs data and the pipeline has "
                          f"no `data:` section", file=str(pipeline.path), key="data",
                          hint="add `data: {source: builtin:digits}` at the top level or in the stage")
    return cfg


def preprocess_config(config: StageConfig, pipeline: LoadedPipeline) -> PreprocessConfig:
    return getattr(config, "preprocess", None) or pipeline.config.preprocess


def model_preprocess(recorded: Any, config: StageConfig, pipeline: LoadedPipeline, *,
                     source: str = "model.json",
                     warn: Any = None) -> tuple[PreprocessConfig, str]:
    """(spec, where it came from): the preprocessing recorded with a model (model.json's
    extra.preprocess, a bundle's preprocess.json) when there is one — what the model was trained
    with — else the stage's / pipeline's `preprocess:`. `warn` is told when the two differ."""
    own = preprocess_config(config, pipeline)
    if not recorded:
        return own, "pipeline"
    try:
        spec = PreprocessConfig.model_validate(recorded)
    except ValueError as exc:
        raise InputError(f"the preprocessing recorded in {source} is invalid: {exc}",
                         file=source) from None
    if warn is not None and spec != own:
        warn(f"using the preprocessing recorded in {source}, which differs from the pipeline's "
             f"`preprocess:`")
    return spec, source


def check_channels(pre: PreprocessConfig, in_chans: int) -> None:
    if pre.num_channels != in_chans:
        raise InputError(f"preprocess.channels={pre.channels} gives {pre.num_channels} channel(s) but "
                         f"the model takes {in_chans}", key="preprocess.channels",
                         hint="use the preprocessing the model was trained with")


def stage_data_files(config: StageConfig, pipeline: LoadedPipeline) -> list[Path]:
    """Data files of the stage's data section (for Stage.data_files)."""
    from edgemml.data.files import data_files

    cfg = data_config(config, pipeline, required=False)
    return data_files(cfg, pipeline.base_dir) if cfg is not None else []


def load_stage_data(ctx: StageContext, config: StageConfig | None = None,
                    data: DataConfig | None = None,
                    preprocess: PreprocessConfig | None = None) -> DataSplits:
    """Load (once per process and config) the stage's data splits through its preprocessing."""
    from edgemml.data import load_data

    config = config or ctx.config
    data = data or data_config(config, ctx.pipeline)
    preprocess = preprocess or preprocess_config(config, ctx.pipeline)
    key = canonical_json({"data": data, "pre": preprocess, "seed": ctx.seed,
                          "base": str(ctx.pipeline.base_dir)})
    if key not in _data_cache:
        splits = load_data(data, preprocess, seed=ctx.seed, base_dir=ctx.pipeline.base_dir)
        for note in splits.notes:
            ctx.warn(note)
        _data_cache[key] = splits
    return _data_cache[key]


def load_input_model(ctx: StageContext, stage: str | None = None) -> tuple[nn.Module, ModelSpec]:
    """The model written by the input stage (or a named earlier stage)."""
    from edgemml.models import load_model

    return load_model(ctx.input(stage)["model"])


def save_model_output(ctx: StageContext, model: nn.Module, spec: ModelSpec,
                      folder: str = MODEL_DIR) -> Path:
    """Write model.safetensors + model.json into the stage folder; returns the folder."""
    from edgemml.models import save_model

    out = ctx.work_dir / folder
    save_model(model, spec, out)
    return out


def write_json(ctx: StageContext, relative: str, obj: Any) -> Path:
    path = ctx.path(relative)
    write_json_atomic(path, obj)
    return path
