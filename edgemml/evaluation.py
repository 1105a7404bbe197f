"""Run any artifact (torch module, ONNX file, OpenVINO IR) on a dataset and measure it.

Why one module: the validate stage compares artifacts of three runtimes, and the comparison is only
fair when each is fed the same preprocessed test samples in the same batches, with the same fixed
thread count, and timed the same way (warm-up, then the median and p90 of many runs). Every figure
returned here is measured; nothing is estimated from file names.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from edgemml.errors import InputError

ARTIFACT_KEY_RE = re.compile(r"^(onnx|openvino)-(fp32|fp16|int8)$")

_OV_PRECISIONS = {"bf16": "bf16", "bfloat16": "bf16", "f32": "f32", "float32": "f32",
                  "f16": "f16", "float16": "f16"}


@dataclass
class Predictor:
    """A loaded model that maps a float32 input batch to float32 logits [N, classes]."""

    name: str
    backend: str  # torch | onnxruntime | openvino
    run: Callable[[np.ndarray], np.ndarray]
    #: the batch size the graph requires (static first dimension), None when any batch works
    static_batch: int | None = None
    #: what the runtime actually computes in (read back from the runtime where it says)
    runtime_precision: str = "f32"
    threads: int = 1
    #: the input shape the graph declares (None for a dynamic dimension), when the runtime says
    input_shape: tuple[int | None, ...] | None = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.run(x)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def torch_predictor(model: Any, *, threads: int, name: str = "torch") -> Predictor:
    """A torch module in eval mode, run under inference_mode with `threads` threads."""
    import torch

    model.eval()

    def run(x: np.ndarray) -> np.ndarray:
        # Set once and left set: torch.set_num_threads rebuilds the OpenMP pool, so switching it
        # around every call measured ~0.5 s per call here instead of ~5 ms.
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        with torch.inference_mode():
            return model(torch.from_numpy(np.ascontiguousarray(x))).float().numpy()

    return Predictor(name, "torch", run, None, "f32", threads)


def onnx_predictor(path: Path, *, threads: int, name: str = "onnx") -> Predictor:
    """An ONNX Runtime CPU session with all graph optimisations and fixed intra-op threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(path), sess_options=opts,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types: all mean "unusable file"
        raise InputError(f"ONNX Runtime cannot load {path.name}: {exc}", file=path) from None
    inp = sess.get_inputs()[0]
    in_dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
    first = inp.shape[0] if inp.shape else None
    static = first if isinstance(first, int) and first > 0 else None

    def run(x: np.ndarray) -> np.ndarray:
        out = sess.run(None, {inp.name: np.ascontiguousarray(x, dtype=in_dtype)})[0]
        return np.asarray(out, dtype=np.float32)

    precision = "f16" if in_dtype == np.float16 else "f32"
    shape = tuple(d if isinstance(d, int) and d > 0 else None for d in inp.shape or ())
    return Predictor(name, "onnxruntime", run, static, precision, threads, shape)


def openvino_predictor(folder: Path, *, threads: int, exact: bool,
                       name: str = "openvino") -> Predictor:
    """An OpenVINO CPU model. exact=False compiles it as deployed (the device's default inference
    precision, bf16 on CPUs with AVX-512 BF16/AMX); exact=True pins INFERENCE_PRECISION_HINT=f32.
    The precision reported is the one the compiled model says it uses."""
    import openvino as ov

    xml = openvino_xml(folder)
    core = ov.Core()
    try:
        model = core.read_model(str(xml))
    except RuntimeError as exc:
        raise InputError(f"OpenVINO cannot read {xml.name}: {exc}", file=xml) from None
    config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
                              "PERFORMANCE_HINT": "LATENCY"}
    if exact:
        config["INFERENCE_PRECISION_HINT"] = "f32"
    compiled = core.compile_model(model, "CPU", config)
    precision = str(compiled.get_property("INFERENCE_PRECISION_HINT")).lower()
    precision = _OV_PRECISIONS.get(precision.replace("<type: '", "").rstrip("'>"), precision)
    request = compiled.create_infer_request()
    out_port = compiled.output(0)
    pshape = model.inputs[0].get_partial_shape()
    static = None
    if pshape.rank.is_static and len(pshape) > 0 and pshape[0].is_static:
        static = pshape[0].get_length()
    shape = tuple(d.get_length() if d.is_static else None for d in pshape) \
        if pshape.rank.is_static else None

    def run(x: np.ndarray) -> np.ndarray:
        res = request.infer([np.ascontiguousarray(x, dtype=np.float32)])
        return np.asarray(res[out_port], dtype=np.float32).copy()

    return Predictor(name, "openvino", run, static, precision, threads, shape)


def openvino_xml(path: Path) -> Path:
    """model.xml of an OpenVINO artifact given as its folder or its .xml file (with its .bin)."""
    xml = path if path.suffix == ".xml" else path / "model.xml"
    if not xml.is_file():
        found = sorted(path.glob("*.xml")) if path.is_dir() else []
        if len(found) != 1:
            raise InputError(f"no OpenVINO model.xml in {path}", file=path,
                             hint="an OpenVINO artifact is a folder with model.xml + model.bin")
        xml = found[0]
    if not xml.with_suffix(".bin").is_file():
        raise InputError(f"{xml.name} has no {xml.with_suffix('.bin').name} next to it", file=xml)
    return xml


# --------------------------------------------------------------------------------------------------
# Running on data
# --------------------------------------------------------------------------------------------------


def iter_batches(dataset: Any, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(inputs, labels) of a dataset in order, as numpy, through its own preprocessing."""
    from edgemml.training import make_loader

    for x, y in make_loader(dataset, batch_size, shuffle=False):
        yield x.numpy(), np.asarray(y, dtype=np.int64)


def predict(predictor: Predictor, dataset: Any, *, batch_size: int = 64,
            advance: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(logits [N, C], labels [N]) of the whole dataset. A graph with a static batch dimension is
    fed chunks of exactly that size (the last one zero-padded, the padding's outputs dropped)."""
    step = predictor.static_batch or batch_size
    outs, labels = [], []
    for x, y in iter_batches(dataset, batch_size):
        for i in range(0, len(x), step):
            chunk = x[i:i + step]
            n = len(chunk)
            if predictor.static_batch and n < step:
                pad = np.zeros((step - n, *chunk.shape[1:]), dtype=chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            out = predictor(chunk)
            outs.append(out.reshape(out.shape[0], -1)[:n])
        labels.append(y)
        if advance:
            advance(len(x))
    if not outs:
        return np.zeros((0, 0), np.float32), np.zeros((0,), np.int64)
    return np.concatenate(outs).astype(np.float32), np.concatenate(labels)


def sample_inputs(dataset: Any, n: int) -> np.ndarray:
    """The first n preprocessed samples (repeated when the set is smaller): latency inputs are
    real images, so data-dependent kernels (e.g. int8 saturation paths) run as in production."""
    if len(dataset) == 0:
        raise InputError("the test split is empty: nothing to measure",
                         hint="raise data.split.test or give data.splits.test")
    items = [dataset[i % len(dataset)][0].numpy() for i in range(n)]
    return np.stack(items).astype(np.float32)


def measure_latency(predictor: Predictor, batch: np.ndarray, *, warmup: int, runs: int,
                    throughput_runs: int) -> dict[str, Any]:
    """Batch-1 latency (median, p90, min, in ms over `runs` timed calls after `warmup` calls) and
    throughput at batch len(batch) (images/s from the median of `throughput_runs` calls)."""
    one = batch[:1]
    if predictor.static_batch and predictor.static_batch != 1:
        one = batch[:predictor.static_batch] if len(batch) >= predictor.static_batch else np.resize(
            batch, (predictor.static_batch, *batch.shape[1:]))
    for _ in range(warmup):
        predictor(one)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        predictor(one)
        times.append((time.perf_counter_ns() - t0) / 1e6)
    arr = np.asarray(times)
    result: dict[str, Any] = {
        "batch1_median_ms": float(np.median(arr)), "batch1_p90_ms": float(np.percentile(arr, 90)),
        "batch1_min_ms": float(arr.min()), "batch1_input": int(len(one)), "runs": runs,
        "warmup": warmup, "threads": predictor.threads}
    big = batch
    if predictor.static_batch:
        big = batch[:predictor.static_batch] if len(batch) >= predictor.static_batch else one
    for _ in range(max(1, warmup // 2)):
        predictor(big)
    ttimes = []
    for _ in range(throughput_runs):
        t0 = time.perf_counter_ns()
        predictor(big)
        ttimes.append((time.perf_counter_ns() - t0) / 1e9)
    med = float(np.median(ttimes))
    result.update({"batch": int(len(big)), "batch_median_ms": med * 1e3,
                   "throughput_ips": float(len(big) / med) if med > 0 else None,
                   "throughput_runs": throughput_runs})
    return result


def roofline_peaks(path: Path) -> dict[str, float]:
    """{"int8": GMAC/s, "fp32": GMAC/s} measured by benchmarks/roofline.py on this machine."""
    import json

    try:
        doc = json.loads(Path(path).read_text())
        peaks = {k: float(v) for k, v in doc["peak_gmacs_per_s"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"cannot read the roofline file {path}: {exc}", file=path,
                         key="roofline", hint="write it with: python benchmarks/roofline.py") from None
    return peaks


def achieved_compute(macs: int | None, latency: dict[str, Any], dtype: str,
                     peaks: dict[str, float] | None) -> dict[str, Any]:
    """The MAC rate an artifact achieved (GMAC/s at batch 1 and at the throughput batch), and as a
    fraction of the machine's measured peak for its dtype when a roofline file is given. Small
    models at batch 1 sit far below the peak: per-call overhead, not arithmetic, dominates."""
    out: dict[str, Any] = {"gmacs_per_s_batch1": None, "gmacs_per_s_batch": None,
                           "peak_dtype": dtype, "peak_gmacs_per_s": None,
                           "fraction_of_peak_batch1": None, "fraction_of_peak_batch": None}
    if not macs:
        return out
    b1 = latency.get("batch1_median_ms")
    if b1:
        out["gmacs_per_s_batch1"] = macs * latency.get("batch1_input", 1) / (b1 / 1e3) / 1e9
    if latency.get("batch_median_ms"):
        out["gmacs_per_s_batch"] = macs * latency["batch"] / (latency["batch_median_ms"] / 1e3) / 1e9
    peak = (peaks or {}).get(dtype)
    if peak:
        out["peak_gmacs_per_s"] = peak
        for key in ("batch1", "batch"):
            rate = out[f"gmacs_per_s_{key}"]
            out[f"fraction_of_peak_{key}"] = rate / peak if rate is not None else None
    return out


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def classification_metrics(logits: np.ndarray, labels: np.ndarray,
                           classes: list[str]) -> dict[str, Any]:
    """Top-1 (and top-5 when there are more than 10 classes) and per-class accuracy, in percent."""
    n = int(len(labels))
    if n == 0:
        return {"n": 0, "top1_pct": None, "top5_pct": None, "per_class_pct": {},
                "worst_class_pct": None}
    pred = logits.argmax(1)
    out: dict[str, Any] = {"n": n, "top1_pct": 100.0 * float((pred == labels).mean())}
    if logits.shape[1] > 10:
        top5 = np.argsort(-logits, axis=1)[:, :5]
        out["top5_pct"] = 100.0 * float((top5 == labels[:, None]).any(1).mean())
    else:
        out["top5_pct"] = None
    per_class: dict[str, float] = {}
    for c in range(logits.shape[1]):
        mask = labels == c
        if mask.any():
            name = classes[c] if c < len(classes) else str(c)
            per_class[name] = 100.0 * float((pred[mask] == c).mean())
    out["per_class_pct"] = per_class
    out["worst_class_pct"] = min(per_class.values()) if per_class else None
    return out


def _centered_correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson correlation of the parts of two logit matrices that vary across samples.

    Each class column is centred over the samples first, so a constant offset shared by every
    input contributes nothing: an artifact whose outputs barely move with the input has (near)
    zero variance here and cannot correlate, however small its absolute difference is.
    """
    a = a - a.mean(0, keepdims=True)
    b = b - b.mean(0, keepdims=True)
    na, nb = float(np.sqrt((a * a).sum())), float(np.sqrt((b * b).sum()))
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float((a * b).sum() / (na * nb))


def parity_metrics(logits: np.ndarray, ref_logits: np.ndarray, labels: np.ndarray,
                   ref_top1_pct: float | None, top1_pct: float | None) -> dict[str, Any]:
    """How closely an artifact reproduces the reference on the same real samples."""
    if logits.shape != ref_logits.shape:
        raise InputError(f"output shape {tuple(logits.shape)} differs from the reference's "
                         f"{tuple(ref_logits.shape)}",
                         hint="the artifact and the reference must be the same classifier")
    if len(labels) == 0:
        return {}
    diff = np.abs(logits.astype(np.float64) - ref_logits.astype(np.float64))
    dot = (logits * ref_logits).sum(1)
    norms = np.linalg.norm(logits, axis=1) * np.linalg.norm(ref_logits, axis=1)
    cos = np.where(norms > 0, dot / np.where(norms > 0, norms, 1), 0.0)
    drop = (ref_top1_pct - top1_pct) if (ref_top1_pct is not None and top1_pct is not None) else None
    return {
        "agreement": float((logits.argmax(1) == ref_logits.argmax(1)).mean()),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "cosine": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "correlation": _centered_correlation(logits.astype(np.float64),
                                             ref_logits.astype(np.float64)),
        "accuracy_drop_pp": drop,
    }


def output_diversity(logits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Whether a model's predictions depend on its input: distinct predicted classes (relative to
    the classes present in the labels), the share of the most frequent prediction, and how much the
    logits vary across samples relative to their magnitude."""
    if len(labels) == 0:
        return {"distinct_predictions": 0, "classes_in_labels": 0, "distinct_fraction": 0.0,
                "majority_share": None, "relative_spread": None}
    pred = logits.argmax(1)
    counts = np.bincount(pred, minlength=logits.shape[1])
    present = int(len(np.unique(labels)))
    distinct = int((counts > 0).sum())
    spread = float(logits.std(0).mean())
    scale = float(np.abs(logits).mean())
    return {"distinct_predictions": distinct, "classes_in_labels": present,
            "distinct_fraction": distinct / max(present, 1),
            "majority_share": float(counts.max() / len(pred)),
            "relative_spread": spread / scale if scale > 0 else 0.0}


# --------------------------------------------------------------------------------------------------
# Size, parameters and MACs
# --------------------------------------------------------------------------------------------------


def artifact_files(path: Path) -> list[Path]:
    """The files a deployment would copy: the .onnx (+ external data), the .xml + .bin, or the
    torch model folder's files."""
    if path.is_dir():
        if (path / "model.json").is_file():
            return sorted(p for p in path.iterdir() if p.is_file())
        xml = openvino_xml(path)
        return [xml, xml.with_suffix(".bin")]
    if path.suffix == ".xml":
        return [path, path.with_suffix(".bin")]
    files = [path]
    if path.suffix == ".onnx":
        import onnx

        model = load_onnx(path, external_data=False)
        locations = {entry.value for t in model.graph.initializer
                     if t.data_location == onnx.TensorProto.EXTERNAL
                     for entry in t.external_data if entry.key == "location"}
        files += [path.parent / loc for loc in sorted(locations)]
    return files


def size_bytes(path: Path) -> int:
    return int(sum(p.stat().st_size for p in artifact_files(path) if p.is_file()))


def torch_macs_params(model: Any, input_shape: tuple[int, ...]) -> tuple[int, int]:
    """(MACs, parameters) of one forward pass at batch 1, counted by torch-pruning."""
    import torch
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model, torch.zeros(1, *input_shape[1:]))
    model.train(was_training)
    return int(macs), int(params)


def onnx_macs_params(path: Path) -> tuple[int | None, int]:
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
    macs = 0
    for n in graph.node:
        try:
            if n.op_type in ("Conv", "QLinearConv", "ConvInteger"):
                w = shapes[n.input[3] if n.op_type == "QLinearConv" else n.input[1]]
                out = shapes[n.output[0]]
                macs += int(np.prod(out[1:])) * int(np.prod(w[1:]))
            elif n.op_type in ("Gemm", "MatMul", "QLinearMatMul", "MatMulInteger"):
                a = shapes[n.input[0]]
                out = shapes[n.output[0]]
                k = a[-1]
                if n.op_type == "Gemm":
                    trans_a = next((x.i for x in n.attribute if x.name == "transA"), 0)
                    k = a[0] if trans_a else a[-1]
                macs += int(np.prod(out)) * int(k)
        except KeyError:
            return None, params
    return (macs if macs > 0 else None), params


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


def artifact_precision(path: Path) -> str:
    """fp32, fp16 or int8, read from the graph (quantisation ops or weight types), for artifacts
    given by path whose name does not say."""
    if path.is_dir() or path.suffix == ".xml":
        text = openvino_xml(path).read_text(encoding="utf-8", errors="replace")
        if "FakeQuantize" in text or re.search(r'element_type="[ui]8"', text):
            return "int8"
        return "fp16" if 'element_type="f16"' in text else "fp32"
    import onnx

    model = load_onnx(path, external_data=False)
    ops = {n.op_type for n in model.graph.node}
    if ops & {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul",
              "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear"}:
        return "int8"
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer):
        return "fp16"
    return "fp32"


def artifact_format(path: Path) -> str:
    """onnx, openvino or torch, from what is on disk."""
    if path.is_file() and path.suffix == ".onnx":
        return "onnx"
    if path.is_file() and path.suffix == ".xml":
        return "openvino"
    if path.is_dir() and (path / "model.json").is_file():
        return "torch"
    if path.is_dir() and (path / "model.xml").is_file():
        return "openvino"
    raise InputError(f"cannot tell what {path} is", file=path,
                     hint="give an .onnx file, an OpenVINO folder (model.xml + model.bin) or an "
                          "edgemml model folder (model.json + model.safetensors)")


def finite_or_none(value: float | None) -> float | None:
    """JSON has no NaN/inf: such a measurement is reported as null."""
    if value is None or not math.isfinite(value):
        return None
    return value
