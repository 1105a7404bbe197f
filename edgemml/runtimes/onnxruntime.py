"""ONNX Runtime on the CPU: the only place edgemml creates an InferenceSession."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgemml.errors import InputError
from edgemml.runtimes.base import Runner

NAME = "onnxruntime"
FORMAT = "onnx"
EXTRA = None
#: whether the deployed precision may differ from fp32 (validate then also runs it pinned to f32)
HAS_EXACT_MODE = False
MODULES = ("onnxruntime",)

#: operators whose presence makes a graph an int8 one
INT8_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul",
                      "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear"})


def claims(path: Path) -> bool:
    return path.is_file() and path.suffix == ".onnx"


def session(path: Path, *, threads: int | None) -> Any:
    """A CPU InferenceSession with all graph optimisations (what a device would run), a fixed
    intra-op thread count and sequential execution, so timings compare across runs. threads=None
    lets ONNX Runtime use every core (accuracy passes, where only the outputs matter)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=opts,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types: all mean "unusable file"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"ONNX Runtime cannot load {Path(path).name}: {first}", file=path,
                         hint="re-export the model; the file may be truncated or not ONNX") \
            from None


def open(path: Path, *, threads: int | None, exact: bool = False,
         name: str | None = None) -> Runner:
    sess = session(path, threads=threads)
    inp, out0 = sess.get_inputs()[0], sess.get_outputs()[0]
    in_dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
    first = inp.shape[0] if inp.shape else None
    static = first if isinstance(first, int) and first > 0 else None

    def run(x: np.ndarray) -> np.ndarray:
        out = sess.run(None, {inp.name: np.ascontiguousarray(x, dtype=in_dtype)})[0]
        return np.asarray(out, dtype=np.float32)

    stored = stored_precision(path)
    precision = "int8" if stored == "int8" else "f16" if in_dtype == np.float16 else "f32"
    io = {"input": inp.name, "input_dtype": inp.type, "input_shape": list(inp.shape),
          "output": out0.name, "output_dtype": out0.type}
    shape = tuple(d if isinstance(d, int) and d > 0 else None for d in inp.shape or ())
    return Runner(name or path.name, NAME, threads or 0, precision, run, static, io, shape)


def load_onnx(path: Path, *, external_data: bool = True) -> Any:
    """onnx.load, with a truncated or foreign file reported as the user's input (exit 2) rather
    than protobuf's DecodeError escaping as a crash."""
    import onnx

    try:
        return onnx.load(str(path), load_external_data=external_data)
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - DecodeError, ValueError, ...: all mean "unreadable"
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise InputError(f"{path.name} is not a readable ONNX model (truncated or corrupt?): "
                         f"{type(exc).__name__}: {first}", file=path,
                         hint="re-export or re-copy the file") from None


def files(path: Path) -> list[Path]:
    """The .onnx file and its external-data files."""
    import onnx

    model = load_onnx(path, external_data=False)
    locations = {entry.value for t in model.graph.initializer
                 if t.data_location == onnx.TensorProto.EXTERNAL
                 for entry in t.external_data if entry.key == "location"}
    return [path] + [path.parent / loc for loc in sorted(locations)]


def stored_precision(path: Path) -> str:
    """int8 (quantization operators), fp16 (fp16 weights) or fp32, read from the graph."""
    import onnx

    model = load_onnx(path, external_data=False)
    if {n.op_type for n in model.graph.node} & INT8_OPS:
        return "int8"
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer):
        return "fp16"
    return "fp32"


def macs_params(path: Path) -> tuple[int | None, int]:
    """(MACs of Conv/Gemm/MatMul at batch 1, weight count) of an ONNX graph, for artifacts that
    come without their torch model. Quantisation parameters (scales, zero points) are not counted
    as weights. MACs are None when shapes cannot be inferred."""
    import onnx
    from onnx import shape_inference

    model = load_onnx(path)
    graph = model.graph
    quant_params = {n.input[i] for n in graph.node
                    if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                    for i in (1, 2) if i < len(n.input)}
    params = sum(int(np.prod(t.dims)) for t in graph.initializer if t.name not in quant_params)
    inits = {t.name for t in graph.initializer}
    for inp in graph.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        if dims:
            dims[0].ClearField("dim_param")
            dims[0].dim_value = 1
    try:
        inferred = shape_inference.infer_shapes(model, strict_mode=False)
    except (shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        raise InputError(f"cannot infer the shapes of {path.name}: {exc}", file=path) from None
    shapes: dict[str, list[int]] = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else 0 for d in dims]
    for t in graph.initializer:
        shapes[t.name] = list(t.dims)
    # Follow DequantizeLinear so QDQ weights have their shapes too.
    for n in graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in shapes:
            shapes.setdefault(n.output[0], shapes[n.input[0]])
    try:
        macs = sum(_node_macs(n, shapes) for n in graph.node)
    except KeyError:
        return None, params
    return (macs if macs > 0 else None), params


def _node_macs(n: Any, shapes: dict[str, list[int]]) -> int:
    if n.op_type in ("Conv", "QLinearConv", "ConvInteger"):
        w = shapes[n.input[3] if n.op_type == "QLinearConv" else n.input[1]]
        return int(np.prod(shapes[n.output[0]][1:])) * int(np.prod(w[1:]))
    if n.op_type in ("Gemm", "MatMul", "QLinearMatMul", "MatMulInteger"):
        a = shapes[n.input[0]]
        k = a[-1]
        if n.op_type == "Gemm":
            trans_a = next((x.i for x in n.attribute if x.name == "transA"), 0)
            k = a[0] if trans_a else a[-1]
        return int(np.prod(shapes[n.output[0]])) * int(k)
    return 0


def all_outputs(path: Path, x: np.ndarray, *, batch_size: int = 32) -> dict[str, np.ndarray]:
    """Every graph output of an ONNX file on `x`, by name, with graph optimisations off.

    For per-layer error: intermediate tensors added as graph outputs must keep the values the graph
    defines (a fused QDQ kernel would not produce them), as onnxruntime.quantization's own
    qdq_loss_debug runs them.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(path), sess_options=opts,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT's own error types: the file is unusable
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"ONNX Runtime cannot load {Path(path).name}: {first}",
                         file=path) from None
    inp = sess.get_inputs()[0].name
    names = [o.name for o in sess.get_outputs()]
    acc: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for i in range(0, len(x), batch_size):
        outs = sess.run(names, {inp: np.ascontiguousarray(x[i:i + batch_size], dtype=np.float32)})
        for n, o in zip(names, outs):
            acc[n].append(np.asarray(o))
    return {n: np.concatenate(v) if v and v[0].ndim else np.stack(v) for n, v in acc.items()}
