"""What every backend returns when it opens an artifact, and the one way edgemml times it.

A `Runner` maps a float32 input batch (already preprocessed, in the layout the model takes) to float32
logits [N, classes], whatever the runtime computes in: a backend whose graph takes int8 inputs or gives
int8 outputs (e.g. a fully quantized .tflite) quantizes and dequantizes inside its runner with the
file's own scale and zero point, so callers never special-case a runtime. `precision` is what the
runtime really computes in, read back from it where it says (OpenVINO runs fp32 graphs in bf16 on CPUs
with AVX-512 BF16 unless told otherwise, which matters for parity).

Why one timer: validate, prune's latency figure and the benchmarks used to time models three ways
(sequentially, in interleaved rounds, with and without pauses between blocks) and disagreed. Every
latency figure now comes from `time_calls`: the calls are timed in interleaved rounds so that load
from other processes hits every variant alike, each block starts after a short pause (so no runtime
is timed in the wake of another's threads) and one untimed call.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import numpy as np


@dataclass
class Runner:
    """An opened artifact: call it with a float32 batch, get float32 logits [N, C]."""

    name: str
    backend: str
    threads: int
    precision: str
    fn: Callable[[np.ndarray], np.ndarray] = field(repr=False)
    #: the batch size the graph requires (static first dimension), None when any batch works
    static_batch: int | None = None
    #: input / output dtypes and shapes, and quantization parameters of int8 I/O
    io: dict[str, Any] = field(default_factory=dict)
    #: the input shape the graph declares (None for a dynamic dimension), when the runtime says
    input_shape: tuple[int | None, ...] | None = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.fn(x)


def chunks(x: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for i in range(0, len(x), size):
        yield np.ascontiguousarray(x[i:i + size])


def predict(runner: Runner, x: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
    """Logits [N, C] of a batch of any size. A graph with a static batch dimension is fed chunks of
    exactly that size (the last one zero-padded, the padding's outputs dropped)."""
    step = runner.static_batch or batch_size
    outs = []
    for chunk in chunks(x, step):
        n = len(chunk)
        if runner.static_batch and n < step:
            pad = np.zeros((step - n, *chunk.shape[1:]), dtype=chunk.dtype)
            chunk = np.concatenate([chunk, pad])
        out = runner(chunk)
        outs.append(np.asarray(out, dtype=np.float32).reshape(len(out), -1)[:n])
    if not outs:
        return np.zeros((0, 0), np.float32)
    return np.concatenate(outs)


@dataclass
class Timing:
    """Milliseconds per call of one timed call site."""

    median_ms: float
    p90_ms: float
    min_ms: float
    runs: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


#: pause before each block of timed calls, so the previous call's runtime threads go idle first.
#: Measured here (benchmarks/timers.py, "after another runtime"): OpenVINO int8 timed right after a
#: block of ONNX Runtime ran 1.8x slower than alone, still 1.74x after a 15 ms pause and 1.07x after
#: 30 ms; other pairs were within 1.1x. A deployed model runs alone in its process, so no block may
#: start in another runtime's wake.
SETTLE_S = 0.05


def time_calls(calls: dict[str, Callable[[], Any]], *, warmup: int, runs: int,
               rounds: int = 1, settle_s: float = SETTLE_S) -> dict[str, Timing]:
    """Time zero-argument calls in interleaved rounds: the one timer of edgemml.

    Every call gets `warmup` untimed calls first; then in each of `rounds` rounds every call (in an
    order rotated by one each round) runs one untimed call and its share of `runs` timed calls.
    Interleaving makes ratios between the calls robust to load from other processes. Each call's
    warm-up and each block starts after a `settle_s` pause (SETTLE_S: another runtime's threads
    slow the next one for tens of ms); the block's untimed call then wakes this runtime's own
    threads, so the timed calls run hot, as a model serving back-to-back requests does.
    """
    names = list(calls)
    for name in names:
        time.sleep(settle_s)
        for _ in range(warmup):
            calls[name]()
    rounds = max(1, min(rounds, runs))
    per_round = [runs // rounds + (1 if r < runs % rounds else 0) for r in range(rounds)]
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            fn = calls[name]
            time.sleep(settle_s)
            fn()
            for _ in range(per_round[r]):
                t0 = time.perf_counter_ns()
                fn()
                times[name].append((time.perf_counter_ns() - t0) / 1e6)
    out = {}
    for name, ts in times.items():
        arr = np.asarray(ts, dtype=np.float64)
        out[name] = Timing(median_ms=float(np.median(arr)), p90_ms=float(np.percentile(arr, 90)),
                           min_ms=float(arr.min()), runs=int(len(arr)))
    return out


@dataclass
class Latency:
    """Batch-1 latency and throughput at a larger batch of one runner."""

    batch1_median_ms: float
    batch1_p90_ms: float
    batch1_min_ms: float
    batch1_input: int
    runs: int
    warmup: int
    threads: int
    batch: int
    batch_median_ms: float
    throughput_ips: float | None
    throughput_runs: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _batch_of(runner: Runner, x: np.ndarray, n: int) -> np.ndarray:
    """n real samples (repeated when fewer), or the graph's static batch size."""
    n = runner.static_batch or n
    return x[:n] if len(x) >= n else np.resize(x, (n, *x.shape[1:])).astype(x.dtype)


def measure_latency(runner: Runner, x: np.ndarray, *, warmup: int, runs: int, batch: int,
                    throughput_runs: int) -> Latency:
    """Batch-1 latency (median, p90, min over `runs` timed calls after `warmup`) and throughput at
    `batch` (images/s from the median of `throughput_runs` calls), on real samples `x` so that
    data-dependent kernels (e.g. int8 saturation paths) run as in production."""
    one, big = _batch_of(runner, x, 1), _batch_of(runner, x, batch)
    t1 = time_calls({"one": lambda: runner(one)}, warmup=warmup, runs=runs)["one"]
    tb = time_calls({"big": lambda: runner(big)}, warmup=max(1, warmup // 2),
                    runs=throughput_runs)["big"]
    return Latency(batch1_median_ms=t1.median_ms, batch1_p90_ms=t1.p90_ms,
                   batch1_min_ms=t1.min_ms, batch1_input=len(one), runs=runs, warmup=warmup,
                   threads=runner.threads, batch=len(big), batch_median_ms=tb.median_ms,
                   throughput_ips=len(big) / (tb.median_ms / 1e3) if tb.median_ms > 0 else None,
                   throughput_runs=throughput_runs)
