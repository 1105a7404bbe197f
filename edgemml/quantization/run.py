"""The quantize stage's work: export fp32 ONNX, calibrate, quantize per backend, measure, search.

Accuracy is top-1 on the validation split, measured with the runtime that will run the artifact
(onnxruntime for the ONNX model, OpenVINO compiled with INFERENCE_PRECISION_HINT=f32 for the IR), and
compared with the torch fp32 model on the same samples.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgemml.errors import InputError, StageError
from edgemml.exporters.runtime import (compare_outputs, dataset_arrays, evenly_spaced, onnx_session,
                                       openvino_compiled, run_onnx, run_openvino)
from edgemml.exporters.stage_io import check_channels, resolve_preprocess, top1, torch_logits
from edgemml.quantization.cpu import RECIPES, detect_target
from edgemml.stages.common import load_input_model, load_stage_data, write_json

if TYPE_CHECKING:
    from edgemml.stages.base import StageContext
    from edgemml.stages.quantize import QuantizeConfig

ONNX_INT8 = "model.int8.onnx"
OV_INT8_DIR = "openvino-int8"
REPORT = "quantize.json"
PARITY_TOLERANCE = 1e-4


def _pp(a: float | None, b: float | None) -> float | None:
    """Drop from a to b in percentage points."""
    return None if a is None or b is None else round((a - b) * 100.0, 4)


def _pct(a: float | None) -> str:
    return "n/a" if a is None else f"{a * 100:.2f}%"


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MB"


def _dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _ort_recipe(config: QuantizeConfig) -> dict[str, Any]:
    if config.target == "auto":
        target, evidence = detect_target()
        why = f"target auto-detected as {target} ({evidence})"
    else:
        target, why = config.target, f"target {config.target} set in the pipeline"
    recipe = RECIPES[target]
    opts = config.onnxruntime
    chosen = {
        "target": target,
        "activation_type": recipe.activation_type if opts.activation_type == "auto"
        else opts.activation_type,
        "weight_type": recipe.weight_type if opts.weight_type == "auto" else opts.weight_type,
        "reduce_range": recipe.reduce_range if opts.reduce_range == "auto" else opts.reduce_range,
        "per_channel": opts.per_channel,
        "why": f"{why}; {recipe.why}",
        "overridden": [k for k in ("activation_type", "weight_type", "reduce_range")
                       if getattr(opts, k) != "auto"],
    }
    return chosen


def _fail_budget(ctx: StageContext, report: dict[str, Any], backend: str, res: dict[str, Any],
                 budget: float, cap: int | None) -> None:
    write_json(ctx, REPORT, report)
    kept = res.get("float_layers") or []
    raise StageError(
        f"{backend} int8 misses the accuracy budget: {_pct(res['accuracy'])} vs fp32 "
        f"{_pct(report['fp32']['accuracy'])} on {report['val_samples']} val samples (drop "
        f"{res['accuracy_drop_pp']:.2f} pp > max_accuracy_drop {budget:g} pp) with "
        f"{len(kept)} layer(s) kept in float"
        + (f" (max_float_layers={cap})" if cap is not None else "")
        + (f": {', '.join(kept[:8])}{' ...' if len(kept) > 8 else ''}" if kept else ""),
        key="max_accuracy_drop",
        hint=f"raise max_accuracy_drop or max_float_layers, calibrate with more or better data "
             f"(calibration.samples/method), or fine-tune the model; figures in "
             f"{ctx.work_dir / REPORT}")


def _quantize_ort(ctx: StageContext, config: QuantizeConfig, fp32: Path, calib: np.ndarray,
                  val_x: np.ndarray, val_y: np.ndarray, ref: np.ndarray, fp32_acc: float | None,
                  report: dict[str, Any]) -> Path:
    from edgemml.quantization.ort import (OrtQuantizer, OrtSettings, initializer_bytes,
                                          preprocess_for_quantization, sensitivity)

    recipe = _ort_recipe(config)
    ctx.log(f"onnxruntime: {recipe['activation_type']} activations x {recipe['weight_type']} "
            f"weights{' per channel' if recipe['per_channel'] else ''}"
            f"{', reduce_range' if recipe['reduce_range'] else ''} ({recipe['why']})")
    tmp = ctx.work_dir / "tmp"
    tmp.mkdir(exist_ok=True)
    prepped = tmp / "fp32.prepped.onnx"
    t0 = time.perf_counter()
    preprocess_for_quantization(fp32, prepped)
    settings = OrtSettings(method=config.calibration.method,
                           percentile=config.calibration.percentile,
                           per_channel=recipe["per_channel"],
                           activation_type=recipe["activation_type"],
                           weight_type=recipe["weight_type"], reduce_range=recipe["reduce_range"])
    quantizer = OrtQuantizer(prepped, calib, settings, tmp)
    out = ctx.work_dir / ONNX_INT8
    quantizer.quantize(out)
    candidates = quantizer.quantized_nodes(out)

    def measure(path: Path) -> tuple[float | None, np.ndarray]:
        logits = run_onnx(onnx_session(path), val_x)
        return top1(logits, val_y), logits

    acc, logits = measure(out)
    plain = {"accuracy": acc, "accuracy_drop_pp": _pp(fp32_acc, acc),
             "top1_agreement_with_fp32": float((logits.argmax(1) == ref.argmax(1)).mean())}
    res: dict[str, Any] = {**plain, "recipe": recipe, "plain_int8": plain,
                           "quantized_layers": len(candidates), "float_layers": [], "search": None}
    budget = config.max_accuracy_drop
    if budget is not None and fp32_acc is not None and plain["accuracy_drop_pp"] > budget:
        ctx.log(f"onnxruntime int8 drops {plain['accuracy_drop_pp']:.2f} pp > {budget:g} pp: ranking "
                f"{len(candidates)} layers by sensitivity")
        sel = evenly_spaced(len(val_x), config.sensitivity_samples)
        with ctx.progress("layer sensitivity (onnxruntime)", len(candidates)) as bar:
            scores = sensitivity(quantizer, candidates, val_x[sel], ref[sel].astype(np.float64),
                                 tmp / "one_layer.onnx", advance=bar.advance)
        ranked = sorted(candidates, key=lambda n: -scores[n])
        cap = min(config.max_float_layers or len(ranked), len(ranked))
        trials = []
        met = False
        with ctx.progress("keeping layers in float", cap) as bar:
            for k in range(1, cap + 1):
                quantizer.quantize(out, exclude=ranked[:k])
                acc, logits = measure(out)
                drop = _pp(fp32_acc, acc)
                trials.append({"float_layers": k, "accuracy": acc, "accuracy_drop_pp": drop})
                bar.advance()
                bar.update(drop_pp=drop)
                if drop is not None and drop <= budget:
                    met = True
                    break
        res.update(accuracy=acc, accuracy_drop_pp=_pp(fp32_acc, acc),
                   top1_agreement_with_fp32=float((logits.argmax(1) == ref.argmax(1)).mean()),
                   float_layers=ranked[:len(trials)],
                   search={"budget_pp": budget, "max_float_layers": cap, "met": met,
                           "sensitivity": {n: round(scores[n], 8) for n in ranked},
                           "sensitivity_samples": int(len(sel)), "trials": trials})
        report["onnxruntime"] = res
        if not met:
            _fail_budget(ctx, report, "onnxruntime", res, budget, config.max_float_layers)
    fp32_bytes, int8_bytes = fp32.stat().st_size, out.stat().st_size
    w_fp32, w_int8 = initializer_bytes(fp32), initializer_bytes(out)
    res.update(seconds=round(time.perf_counter() - t0, 2), file=ONNX_INT8,
               calibration_method=config.calibration.method,
               size={"fp32_bytes": fp32_bytes, "int8_bytes": int8_bytes,
                     "ratio": round(fp32_bytes / int8_bytes, 3),
                     "weights_fp32_bytes": w_fp32, "weights_int8_bytes": w_int8})
    report["onnxruntime"] = res
    for p in tmp.iterdir():
        p.unlink()
    tmp.rmdir()
    return out


def _quantize_ov(ctx: StageContext, config: QuantizeConfig, fp32: Path, calib: np.ndarray,
                 val_x: np.ndarray, val_y: np.ndarray, ref: np.ndarray, fp32_acc: float | None,
                 report: dict[str, Any]) -> Path:
    import openvino as ov

    from edgemml.exporters.openvino import IR_XML, save_ir
    from edgemml.quantization.ov import (OvSettings, float_layers, quantize_ov,
                                         quantize_ov_with_budget)

    settings = OvSettings(preset=config.openvino.preset,
                          fast_bias_correction=config.openvino.fast_bias_correction,
                          model_type=config.openvino.model_type, subset_size=len(calib))
    t0 = time.perf_counter()
    model = ov.convert_model(str(fp32))
    fp32_dir = ctx.work_dir / "tmp-ov-fp32"
    ov.save_model(model, str(fp32_dir / IR_XML), compress_to_fp16=False)
    fp32_ir_bytes = _dir_bytes(fp32_dir)
    budget = config.max_accuracy_drop
    out_dir = ctx.work_dir / OV_INT8_DIR

    def accuracy(compiled: Any, x: np.ndarray, y: np.ndarray) -> float:
        return top1(run_openvino(compiled, x), y) or 0.0

    q = quantize_ov(model, calib, settings)
    save_ir(q, out_dir / IR_XML, compress_to_fp16=False)
    compiled, precision = openvino_compiled(out_dir / IR_XML, precision="f32")
    logits = run_openvino(compiled, val_x)
    acc = top1(logits, val_y)
    plain = {"accuracy": acc, "accuracy_drop_pp": _pp(fp32_acc, acc),
             "top1_agreement_with_fp32": float((logits.argmax(1) == ref.argmax(1)).mean())}
    search = None
    if budget is not None and fp32_acc is not None and plain["accuracy_drop_pp"] > budget:
        ctx.log(f"openvino int8 drops {plain['accuracy_drop_pp']:.2f} pp > {budget:g} pp: "
                f"nncf.quantize_with_accuracy_control")
        q = quantize_ov_with_budget(ov.convert_model(str(fp32)), calib, val_x, val_y, settings,
                                    max_drop_pp=budget, max_float_layers=config.max_float_layers,
                                    accuracy=accuracy)
        shutil_rm(out_dir)
        save_ir(q, out_dir / IR_XML, compress_to_fp16=False)
        compiled, precision = openvino_compiled(out_dir / IR_XML, precision="f32")
        logits = run_openvino(compiled, val_x)
        acc = top1(logits, val_y)
        search = {"budget_pp": budget, "method": "nncf.quantize_with_accuracy_control",
                  "max_float_layers": config.max_float_layers}
    quantized, floating = float_layers(ov.Core().read_model(str(out_dir / IR_XML)))
    res = {"accuracy": acc, "accuracy_drop_pp": _pp(fp32_acc, acc),
           "top1_agreement_with_fp32": float((logits.argmax(1) == ref.argmax(1)).mean()),
           "inference_precision": precision, "plain_int8": plain,
           "settings": {"preset": settings.preset, "subset_size": settings.subset_size,
                        "fast_bias_correction": settings.fast_bias_correction,
                        "model_type": settings.model_type, "target_device": "CPU"},
           "quantized_layers": len(quantized), "float_layers": floating, "search": search,
           "folder": OV_INT8_DIR, "seconds": round(time.perf_counter() - t0, 2)}
    int8_bytes = _dir_bytes(out_dir)
    res["size"] = {"fp32_bytes": fp32_ir_bytes, "int8_bytes": int8_bytes,
                   "ratio": round(fp32_ir_bytes / int8_bytes, 3)}
    report["openvino"] = res
    shutil_rm(fp32_dir)
    if search is not None:
        search["met"] = res["accuracy_drop_pp"] is not None and res["accuracy_drop_pp"] <= budget
        if not search["met"]:
            _fail_budget(ctx, report, "openvino", res, budget, config.max_float_layers)
    return out_dir


def shutil_rm(path: Path) -> None:
    import shutil

    if path.exists():
        shutil.rmtree(path)


def quantize_stage(ctx: StageContext, config: QuantizeConfig) -> dict[str, Path]:
    """Run the quantize stage (see edgemml/stages/quantize.py for the contract)."""
    import torch

    from edgemml.exporters.onnx import check_onnx, export_onnx

    model, spec = load_input_model(ctx)
    pre, pre_from = resolve_preprocess(spec, config, ctx.pipeline)
    check_channels(pre, spec)
    data = load_stage_data(ctx, config, preprocess=pre)
    split = config.calibration.split
    calib_set = data.calibration if split == "calibration" else data.split(split)
    if len(calib_set) == 0:
        raise InputError(f"the {split} split used for calibration is empty", key="calibration.split")
    calib, _ = dataset_arrays(calib_set,
                              evenly_spaced(len(calib_set), config.calibration.samples).tolist())
    val_x, val_y = dataset_arrays(data.val)
    if len(val_x) == 0:
        if config.max_accuracy_drop is not None:
            raise InputError("max_accuracy_drop needs a validation split, and it is empty",
                             key="data.split.val", hint="give data.split.val a fraction > 0")
        ctx.warn("the validation split is empty: int8 accuracy is not measured")
        val_x = calib[: min(64, len(calib))]
        val_y = np.full(len(val_x), -1, dtype=np.int64)
    ref = torch_logits(model, val_x)
    fp32_acc = top1(ref, val_y)

    tmp = ctx.work_dir / "tmp-fp32"
    tmp.mkdir(exist_ok=True)
    fp32 = tmp / "model.fp32.onnx"
    exp = export_onnx(model, torch.from_numpy(calib[:2]), fp32, opset=config.onnx.opset,
                      exporter=config.onnx.exporter, input_name=config.onnx.input_name,
                      output_name=config.onnx.output_name, dynamic_batch=config.onnx.dynamic_batch,
                      log=ctx.log)
    check_onnx(fp32)
    parity = compare_outputs(ref, run_onnx(onnx_session(fp32), val_x), tolerance=PARITY_TOLERANCE)
    if not parity.ok:
        raise StageError(f"the fp32 ONNX export differs from torch before quantization: max abs diff "
                         f"{parity.max_abs_diff:.3g} ({parity.rel_diff:.3g} of the output scale > "
                         f"{PARITY_TOLERANCE:g})", key="onnx.exporter",
                         hint="try onnx.exporter: torchscript")
    report: dict[str, Any] = {
        "input_stage": ctx.input_name, "preprocess": pre.model_dump(mode="json"),
        "preprocess_from": pre_from, "classes": spec.class_names or data.classes,
        "calibration": {"split": split if split != "calibration" or data.calibration_set is not None
                        else "calibration (train split: no data.calibration)",
                        "samples": int(len(calib)), "method": config.calibration.method,
                        "percentile": config.calibration.percentile
                        if config.calibration.method == "percentile" else None},
        "val_samples": int(len(val_x)),
        "fp32": {"accuracy": fp32_acc, "onnx_export": exp.as_dict(), "onnx_parity": parity.as_dict()},
        "max_accuracy_drop_pp": config.max_accuracy_drop,
    }
    outputs: dict[str, Path] = {}
    if "onnxruntime" in config.backends:
        outputs["onnx-int8"] = _quantize_ort(ctx, config, fp32, calib, val_x, val_y, ref, fp32_acc,
                                             report)
    if "openvino" in config.backends:
        outputs["openvino-int8"] = _quantize_ov(ctx, config, fp32, calib, val_x, val_y, ref,
                                                fp32_acc, report)
    shutil_rm(tmp)
    outputs["report"] = write_json(ctx, REPORT, report)
    highlights, metrics = [], {"fp32_accuracy": fp32_acc}
    for backend, key in (("onnxruntime", "onnx"), ("openvino", "openvino")):
        res = report.get(backend)
        if res is None:
            continue
        metrics[f"{key}_int8_accuracy"] = res["accuracy"]
        metrics[f"{key}_int8_accuracy_drop_pp"] = res["accuracy_drop_pp"]
        metrics[f"{key}_float_layers"] = len(res["float_layers"])
        metrics[f"{key}_size_ratio"] = res["size"]["ratio"]
        extra = (f", {len(res['float_layers'])} layer(s) kept in float" if res["float_layers"]
                 else "")
        runs_in = f" (runs in {res['inference_precision']} outside int8 ops)" \
            if backend == "openvino" else f" ({res['recipe']['activation_type']} activations)"
        highlights.append(
            f"{backend} int8{runs_in}: val top-1 {_pct(res['accuracy'])} vs fp32 {_pct(fp32_acc)}, "
            f"{_mb(res['size']['fp32_bytes'])} -> {_mb(res['size']['int8_bytes'])}{extra}")
    ctx.record(**metrics, highlights=highlights)
    return outputs
