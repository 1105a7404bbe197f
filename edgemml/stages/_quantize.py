"""The quantize stage's per-layer error glue: which int8 layer hurts, measured (issue 15).

For every int8 artifact the stage compares each layer's output with the fp32 graph's on
calibration samples (edgemml.quantization.perlayer) and keeps the worst layers in quantize.json.
For the layers the accuracy budget kept in float, the reason is measured too: their SQNR in the
plain (fully quantized) int8 model and, for ONNX Runtime, the logits error when only that layer is
quantized (the sensitivity the budget search ranked them by).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pydantic import Field

from edgemml.config import StrictModel

WORST = 10


class QatOptions(StrictModel):
    """Quantization-aware training (torchao PT2E, see edgemml/quantization/qat.py), run only when
    post-training int8 misses max_accuracy_drop with the allowed layers kept in float."""

    max_steps: int = Field(100, ge=1, description="Fine-tuning steps with fake quantization.")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate (AdamW, cosine decay).")
    batch_size: int = Field(32, ge=2, description="Training batch size.")


def _kept_in_float(float_layers: list[str], plain: Any, sensitivity: dict[str, float]
                   ) -> list[dict[str, Any]]:
    by_name = {r.layer: r for r in plain.layers} if plain is not None else {}
    out = []
    for name in float_layers:
        row: dict[str, Any] = {"layer": name}
        if name in sensitivity:
            row["logits_error_when_only_it_is_int8"] = sensitivity[name]
        if name in by_name:
            row["sqnr_db_when_int8"] = by_name[name].sqnr_db
            row["cosine_when_int8"] = by_name[name].cosine
        out.append(row)
    return out


def ort_per_layer(prepped: Path, final: Path, calib: np.ndarray, tmp: Path, *,
                  float_layers: list[str], search: dict[str, Any] | None,
                  quantize_plain: Callable[[Path], Path], log: Callable[[str], None]
                  ) -> dict[str, Any]:
    """quantize.json's `per_layer` entry of the ONNX Runtime int8 model `final`."""
    from edgemml.quantization import perlayer

    t0 = time.perf_counter()
    res = perlayer.ort_per_layer(prepped, final, calib, tmp)
    entry = res.summary(WORST)
    if float_layers:
        plain = perlayer.ort_per_layer(prepped, quantize_plain(tmp / "plain.int8.onnx"), calib,
                                       tmp)
        entry["kept_in_float"] = _kept_in_float(float_layers, plain,
                                                (search or {}).get("sensitivity", {}))
    entry["seconds"] = round(time.perf_counter() - t0, 2)
    _log_worst(log, "onnxruntime", entry)
    return entry


def ov_per_layer(fp32_xml: Path, final_xml: Path, plain_xml: Path | None, calib: np.ndarray, *,
                 float_layers: list[str], log: Callable[[str], None],
                 progress: Any) -> dict[str, Any]:
    """quantize.json's `per_layer` entry of the OpenVINO int8 IR `final_xml` (one compiled model
    per layer: see runtimes.openvino.tapped_outputs)."""
    import openvino as ov

    from edgemml.quantization import perlayer

    t0 = time.perf_counter()
    layers = len(perlayer.ov_layers(ov.Core().read_model(str(final_xml))))
    with progress("per-layer int8 error (openvino)", layers) as bar:
        res = perlayer.ov_per_layer(fp32_xml, final_xml, calib, progress=bar.advance)
    entry = res.summary(WORST)
    if float_layers:
        plain = (perlayer.ov_per_layer(fp32_xml, plain_xml, calib) if plain_xml is not None
                 else None)
        entry["kept_in_float"] = _kept_in_float(float_layers, plain, {})
    entry["seconds"] = round(time.perf_counter() - t0, 2)
    _log_worst(log, "openvino", entry)
    return entry


def _log_worst(log: Callable[[str], None], backend: str, entry: dict[str, Any]) -> None:
    worst = entry.get("worst") or []
    if not worst:
        log(f"{backend} per-layer error: no layer matched ({entry.get('note')})")
        return
    w = worst[0]
    log(f"{backend} per-layer error on {entry['samples']} calibration samples: median SQNR "
        f"{entry['median_sqnr_db']} dB over {entry['layers']} layers; worst {w['layer']} "
        f"({w['op']}) {w['sqnr_db']} dB, cosine {w['cosine']}")


# --------------------------------------------------------------------------------------------------
# QAT: when post-training int8 misses the budget even with the allowed layers in float
# --------------------------------------------------------------------------------------------------


def qat_model(ctx: Any, config: Any, a: Any, target: str) -> Any:
    """One torchao PT2E QAT fine-tune per stage run (both backends use its QDQ ONNX file);
    a StageError when the model cannot be prepared (the budget failure then reports it)."""
    from edgemml.errors import StageError
    from edgemml.quantization.qat import qat_to_onnx

    if isinstance(a.qat, StageError):
        raise a.qat
    if a.qat is None:
        ctx.log(f"post-training int8 misses the budget: quantization-aware training, "
                f"{config.qat.max_steps} steps")
        out = ctx.work_dir / "tmp-qat"
        out.mkdir(exist_ok=True)
        try:
            a.qat = qat_to_onnx(a.model, a.train, a.calib, out / "model.qat.int8.onnx",
                                target=target, max_steps=config.qat.max_steps, lr=config.qat.lr,
                                batch_size=config.qat.batch_size, seed=ctx.seed,
                                opset=max(18, config.onnx.opset),
                                input_name=config.onnx.input_name,
                                output_name=config.onnx.output_name, log=ctx.log,
                                progress=ctx.progress)
        except StageError as exc:
            ctx.warn(f"quantization-aware training failed: {exc.message}")
            a.qat = exc
            raise
    return a.qat


def _failed(exc: Exception) -> dict[str, Any]:
    return {"method": "torchao PT2E QAT", "met": False, "replaced_ptq": False,
            "error": getattr(exc, "message", str(exc))}


def _adopt(res: Any, scored: Any, budget: Any) -> dict[str, Any]:
    met = budget.meets(scored)
    if met:  # the QAT model replaces the post-training one
        res.final, res.float_layers = scored, []
        res.search = {**(res.search or {}), "met": True, "met_by": "qat"}
    return {**scored.as_dict(), "met": met, "replaced_ptq": met}


def qat_ort(ctx: Any, config: Any, a: Any, res: Any, out: Path, target: str) -> dict[str, Any]:
    """Fine-tune with fake quantization; ship its int8 ONNX file when it meets the budget."""
    import shutil

    from edgemml.quantization.budget import score
    from edgemml.quantization.ort import logits

    from edgemml.errors import StageError

    try:
        q = qat_model(ctx, config, a, target)
    except StageError as exc:
        return _failed(exc)
    entry = {**q.as_dict(), **_adopt(res, score(logits(q.onnx, a.val_x), a.val_y, a.ref,
                                                a.fp32_pct), config.budget())}
    if entry["met"]:
        shutil.copyfile(q.onnx, out)
    return entry


def qat_ov(ctx: Any, config: Any, a: Any, res: Any, out_dir: Path, target: str
           ) -> dict[str, Any]:
    """The same QAT model converted to an OpenVINO IR (its Q/DQ pairs become FakeQuantize)."""
    import shutil

    import openvino as ov

    from edgemml.quantization.budget import score
    from edgemml.quantization.ov import float_layers, logits_f32
    from edgemml.runtimes.openvino import IR_XML

    from edgemml.errors import StageError

    try:
        q = qat_model(ctx, config, a, target)
    except StageError as exc:
        return _failed(exc)
    ir = ctx.work_dir / "tmp-qat" / "ir"
    shutil.rmtree(ir, ignore_errors=True)
    ov.save_model(ov.convert_model(str(q.onnx)), str(ir / IR_XML), compress_to_fp16=False)
    logits, _ = logits_f32(ir / IR_XML, a.val_x)
    entry = {**q.as_dict(), **_adopt(res, score(logits, a.val_y, a.ref, a.fp32_pct),
                                     config.budget())}
    if entry["met"]:
        shutil.rmtree(out_dir)
        shutil.move(str(ir), str(out_dir))
        res.quantized_layers = len(float_layers(ov.Core().read_model(str(out_dir / IR_XML)))[0])
    return entry


def pct(a: float | None) -> str:
    return "n/a" if a is None else f"{a:.2f}%"


def record(ctx: Any, report: dict[str, Any], fp32_pct: float | None) -> None:
    """The stage's metrics and highlights (stage.json, the run summary)."""
    metrics: dict[str, Any] = {"fp32_top1_pct": fp32_pct}
    for backend, key in (("onnxruntime", "onnx"), ("openvino", "openvino"),
                         ("executorch", "executorch"), ("litert", "litert")):
        res = report.get(backend)
        if res is None:
            continue
        metrics[f"{key}_int8_top1_pct"] = res["top1_pct"]
        metrics[f"{key}_int8_accuracy_drop_pp"] = res["accuracy_drop_pp"]
        metrics[f"{key}_float_layers"] = len(res["float_layers"])
        metrics[f"{key}_size_ratio"] = res["size"]["ratio"]
        extra = (f", {len(res['float_layers'])} layer(s) kept in float" if res["float_layers"]
                 else "")
        fp32_what = " of fp32 weights" if "fp32_bytes_means" in res["size"] else ""
        runs_in = (f" (runs in {res['inference_precision']} outside int8 ops)"
                   if backend == "openvino" else f" ({res['recipe']['activation_type']} activations)"
                   if backend == "onnxruntime" else f" ({res['io_note']})")
        ctx.highlight(f"{backend} int8{runs_in}: val top-1 {pct(res['top1_pct'])} vs fp32 "
                      f"{pct(fp32_pct)}, {res['size']['fp32_bytes'] / 2**20:.2f} MB{fp32_what} -> "
                      f"{res['size']['int8_bytes'] / 2**20:.2f} MB{extra}")
    ctx.record(**metrics)
