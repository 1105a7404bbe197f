"""LiteRT (TFLite) on the CPU: the only place edgemml makes a TFLite interpreter.

Needs only numpy + ai-edge-litert (which brings flatbuffers): no torch, which is why a bundle's
predict.py can run a .tflite with numpy, Pillow and ai-edge-litert alone. The interpreter applies its
default XNNPACK delegate; XNNPACK runs an fp32 model in fp32 and an int8 model with int8 kernels, so
the precision is read from the file: the weight and activation types of its conv / fully-connected /
matmul operators.

Quantized I/O: a fully int8 model converted with litert-torch takes int8 input and gives int8
output. The runner quantizes the float32 batch with the input tensor's own scale / zero point and
dequantizes the output with the output's, so callers always see float logits; the parameters are in
Runner.io (validate's report says the model was fed and read through them; the bundle's manifest
records them).

Static batch: litert-torch writes the example's batch into the graph (shape_signature has no -1),
and resize_tensor_input to another batch fails in the XNNPACK delegate ("failed to reshape"), so the
runner reports static_batch and runtimes.predict pads. A model with a dynamic batch (-1) is resized
on demand. This module is named like the builtin `open` it defines; files are read with
builtins.open.
"""

from __future__ import annotations

import builtins
import mmap
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgemml.errors import InputError
from edgemml.runtimes.base import Runner

NAME = "litert"
FORMAT = "litert"
EXTRA = "litert"
#: what running a .tflite needs (no torch); what converting one needs besides
MODULES = ("ai_edge_litert",)
EXPORT_MODULES = ("litert_torch", "torchao")
#: XNNPACK runs a .tflite in the precision it stores: there is no second, exact mode
HAS_EXACT_MODE = False

def claims(path: Path) -> bool:
    return Path(path).is_file() and Path(path).suffix == ".tflite"


def files(path: Path) -> list[Path]:
    return [Path(path)]


# ---------------------------------------------------------------------------------------------
# Reading the file

#: builtin operators that carry weights (input 1), by their schema names
_WEIGHTED = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV", "CONV_3D",
             "BATCH_MATMUL")
_INT_TYPES = ("INT8", "UINT8", "INT4", "INT16")


@dataclass
class TfliteInfo:
    """Per weighted operator: (op name, weight type, activation type), and all op counts."""

    weighted: list[tuple[str, str, str]]
    ops: Counter

    @property
    def precision(self) -> str:
        """int8 when any weighted op has integer weights, fp16 for half weights, else fp32."""
        if any(w in _INT_TYPES for _, w, _ in self.weighted):
            return "int8"
        return "fp16" if any(w == "FLOAT16" for _, w, _ in self.weighted) else "fp32"

    @property
    def compute(self) -> str:
        """What XNNPACK computes in: int8 when some weighted op has integer activations."""
        if any(a in _INT_TYPES for _, _, a in self.weighted):
            return "int8"
        return "f32"


def read_tflite(path: Path) -> TfliteInfo:
    """Weighted operators and op counts of a .tflite, read with the schema ai-edge-litert ships."""
    from ai_edge_litert import schema_py_generated as fb

    path = Path(path)
    names = {v: k for k, v in vars(fb.BuiltinOperator).items() if not k.startswith("_")}
    types = {v: k for k, v in vars(fb.TensorType).items() if not k.startswith("_")}
    try:
        with builtins.open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if len(buf) < 8 or bytes(buf[4:8]) != b"TFL3":
                raise ValueError("no TFLite file identifier (TFL3)")
            model = fb.Model.GetRootAs(buf, 0)
            _check_buffers(model, len(buf))
            codes = [max(model.OperatorCodes(i).BuiltinCode(),
                         model.OperatorCodes(i).DeprecatedBuiltinCode())
                     for i in range(model.OperatorCodesLength())]
            weighted, ops = [], Counter()
            for s in range(model.SubgraphsLength()):
                g = model.Subgraphs(s)
                producer = {}
                for i in range(g.OperatorsLength()):
                    op = g.Operators(i)
                    for j in range(op.OutputsLength()):
                        producer[op.Outputs(j)] = op
                for i in range(g.OperatorsLength()):
                    op = g.Operators(i)
                    name = names.get(codes[op.OpcodeIndex()], "CUSTOM")
                    ops[name] += 1
                    if name not in _WEIGHTED or op.InputsLength() < 2:
                        continue
                    act = types.get(g.Tensors(op.Inputs(0)).Type(), "?")
                    w_idx = op.Inputs(1)
                    w_type = types.get(g.Tensors(w_idx).Type(), "?")
                    src = producer.get(w_idx)   # fp16 weights arrive through a DEQUANTIZE op
                    if src is not None and names.get(codes[src.OpcodeIndex()]) == "DEQUANTIZE":
                        w_type = types.get(g.Tensors(src.Inputs(0)).Type(), w_type)
                    weighted.append((name, w_type, act))
            return TfliteInfo(weighted, ops)
    except (ValueError, IndexError, OSError, TypeError, AttributeError, struct.error) as exc:
        raise InputError(f"not a readable TFLite model ({exc})", file=path,
                         hint="re-export the model; the file may be truncated or not a .tflite") \
            from None


def _check_buffers(model: Any, size: int) -> None:
    """Every weight buffer lies inside the file (a truncated .tflite keeps a parseable head: the
    weights are at the end)."""
    for i in range(model.BuffersLength()):
        b = model.Buffers(i)
        if b.Offset() > 1:  # stored after the flatbuffer (models over 2 GB)
            if b.Offset() + b.Size() > size:
                raise ValueError(f"weight buffer {i} ends past the end of the file (truncated)")
        elif b.DataLength():
            b.DataAsNumpy()  # np.frombuffer raises when the vector runs past the end


def stored_precision(path: Path) -> str:
    return read_tflite(path).precision


# ---------------------------------------------------------------------------------------------
# Running it


def _qparams(detail: dict[str, Any]) -> tuple[float, int] | None:
    """(scale, zero point) of a per-tensor quantized I/O tensor, None for a float one."""
    if np.dtype(detail["dtype"]).kind not in "iu":
        return None
    scale, zero = detail["quantization"]
    if not scale:
        raise ValueError(f"integer tensor {detail['name']} has no quantization scale")
    return float(scale), int(zero)


def quantize(x: np.ndarray, q: tuple[float, int], dtype: Any) -> np.ndarray:
    info = np.iinfo(dtype)
    return np.clip(np.round(x / q[0]) + q[1], info.min, info.max).astype(dtype)


def dequantize(y: np.ndarray, q: tuple[float, int]) -> np.ndarray:
    return ((y.astype(np.float32) - q[1]) * q[0]).astype(np.float32)


def open(path: Path, *, threads: int | None, exact: bool = False,
         name: str | None = None) -> Runner:
    """A TFLite interpreter (default XNNPACK delegate) with `threads` threads. `exact` is ignored:
    XNNPACK does not downcast fp32 models unless they carry fp16 hints, which litert-torch does
    not write."""
    from ai_edge_litert.interpreter import Interpreter

    path = Path(path)
    info = read_tflite(path)
    try:
        it = Interpreter(model_path=str(path), num_threads=threads or None)
        it.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"the LiteRT interpreter cannot load {path.name}: {first}", file=path,
                         hint="re-export the model; the file may be truncated") from None
    ins, outs = it.get_input_details(), it.get_output_details()
    if len(ins) != 1:
        raise InputError(f"{path.name} takes {len(ins)} inputs; edgemml runs single-input "
                         f"classifiers", file=path)
    inp, out = ins[0], outs[0]
    in_q, out_q = _qparams(inp), _qparams(out)
    in_dtype = np.dtype(inp["dtype"])
    sig = [int(d) for d in inp["shape_signature"]]
    static = sig[0] if sig and sig[0] > 0 else None
    state = {"shape": [int(d) for d in inp["shape"]]}

    def run(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if list(x.shape[1:]) != state["shape"][1:] or (static and len(x) != static):
            raise ValueError(f"{path.name} takes input {sig} , got {list(x.shape)}")
        if not static and len(x) != state["shape"][0]:
            it.resize_tensor_input(inp["index"], [len(x), *state["shape"][1:]])
            it.allocate_tensors()
            state["shape"] = [len(x), *state["shape"][1:]]
        feed = quantize(x, in_q, in_dtype) if in_q else np.ascontiguousarray(x, dtype=in_dtype)
        it.set_tensor(inp["index"], feed)
        it.invoke()
        y = it.get_tensor(out["index"])
        return dequantize(y, out_q) if out_q else np.array(y, dtype=np.float32, copy=True)

    io = {"input": inp["name"], "input_shape": sig, "input_dtype": in_dtype.name,
          "output": out["name"], "output_shape": [int(d) for d in out["shape_signature"]],
          "output_dtype": np.dtype(out["dtype"]).name,
          "weighted_ops": dict(Counter(f"{op}:{w}/{a}" for op, w, a in info.weighted))}
    if in_q:
        io.update(input_scale=in_q[0], input_zero_point=in_q[1])
    if out_q:
        io.update(output_scale=out_q[0], output_zero_point=out_q[1])
    return Runner(name=name or path.name, backend=NAME, threads=threads or 0,
                  precision=info.compute, fn=run, static_batch=static, io=io,
                  input_shape=tuple(d if d > 0 else None for d in sig))
