"""Measured peak of fp32 and int8 matrix multiplication on this machine, in ONNX Runtime and OpenVINO.

Why: a latency figure alone does not say whether a model is slow because the hardware is, or because
the graph runs far below what the hardware can do. This measures the attainable multiply-accumulate
rate (GMAC/s) of a large matrix product at a fixed thread count — fp32 MatMul, and int8 as a QDQ
graph (uint8 activations x int8 weights, the form both runtimes lower to their int8 kernels) — so the
validate report can state each artifact's achieved MAC rate as a fraction of that peak.

Run by hand (not in CI):  .venv/bin/python benchmarks/roofline.py [--threads 2] [--size 1024]
Writes benchmarks/results/roofline.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import sys

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_name  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def matmul_model(m: int, k: int, n: int, int8: bool) -> onnx.ModelProto:
    """[m,k] x [k,n] with the weight as an initializer; int8 = QDQ around the MatMul."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.05
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])
    if not int8:
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
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
            helper.make_node("MatMul", ["xd", "wd"], ["y"]),
        ]
    graph = helper.make_graph(nodes, "matmul", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _time(fn: Any, repeats: int) -> list[float]:
    """Seconds per call, by edgemml's one timer (3 warm-up calls)."""
    from edgemml.runtimes import time_calls

    t = time_calls({"mm": fn}, warmup=3, runs=repeats)["mm"]
    return [t.median_ms / 1e3]


def bench(path: Path, x: np.ndarray, threads: int, repeats: int, backend: str,
          exact: bool = True) -> tuple[list[float], str]:
    """(seconds per call, the precision the runtime says it ran in) of a one-MatMul model,
    opened through edgemml's runtime layer like every artifact."""
    from edgemml import runtimes

    runner = runtimes.backend(backend).open(path, threads=threads, exact=exact)
    return _time(lambda: runner(x), repeats), runner.precision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=1024, help="m = k = n of the product")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS / "roofline.json")
    args = parser.parse_args()
    s = args.size
    macs = s * s * s
    x = np.random.default_rng(1).standard_normal((s, s)).astype(np.float32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for int8 in (False, True):
            path = Path(tmp) / f"mm_{'int8' if int8 else 'fp32'}.onnx"
            onnx.save(matmul_model(s, s, s, int8), path)
            runs = [("onnxruntime", "n/a", True), ("openvino", "f32", True)]
            if not int8:
                runs.append(("openvino", "default", False))  # bf16 where the CPU has it
            for runtime, hint, exact in runs:
                times, ran_in = bench(path, x, args.threads, args.repeats, runtime, exact)
                hint = ran_in if runtime == "openvino" else hint
                med = statistics.median(times)
                row = {"runtime": runtime, "dtype": "int8" if int8 else "fp32",
                       "precision_hint": hint, "median_ms": round(med * 1e3, 3),
                       "gmacs_per_s": round(macs / med / 1e9, 2)}
                rows.append(row)
                print(f"{runtime:12s} {row['dtype']:5s} hint={hint:4s} {row['median_ms']:9.2f} ms "
                      f"{row['gmacs_per_s']:8.1f} GMAC/s")
    peaks = {}
    for row in rows:
        key = row["dtype"]
        peaks[key] = max(peaks.get(key, 0.0), row["gmacs_per_s"])
    result = {"cpu": cpu_name(), "threads": args.threads, "size": s, "macs": macs,
              "measurements": rows, "peak_gmacs_per_s": peaks,
              "note": "peak = the fastest runtime for that dtype at this thread count; int8 is a "
                      "QDQ MatMul (uint8 x int8) as the runtimes lower quantized models."}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
