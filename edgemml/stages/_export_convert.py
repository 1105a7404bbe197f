"""The export stage's float conversions: fp32 ONNX (and fp16 ONNX, OpenVINO IR, and through
_export_embedded the fp32 .pte / .tflite), each run through the runtime layer right after conversion
and checked against torch on real samples. Apart from stages/export.py so that the stage file holds
the stage (config, orchestration, bundle) and this one the per-format conversion recipes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgemml.errors import StageError

if TYPE_CHECKING:
    import numpy as np

    from edgemml.stages.base import StageContext

FP32_ONNX = "model.fp32.onnx"
FP16_ONNX = "model.fp16.onnx"


def check(name: str, ref: np.ndarray, out: np.ndarray, tolerance: float) -> dict[str, Any]:
    from edgemml.metrics import check_parity

    result = check_parity(ref, out, tolerance=tolerance)
    if not result.ok:
        raise StageError(
            f"{name} differs from torch: max abs diff {result.max_abs_diff:.3g} = "
            f"{result.rel_diff:.3g} of the output scale {result.output_scale:.3g} (tolerance "
            f"{tolerance:g}); top-1 agreement {result.top1_agreement:.1%} on {result.samples} "
            f"samples",
            hint="try onnx.exporter: torchscript (or dynamo), another opset, or slim: none")
    return result.as_dict()


def outputs_of(path: Path, x: np.ndarray, *, exact: bool = True) -> tuple[np.ndarray, str]:
    """Outputs of an artifact on x (all cores: only the values matter here) and the precision its
    runtime computed them in."""
    from edgemml import runtimes

    runner = runtimes.open_artifact(path, threads=None, exact=exact)
    return runtimes.predict(runner, x), runner.precision


def _ov_parity(name: str, folder: Path, x: np.ndarray, ref: np.ndarray,
               tolerance: float) -> dict[str, Any]:
    from edgemml.metrics import check_parity

    out, precision = outputs_of(folder, x)
    checks = check(f"{name} (OpenVINO, {precision})", ref, out, tolerance)
    checks["inference_precision"] = precision
    out, default_precision = outputs_of(folder, x, exact=False)
    info = check_parity(ref, out, tolerance=tolerance).as_dict()
    checks["default_hint"] = {"inference_precision": default_precision,
                              "rel_diff": info["rel_diff"], "max_abs_diff": info["max_abs_diff"],
                              "top1_agreement": info["top1_agreement"]}
    return checks


def convert(ctx: StageContext, config: Any, model: Any, x: np.ndarray,
             ref: np.ndarray) -> tuple[dict[str, dict[str, Any]], Any]:
    """fp32 ONNX (and fp16 ONNX, OpenVINO IR), each checked against torch on x. `config` is the
    export stage's ExportConfig (not imported here: stages/export.py imports this module)."""
    import torch

    from edgemml.exporters.onnx import (check_onnx, convert_fp16, export_onnx, io_signature,
                                        slim_onnx)
    from edgemml.exporters.openvino import IR_XML, convert_to_ir, ir_signature

    arts: dict[str, dict[str, Any]] = {}
    fp32 = ctx.work_dir / FP32_ONNX
    exp = export_onnx(model, torch.from_numpy(x[:2]), fp32, opset=config.onnx.opset,
                      exporter=config.onnx.exporter, input_name=config.onnx.input_name,
                      output_name=config.onnx.output_name, dynamic_batch=config.onnx.dynamic_batch,
                      log=ctx.log)
    exp.slimmed_with = slim_onnx(fp32, config.slim)
    check_onnx(fp32)
    parity = check(FP32_ONNX, ref, outputs_of(fp32, x)[0], config.tolerance)
    ctx.log(f"onnx-fp32: opset {exp.opset} via {exp.exporter}"
            f"{', slimmed with ' + exp.slimmed_with if exp.slimmed_with else ''}; max abs diff vs "
            f"torch {parity['max_abs_diff']:.3g} ({parity['rel_diff']:.2g} of scale) on "
            f"{parity['samples']} samples")
    arts["onnx-fp32"] = {"file": FP32_ONNX, "files": [FP32_ONNX], "format": "onnx",
                         "precision": "fp32", "runtime": "onnxruntime", "export": exp.as_dict(),
                         "checks": {"parity_vs_torch": parity}, **io_signature(fp32),
                         "_path": fp32}
    if config.fp16:
        fp16 = ctx.work_dir / FP16_ONNX
        convert_fp16(fp32, fp16)
        check_onnx(fp16)
        p16 = check(FP16_ONNX, ref, outputs_of(fp16, x)[0], config.fp16_tolerance)
        arts["onnx-fp16"] = {"file": FP16_ONNX, "files": [FP16_ONNX], "format": "onnx",
                             "precision": "fp16", "runtime": "onnxruntime",
                             "checks": {"parity_vs_torch": p16}, **io_signature(fp16),
                             "_path": fp16}
    if config.openvino.enabled:
        w = config.openvino.weights
        key = f"openvino-{w}"
        folder = ctx.work_dir / key
        ir = convert_to_ir(fp32 if config.openvino.source == "onnx" else model, folder,
                           example=torch.from_numpy(x[:2]), weights=w,
                           input_name=config.onnx.input_name, output_name=config.onnx.output_name,
                           dynamic_batch=config.onnx.dynamic_batch)
        checks = _ov_parity(key, folder, x, ref,
                            config.tolerance if w == "fp32" else config.fp16_tolerance)
        ctx.log(f"{key}: from {ir.source}, runs in {checks['inference_precision']}: max abs diff vs "
                f"torch {checks['max_abs_diff']:.3g}; with OpenVINO's default precision "
                f"({checks['default_hint']['inference_precision']}) it would be "
                f"{checks['default_hint']['max_abs_diff']:.3g}")
        arts[key] = {"file": f"{key}/{IR_XML}", "files": [f"{key}/{IR_XML}", f"{key}/model.bin"],
                     "format": "openvino", "precision": w, "runtime": "openvino",
                     "inference_precision": checks["inference_precision"], "export": ir.as_dict(),
                     "checks": {"parity_vs_torch": checks}, **ir_signature(folder),
                     "_path": folder}
    from edgemml.stages._export_embedded import convert_fp32

    arts.update(convert_fp32(ctx, config, model, x, ref, check))
    return arts, exp
