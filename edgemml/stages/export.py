"""export: the input model as ONNX and OpenVINO IR, each checked against torch on real samples, plus
the deployable bundle (folder and .tar.gz) with the int8 models of an earlier quantize stage.

Outputs: onnx-fp32 (model.fp32.onnx), onnx-fp16 (when fp16: true), openvino-fp32 or openvino-fp16
(folder with model.xml/.bin), bundle (folder), bundle_archive (bundle.tar.gz), report (export.json).
A conversion whose outputs differ from torch by more than the tolerance is an error, not a warning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from edgemml.config import (STAGE_NAME_RE, DataConfig, LoadedPipeline, PreprocessConfig,
                            StageConfig, StrictModel)
from edgemml.exporters.options import OnnxOptions
from edgemml.stages.base import Stage, StageContext
from edgemml.stages.common import stage_data_files

ArtifactKey = Literal["onnx-fp32", "onnx-fp16", "onnx-int8", "openvino-fp32", "openvino-fp16",
                      "openvino-int8"]


class OpenVinoExportOptions(StrictModel):
    """The OpenVINO IR written by this stage."""

    enabled: bool = Field(True, description="Write an OpenVINO IR.")
    weights: Literal["fp32", "fp16"] = Field(
        "fp32", description="Weight precision stored in model.bin (output key openvino-<weights>).")
    source: Literal["onnx", "torch"] = Field(
        "onnx", description="Convert from the exported ONNX file (same graph and names as the "
        "ONNX artifact) or from the torch module directly.")


class BundleOptions(StrictModel):
    """What goes into the deployable bundle."""

    include: list[ArtifactKey] | None = Field(
        None, description="Artifacts to ship (default: every fp32 and int8 model available; fp16 "
        "ones only when listed).")
    default_model: Literal["auto"] | ArtifactKey = Field(
        "auto", description="Model predict.py uses by default; auto: onnx-int8 when present, else "
        "onnx-fp32.")
    samples: int = Field(8, ge=0, le=1000, description="Held-out images shipped in samples/ with "
                         "the pipeline's predictions (for predict.py --self-check).")
    archive: bool = Field(True, description="Also write bundle.tar.gz.")


class ExportConfig(StageConfig):
    type: Literal["export"]
    onnx: OnnxOptions = Field(default_factory=OnnxOptions, description="ONNX export options.")
    slim: Literal["auto", "onnxslim", "onnxsim", "none"] = Field(
        "auto", description="Graph simplification: auto uses onnxslim or onnxsim when installed.")
    fp16: bool = Field(False, description="Also write model.fp16.onnx (fp16 weights and compute, "
                       "fp32 inputs/outputs).")
    openvino: OpenVinoExportOptions = Field(default_factory=OpenVinoExportOptions,
                                            description="OpenVINO IR options.")
    quantized: str = Field(
        "auto", description="Quantize stage whose int8 models go into the bundle: its name, auto "
        "(the nearest earlier quantize stage, if any) or none.")
    parity_samples: int = Field(64, ge=1, description="Val samples on which every converted model "
                                "is compared with torch.")
    tolerance: float = Field(1e-4, gt=0, description="Largest allowed max |diff| relative to the "
                             "output scale (max |torch output|) for fp32 artifacts.")
    fp16_tolerance: float = Field(2e-2, gt=0, description="The same bound for fp16 artifacts.")
    bundle: BundleOptions = Field(default_factory=BundleOptions, description="Bundle contents.")
    data: DataConfig | None = Field(None, description="Data (merged over the pipeline's).")
    preprocess: PreprocessConfig | None = Field(
        None, description="Preprocessing when the input model does not record its own.")

    @field_validator("quantized")
    @classmethod
    def _stage_ref(cls, value: str) -> str:
        if value not in ("auto", "none") and not STAGE_NAME_RE.match(value):
            raise ValueError("give a stage name, auto or none")
        return value


class ExportStage(Stage[ExportConfig]):
    """ONNX and OpenVINO IR checked against torch, and the deployable bundle with predict.py."""

    type = "export"
    Config = ExportConfig
    provides = ("onnx-fp32", "onnx-fp16", "openvino-fp32", "openvino-fp16", "bundle",
                "bundle_archive", "report")
    requires = ("torch", "onnx", "onnxruntime", "openvino", "onnxscript", "onnxslim", "onnxsim")
    code = ("edgemml.models", "edgemml.data", "edgemml.stages.common", "edgemml.exporters")
    #: `quantized: auto` picks the nearest earlier quantize stage, which only the run knows
    reads_all_earlier = True

    @classmethod
    def references(cls, config: ExportConfig) -> list[tuple[str, str]]:
        refs = super().references(config)
        if config.quantized not in ("auto", "none"):
            refs.append(("quantized", config.quantized))
        return refs

    @classmethod
    def data_files(cls, config: ExportConfig, pipeline: LoadedPipeline) -> list[Path]:
        return stage_data_files(config, pipeline)

    def run(self, ctx: StageContext, config: ExportConfig) -> dict[str, Path]:
        # torch, onnx and openvino are imported there, not when the pipeline file is validated
        from edgemml.exporters.export_run import export_stage

        return export_stage(ctx, config)


STAGE = ExportStage
