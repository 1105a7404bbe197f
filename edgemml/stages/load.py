"""load: start a pipeline from a model folder that edgemml saved earlier.

Why: a model trained, migrated or pruned by another pipeline (or another team) should be
quantized, exported and validated without re-running what made it. The folder (model.json +
model.safetensors) is checked by actually rebuilding the module, so a broken or foreign folder
fails here, with its name, rather than deep inside a later stage.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from edgemml.config import StageConfig
from edgemml.errors import InputError
from edgemml.stages.base import Stage, StageContext

if TYPE_CHECKING:
    from edgemml.config import LoadedPipeline


class LoadConfig(StageConfig):
    type: Literal["load"]
    path: Path = Field(..., description="A model folder saved by edgemml (model.json + "
                       "model.safetensors), e.g. runs/other/04-prune/model; relative to the "
                       "pipeline file.")


class LoadStage(Stage[LoadConfig]):
    """Start from a model folder saved by edgemml (another run's model/ output)."""

    type = "load"
    Config = LoadConfig
    provides = ("model",)
    requires = ("torch", "torchvision")

    @classmethod
    def needs_input(cls, config: LoadConfig) -> bool:
        return False

    @classmethod
    def data_files(cls, config: LoadConfig, pipeline: LoadedPipeline) -> list[Path]:
        return [pipeline.resolve_path(config.path)]  # its bytes enter the fingerprint

    def run(self, ctx: StageContext, config: LoadConfig) -> dict[str, Path]:
        from edgemml.models import MODEL_SPEC, MODEL_WEIGHTS, load_model

        src = ctx.resolve(config.path)
        if not (src / MODEL_SPEC).is_file() or not (src / MODEL_WEIGHTS).is_file():
            raise InputError(f"{src} is not an edgemml model folder (needs {MODEL_SPEC} and "
                             f"{MODEL_WEIGHTS})", key=f"stages.{ctx.name}.path",
                             hint="give the model/ folder of an earlier run's stage, or start "
                             "from a checkpoint with a migrate stage")
        _, spec = load_model(src)  # rebuilds the module: fails here, not in a later stage
        out = ctx.work_dir / "model"
        shutil.copytree(src, out)
        ctx.record(arch=spec.arch or spec.python, num_classes=spec.num_classes,
                   in_chans=spec.in_chans, pruned_layers=len(spec.layer_shapes))
        return {"model": out}


STAGE = LoadStage
