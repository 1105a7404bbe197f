"""Measure one artifact on real samples: accuracy, parity with its reference, latency, size, MACs.

Why one function for every artifact: validate compares artifacts of several runtimes, and the
comparison is only fair when each is fed the same preprocessed samples in the same batches, with the
same fixed thread count, and timed by the same timer (edgemml.runtimes). Every figure returned here
is measured; nothing is estimated from file names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from edgemml import metrics, runtimes
from edgemml.errors import InputError
from edgemml.report.schema import ArtifactEntry, Compute
from edgemml.roofline import Roofline

#: arrays up to this size are preprocessed once and kept for every artifact; larger sets stream
_KEEP_BYTES = 1 << 30


class Samples:
    """The evaluation split as (inputs, labels) batches in a fixed order, preprocessed once when it
    fits in memory (else streamed again for each artifact)."""

    def __init__(self, dataset: Any, batch_size: int) -> None:
        from edgemml.data.datasets import as_arrays

        self.dataset, self.batch_size = dataset, batch_size
        self.labels = np.asarray(dataset.labels if hasattr(dataset, "labels") else
                                 [dataset[i][1] for i in range(len(dataset))], dtype=np.int64)
        first, _ = as_arrays(dataset, [0]) if len(dataset) else (np.zeros((0, 1)), None)
        self.shape = tuple(first.shape[1:])
        fits = first.nbytes * len(dataset) <= _KEEP_BYTES
        self._kept = as_arrays(dataset)[0] if fits else None

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self) -> Iterator[np.ndarray]:
        from edgemml.data.datasets import as_arrays

        for i in range(0, len(self), self.batch_size):
            if self._kept is not None:
                yield self._kept[i:i + self.batch_size]
            else:
                yield as_arrays(self.dataset, range(i, min(i + self.batch_size, len(self))))[0]

    def first(self, n: int) -> np.ndarray:
        """n real samples (repeated when the split is smaller): latency inputs."""
        from edgemml.data.datasets import as_arrays

        if len(self) == 0:
            raise InputError("the evaluation split is empty: nothing to measure",
                             hint="raise data.split.test or give data.splits.test")
        return as_arrays(self.dataset, range(n))[0]


@dataclass
class Subject:
    """What is measured: one artifact in one runtime mode, and what it is compared with."""

    name: str
    key: str
    format: str
    precision: str
    mode: str  # reference | deployed | exact
    path: Path
    stage: str | None = None
    reference: str | None = None
    model: Any = None  # the torch module of a reference
    macs_from: str | None = None
    in_chans: int | None = None  # input channels a torch reference records in its model.json


@dataclass
class LatencySettings:
    warmup: int = 5
    runs: int = 50
    batch: int = 32
    throughput_runs: int = 10


@dataclass
class Measured:
    entry: ArtifactEntry
    logits: np.ndarray = field(repr=False)


def open_subject(subject: Subject, threads: int) -> runtimes.Runner:
    if subject.model is not None:
        return runtimes.backend("torch").open_module(subject.model, threads=threads,
                                                     name=subject.name)
    return runtimes.open_artifact(subject.path, threads=threads, exact=subject.mode == "exact",
                                  name=subject.name)


def check_input_shape(subject: Subject, runner: runtimes.Runner, sample_shape: tuple[int, ...],
                      spec: dict[str, Any]) -> None:
    """The model's declared input (rank, channels, a static size) must be what the preprocessing
    makes, or the runtime fails mid-measurement with its own words: say which setting differs."""
    actual = (1, *sample_shape)
    declared = runner.input_shape
    if subject.in_chans is not None:  # a torch model: its recorded input channels
        channel_axis = (1 if spec.get("layout", "NCHW") == "NCHW" else -1) % len(actual)
        declared = tuple(subject.in_chans if i == channel_axis else None
                         for i in range(len(actual)))
    if declared is None:
        return
    if len(declared) == len(actual) and all(d is None or d == a
                                            for d, a in zip(declared[1:], actual[1:])):
        return
    shown = "[" + ", ".join("N" if i == 0 or d is None else str(d)
                            for i, d in enumerate(declared)) + "]"
    raise InputError(
        f"{subject.name} takes input {shown}, but the preprocessing makes "
        f"[N, {', '.join(map(str, actual[1:]))}] (channels: {spec.get('channels')}, size: "
        f"{list(spec.get('size', []))}, layout: {spec.get('layout')})", file=subject.path,
        key="preprocess",
        hint="set preprocess: (channels, size, layout) to what the model was exported with")


def logits_of(runner: runtimes.Runner, samples: Samples,
              advance: Callable[[int], None] | None = None) -> np.ndarray:
    outs = []
    for x in samples.batches():
        outs.append(runtimes.predict(runner, x, batch_size=samples.batch_size))
        if advance:
            advance(len(x))
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def count_macs(subject: Subject, input_shape: tuple[int, ...],
               measured: dict[str, Measured]) -> tuple[int | None, int | None, str | None]:
    """(MACs, parameters, how they were counted) of an artifact at batch 1."""
    if subject.model is not None:
        macs, params = runtimes.backend("torch").macs_params(subject.model, (1, *input_shape))
        return macs, params, None
    if subject.macs_from in measured:
        src = measured[subject.macs_from].entry
        return src["macs"], src["params"], (f"counted on {subject.macs_from}, the torch model it "
                                            f"was exported from")
    backend = runtimes.detect(subject.path)
    if hasattr(backend, "macs_params"):
        macs, params = backend.macs_params(subject.path)
        return macs, params, f"counted from the {backend.FORMAT} graph"
    return None, None, f"not counted: a {backend.FORMAT} artifact without its torch model"


def measure(subject: Subject, runner: runtimes.Runner, samples: Samples, classes: list[str], *,
            reference: Measured | None, latency: LatencySettings, latency_x: np.ndarray,
            macs: tuple[int | None, int | None, str | None],
            roofline: Roofline | None) -> Measured:
    """Every figure of one artifact. `reference` is the measured entry it is compared with (None
    for a reference itself, which is compared with itself)."""
    logits = logits_of(runner, samples)
    labels = samples.labels
    if logits.shape[1] != len(classes):
        raise InputError(f"{subject.name} outputs {logits.shape[1]} values per sample but the data "
                         f"has {len(classes)} classes",
                         hint="validate a classifier trained on this label set")
    acc = metrics.accuracy(logits, labels, classes)
    ref_logits = reference.logits if reference is not None else logits
    ref_top1 = reference.entry["accuracy"]["top1_pct"] if reference is not None else acc.top1_pct
    parity = metrics.parity(logits, ref_logits, ref_top1, acc.top1_pct)
    parity.update(batch_of_one(runner, samples, logits))
    lat = runtimes.measure_latency(runner, latency_x, warmup=latency.warmup, runs=latency.runs,
                                   batch=latency.batch, throughput_runs=latency.throughput_runs)
    n_macs, params, macs_note = macs
    notes: dict[str, str] = {}
    if logits.shape[1] <= 10:
        notes["top5_pct"] = "top-5 is reported for more than 10 classes only"
    if macs_note:
        notes["macs"] = macs_note
    quantized_io = io_note(runner.io)
    if quantized_io:
        notes["io"] = quantized_io
    size = runtimes.size_bytes(subject.path)
    entry: ArtifactEntry = {
        "name": subject.name, "key": subject.key, "stage": subject.stage,
        "format": subject.format, "backend": runner.backend, "precision": subject.precision,
        "mode": subject.mode,  # type: ignore[typeddict-item]
        "runtime_precision": runner.precision, "path": str(subject.path),
        "reference": subject.reference, "size_bytes": size, "size_mb": size / 1e6,
        "params": params, "mparams": params / 1e6 if params is not None else None,
        "macs": n_macs, "mmacs": n_macs / 1e6 if n_macs is not None else None,
        "accuracy": acc.as_dict(),  # type: ignore[typeddict-item]
        "parity": parity, "diversity": metrics.output_diversity(logits, labels),
        "latency": lat.as_dict(),  # type: ignore[typeddict-item]
        "compute": achieved_compute(n_macs, lat, runner.backend,
                                    "int8" if subject.precision == "int8" else runner.precision,
                                    roofline),
        "io": runner.io, "passed": None, "recommended": False, "notes": notes,
        "robustness": None}  # filled by validate's robustness pass when configured
    return Measured(entry, logits)


#: samples each artifact also runs one at a time
BATCH1_SAMPLES = 32


def batch_of_one(runner: runtimes.Runner, samples: Samples, logits: np.ndarray
                 ) -> dict[str, Any]:
    """The first samples run one at a time against the same samples batched: accuracy is
    computed batched, but an edge device runs batch 1 and latency is timed at batch 1, so both
    must be the same computation. Measured trap: OpenVINO 2026.4.1 int8 IRs with depthwise
    convolutions and a dynamic batch were wrong at batch 1 alone (mobilenet_v2 9 % top-1, 100 %
    batched). Nothing to compare where the graph's batch is static (every call runs it)."""
    if runner.static_batch is not None or len(samples) < 2:
        return {}
    k = min(BATCH1_SAMPLES, len(samples))
    x = samples.first(k)
    one = np.concatenate([np.asarray(runner(x[i:i + 1]), np.float32).reshape(1, -1)
                          for i in range(k)])
    ref = logits[:k]
    scale = float(np.abs(ref).max()) or 1.0
    # a near-tie batched (top two within 0.1 % of the logits' range, e.g. a barely trained
    # model's) may flip on rounding alone: it does not count as a changed prediction
    top2 = np.sort(ref, axis=1)[:, -2:] if ref.shape[1] > 1 else np.zeros((k, 2))
    decided = (top2[:, 1] - top2[:, 0]) > 1e-3 * scale
    flips = (one.argmax(1) != ref.argmax(1)) & decided
    return {"batch1_samples": k, "batch1_agreement": 1.0 - float(flips.sum()) / k,
            "batch1_max_rel_diff": float(np.abs(one - ref).max() / scale)}


def io_note(io: dict[str, Any]) -> str | None:
    """How an artifact with integer input / output (a fully int8 .tflite) was fed and read: the
    runtime layer quantizes the float batch with the input's own scale / zero point and
    dequantizes the output with the output's. None for float I/O."""
    parts = [f"{side} {io.get(f'{side}_dtype')}: {verb} through its own scale "
             f"{io[f'{side}_scale']:.6g} and zero point {io[f'{side}_zero_point']}"
             for side, verb in (("input", "fed"), ("output", "read")) if f"{side}_scale" in io]
    return "; ".join(parts) if parts else None


def achieved_compute(macs: int | None, latency: runtimes.Latency, backend: str, precision: str,
                     roofline: Roofline | None) -> Compute:
    """The MAC rate an artifact achieved (GMAC/s at batch 1 and at the throughput batch), and as a
    fraction of the peak this machine measured for the same runtime computing in the same precision
    (OpenVINO bf16, ONNX Runtime int8, torch f32 ...) at the same thread count, when a roofline is
    given. Small models at batch 1 sit far below the peak: per-call overhead, not arithmetic,
    dominates."""
    out: Compute = {"gmacs_per_s_batch1": None, "gmacs_per_s_batch": None, "peak_dtype": precision,
                    "peak_runtime": backend, "peak_gmacs_per_s": None,
                    "fraction_of_peak_batch1": None, "fraction_of_peak_batch": None}
    if not macs:
        return out
    if latency.batch1_median_ms:
        out["gmacs_per_s_batch1"] = (macs * latency.batch1_input
                                     / (latency.batch1_median_ms / 1e3) / 1e9)
    if latency.batch_median_ms:
        out["gmacs_per_s_batch"] = macs * latency.batch / (latency.batch_median_ms / 1e3) / 1e9
    peak = roofline.peak(backend, precision) if roofline is not None else None
    if peak:
        out["peak_gmacs_per_s"] = peak
        for key in ("batch1", "batch"):
            rate = out[f"gmacs_per_s_{key}"]  # type: ignore[literal-required]
            out[f"fraction_of_peak_{key}"] = (  # type: ignore[literal-required]
                rate / peak if rate is not None else None)
    return out
