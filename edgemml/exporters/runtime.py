"""Running exported models in ONNX Runtime and OpenVINO, and comparing their outputs with torch.

Why here and not in each stage: quantize (accuracy of int8), export (parity right after conversion)
and validate (every artifact on held-out data) must run artifacts the same way: the same thread
settings, the same batching and, for OpenVINO, an explicit inference precision. On CPUs with
AVX-512 BF16 OpenVINO runs an fp32 model in bf16 unless told otherwise, so every compiled model here
states its precision and reports the one the runtime says it used.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

import numpy as np

OvPrecision = Literal["f32", "bf16", "f16", "default"]


def onnx_session(path: Path, *, threads: int | None = None) -> Any:
    """An onnxruntime CPU InferenceSession with all graph optimizations (what a device would run)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def openvino_compiled(xml: Path, *, precision: OvPrecision = "f32",
                      threads: int | None = None) -> tuple[Any, str]:
    """(compiled model, precision it runs in). `precision="f32"` pins fp32 execution; "default"
    lets OpenVINO choose (bf16 on AVX-512 BF16 / AMX CPUs). The returned precision is read back from
    the compiled model, not assumed."""
    import openvino as ov

    config: dict[str, Any] = {}
    if precision != "default":
        config["INFERENCE_PRECISION_HINT"] = precision
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = ov.Core().compile_model(str(xml), "CPU", config)
    return compiled, precision_name(compiled.get_property("INFERENCE_PRECISION_HINT"))


def precision_name(value: Any) -> str:
    """OpenVINO's element type as f32 / bf16 / f16 (the property comes back as "<Type: 'float32'>")."""
    text = value.to_string() if hasattr(value, "to_string") else str(value)
    match = re.search(r"'([a-z0-9]+)'", text)
    name = match.group(1) if match else text
    return {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}.get(name, name)


def _batches(x: np.ndarray, batch_size: int) -> Iterable[np.ndarray]:
    for i in range(0, len(x), batch_size):
        yield np.ascontiguousarray(x[i:i + batch_size])


def run_onnx(session: Any, x: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
    """First output of an ONNX model for a float32 batch, computed in chunks."""
    name = session.get_inputs()[0].name
    outs = [session.run(None, {name: chunk})[0] for chunk in _batches(x, batch_size)]
    return np.concatenate(outs) if outs else np.zeros((0,), np.float32)


def run_openvino(compiled: Any, x: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
    """First output of a compiled OpenVINO model for a float32 batch, computed in chunks."""
    request = compiled.create_infer_request()
    outs = []
    for chunk in _batches(x, batch_size):
        result = request.infer({0: chunk})
        outs.append(np.array(result[compiled.outputs[0]], copy=True))
    return np.concatenate(outs) if outs else np.zeros((0,), np.float32)


def dataset_arrays(dataset: Any, indices: Iterable[int] | None = None) -> tuple[np.ndarray,
                                                                                np.ndarray]:
    """(inputs [N, ...] float32, labels [N]) of a torch-style dataset's items (all, or `indices`)."""
    xs, ys = [], []
    for i in (range(len(dataset)) if indices is None else indices):
        x, y = dataset[i]
        xs.append(np.asarray(x, dtype=np.float32))
        ys.append(int(y))
    if not xs:
        return np.zeros((0,), np.float32), np.zeros((0,), np.int64)
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


def evenly_spaced(n_total: int, n: int) -> np.ndarray:
    """n indices spread over range(n_total) (deterministic, covers every class of a sorted split)."""
    if n >= n_total:
        return np.arange(n_total)
    return np.unique(np.linspace(0, n_total - 1, n).round().astype(np.int64))


@dataclass
class ParityResult:
    """How far a converted model's outputs are from the reference on the same inputs."""

    samples: int
    max_abs_diff: float
    output_scale: float
    rel_diff: float
    top1_agreement: float
    tolerance: float
    ok: bool

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 9) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def compare_outputs(ref: np.ndarray, out: np.ndarray, *, tolerance: float) -> ParityResult:
    """max |out - ref| relative to the output scale (max |ref|), and top-1 agreement.

    Relative to the scale because logits of one model span 0.1 and of another 50: an absolute bound
    would be either meaningless or impossible.
    """
    if ref.shape != out.shape:
        raise ValueError(f"output shapes differ: reference {ref.shape}, converted {out.shape}")
    diff = float(np.abs(out.astype(np.float64) - ref.astype(np.float64)).max()) if ref.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    rel = diff / max(scale, 1e-12)
    agree = float((out.argmax(-1) == ref.argmax(-1)).mean()) if ref.ndim == 2 and len(ref) else 1.0
    return ParityResult(samples=int(len(ref)), max_abs_diff=diff, output_scale=scale, rel_diff=rel,
                        top1_agreement=agree, tolerance=tolerance, ok=bool(rel <= tolerance))
