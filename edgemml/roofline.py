"""This machine's measured peak multiply-accumulate rate, per runtime and precision, cached per CPU.

Why: a latency figure alone does not say whether a model is slow because the hardware is, or because
the graph runs far below what the hardware can do. The validate report therefore divides each
artifact's achieved MAC rate by the peak *of the runtime and precision it ran in* (ONNX Runtime
int8, OpenVINO bf16, torch fp32 ...), measured here as one large matrix product computed two ways,
as a MatMul and as a 1x1 convolution (the same MACs through the runtime's convolution kernels):
fp32, and int8 as a QDQ graph (uint8 activations x int8 weights, the form both runtimes lower to
their int8 kernels), opened and timed through edgemml.runtimes like every artifact, at the report's
thread count. The peak is the faster of the two: a network runs convolution kernels, and a runtime's
convolution kernels may beat its MatMul (here ONNX Runtime's and torch's fp32 ones did, by up to
1.07x). A peak is a measured reference, not a bound: a model whose kernels run better than one large
product shows over 100 %.

A peak is a property of one CPU, one set of kernels (library versions) and one thread count, so the
cache is keyed by all of them (`cache_dir()/roofline-<key>.json`), and a roofline file measured
elsewhere is refused with the reason: a `% of peak` divided by another machine's peak is a number
that was not measured where it is shown.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgemml.artifacts import canonical_json, read_json, write_json_atomic
from edgemml.errors import InputError
from edgemml.machine import CACHE_ENV, cache_dir, cpu, dist_version

#: environment variable that moves edgemml's cache folder (tests point it at a temporary folder)
#: environment variable that sets the matrix size validate measures (tests use a small one)
SIZE_ENV = "EDGEMML_ROOFLINE_SIZE"
SCHEMA = "edgemml.roofline"
VERSION = 3
#: the kernels the product is computed by (the peak is the fastest)
KERNELS = ("matmul", "conv1x1")
#: the libraries whose kernels are measured: their versions are part of the key
KERNEL_DISTRIBUTIONS = ("onnxruntime", "openvino", "torch")
DEFAULT_SIZE = 1024


class RooflineMismatch(InputError):
    """A roofline measured on another CPU, with other kernels or at another thread count."""


def machine_key(threads: int) -> dict[str, Any]:
    """What a peak depends on: the CPU (name, the int8/bf16 features its kernels use), the kernel
    libraries' versions and the thread count."""
    info = cpu()
    return {"cpu": info.name, "machine": info.machine, "cpu_flags": info.kernel_flags,
            "versions": {d: dist_version(d) for d in KERNEL_DISTRIBUTIONS}, "threads": int(threads)}


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(key).encode()).hexdigest()[:16]


def cache_path(threads: int) -> Path:
    return cache_dir() / f"roofline-{key_digest(machine_key(threads))}.json"


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------


def conv_side(size: int) -> int:
    """The 1x1 convolution's map is side x side pixels, side^2 ~ size rows of the MatMul."""
    return max(1, int(round(size ** 0.5)))


def input_shape(kernel: str, size: int) -> list[int]:
    side = conv_side(size)
    return [size, size] if kernel == "matmul" else [1, size, side, side]


def kernel_macs(kernel: str, size: int) -> int:
    rows = size if kernel == "matmul" else conv_side(size) ** 2
    return rows * size * size


def matmul_model(m: int, k: int, n: int, int8: bool, kernel: str = "matmul") -> Any:
    """ONNX [m,k] x [k,n] with the weight as an initializer; int8 = QDQ around the MatMul. With
    kernel="conv1x1" the same product as a Conv: [1,k,s,s] input (s^2 = m), weight [n,k,1,1]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.05
    op, args = "MatMul", {}
    x_shape, y_shape = [m, k], [m, n]
    if kernel == "conv1x1":
        side = conv_side(m)
        w = np.ascontiguousarray(w.T.reshape(n, k, 1, 1))
        op, args = "Conv", {"kernel_shape": [1, 1]}
        x_shape, y_shape = [1, k, side, side], [1, n, side, side]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)
    if not int8:
        nodes = [helper.make_node(op, ["x", "w"], ["y"], **args)]
        inits = [numpy_helper.from_array(w, "w")]
    else:
        w_scale = np.float32(np.abs(w).max() / 127)
        wq = np.clip(np.round(w / w_scale), -127, 127).astype(np.int8)
        inits = [
            numpy_helper.from_array(wq, "wq"),
            numpy_helper.from_array(np.array(w_scale, np.float32), "w_scale"),
            numpy_helper.from_array(np.array(0, np.int8), "w_zp"),
            numpy_helper.from_array(np.array(4.0 / 255, np.float32), "x_scale"),
            numpy_helper.from_array(np.array(128, np.uint8), "x_zp"),
        ]
        nodes = [
            helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"]),
            helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"]),
            helper.make_node("DequantizeLinear", ["wq", "w_scale", "w_zp"], ["wd"]),
            helper.make_node(op, ["xd", "wd"], ["y"], **args),
        ]
    graph = helper.make_graph(nodes, kernel, [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


@dataclass
class Row:
    """One (runtime, precision) measurement of the matrix product."""

    runtime: str
    dtype: str       # what the graph stores: fp32 | int8
    precision: str   # what the runtime says it computed in: f32 | bf16 | int8
    min_ms: float    # the fastest call: the rate the hardware attains (load only adds time)
    median_ms: float
    gmacs_per_s: float  # from min_ms
    kernel: str = "matmul"  # matmul | conv1x1


@dataclass
class Roofline:
    """Measured peaks and what they were measured on."""

    key: dict[str, Any]
    size: int
    rows: list[Row] = field(default_factory=list)
    created: str = ""
    loadavg: list[float] = field(default_factory=list)
    path: Path | None = None

    def peak(self, runtime: str, precision: str) -> float | None:
        """GMAC/s of a runtime computing in a precision (f32 | bf16 | f16 | int8)."""
        found = [r.gmacs_per_s for r in self.rows
                 if r.runtime == runtime and r.precision == precision]
        return max(found) if found else None

    def best(self, dtype: str) -> float | None:
        """The fastest runtime's rate for a stored dtype (fp32 | int8)."""
        found = [r.gmacs_per_s for r in self.rows if r.dtype == dtype]
        return max(found) if found else None

    def as_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "version": VERSION, "key": self.key, "size": self.size,
                "macs": {k: kernel_macs(k, self.size) for k in KERNELS},
                "created": self.created, "loadavg": self.loadavg,
                "rows": [asdict(r) for r in self.rows],
                "peak_gmacs_per_s": {d: self.best(d) for d in ("fp32", "int8") if self.best(d)},
                "note": "one [size x size] x [size x size] product per runtime and precision, "
                        "as a MatMul and as a 1x1 Conv (peak: the faster), timed together in "
                        "interleaved rounds by edgemml.runtimes.time_calls; GMAC/s from the "
                        "fastest call; int8 is a QDQ graph (uint8 activations x int8 weights)"}

    @classmethod
    def from_dict(cls, doc: dict[str, Any], path: Path | None = None) -> Roofline:
        if doc.get("version") != VERSION:
            raise ValueError(f"written by another edgemml (roofline version {doc.get('version')}, "
                             f"this one reads {VERSION})")
        rows = [Row(**{k: r[k] for k in ("runtime", "dtype", "precision", "min_ms", "median_ms",
                                         "gmacs_per_s", "kernel")}) for r in doc["rows"]]
        return cls(dict(doc["key"]), int(doc["size"]), rows, str(doc.get("created", "")),
                   list(doc.get("loadavg", [])), path)


def _open(runtime: str, path: Path, threads: int, exact: bool) -> Any:
    """The ONNX graph in ONNX Runtime, or converted in memory for OpenVINO (no IR on disk)."""
    from edgemml import runtimes

    backend = runtimes.backend(runtime)
    if runtime != "openvino":
        return backend.open(path, threads=threads, exact=exact)
    import openvino as ov

    compiled, precision = backend.compile(ov.convert_model(str(path)), threads=threads,
                                          exact=exact)
    return backend.runner_for(compiled, precision, threads=threads, name=path.name)


def _torch_product(size: int, threads: int, kernel: str) -> Any:
    """A torch module holding one [size x size] weight (Linear or 1x1 Conv2d): fp32 eager,
    through the runtime layer."""
    import torch

    from edgemml import runtimes

    layer = (torch.nn.Linear(size, size, bias=False) if kernel == "matmul"
             else torch.nn.Conv2d(size, size, 1, bias=False))
    return runtimes.backend("torch").open_module(layer, threads=threads, name=kernel)


def measure(threads: int, *, size: int = DEFAULT_SIZE, repeats: int = 30,
            runtimes_: tuple[str, ...] = ("onnxruntime", "openvino", "torch"),
            log: Callable[[str], None] | None = None) -> Roofline:
    """Time one [size]^3 product, as a MatMul and as a 1x1 Conv, per runtime and precision: ONNX
    Runtime fp32 and int8, OpenVINO pinned f32, at its default precision (bf16 on CPUs with AVX-512
    BF16) and int8, torch fp32.

    All are timed together by the one timer, in interleaved rounds, so load from other processes
    hits each alike; the peak is each one's fastest call (a peak is what the hardware attains, and
    load only ever adds time), the median is kept beside it."""
    import onnx

    from edgemml.runtimes import time_calls

    rng = np.random.default_rng(1)
    xs = {k: rng.standard_normal(input_shape(k, size)).astype(np.float32) for k in KERNELS}
    roof = Roofline(machine_key(threads), size,
                    created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    loadavg=[round(v, 2) for v in os.getloadavg()])
    runners: dict[str, tuple[str, str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="edgemml-roofline-") as tmp:
        for kernel in KERNELS:
            for dtype in ("fp32", "int8"):
                path = Path(tmp) / f"{kernel}_{dtype}.onnx"
                onnx.save(matmul_model(size, size, size, dtype == "int8", kernel), str(path))
                modes: list[tuple[str, bool]] = []
                if "onnxruntime" in runtimes_:
                    modes.append(("onnxruntime", True))
                if "openvino" in runtimes_:
                    modes += [("openvino", True)] + ([("openvino", False)] if dtype == "fp32"
                                                     else [])
                for runtime, exact in modes:
                    name = f"{runtime}-{kernel}-{dtype}-{'exact' if exact else 'default'}"
                    runners[name] = (kernel, dtype, _open(runtime, path, threads, exact))
    if "torch" in runtimes_:
        for kernel in KERNELS:
            runners[f"torch-{kernel}-fp32"] = (kernel, "fp32",
                                               _torch_product(size, threads, kernel))
    timed = time_calls({k: (lambda r=r, x=xs[kn]: r(x)) for k, (kn, _, r) in runners.items()},
                       warmup=3, runs=repeats, rounds=min(5, repeats))
    for key, (kernel, dtype, runner) in runners.items():
        t = timed[key]
        row = Row(runner.backend, dtype, "int8" if dtype == "int8" else runner.precision,
                  round(t.min_ms, 4), round(t.median_ms, 4),
                  round(kernel_macs(kernel, size) / (t.min_ms / 1e3) / 1e9, 2), kernel)
        roof.rows.append(row)
        if log is not None:
            log(f"{row.runtime:12s} {kernel:8s} {dtype:5s} runs in {row.precision:5s} "
                f"{row.min_ms:9.3f} ms (median {row.median_ms:.3f}) {row.gmacs_per_s:9.1f} GMAC/s")
    return roof


# --------------------------------------------------------------------------------------------------
# Reading, checking, caching
# --------------------------------------------------------------------------------------------------


def mismatches(key: dict[str, Any], here: dict[str, Any]) -> list[str]:
    """What differs between the machine a roofline was measured on and this one, in words."""
    out = []
    for name, label in (("cpu", "CPU"), ("cpu_flags", "CPU features"), ("threads", "threads"),
                        ("machine", "architecture"), ("versions", "library versions")):
        if key.get(name) != here.get(name):
            out.append(f"{label} {key.get(name)!r} (here {here.get(name)!r})")
    return out


def load(path: Path, *, threads: int) -> Roofline:
    """A roofline file, checked against this machine and thread count. RooflineMismatch names
    what differs: a peak from another CPU, other kernels or another thread count is refused."""
    path = Path(path)
    try:
        doc = read_json(path)
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
            raise ValueError(f"not an {SCHEMA} file (write one with `edgemml roofline --out`)")
        roof = Roofline.from_dict(doc, path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"cannot read the roofline file {path}: {exc}", file=path,
                         key="roofline", hint="use roofline: auto (measured here and cached)") \
            from None
    diff = mismatches(roof.key, machine_key(threads))
    if diff:
        raise RooflineMismatch(f"the roofline file {path} was measured elsewhere: "
                               + "; ".join(diff), file=path, key="roofline",
                               hint="use roofline: auto, which measures this machine's peak")
    return roof


def default_size() -> int:
    """$EDGEMML_ROOFLINE_SIZE (tests and slow CI machines use a smaller product), else 1024."""
    try:
        return max(64, int(os.environ.get(SIZE_ENV, DEFAULT_SIZE)))
    except ValueError:
        return DEFAULT_SIZE


def cached(threads: int, *, size: int | None = None, repeats: int = 30, force: bool = False,
           log: Callable[[str], None] | None = None,
           warn: Callable[[str], None] | None = None) -> Roofline:
    """This machine's roofline at `threads`: read from the cache when one was measured with the
    same key (and matrix size), otherwise measured now and cached. A cache file whose content
    belongs to another machine (a copied home folder) is never used: it is measured again, with a
    warning."""
    size = size or default_size()
    path = cache_path(threads)
    if path.is_file() and not force:
        try:
            roof = load(path, threads=threads)
            if roof.size == size:
                return roof
        except RooflineMismatch as exc:
            if warn is not None:
                warn(f"{exc.message}; measuring this machine's peak instead")
        except InputError as exc:
            if warn is not None:
                warn(f"ignoring an unreadable roofline cache ({exc.message})")
    roof = measure(threads, size=size, repeats=repeats, log=log)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, roof.as_dict())
        roof.path = path
    except OSError as exc:  # a read-only home folder must not fail a validation
        if warn is not None:
            warn(f"cannot cache the roofline in {path.parent} ({exc}); set {CACHE_ENV}")
    return roof


def save(roof: Roofline, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, roof.as_dict())
    return path


def describe(roof: Roofline) -> dict[str, Any]:
    """What a report records about the peaks it divided by."""
    return {"source": str(roof.path) if roof.path else None, "created": roof.created,
            "threads": roof.key.get("threads"), "cpu": roof.key.get("cpu"), "size": roof.size,
            "loadavg_when_measured": roof.loadavg,
            "peaks": [asdict(r) for r in roof.rows]}


def as_json(roof: Roofline) -> str:
    return json.dumps(roof.as_dict(), indent=2)
