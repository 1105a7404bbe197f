"""A torch module as the artifact it will be deployed as, made quickly: for timing, not for shipping.

A latency-targeted prune measures each candidate as the *deployed* artifact (an int8 model runs
several times faster than its fp32 graph, and not by the same factor for every shape), so each
candidate goes through the same conversions the quantize and export stages use — the ONNX export
(edgemml.exporters.onnx), ONNX Runtime's static QDQ with this CPU's recipe
(edgemml.quantization.ort / .cpu), NNCF (edgemml.quantization.ov), the OpenVINO converter
(edgemml.exporters.openvino) — but calibrated on a few samples and without an accuracy budget: the
kernels that run, and so the latency, do not depend on how well the ranges were calibrated. The
quantize stage makes the artifact that ships.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np

#: what a latency target can refer to (an artifact key of the quantize / export stages, or torch)
DeployedKind = Literal["onnx-int8", "openvino-int8", "onnx-fp32", "openvino-fp32", "torch"]
KINDS: tuple[str, ...] = ("onnx-int8", "openvino-int8", "onnx-fp32", "openvino-fp32", "torch")


def ort_settings(target: str = "auto") -> Any:
    """The ONNX Runtime int8 recipe the quantize stage uses by default on `target` (auto: here)."""
    from edgemml.quantization.cpu import RECIPES, detect_target
    from edgemml.quantization.ort import OrtSettings

    recipe = RECIPES[detect_target()[0] if target == "auto" else target]
    return OrtSettings(method="minmax", percentile=99.999, per_channel=True,
                       activation_type=recipe.activation_type, weight_type=recipe.weight_type,
                       reduce_range=recipe.reduce_range)


def quick_artifact(model: Any, example: Any, kind: str, calibration: np.ndarray, folder: Path, *,
                   opset: int = 18, exporter: Literal["auto", "dynamo", "torchscript"] = "auto",
                   target: str = "auto") -> Path | None:
    """Write `model` as a `kind` artifact into `folder` and return its path (None for torch, which
    runs the module itself). `example` is one input batch (torch tensor); `calibration` a few
    preprocessed samples."""
    if kind == "torch":
        return None
    if kind not in KINDS:
        raise ValueError(f"unknown deployed artifact {kind!r} (known: {', '.join(KINDS)})")
    from edgemml.exporters.onnx import export_onnx

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fp32 = folder / "model.fp32.onnx"
    export_onnx(model, example, fp32, opset=opset, exporter=exporter)
    if kind == "onnx-fp32":
        return fp32
    if kind == "onnx-int8":
        from edgemml.quantization.ort import OrtQuantizer, preprocess_for_quantization

        prepped, out = folder / "model.prepped.onnx", folder / "model.int8.onnx"
        preprocess_for_quantization(fp32, prepped)
        OrtQuantizer(prepped, calibration, ort_settings(target), folder).quantize(out)
        return out
    if kind == "openvino-fp32":
        from edgemml.exporters.openvino import convert_to_ir

        return convert_to_ir(fp32, folder / "openvino-fp32", example=example).folder
    import openvino as ov

    from edgemml.quantization.ov import OvSettings, quantize_ov
    from edgemml.runtimes.openvino import IR_XML

    settings = OvSettings(preset="performance", fast_bias_correction=True, model_type=None,
                          subset_size=len(calibration))
    out_dir = folder / "openvino-int8"
    out_dir.mkdir(exist_ok=True)
    ov.save_model(quantize_ov(ov.convert_model(str(fp32)), calibration, settings),
                  str(out_dir / IR_XML), compress_to_fp16=False)
    return out_dir
