"""Shared helpers of the latency benchmarks (quantize.py, compare.py): fair timing, the "default
settings" int8 baselines built outside edgemml, machine facts, and writing results.

Why interleaved: this is a shared 2-core machine and background load moves a single timing by tens
of percent within seconds. Timing every variant in short blocks, round after round
(A B C A B C ...), exposes all of them to the same load, so the *ratios* of one run are
trustworthy even when the absolute milliseconds are not. The timer is edgemml's own
(edgemml.runtimes.time_calls), the one validate uses, so the two report the same thing.
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
README = HERE / "README.md"

#: layer types of OpenVINO's execution graph that carry the model's multiply-accumulates
OV_COMPUTE_LAYERS = ("Convolution", "FullyConnected", "MatMul", "Deconvolution")


# --------------------------------------------------------------------------------------------------
# Machine
# --------------------------------------------------------------------------------------------------


def cpu_name() -> str:
    from edgemml.machine import cpu

    return cpu().name


def machine_info() -> dict[str, Any]:
    """What the figures depend on: CPU, its int8/bf16 features, library versions, load now."""
    from edgemml.machine import cpu

    flags = cpu().flags
    versions = {}
    for dist in ("torch", "torchvision", "onnx", "onnxruntime", "openvino", "nncf", "edgemml"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "cpu": cpu_name(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "int8_bf16_flags": sorted(flags & {"avx2", "avx512f", "avx512_vnni", "avx_vnni",
                                           "avx512_bf16", "amx_bf16", "amx_int8", "asimddp"}),
        "python": sys.version.split()[0], "versions": versions,
        "loadavg_start": [round(v, 2) for v in os.getloadavg()],
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def load_note(info: dict[str, Any]) -> str:
    """One line on how busy the machine was, for the reports. With `foreign_load` (the share of
    the CPUs *other* processes used while the benchmark ran, edgemml.machine.ForeignLoad) that
    share decides; otherwise the 1-minute load average, which also counts the benchmark's own
    threads (a 2-thread benchmark alone ends at a load of ~2)."""
    start = info.get("loadavg_start", [0])[0]
    end = info.get("loadavg_end", [start])[0]
    cores = info.get("cpu_count") or 1
    text = f"load average (1 min) {start:.2f} at start, {end:.2f} at end, on {cores} cores"
    foreign = info.get("foreign_load")
    if foreign is not None:
        text += f"; other processes used {100 * foreign:.0f} % of the CPUs meanwhile"
        busy = foreign > 0.25
    else:
        busy = max(start, end) > 0.5 * cores
    return text + (" — the machine was busy: absolute times are inflated, compare ratios"
                   if busy else "")


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


def interleaved_latency(calls: dict[str, Callable[[], Any]], *, warmup: int, repeats: int,
                        rounds: int) -> dict[str, dict[str, Any]]:
    """Median/p90/min milliseconds of each zero-argument call, timed in interleaved rounds by
    edgemml's one timer (edgemml.runtimes.time_calls), so benchmark and validate figures agree."""
    from edgemml.runtimes import time_calls

    timed = time_calls(calls, warmup=warmup, runs=repeats, rounds=rounds)
    return {name: {k: round(v, 4) if isinstance(v, float) else v for k, v in t.as_dict().items()}
            for name, t in timed.items()}


# --------------------------------------------------------------------------------------------------
# Variants: what is timed, and what it is
# --------------------------------------------------------------------------------------------------


@dataclass
class Variant:
    """One model as one runtime runs it."""

    key: str
    label: str
    source: str  # "edgemml" | "nncf defaults" | "ort defaults" | "torch"
    runner: Any  # edgemml.runtimes.Runner
    precision: str  # what the runtime says it computes in
    path: Path | None = None
    size_bytes: int | None = None
    notes: dict[str, Any] = field(default_factory=dict)


def ov_layer_precisions(xml: Path, *, threads: int, precision: str = "default") -> dict[str, int]:
    """Compute layers of OpenVINO's *execution* graph by the precision they run in (e.g.
    {"u8": 20, "bf16": 1}): what the plugin decided, not what the IR asked for."""
    from edgemml.runtimes import backend

    compiled, _ = backend("openvino").compile(xml, threads=threads, exact=precision == "f32")
    counts: dict[str, int] = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer = info["layerType"].astype(str) if "layerType" in info else op.get_type_name()
        if layer not in OV_COMPUTE_LAYERS:
            continue
        prec = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else "?"
        counts[prec] = counts.get(prec, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def precision_label(runtime_precision: str, layers: dict[str, int] | None) -> str:
    """"u8 x41, bf16 x1 (rest bf16)" style label of what an OpenVINO model really runs in."""
    if not layers or set(layers) == {runtime_precision}:
        return runtime_precision
    parts = ", ".join(f"{k} x{v}" for k, v in layers.items())
    return f"{parts} (rest {runtime_precision})"


def ort_precision(path: Path) -> str:
    """int8 flavour of an ONNX graph from its QuantizeLinear zero points: u8 / s8 activations."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    kinds = set()
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and len(node.input) > 2 and node.input[2] in inits:
            kinds.add(numpy_helper.to_array(inits[node.input[2]]).dtype.name)
    if not kinds:
        return "f32"
    names = {"uint8": "u8", "int8": "s8"}
    return "int8 QDQ, activations " + "+".join(sorted(names.get(k, k) for k in kinds))


# --------------------------------------------------------------------------------------------------
# The comparison points: int8 with each library's *default* settings, outside edgemml
# --------------------------------------------------------------------------------------------------


def ort_default_int8(fp32_onnx: Path, out: Path, calibration: np.ndarray) -> dict[str, Any]:
    """onnxruntime.quantization.quantize_static with every option at its default (QDQ, signed
    QInt8 activations and weights, per-tensor, MinMax), on the fp32 file as exported (no
    quant_pre_process, which ORT recommends but does not run by default). Returns what was used."""
    import logging

    import onnx
    from onnxruntime.quantization import quantize_static

    from edgemml.quantization.ort import ArrayReader

    name = onnx.load(str(fp32_onnx), load_external_data=False).graph.input[0].name
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # ORT warns that pre-processing is recommended: that is the point
    try:
        t0 = time.perf_counter()
        quantize_static(str(fp32_onnx), str(out), ArrayReader(name, calibration))
        seconds = time.perf_counter() - t0
    finally:
        root.setLevel(level)
    return {"call": "quantize_static(model_in, model_out, reader)", "defaults": {
        "quant_format": "QDQ", "activation_type": "QInt8", "weight_type": "QInt8",
        "per_channel": False, "reduce_range": False, "calibrate_method": "MinMax"},
        "calibration_samples": int(len(calibration)), "seconds": round(seconds, 2)}


def nncf_default_int8(fp32_onnx: Path, out_dir: Path, calibration: np.ndarray) -> dict[str, Any]:
    """nncf.quantize(ov_model, nncf.Dataset(items)) with every option at its default (preset
    None -> performance for CNNs, target_device ANY, subset_size 300, fast bias correction), on
    the OpenVINO model converted from the fp32 ONNX file; saved with fp32 weights."""
    import logging
    import warnings

    import nncf
    import openvino as ov

    from edgemml.runtimes.openvino import IR_XML

    logging.getLogger("nncf").setLevel(logging.ERROR)
    model = ov.convert_model(str(fp32_onnx))
    dataset = nncf.Dataset([calibration[i:i + 1] for i in range(len(calibration))])
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = nncf.quantize(model, dataset)
    seconds = time.perf_counter() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, str(out_dir / IR_XML), compress_to_fp16=False)
    return {"call": "nncf.quantize(ov.convert_model(fp32.onnx), nncf.Dataset(items))",
            "defaults": {"preset": "None (performance for CNNs)", "target_device": "ANY",
                         "subset_size": 300, "fast_bias_correction": True},
            "calibration_samples": int(len(calibration)), "seconds": round(seconds, 2)}


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


def md_table(header: list[str], rows: list[list[Any]], align: str | None = None) -> str:
    """A GitHub Markdown table; `align` is one character per column (l or r)."""
    align = align or "l" * len(header)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join("" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{suffix}"


def mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.2f}"


def write_results(stem: str, result: dict[str, Any], markdown: str, out_dir: Path = RESULTS) -> \
        tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    js.write_text(json.dumps(result, indent=2, default=str) + "\n")
    md.write_text(markdown.rstrip() + "\n")
    return js, md


def update_readme_section(name: str, text: str, readme: Path = README) -> bool:
    """Replace the text between `<!-- BEGIN name -->` and `<!-- END name -->` in the README (the
    rest of the file is hand-written). Returns False when the markers are missing."""
    if not readme.is_file():
        return False
    body = readme.read_text()
    begin, end = re.escape(f"<!-- BEGIN {name} -->"), re.escape(f"<!-- END {name} -->")
    pattern = re.compile(rf"({begin}\n).*?({end})", re.S)
    if not pattern.search(body):
        return False
    readme.write_text(pattern.sub(lambda m: m.group(1) + text.rstrip() + "\n" + m.group(2), body))
    return True


def median_ratio(ref: dict[str, Any], other: dict[str, Any]) -> float | None:
    """How many times faster `other` is than `ref` (ratio of medians)."""
    if not ref or not other or not other.get("median_ms"):
        return None
    return round(ref["median_ms"] / other["median_ms"], 3)


def human_seconds(s: float) -> str:
    return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"


def predict_dataset(runner: Any, samples: Any) -> np.ndarray:
    """Logits of a runner on an edgemml.evaluation.Samples (the same batches for every variant)."""
    from edgemml.evaluation import logits_of

    return logits_of(runner, samples)
