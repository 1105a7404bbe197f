"""quantize: post-training int8 of the input model for ONNX Runtime, OpenVINO, ExecuTorch and/or
LiteRT, within an accuracy budget.

Defaults are the fast and accurate recipe for the CPU it runs on (uint8 activations x int8
per-channel weights on x86 with VNNI; see edgemml/quantization/cpu.py), and the choice is reported.
Accuracy fp32 vs int8 is measured on the validation split. With `max_accuracy_drop` (and
`min_agreement`, the share of val predictions int8 must keep), a model that misses the budget gets
its most sensitive layers kept in float, the fewest that meet it; when no allowed number does, the
stage fails with the figures.

Why this stage, not export, owns the int8 .pte and .tflite files: an int8 file is the product of
calibration and of the budget search, and both live here: the same calibration samples (one
`calibration:` section), the same validation split, fp32 reference and `max_accuracy_drop` /
`max_float_layers` for every backend, so the four int8 artifacts of a run are comparable and one
budget means one thing. Export stays a conversion of the fp32 model (it writes the fp32 .pte and
.tflite, checked against torch) plus the bundle, into which it copies this stage's int8 files as it
does the ONNX and OpenVINO ones. The embedded glue is in _quantize_embedded.py.

Outputs: onnx-int8 (model.int8.onnx), openvino-int8 (folder with model.xml/.bin), executorch-int8
(model.int8.pte), litert-int8 (model.int8.tflite), report (quantize.json). The libraries do the work
(edgemml.quantization.ort / .ov / .pt2e and edgemml.exporters.executorch / .litert, through the
runtime layer); this module decides what to do and reports it. torch, onnxruntime, openvino,
executorch and litert are imported inside `run`, not when a pipeline file is validated.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from edgemml.config import DataConfig, LoadedPipeline, PreprocessConfig, StageConfig, StrictModel
from edgemml.errors import InputError, StageError
from edgemml.exporters.options import OnnxOptions
from edgemml.quantization.budget import Budget
from edgemml.stages._quantize_embedded import (EMBEDDED, Pt2eOptions, check_extras,
                                               quantize_embedded)
from edgemml.stages.base import Stage, StageContext
from edgemml.stages._quantize import QatOptions, pct as _pct, record
from edgemml.stages.common import (check_channels, load_input_model, load_stage_data,
                                   model_preprocess, stage_data_files, write_json)

if TYPE_CHECKING:
    import numpy as np

    from edgemml.quantization.budget import Searched

ONNX_INT8 = "model.int8.onnx"
OV_INT8_DIR = "openvino-int8"
REPORT = "quantize.json"
PARITY_TOLERANCE = 1e-4


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
    backends: list[Literal["onnxruntime", "openvino", "executorch", "litert"]] = Field(
        ["onnxruntime", "openvino"], min_length=1, description="Runtimes to produce int8 models "
        "for; executorch (.pte, XNNPACK) and litert (.tflite) need their pip extras.")
    target: Literal["auto", "x86-vnni", "x86", "arm64"] = Field(
        "auto", description="CPU the int8 model will run on; auto: this machine (/proc/cpuinfo).")
    calibration: CalibrationOptions = Field(default_factory=CalibrationOptions,
                                            description="Calibration data and method.")
    onnxruntime: OrtOptions = Field(default_factory=OrtOptions, description="ONNX Runtime options.")
    openvino: OvOptions = Field(default_factory=OvOptions, description="OpenVINO/NNCF options.")
    executorch: Pt2eOptions = Field(default_factory=Pt2eOptions,
                                    description="ExecuTorch int8 (XNNPACKQuantizer) options.")
    litert: Pt2eOptions = Field(default_factory=Pt2eOptions,
                                description="LiteRT int8 (litert-torch PT2EQuantizer) options.")
    onnx: OnnxOptions = Field(default_factory=OnnxOptions,
                              description="Export of the fp32 ONNX graph that is quantized.")
    max_accuracy_drop: float | None = Field(
        None, ge=0, description="Largest allowed top-1 drop (percentage points, val split) of int8 "
        "vs fp32; beyond it the most sensitive layers stay in float. None: no budget.")
    min_agreement: float | None = Field(
        None, gt=0, le=1, description="With max_accuracy_drop: int8 must also predict the fp32 "
        "model's top-1 class on at least this fraction of the val split (e.g. 0.99). Flips cancel "
        "in a drop (MobileNetV2 int8: 0.00 pp on val with 6 of 359 changed, 0.56 pp on test); "
        "the disagreement bounds the drop on unseen data. None: the drop alone.")
    max_float_layers: int | None = Field(
        None, ge=1, description="At most this many layers may stay in float for the budget "
        "(ONNX Runtime, ExecuTorch, LiteRT); for OpenVINO, NNCF's accuracy-restorer iterations, "
        "each of which may revert several layers that share a quantizer (default: no limit).")
    sensitivity_samples: int = Field(64, ge=1, description="Val samples used to rank layer "
                                     "sensitivity (ONNX Runtime).")
    qat: QatOptions | None = Field(
        None, description="Quantization-aware training when post-training int8 misses "
        "max_accuracy_drop even with max_float_layers in float; its int8 ONNX/IR replace the "
        "post-training ones when they meet it. Needs max_accuracy_drop and torchao.")
    per_layer_samples: int = Field(
        32, ge=0, description="Calibration samples on which every int8 layer's output is compared "
        "with fp32 (SQNR, cosine; the worst 10 in quantize.json and report.html); 0: skip.")
    data: DataConfig | None = Field(None, description="Data (merged over the pipeline's).")
    preprocess: PreprocessConfig | None = Field(
        None, description="Preprocessing when the input model does not record its own.")

    @model_validator(mode="after")
    def _qat_needs_budget(self) -> QuantizeConfig:
        if self.qat is not None and self.max_accuracy_drop is None:
            raise ValueError("qat runs only when int8 misses max_accuracy_drop: set it")
        if self.min_agreement is not None and self.max_accuracy_drop is None:
            raise ValueError("min_agreement is a second condition of the budget: set "
                             "max_accuracy_drop too")
        return self

    def budget(self) -> Budget:
        return Budget(self.max_accuracy_drop, self.min_agreement)

    @field_validator("backends")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("list each backend once")
        check_extras([b for b in value if b in EMBEDDED], "remove it from backends")
        return value


class QuantizeStage(Stage[QuantizeConfig]):
    """Post-training int8 (ONNX Runtime QDQ, OpenVINO/NNCF) within an accuracy budget."""

    type = "quantize"
    Config = QuantizeConfig
    provides = ("onnx-int8", "openvino-int8", "executorch-int8", "litert-int8", "report")
    requires = ("torch", "onnx", "onnxruntime", "openvino", "nncf", "onnxscript", "executorch",
                "torchao", "litert-torch", "ai-edge-litert")

    @classmethod
    def model_needs(cls, config: QuantizeConfig) -> tuple[str, ...]:
        return ("quantize",)

    @classmethod
    def data_files(cls, config: QuantizeConfig, pipeline: LoadedPipeline) -> list[Path]:
        return stage_data_files(config, pipeline)

    def run(self, ctx: StageContext, config: QuantizeConfig) -> dict[str, Path]:
        import numpy as np

        from edgemml import runtimes
        from edgemml.data.datasets import as_arrays, evenly_spaced
        from edgemml.metrics import accuracy, check_parity

        model, spec = load_input_model(ctx)
        pre, pre_from = model_preprocess(spec.extra.get("preprocess"), config, ctx.pipeline)
        check_channels(pre, spec.in_chans)
        data = load_stage_data(ctx, config, preprocess=pre)
        split = config.calibration.split
        calib_set = data.calibration if split == "calibration" else data.split(split)
        if len(calib_set) == 0:
            raise InputError(f"the {split} split used for calibration is empty",
                             key="calibration.split")
        calib, _ = as_arrays(calib_set, evenly_spaced(len(calib_set), config.calibration.samples))
        val_x, val_y = as_arrays(data.val)
        if len(val_x) == 0:
            if config.max_accuracy_drop is not None:
                raise InputError("max_accuracy_drop needs a validation split, and it is empty",
                                 key="data.split.val", hint="give data.split.val a fraction > 0")
            ctx.warn("the validation split is empty: int8 accuracy is not measured")
            val_x = calib[: min(64, len(calib))]
            val_y = np.full(len(val_x), -1, dtype=np.int64)
        ref = runtimes.backend("torch").logits(model, val_x)
        fp32_pct = accuracy(ref, val_y).top1_pct
        calibration = {"split": split if split != "calibration" or data.calibration_set is not None
                       else "calibration (train split: no data.calibration)",
                       "samples": int(len(calib)), "method": config.calibration.method,
                       "percentile": config.calibration.percentile
                       if config.calibration.method == "percentile" else None}
        report: dict[str, Any] = {
            "input_stage": ctx.input_name, "preprocess": pre.model_dump(mode="json"),
            "preprocess_from": pre_from, "classes": spec.class_names or data.classes,
            "calibration": calibration, "val_samples": int(len(val_x)),
            "fp32": {"top1_pct": fp32_pct}, "max_accuracy_drop_pp": config.max_accuracy_drop,
            "min_agreement": config.min_agreement}
        args = _Args(None, calib, val_x, val_y, ref, fp32_pct)
        args.model, args.train = model, data.train
        outputs: dict[str, Path] = {}
        tmp = ctx.work_dir / "tmp-fp32"
        if {"onnxruntime", "openvino"} & set(config.backends):
            tmp.mkdir(exist_ok=True)
            args.fp32, exp = self._export_fp32(ctx, config, model, calib, tmp)
            onnx_rt = runtimes.backend("onnxruntime")
            parity = check_parity(ref, runtimes.predict(onnx_rt.open(args.fp32, threads=None),
                                                        val_x), tolerance=PARITY_TOLERANCE)
            if not parity.ok:
                raise StageError(f"the fp32 ONNX export differs from torch before quantization: "
                                 f"max abs diff {parity.max_abs_diff:.3g} ({parity.rel_diff:.3g} "
                                 f"of the output scale > {PARITY_TOLERANCE:g})",
                                 key="onnx.exporter", hint="try onnx.exporter: torchscript")
            report["fp32"].update(onnx_export=exp.as_dict(), onnx_parity=parity.as_dict())
        if "onnxruntime" in config.backends:
            outputs["onnx-int8"] = _quantize_ort(ctx, config, args, report)
        if "openvino" in config.backends:
            outputs["openvino-int8"] = _quantize_ov(ctx, config, args, report)
        for target in (b for b in config.backends if b in EMBEDDED):
            outputs[f"{target}-int8"] = quantize_embedded(ctx, config, target, model, args,
                                                             report, _check_budget)
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.rmtree(ctx.work_dir / "tmp-qat", ignore_errors=True)
        outputs["report"] = write_json(ctx, REPORT, report)
        record(ctx, report, fp32_pct)
        return outputs

    @staticmethod
    def _export_fp32(ctx: StageContext, config: QuantizeConfig, model: Any, calib: np.ndarray,
                     tmp: Path) -> tuple[Path, Any]:
        import torch

        from edgemml.exporters.onnx import check_onnx, export_onnx

        fp32 = tmp / "model.fp32.onnx"
        exp = export_onnx(model, torch.from_numpy(calib[:2]), fp32, opset=config.onnx.opset,
                          exporter=config.onnx.exporter, input_name=config.onnx.input_name,
                          output_name=config.onnx.output_name,
                          dynamic_batch=config.onnx.dynamic_batch, log=ctx.log)
        check_onnx(fp32)
        return fp32, exp


class _Args:
    """What both backends quantize and measure against."""

    def __init__(self, fp32: Path | None, calib: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                 ref: np.ndarray, fp32_pct: float | None) -> None:
        self.fp32, self.calib, self.val_x, self.val_y = fp32, calib, val_x, val_y
        self.ref, self.fp32_pct = ref, fp32_pct
        self.model: Any = None   # the fp32 torch model and the train split, for QAT
        self.train: Any = None
        self.qat: Any = None     # the QAT result, shared by both backends


def _dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _ort_recipe(config: QuantizeConfig) -> dict[str, Any]:
    from edgemml.quantization.cpu import RECIPES, detect_target

    if config.target == "auto":
        target, evidence = detect_target()
        why = f"target auto-detected as {target} ({evidence})"
    else:
        target, why = config.target, f"target {config.target} set in the pipeline"
    recipe = RECIPES[target]
    opts = config.onnxruntime
    return {
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


def _qat_note(qat: dict[str, Any] | None) -> str:
    if qat is None:
        return ""
    if qat.get("error"):
        return f"; quantization-aware training failed: {qat['error']}"
    return (f"; after quantization-aware training ({qat['steps']} steps): "
            f"{_pct(qat['top1_pct'])} (drop {qat['accuracy_drop_pp']:.2f} pp)")


def _check_budget(ctx: StageContext, config: QuantizeConfig, report: dict[str, Any],
                  backend: str, res: Searched) -> None:
    """Raise (after writing the report) when the budget search did not meet the budget."""
    if res.met:
        return
    write_json(ctx, REPORT, report)
    kept, cap = res.float_layers, config.max_float_layers
    raise StageError(
        f"{backend} int8 misses the accuracy budget: {_pct(res.final.top1_pct)} vs fp32 "
        f"{_pct(report['fp32']['top1_pct'])} on {report['val_samples']} val samples "
        f"({config.budget().miss(res.final)}) with "
        f"{len(kept)} weighted layer(s) running in float"
        + (f" (max_float_layers={cap}" + (": NNCF's restorer iterations, each may revert "
                                          "several layers, and NNCF leaves some layers in float "
                                          "by design)" if backend == "openvino" else ")")
           if cap is not None else "")
        + (f": {', '.join(kept[:8])}{' ...' if len(kept) > 8 else ''}" if kept else "")
        + _qat_note(report[backend].get("qat")),
        key="max_accuracy_drop",
        hint=f"raise max_accuracy_drop or max_float_layers (or lower min_agreement), calibrate with more or better data "
             f"(calibration.samples/method), fine-tune the model, or give qat: more steps; "
             f"figures in "
             f"{ctx.work_dir / REPORT}")


def _quantize_ort(ctx: StageContext, config: QuantizeConfig, a: _Args,
                  report: dict[str, Any]) -> Path:
    from edgemml.quantization.ort import (OrtQuantizer, OrtSettings, initializer_bytes,
                                          preprocess_for_quantization, quantize_within_budget)

    recipe = _ort_recipe(config)
    ctx.log(f"onnxruntime: {recipe['activation_type']} activations x {recipe['weight_type']} "
            f"weights{' per channel' if recipe['per_channel'] else ''}"
            f"{', reduce_range' if recipe['reduce_range'] else ''} ({recipe['why']})")
    tmp = ctx.work_dir / "tmp"
    tmp.mkdir(exist_ok=True)
    prepped = tmp / "fp32.prepped.onnx"
    t0 = time.perf_counter()
    preprocess_for_quantization(a.fp32, prepped)
    settings = OrtSettings(method=config.calibration.method,
                           percentile=config.calibration.percentile,
                           per_channel=recipe["per_channel"],
                           activation_type=recipe["activation_type"],
                           weight_type=recipe["weight_type"], reduce_range=recipe["reduce_range"])
    out = ctx.work_dir / ONNX_INT8
    quantizer = OrtQuantizer(prepped, a.calib, settings, tmp)
    res = quantize_within_budget(
        quantizer, out, tmp, val_x=a.val_x, val_y=a.val_y,
        ref=a.ref, fp32_pct=a.fp32_pct, budget=config.budget(),
        max_float_layers=config.max_float_layers,
        sensitivity_samples=config.sensitivity_samples, log=ctx.log, progress=ctx.progress)
    qat = None
    if not res.met and config.qat is not None:
        from edgemml.stages._quantize import qat_ort

        qat = qat_ort(ctx, config, a, res, out, recipe["target"])
    entry = report["onnxruntime"] = {**res.as_dict(), "recipe": recipe}
    if qat is not None:
        entry["qat"] = qat
    if config.per_layer_samples:
        from edgemml.stages._quantize import ort_per_layer

        entry["per_layer"] = ort_per_layer(
            prepped, out, a.calib[:config.per_layer_samples], tmp, float_layers=res.float_layers,
            search=res.search, quantize_plain=quantizer.quantize, log=ctx.log)
    _check_budget(ctx, config, report, "onnxruntime", res)
    fp32_bytes, int8_bytes = a.fp32.stat().st_size, out.stat().st_size
    entry.update(seconds=round(time.perf_counter() - t0, 2), file=ONNX_INT8,
                 calibration_method=config.calibration.method,
                 size={"fp32_bytes": fp32_bytes, "int8_bytes": int8_bytes,
                       "ratio": round(fp32_bytes / int8_bytes, 3),
                       "weights_fp32_bytes": initializer_bytes(a.fp32),
                       "weights_int8_bytes": initializer_bytes(out)})
    shutil.rmtree(tmp)
    return out


def _quantize_ov(ctx: StageContext, config: QuantizeConfig, a: _Args,
                 report: dict[str, Any]) -> Path:
    from edgemml.quantization.ov import OvSettings, quantize_ir
    from edgemml.quantization.perlayer import ov_ir_from_onnx

    settings = OvSettings(preset=config.openvino.preset,
                          fast_bias_correction=config.openvino.fast_bias_correction,
                          model_type=config.openvino.model_type, subset_size=len(a.calib))
    t0 = time.perf_counter()
    fp32_dir = ctx.work_dir / "tmp-ov-fp32"
    ov_ir_from_onnx(a.fp32, fp32_dir)  # also the per-layer reference
    fp32_ir_bytes = _dir_bytes(fp32_dir)
    out_dir, plain_dir = ctx.work_dir / OV_INT8_DIR, ctx.work_dir / "tmp-ov-plain"
    res, precision = quantize_ir(a.fp32, out_dir, a.calib, settings, val_x=a.val_x,
                                 val_y=a.val_y, ref=a.ref, fp32_pct=a.fp32_pct,
                                 budget=config.budget(),
                                 max_float_layers=config.max_float_layers, log=ctx.log,
                                 keep_plain=plain_dir)
    qat = None
    if not res.met and config.qat is not None:
        from edgemml.stages._quantize import qat_ov

        qat = qat_ov(ctx, config, a, res, out_dir, _ort_recipe(config)["target"])
    int8_bytes = _dir_bytes(out_dir)
    per_layer = None
    if config.per_layer_samples:
        from edgemml.stages._quantize import ov_per_layer

        per_layer = ov_per_layer(
            fp32_dir / "model.xml", out_dir / "model.xml",
            plain_dir / "model.xml" if plain_dir.exists() else None,
            a.calib[:config.per_layer_samples], float_layers=res.float_layers, log=ctx.log,
            progress=ctx.progress)
    shutil.rmtree(fp32_dir)
    shutil.rmtree(plain_dir, ignore_errors=True)
    report["openvino"] = {
        **res.as_dict(), "inference_precision": precision,
        "settings": {"preset": settings.preset, "subset_size": settings.subset_size,
                     "fast_bias_correction": settings.fast_bias_correction,
                     "model_type": settings.model_type, "target_device": "CPU"},
        "folder": OV_INT8_DIR, "seconds": round(time.perf_counter() - t0, 2),
        "size": {"fp32_bytes": fp32_ir_bytes, "int8_bytes": int8_bytes,
                 "ratio": round(fp32_ir_bytes / int8_bytes, 3)}}
    if per_layer is not None:
        report["openvino"]["per_layer"] = per_layer
    if qat is not None:
        report["openvino"]["qat"] = qat
    _check_budget(ctx, config, report, "openvino", res)
    return out_dir


STAGE = QuantizeStage
