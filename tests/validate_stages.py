"""Test-only stages that make real artifacts for the validate stage (imported via `plugins:`).

`vt_train` trains a tiny CNN on the pipeline's data (a real classifier, so accuracy and per-class
figures mean something); `vt_export` writes what export and quantize will write, with the real
libraries: a torch model folder, ONNX fp32 (legacy exporter, self-contained), ONNX int8
(onnxruntime.quantization.quantize_static, QDQ, uint8 activations), an OpenVINO fp32 IR
(convert_model + save_model without fp16 compression) and a bundle folder with manifest.json.
Its `perturb` option adds seeded noise to the weights (a degraded model for baseline tests) and
`degenerate` zeroes them (a near-constant model that must not pass parity).
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from edgemml.config import DataConfig, PreprocessConfig, StageConfig
from edgemml.stages import common, register
from edgemml.stages.base import Stage, StageContext


def tiny_cnn(num_classes: int, in_chans: int, width: int = 8) -> nn.Module:
    """A small conv net with BatchNorm (what fp32/int8 parity is about) that trains in seconds."""
    return nn.Sequential(
        nn.Conv2d(in_chans, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8 * width, num_classes))


class VtTrainConfig(StageConfig):
    type: Literal["vt_train"]
    data: DataConfig | None = None
    preprocess: PreprocessConfig | None = None
    epochs: int = Field(4, description="Training epochs.")


@register
class VtTrain(Stage[VtTrainConfig]):
    """Trains the pipeline's model on its data; writes model/ and history.json."""

    type = "vt_train"
    Config = VtTrainConfig
    provides = ("model", "history")

    @classmethod
    def needs_input(cls, config: VtTrainConfig) -> bool:
        return False

    @classmethod
    def data_files(cls, config: VtTrainConfig, pipeline: Any) -> list[Path]:
        return common.stage_data_files(config, pipeline)

    def run(self, ctx: StageContext, config: VtTrainConfig) -> dict[str, Path]:
        from edgemml.models import ModelSpec, build_model
        from edgemml.training import TrainConfig, train

        pre = common.preprocess_config(config, ctx.pipeline)
        splits = common.load_stage_data(ctx, config)
        model_cfg = ctx.pipeline.config.model
        assert model_cfg is not None
        model = build_model(model_cfg, num_classes=len(splits.classes),
                            in_chans=pre.num_channels)
        torch.set_num_threads(1)
        result = train(model, splits.train, splits.val,
                       TrainConfig(epochs=config.epochs, lr=1e-2, batch_size=64, device="cpu"),
                       seed=ctx.seed)
        spec = ModelSpec.from_config(model_cfg, num_classes=len(splits.classes),
                                     in_chans=pre.num_channels, class_names=splits.classes,
                                     preprocess=pre.model_dump(mode="json"))
        folder = common.save_model_output(ctx, result.model, spec)
        history = common.write_json(ctx, "history.json", {"epochs": result.history})
        ctx.record(history=result.history)
        return {"model": folder, "history": history}


class VtExportConfig(StageConfig):
    type: Literal["vt_export"]
    data: DataConfig | None = None
    preprocess: PreprocessConfig | None = None
    perturb: float = Field(0.0, ge=0, description="Noise std relative to each weight's std.")
    degenerate: bool = Field(False, description="Zero every weight: a near-constant model.")
    openvino: bool = Field(True, description="Also write an OpenVINO fp32 IR.")
    int8: bool = Field(True, description="Also write an ONNX int8 model.")


class _Reader:
    """onnxruntime CalibrationDataReader over real training samples."""

    def __init__(self, name: str, batches: list[np.ndarray]) -> None:
        self.name, self.batches = name, iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {self.name: batch}


@register
class VtExport(Stage[VtExportConfig]):
    """Writes model/, model.onnx, model-int8.onnx, openvino/ and bundle/ from its input model."""

    type = "vt_export"
    Config = VtExportConfig
    provides = ("model", "onnx-fp32", "onnx-int8", "openvino-fp32", "bundle")

    @classmethod
    def data_files(cls, config: VtExportConfig, pipeline: Any) -> list[Path]:
        return common.stage_data_files(config, pipeline)

    def run(self, ctx: StageContext, config: VtExportConfig) -> dict[str, Path]:
        model, spec = common.load_input_model(ctx)
        gen = torch.Generator().manual_seed(ctx.seed)
        with torch.no_grad():
            for p in model.parameters():
                if config.degenerate:
                    p.zero_()
                elif config.perturb and p.dim() > 1:
                    p.add_(torch.randn(p.shape, generator=gen) * p.std() * config.perturb)
        model.eval()
        outputs: dict[str, Path] = {"model": common.save_model_output(ctx, model, spec)}
        splits = common.load_stage_data(ctx, config)
        example = splits.train[0][0][None]
        onnx_path = ctx.path("model.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(onnx_path), dynamo=False, opset_version=17,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        outputs["onnx-fp32"] = onnx_path
        if config.int8:
            from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

            xs = [splits.train[i][0][None].numpy() for i in range(64)]
            int8_path = ctx.path("model-int8.onnx")
            quantize_static(str(onnx_path), str(int8_path), _Reader("input", xs),
                            quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, per_channel=True)
            outputs["onnx-int8"] = int8_path
        if config.openvino:
            import openvino as ov

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ov_model = ov.convert_model(model, example_input=example)
            ov_dir = ctx.work_dir / "openvino"
            ov_dir.mkdir()
            ov.save_model(ov_model, str(ov_dir / "model.xml"), compress_to_fp16=False)
            outputs["openvino-fp32"] = ov_dir
        bundle = ctx.work_dir / "bundle"
        bundle.mkdir()
        shutil.copy(onnx_path, bundle / "model.onnx")
        if "onnx-int8" in outputs:
            shutil.copy(outputs["onnx-int8"], bundle / "model-int8.onnx")
        common.write_json(ctx, "bundle/manifest.json", {
            "format": 1, "files": sorted(p.name for p in bundle.iterdir()),
            "preprocess": spec.extra.get("preprocess"), "classes": spec.class_names})
        outputs["bundle"] = bundle
        return outputs
