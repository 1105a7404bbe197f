"""OpenVINO int8 with NNCF: `nncf.quantize`, or `nncf.quantize_with_accuracy_control` under a budget.

Which layers ended up in float is read from the quantized IR itself (a weighted layer whose data
input does not come from a FakeQuantize runs in float), not from NNCF's log, so the report describes
the artifact that ships.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np

from edgemml import runtimes
from edgemml.errors import StageError
from edgemml.exporters.openvino import save_ir
from edgemml.quantization.budget import Budget, Searched, score
from edgemml.runtimes.openvino import IR_XML

WEIGHTED_OPS = ("Convolution", "GroupConvolution", "MatMul", "ConvolutionBackpropData",
                "GroupConvolutionBackpropData")

#: ops that keep int8 values int8 (NNCF puts its FakeQuantize before them, not after)
_PASS_THROUGH = ("MaxPool", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Concat", "Split",
                 "VariadicSplit", "StridedSlice", "Slice", "Pad", "DepthToSpace", "SpaceToDepth")


@dataclass(frozen=True)
class OvSettings:
    preset: Literal["performance", "mixed"]
    fast_bias_correction: bool
    model_type: Literal["transformer"] | None
    subset_size: int


def _quiet_nncf() -> None:
    logging.getLogger("nncf").setLevel(logging.ERROR)


def _common_kwargs(settings: OvSettings) -> dict[str, Any]:
    import nncf

    return {
        "preset": {"performance": nncf.QuantizationPreset.PERFORMANCE,
                   "mixed": nncf.QuantizationPreset.MIXED}[settings.preset],
        "target_device": nncf.TargetDevice.CPU,
        "subset_size": settings.subset_size,
        "fast_bias_correction": settings.fast_bias_correction,
        "model_type": nncf.ModelType.TRANSFORMER if settings.model_type == "transformer" else None,
    }


def quantize_ov(model: Any, calibration: np.ndarray, settings: OvSettings) -> Any:
    """nncf.quantize on an openvino.Model with one-sample calibration items."""
    import nncf

    _quiet_nncf()
    dataset = nncf.Dataset([calibration[i:i + 1] for i in range(len(calibration))])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return nncf.quantize(model, dataset, **_common_kwargs(settings))
        except (RuntimeError, ValueError, nncf.errors.ValidationError) as exc:
            raise StageError(f"nncf.quantize failed: {exc}") from exc


def quantize_ov_with_budget(model: Any, calibration: np.ndarray, val_x: np.ndarray,
                            val_y: np.ndarray, settings: OvSettings, *, max_drop_pp: float,
                            max_float_layers: int | None,
                            accuracy: Callable[[Any, np.ndarray, np.ndarray, np.ndarray], float]
                            ) -> Any:
    """nncf.quantize_with_accuracy_control with an absolute top-1 drop budget (percentage points).

    `accuracy(compiled_model, x, y, indices)` is the same metric the stage reports (top-1 in
    percent; `indices` into val_x, for a metric that also compares with reference outputs), so
    NNCF optimises what the report measures; the budget is in the same unit.
    """
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    _quiet_nncf()
    calib = nncf.Dataset([calibration[i:i + 1] for i in range(len(calibration))])
    items = [(val_x[i:i + 1], int(val_y[i]), i) for i in range(len(val_x))]
    val = nncf.Dataset(items, lambda item: item[0])

    def validate(compiled: Any, data: Any) -> float:
        items = list(data)
        x = np.concatenate([p[0] for p in items])
        return accuracy(compiled, x, np.asarray([p[1] for p in items]),
                        np.asarray([p[2] for p in items]))

    restorer = AdvancedAccuracyRestorerParameters(
        max_num_iterations=max_float_layers if max_float_layers is not None else 2**31 - 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return nncf.quantize_with_accuracy_control(
                model, calib, val, validate, max_drop=max_drop_pp,
                drop_type=nncf.DropType.ABSOLUTE,
                advanced_accuracy_restorer_parameters=restorer, **_common_kwargs(settings))
        except (RuntimeError, ValueError, nncf.errors.ValidationError) as exc:
            raise StageError(f"nncf.quantize_with_accuracy_control failed: {exc}") from exc


def float_layers(model: Any) -> tuple[list[str], list[str]]:
    """(weighted layers running in int8, weighted layers left in float) of an OpenVINO model."""
    quantized, floating = [], []
    for op in model.get_ordered_ops():
        if op.get_type_name() not in WEIGHTED_OPS:
            continue
        src = op.input_value(0).get_node()
        while src.get_type_name() in _PASS_THROUGH:
            src = src.input_value(0).get_node()
        (quantized if src.get_type_name() == "FakeQuantize" else floating).append(
            op.get_friendly_name())
    return quantized, floating


def logits_f32(model_or_xml: Any, x: np.ndarray) -> tuple[np.ndarray, str]:
    """Outputs in fp32 execution (INFERENCE_PRECISION_HINT=f32), and that precision."""
    ov_rt = runtimes.backend("openvino")
    compiled, precision = ov_rt.compile(model_or_xml, threads=None, exact=True)
    runner = ov_rt.runner_for(compiled, precision, threads=None, name="int8")
    return runtimes.predict(runner, x), precision


def _nncf_metric(budget: Budget, ref: np.ndarray
                 ) -> Callable[[Any, np.ndarray, np.ndarray, np.ndarray], float]:
    """The metric NNCF's accuracy control keeps within budget.max_drop_pp of fp32's: top-1 in
    percent of a model NNCF compiled itself; with budget.min_agreement, 100 points and the
    shortfall lower while the model agrees with `ref` (fp32) on fewer val samples than that.
    NNCF knows one metric and one drop; the penalty makes "agreement missed" a drop over any
    budget, so its restorer keeps reverting layers (ranked by their output error, not by this
    metric) until both hold. The fp32 model agrees with itself, so its metric is its top-1."""
    from edgemml.metrics import accuracy, agreement

    def metric(compiled: Any, x: np.ndarray, y: np.ndarray, idx: np.ndarray) -> float:
        runner = runtimes.backend("openvino").runner_for(compiled, "f32", threads=None,
                                                         name="nncf")
        logits = runtimes.predict(runner, x)
        top1 = accuracy(logits, y).top1_pct or 0.0
        if budget.min_agreement is None:
            return top1
        shortfall = budget.min_agreement - agreement(logits, ref[idx])
        return top1 if shortfall <= 0 else top1 - 100.0 * (1.0 + shortfall)

    return metric


def quantize_ir(fp32_onnx: Path, out_dir: Path, calibration: np.ndarray, settings: OvSettings, *,
                val_x: np.ndarray, val_y: np.ndarray, ref: np.ndarray, fp32_pct: float | None,
                budget: Budget, max_float_layers: int | None,
                log: Callable[[str], None] = print,
                keep_plain: Path | None = None) -> tuple[Searched, str]:
    """An int8 IR of an fp32 ONNX model in out_dir/model.xml, and the precision it runs in.

    nncf.quantize first; if the result misses `budget`, nncf.quantize_with_accuracy_control keeps
    layers in float until the budget holds (top-1 drop, and agreement with fp32 through
    _nncf_metric); a miss leaves `met` False, for QAT or the error. Accuracy is measured with the IR compiled in f32, and which layers stayed
    in float is read from the saved IR itself.
    `keep_plain`: a folder where the plain int8 IR is kept when the budget search replaces it
    (the per-layer error of the layers kept in float is measured on it).
    """
    import shutil

    import openvino as ov

    model = ov.convert_model(str(fp32_onnx))
    save_ir(quantize_ov(model, calibration, settings), out_dir / IR_XML, compress_to_fp16=False)
    logits, precision = logits_f32(out_dir / IR_XML, val_x)
    plain = score(logits, val_y, ref, fp32_pct)
    final, search = plain, None
    if budget.active and not budget.meets(plain):
        log(f"openvino int8 misses the budget ({budget.miss(plain)}): "
            f"nncf.quantize_with_accuracy_control")
        q = quantize_ov_with_budget(ov.convert_model(str(fp32_onnx)), calibration, val_x, val_y,
                                    settings, max_drop_pp=budget.max_drop_pp or 0.0,
                                    max_float_layers=max_float_layers,
                                    accuracy=_nncf_metric(budget, ref))
        if keep_plain is not None:
            shutil.rmtree(keep_plain, ignore_errors=True)
            shutil.move(str(out_dir), str(keep_plain))
        else:
            shutil.rmtree(out_dir)
        save_ir(q, out_dir / IR_XML, compress_to_fp16=False)
        logits, precision = logits_f32(out_dir / IR_XML, val_x)
        final = score(logits, val_y, ref, fp32_pct)
        search = {**budget.as_dict(), "method": "nncf.quantize_with_accuracy_control",
                  "max_float_layers": max_float_layers, "met": budget.meets(final)}
    quantized, floating = float_layers(ov.Core().read_model(str(out_dir / IR_XML)))
    return Searched(plain, final, len(quantized), floating, search), precision
