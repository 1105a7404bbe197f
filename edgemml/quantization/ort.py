"""ONNX Runtime static QDQ quantization, calibrated once, re-quantized many times for the budget search.

`quant_pre_process` (shape inference + ORT basic optimisations: Conv+BN folding) runs first, as ORT
recommends. Calibration ranges are computed once and kept in ORT's own calibration cache
(`calibration_cache_path`), so the sensitivity ranking and the greedy search, which quantize the same
graph dozens of times with different `nodes_to_quantize` / `nodes_to_exclude`, never recalibrate.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np

from edgemml import runtimes
from edgemml.errors import StageError
from edgemml.quantization.budget import Budget, Searched, noop_progress, score

Method = Literal["minmax", "entropy", "percentile"]


@dataclass(frozen=True)
class OrtSettings:
    method: Method
    percentile: float
    per_channel: bool
    activation_type: Literal["uint8", "int8"]
    weight_type: Literal["uint8", "int8"]
    reduce_range: bool


def _qtype(name: str) -> Any:
    from onnxruntime.quantization import QuantType

    return {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[name]


class ArrayReader:
    """onnxruntime CalibrationDataReader over an in-memory float32 array, in batches."""

    def __init__(self, input_name: str, x: np.ndarray, batch_size: int = 16) -> None:
        self.input_name = input_name
        self.x = x
        self.batch_size = batch_size
        self.pos = 0
        self.end = len(x)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.pos >= self.end:
            return None
        chunk = np.ascontiguousarray(self.x[self.pos:min(self.pos + self.batch_size, self.end)])
        self.pos += self.batch_size
        return {self.input_name: chunk}

    def __iter__(self) -> ArrayReader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item

    def __len__(self) -> int:
        return len(self.x)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.pos, self.end = start_index, min(end_index, len(self.x))


def preprocess_for_quantization(src: Path, dst: Path) -> None:
    """ORT's quant_pre_process: symbolic + ONNX shape inference and graph optimisation.

    Nodes are then given a unique name where they have none (its optimiser leaves some unnamed,
    e.g. in mobilenet_v3_small): the budget search ranks and excludes nodes by name, and an
    unnamed node was ranked as '' and 'kept in float' without anything being excluded.
    """
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
    model = onnx.load(str(dst))
    taken = {n.name for n in model.graph.node}
    renamed = 0
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_unnamed_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
            renamed += 1
    if renamed:
        onnx.save(model, str(dst))


class OrtQuantizer:
    """Quantize one pre-processed fp32 ONNX graph, possibly many times with different exclusions."""

    def __init__(self, prepped: Path, calibration: np.ndarray, settings: OrtSettings,
                 work_dir: Path) -> None:
        import onnx

        self.prepped = prepped
        self.calibration = calibration
        self.settings = settings
        self.cache = work_dir / "calibration_ranges.json"
        self.cache.unlink(missing_ok=True)
        model = onnx.load(str(prepped))
        self.input_name = model.graph.input[0].name
        self.nodes = [(n.name, n.op_type) for n in model.graph.node]

    def _extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.settings.method == "percentile":
            extra["CalibPercentile"] = self.settings.percentile
        return extra

    def quantize(self, out: Path, *, exclude: list[str] | None = None,
                 only: list[str] | None = None) -> Path:
        """Write an int8 QDQ model to `out`; `only` restricts quantization to those nodes."""
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

        method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[self.settings.method]
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # ORT logs pre-processing advice at WARNING on every call
        try:
            quantize_static(
                str(self.prepped), str(out),
                calibration_data_reader=ArrayReader(self.input_name, self.calibration),
                quant_format=QuantFormat.QDQ,
                per_channel=self.settings.per_channel,
                reduce_range=self.settings.reduce_range,
                activation_type=_qtype(self.settings.activation_type),
                weight_type=_qtype(self.settings.weight_type),
                nodes_to_quantize=list(only or []),
                nodes_to_exclude=list(exclude or []),
                calibrate_method=method,
                extra_options=self._extra(),
                calibration_cache_path=str(self.cache),
            )
        except (ValueError, RuntimeError) as exc:
            raise StageError(f"onnxruntime quantize_static failed: {exc}") from exc
        finally:
            root.setLevel(level)
        return out

    def quantized_nodes(self, qmodel: Path) -> list[str]:
        """Nodes of the fp32 graph whose inputs are fed by a DequantizeLinear in `qmodel`."""
        import onnx

        model = onnx.load(str(qmodel))
        dq_outputs = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        names = {n for n, _ in self.nodes}
        return [n.name for n in model.graph.node
                if n.name in names and any(i in dq_outputs for i in n.input)]


def logits(path: Path, x: np.ndarray) -> np.ndarray:
    """Outputs of an ONNX file on x, through the runtime layer (all cores: only values matter)."""
    return runtimes.predict(runtimes.backend("onnxruntime").open(path, threads=None), x)


def sensitivity(quantizer: OrtQuantizer, candidates: list[str], x: np.ndarray, ref: np.ndarray,
                tmp: Path, advance: Callable[[], None] | None = None) -> dict[str, float]:
    """Per node: normalised output error when ONLY that node is quantized (larger = more sensitive).

    error = mean((logits_q - logits_fp32)^2) / mean(logits_fp32^2), on `x` (a val subset).
    """
    scores: dict[str, float] = {}
    denom = float(np.mean(ref.astype(np.float64) ** 2)) or 1e-12
    for node in candidates:
        out = quantizer.quantize(tmp, only=[node])
        err = float(np.mean((logits(out, x).astype(np.float64) - ref) ** 2)) / denom
        scores[node] = err
        if advance:
            advance()
    tmp.unlink(missing_ok=True)
    return scores


def quantize_within_budget(quantizer: OrtQuantizer, out: Path, tmp: Path, *, val_x: np.ndarray,
                           val_y: np.ndarray, ref: np.ndarray, fp32_pct: float | None,
                           budget: Budget, max_float_layers: int | None,
                           sensitivity_samples: int, log: Callable[[str], None] = print,
                           progress: Any = noop_progress) -> Searched:
    """Quantize every node; if the result on (val_x, val_y) misses `budget`, rank the nodes by
    sensitivity and keep the k most sensitive in float for the smallest k that meets it (at most
    `max_float_layers`). `result.met` is False when no allowed k does."""
    from edgemml.data.datasets import evenly_spaced

    quantizer.quantize(out)
    candidates = quantizer.quantized_nodes(out)
    plain = score(logits(out, val_x), val_y, ref, fp32_pct)
    result = Searched(plain, plain, quantized_layers=len(candidates))
    if not budget.active or budget.meets(plain):
        return result
    log(f"onnxruntime int8 misses the budget ({budget.miss(plain)}): ranking "
        f"{len(candidates)} layers by sensitivity")
    sel = evenly_spaced(len(val_x), sensitivity_samples)
    with progress("layer sensitivity (onnxruntime)", len(candidates)) as bar:
        scores = sensitivity(quantizer, candidates, val_x[sel], ref[sel].astype(np.float64),
                             tmp / "one_layer.onnx", advance=bar.advance)
    ranked = sorted(candidates, key=lambda n: -scores[n])
    cap = min(max_float_layers or len(ranked), len(ranked))
    trials: list[dict[str, Any]] = []
    final, met = plain, False
    with progress("keeping layers in float", cap) as bar:
        for k in range(1, cap + 1):
            quantizer.quantize(out, exclude=ranked[:k])
            final = score(logits(out, val_x), val_y, ref, fp32_pct)
            trials.append({"float_layers": k, "top1_pct": final.top1_pct,
                           "accuracy_drop_pp": final.drop_pp, "agreement": final.agreement})
            bar.advance()
            bar.update(drop_pp=final.drop_pp)
            if budget.meets(final):
                met = True
                break
    result.final = final
    result.float_layers = ranked[:len(trials)]
    result.search = {**budget.as_dict(), "max_float_layers": cap, "met": met,
                     "sensitivity": {n: round(scores[n], 8) for n in ranked},
                     "sensitivity_samples": int(len(sel)), "trials": trials}
    return result


def initializer_bytes(path: Path) -> dict[str, int]:
    """Bytes of the graph's initializers (weights) by element type."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    out: dict[str, int] = {}
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        out[arr.dtype.name] = out.get(arr.dtype.name, 0) + int(arr.nbytes)
    return out
