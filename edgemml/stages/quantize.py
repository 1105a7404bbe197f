"""quantize: post-training int8 of the input model for ONNX Runtime and/or OpenVINO, within an
accuracy budget.

Defaults are the fast and accurate recipe for the CPU it runs on (uint8 activations x int8
per-channel weights on x86 with VNNI; see edgemml/quantization/cpu.py), and the choice is reported.
Accuracy fp32 vs int8 is measured on the validation split. With `max_accuracy_drop`, a model that
misses the budget gets its most sensitive layers kept in float, the fewest that meet it; when no
allowed number does, the stage fails with the figures.

Outputs: onnx-int8 (model.int8.onnx), openvino-int8 (folder with model.xml/.bin), report
(quantize.json).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from edgemml.config import DataConfig, LoadedPipeline, PreprocessConfig, StageConfig, StrictModel
from edgemml.exporters.options import OnnxOptions
from edgemml.stages.base import Stage, StageContext
from edgemml.stages.common import stage_data_files


class CalibrationOptions(StrictModel):
    """Which samples set the activation ranges, and how ranges are computed."""

    split: Literal["calibration", "train", "val", "test"] = Field(
        "calibration", description="calibration: data.calibration images when configured, else the "
        "train split; or a named split.")
    samples: int = Field(128, ge=1, description="Number of calibration samples (spread evenly over "
                         "the split; fewer when the split is smaller).")
    method: Literal["minmax", "entropy", "percentile"] = Field(
        "minmax", description="ONNX Runtime range estimation (OpenVINO/NNCF uses its own).")
    percentile: float = Field(99.999, gt=90, le=100, description="Percentile for method: percentile.")


class OrtOptions(StrictModel):
    """ONNX Runtime static QDQ quantization (quantize_static after quant_pre_process)."""

    per_channel: bool = Field(True, description="One weight scale per output channel.")
    activation_type: Literal["auto", "uint8", "int8"] = Field(
        "auto", description="auto: from target (uint8 on x86, int8 on arm64).")
    weight_type: Literal["auto", "int8", "uint8"] = Field("auto", description="auto: int8.")
    reduce_range: Literal["auto"] | bool = Field(
        "auto", description="7-bit weights; auto: true only on x86 without VNNI.")


class OvOptions(StrictModel):
    """OpenVINO int8 with NNCF."""

    preset: Literal["performance", "mixed"] = Field(
        "performance", description="performance: symmetric weights and activations; mixed: "
        "asymmetric activations (for activations that are not centred, e.g. without ReLU).")
    fast_bias_correction: bool = Field(True, description="NNCF's fast bias correction.")
    model_type: Literal["transformer"] | None = Field(
        None, description="transformer: NNCF's transformer-specific scheme.")


class QuantizeConfig(StageConfig):
    type: Literal["quantize"]
    backends: list[Literal["onnxruntime", "openvino"]] = Field(
        ["onnxruntime", "openvino"], min_length=1, description="Runtimes to produce int8 models for.")
    target: Literal["auto", "x86-vnni", "x86", "arm64"] = Field(
        "auto", description="CPU the int8 model will run on; auto: this machine (/proc/cpuinfo).")
    calibration: CalibrationOptions = Field(default_factory=CalibrationOptions,
                                            description="Calibration data and method.")
    onnxruntime: OrtOptions = Field(default_factory=OrtOptions, description="ONNX Runtime options.")
    openvino: OvOptions = Field(default_factory=OvOptions, description="OpenVINO/NNCF options.")
    onnx: OnnxOptions = Field(default_factory=OnnxOptions,
                              description="Export of the fp32 ONNX graph that is quantized.")
    max_accuracy_drop: float | None = Field(
        None, ge=0, description="Largest allowed top-1 drop (percentage points, val split) of int8 "
        "vs fp32; beyond it the most sensitive layers stay in float. None: no budget.")
    max_float_layers: int | None = Field(
        None, ge=1, description="At most this many layers may stay in float for the budget "
        "(default: no limit).")
    sensitivity_samples: int = Field(64, ge=1, description="Val samples used to rank layer "
                                     "sensitivity (ONNX Runtime).")
    data: DataConfig | None = Field(None, description="Data (merged over the pipeline's).")
    preprocess: PreprocessConfig | None = Field(
        None, description="Preprocessing when the input model does not record its own.")

    @field_validator("backends")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("list each backend once")
        return value


class QuantizeStage(Stage[QuantizeConfig]):
    """Post-training int8 (ONNX Runtime QDQ, OpenVINO/NNCF) within an accuracy budget."""

    type = "quantize"
    Config = QuantizeConfig
    provides = ("onnx-int8", "openvino-int8", "report")
    requires = ("torch", "onnx", "onnxruntime", "openvino", "nncf", "onnxscript")
    code = ("edgemml.models", "edgemml.data", "edgemml.stages.common", "edgemml.exporters",
            "edgemml.quantization", "edgemml.training")

    @classmethod
    def data_files(cls, config: QuantizeConfig, pipeline: LoadedPipeline) -> list[Path]:
        return stage_data_files(config, pipeline)

    def run(self, ctx: StageContext, config: QuantizeConfig) -> dict[str, Path]:
        # The work itself lives in edgemml.quantization.run (torch, onnxruntime, openvino are
        # imported there, not when the pipeline file is validated).
        from edgemml.quantization.run import quantize_stage

        return quantize_stage(ctx, config)


STAGE = QuantizeStage
