"""Per-layer quantization error: where in the network int8 hurts, measured.

For each layer of an int8 model: the SQNR (signal-to-quantization-noise ratio, dB; higher is better)
and the cosine of its output against the same layer of the fp32 model on the calibration samples.
The error is cumulative (what the next layer really sees), so the layer to blame is the first one,
in graph order, whose SQNR falls well below its predecessors'. Users of every int8 tool ask for
this (onnxruntime#14233, #13863: which layer broke it, which one to exclude).

ONNX Runtime (QDQ): the fp32 reference is the graph the quantizer read (quant_pre_process's output:
same tensor names, BatchNorm folded). Every compute layer's output and every tensor the quantizer
put a QuantizeLinear on are added as graph outputs to both models; the int8 value compared is the
one after its Q/DQ pair (what the next layer reads), and `local_sqnr_db` is that pair's own
rounding. Models run with graph optimisations off (runtimes.onnxruntime.all_outputs), streamed in
batches (sums are accumulated, activations never all kept).

OpenVINO (NNCF's FakeQuantize IR): layers are the Convolution / GroupConvolution / MatMul ops,
matched by friendly name (NNCF keeps them) or, for an IR from another source (QAT), by order and
shape. The fp32 IR is tapped at every layer in one compiled model; the int8 IR one layer per
compiled model (see runtimes.openvino.tapped_outputs for the trap that forces it).
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgemml import runtimes

COMPUTE_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")
OV_COMPUTE_OPS = ("Convolution", "GroupConvolution", "MatMul", "ConvolutionBackpropData")


@dataclass
class LayerError:
    layer: str                     # ONNX node name / OpenVINO friendly name
    op: str
    sqnr_db: float
    cosine: float
    quantized: bool                # this layer's output / weights run in int8
    tensor: str | None = None
    local_sqnr_db: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class PerLayer:
    backend: str
    samples: int
    layers: list[LayerError] = field(default_factory=list)
    matched_by: str = "name"
    note: str | None = None

    def worst(self, n: int = 10) -> list[LayerError]:
        return sorted(self.layers, key=lambda r: r.sqnr_db)[:n]

    def summary(self, n: int = 10) -> dict[str, Any]:
        """What quantize.json keeps: the worst n layers and the distribution."""
        sq = [r.sqnr_db for r in self.layers if math.isfinite(r.sqnr_db)]
        return {"samples": self.samples, "layers": len(self.layers), "matched_by": self.matched_by,
                "median_sqnr_db": round(float(np.median(sq)), 2) if sq else None,
                "min_sqnr_db": round(min(sq), 2) if sq else None,
                "worst": [r.as_dict() for r in self.worst(n)], "note": self.note}


class _Acc:
    """Streaming sums for SQNR and cosine of one tensor."""

    def __init__(self) -> None:
        self.ref2 = self.err2 = self.dot = self.got2 = 0.0

    def add(self, ref: np.ndarray, got: np.ndarray) -> None:
        r = ref.astype(np.float64).ravel()
        g = got.astype(np.float64).ravel()
        if r.shape != g.shape:
            raise ValueError("shape mismatch")
        self.ref2 += float(r @ r)
        self.got2 += float(g @ g)
        self.dot += float(r @ g)
        d = r - g
        self.err2 += float(d @ d)

    def sqnr_db(self) -> float:
        if self.err2 <= 0:
            return math.inf
        return 10 * math.log10(max(self.ref2, 1e-30) / self.err2)

    def cosine(self) -> float:
        return self.dot / max(math.sqrt(self.ref2 * self.got2), 1e-30)


def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    acc = _Acc()
    acc.add(ref, got)
    return acc.sqnr_db()


def _round(x: float) -> float:
    return round(x, 2) if math.isfinite(x) else 999.0


# --------------------------------------------------------------------------------------------------
# ONNX Runtime
# --------------------------------------------------------------------------------------------------


def _with_outputs(src: Path, dst: Path, names: list[str]) -> None:
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(src))
    have = {o.name for o in model.graph.output}
    model.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                              for n in names if n not in have)
    onnx.save(model, str(dst))


def ort_per_layer(fp32: Path, int8: Path, x: np.ndarray, tmp: Path, *,
                  batch_size: int = 8) -> PerLayer:
    """Per-layer error of an ORT QDQ model against the fp32 graph it was quantized from.

    Layers are matched by node name (the QDQ quantizer keeps the fp32 graph's node names; where it
    dropped an activation after a layer, e.g. a Clip that the uint8 range makes redundant, the
    layer's output carries the activation's name, and that is the fp32 tensor compared). An int8
    graph made from another fp32 graph (QAT) is matched by the order and shape of its compute
    layers.
    """
    import onnx

    f_model, q_model = onnx.load(str(fp32)), onnx.load(str(int8))
    f_by_name = {n.name: n for n in f_model.graph.node if n.name}
    computes = [n for n in q_model.graph.node if n.op_type in COMPUTE_OPS]
    if sum(n.name in f_by_name for n in computes) >= 0.5 * max(1, len(computes)):
        return _ort_by_name(f_model, q_model, fp32, int8, x, tmp, batch_size, f_by_name)
    return _ort_by_order(f_model, q_model, fp32, int8, x, tmp, batch_size)


def _dq_after_q(q_model: Any) -> dict[str, str]:
    """float tensor -> the DequantizeLinear output that follows its QuantizeLinear."""
    q_of = {n.input[0]: n.output[0] for n in q_model.graph.node if n.op_type == "QuantizeLinear"}
    dq_of = {n.input[0]: n.output[0] for n in q_model.graph.node
             if n.op_type == "DequantizeLinear"}
    return {t: dq_of[q] for t, q in q_of.items() if q in dq_of}


def _ort_by_name(f_model: Any, q_model: Any, fp32: Path, int8: Path, x: np.ndarray, tmp: Path,
                 batch_size: int, f_by_name: dict[str, Any]) -> PerLayer:
    post = _dq_after_q(q_model)
    f_tensors = {o for n in f_model.graph.node for o in n.output}
    rows: list[tuple[str, str, str, str]] = []  # (node, op, fp32 tensor, int8 tensor)
    for node in q_model.graph.node:
        out = node.output[0]
        if node.name not in f_by_name or not (node.op_type in COMPUTE_OPS or out in post):
            continue
        ref = out if out in f_tensors else f_by_name[node.name].output[0]
        rows.append((node.name, node.op_type, ref, out))
    tmp.mkdir(parents=True, exist_ok=True)
    aug_f, aug_q = tmp / "perlayer.fp32.onnx", tmp / "perlayer.int8.onnx"
    _with_outputs(fp32, aug_f, sorted({r[2] for r in rows}))
    _with_outputs(int8, aug_q, sorted({r[3] for r in rows} | {post[r[3]] for r in rows
                                                             if r[3] in post}))
    cum = [_Acc() for _ in rows]
    # a layer whose activation the quantizer fused away (its Q clamps instead) has no separate
    # rounding error to show: its Q/DQ pair also applies the activation
    local = [_Acc() if r[3] in post and f_by_name[r[0]].output[0] == r[3] else None
             for r in rows]
    ort = runtimes.backend("onnxruntime")
    try:
        for i in range(0, len(x), batch_size):
            chunk = x[i:i + batch_size]
            fo, qo = ort.all_outputs(aug_f, chunk), ort.all_outputs(aug_q, chunk)
            for k, (_, _, ref, out) in enumerate(rows):
                cum[k].add(fo[ref], qo[post.get(out, out)])
                if local[k] is not None:
                    local[k].add(qo[out], qo[post[out]])
    finally:
        aug_f.unlink(missing_ok=True)
        aug_q.unlink(missing_ok=True)
    dq_outputs = set(post.values())
    layers = [LayerError(name, op, _round(c.sqnr_db()), round(c.cosine(), 5),
                         quantized=out in post or any(i in dq_outputs for i in node_inputs),
                         tensor=out, local_sqnr_db=_round(lo.sqnr_db()) if lo else None)
              for (name, op, _, out), c, lo, node_inputs in
              zip(rows, cum, local, [_inputs_of(q_model, r[0]) for r in rows])]
    return PerLayer("onnxruntime", int(len(x)), layers, "name")


def _inputs_of(model: Any, name: str) -> list[str]:
    return next((list(n.input) for n in model.graph.node if n.name == name), [])


def _ort_by_order(f_model: Any, q_model: Any, fp32: Path, int8: Path, x: np.ndarray, tmp: Path,
                  batch_size: int) -> PerLayer:
    f_nodes = [n for n in f_model.graph.node if n.op_type in COMPUTE_OPS]
    q_nodes = [n for n in q_model.graph.node if n.op_type in COMPUTE_OPS]
    if len(f_nodes) != len(q_nodes):
        return PerLayer("onnxruntime", int(len(x)), [], "order",
                        note=f"the int8 graph has {len(q_nodes)} compute layers, the fp32 graph "
                        f"{len(f_nodes)}: layers cannot be matched")
    pairs = [(f.output[0], q.output[0], q.name or f.name, q.op_type)
             for f, q in zip(f_nodes, q_nodes)]
    tmp.mkdir(parents=True, exist_ok=True)
    aug_f, aug_q = tmp / "perlayer.fp32.onnx", tmp / "perlayer.int8.onnx"
    _with_outputs(fp32, aug_f, [p[0] for p in pairs])
    _with_outputs(int8, aug_q, [p[1] for p in pairs])
    accs = [_Acc() for _ in pairs]
    ort = runtimes.backend("onnxruntime")
    skipped: set[int] = set()
    try:
        for i in range(0, len(x), batch_size):
            chunk = x[i:i + batch_size]
            fo, qo = ort.all_outputs(aug_f, chunk), ort.all_outputs(aug_q, chunk)
            for k, (ft, qt, _, _) in enumerate(pairs):
                if k in skipped:
                    continue
                try:
                    accs[k].add(fo[ft], qo[qt])
                except ValueError:
                    skipped.add(k)
    finally:
        aug_f.unlink(missing_ok=True)
        aug_q.unlink(missing_ok=True)
    layers = [LayerError(name, op, _round(a.sqnr_db()), round(a.cosine(), 5), True, tensor=qt)
              for k, ((_, qt, name, op), a) in enumerate(zip(pairs, accs)) if k not in skipped]
    note = f"{len(skipped)} layer(s) with different shapes skipped" if skipped else None
    return PerLayer("onnxruntime", int(len(x)), layers, "order", note=note)


# --------------------------------------------------------------------------------------------------
# OpenVINO
# --------------------------------------------------------------------------------------------------


def ov_layers(model: Any) -> list[tuple[str, str, tuple[int, ...] | None]]:
    out = []
    for op in model.get_ordered_ops():
        if op.get_type_name() in OV_COMPUTE_OPS:
            shape = op.get_output_partial_shape(0)
            dims = tuple(d.get_length() if d.is_static else -1 for d in shape) \
                if shape.rank.is_static else None
            out.append((op.get_friendly_name(), op.get_type_name(), dims))
    return out


def ov_per_layer(fp32_xml: Path, int8_xml: Path, x: np.ndarray, *,
                 progress: Callable[[], None] | None = None) -> PerLayer:
    """Per-layer error of an int8 OpenVINO IR against the fp32 IR (both pinned to f32)."""
    import openvino as ov

    from edgemml.quantization.ov import float_layers

    core = ov.Core()
    ov_rt = runtimes.backend("openvino")
    f_layers = ov_layers(core.read_model(str(fp32_xml)))
    q_model = core.read_model(str(int8_xml))
    q_layers = ov_layers(q_model)
    quantized, _ = float_layers(q_model)
    # a friendly name is not unique in every IR (densenet121's int8 IR reuses a name with another
    # output shape): a name matches only with the same static shape
    q_shapes = {n: shape for n, _, shape in q_layers}
    by_name = [(f, f, op) for f, op, shape in f_layers
               if f in q_shapes and (shape is None or q_shapes[f] is None
                                     or shape == q_shapes[f])]
    matched_by, note = "name", None
    pairs = by_name
    if len(by_name) < 0.5 * max(1, len(f_layers)):
        matched_by = "order"
        if len(f_layers) != len(q_layers) or any(
                fs != qs for (_, _, fs), (_, _, qs) in zip(f_layers, q_layers)):
            return PerLayer("openvino", int(len(x)), [], "order",
                            note="the int8 IR's layers do not match the fp32 IR's in order and "
                            "shape: layers cannot be matched")
        pairs = [(f, q, op) for (f, op, _), (q, _, _) in zip(f_layers, q_layers)]
    ref = ov_rt.tapped_outputs(core.read_model(str(fp32_xml)), [p[0] for p in pairs], x)
    layers, skipped = [], []
    for f, q, op in pairs:
        got = ov_rt.tapped_outputs(core.read_model(str(int8_xml)), [q], x)[q]
        if np.shape(got) != np.shape(ref[f]):  # dynamic shapes that differ only at run time
            skipped.append(q)
            if progress is not None:
                progress()
            continue
        acc = _Acc()
        acc.add(ref[f], got)
        layers.append(LayerError(q, op, _round(acc.sqnr_db()), round(acc.cosine(), 5),
                                 quantized=q in quantized))
        if progress is not None:
            progress()
    if skipped:
        note = (f"{len(skipped)} layer(s) whose int8 output shape differs from the fp32 layer of "
                f"the same name were not compared: {', '.join(skipped[:5])}")
    return PerLayer("openvino", int(len(x)), layers, matched_by, note)


def ov_ir_from_onnx(onnx_path: Path, folder: Path) -> Path:
    """An fp32 IR of an ONNX file (the OpenVINO per-layer reference), written to folder."""
    import openvino as ov

    from edgemml.runtimes.openvino import IR_XML

    if folder.exists():
        shutil.rmtree(folder)
    ov.save_model(ov.convert_model(str(onnx_path)), str(folder / IR_XML), compress_to_fp16=False)
    return folder / IR_XML
