"""The quantize stage's per-layer error glue: which int8 layer hurts, measured (issue 15).

For every int8 artifact the stage compares each layer's output with the fp32 graph's on
calibration samples (edgemml.quantization.perlayer) and keeps the worst layers in quantize.json.
For the layers the accuracy budget kept in float, the reason is measured too: their SQNR in the
plain (fully quantized) int8 model and, for ONNX Runtime, the logits error when only that layer is
quantized (the sensitivity the budget search ranked them by).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

WORST = 10


def _kept_in_float(float_layers: list[str], plain: Any, sensitivity: dict[str, float]
                   ) -> list[dict[str, Any]]:
    by_name = {r.layer: r for r in plain.layers} if plain is not None else {}
    out = []
    for name in float_layers:
        row: dict[str, Any] = {"layer": name}
        if name in sensitivity:
            row["logits_error_when_only_it_is_int8"] = sensitivity[name]
        if name in by_name:
            row["sqnr_db_when_int8"] = by_name[name].sqnr_db
            row["cosine_when_int8"] = by_name[name].cosine
        out.append(row)
    return out


def ort_per_layer(prepped: Path, final: Path, calib: np.ndarray, tmp: Path, *,
                  float_layers: list[str], search: dict[str, Any] | None,
                  quantize_plain: Callable[[Path], Path], log: Callable[[str], None]
                  ) -> dict[str, Any]:
    """quantize.json's `per_layer` entry of the ONNX Runtime int8 model `final`."""
    from edgemml.quantization import perlayer

    t0 = time.perf_counter()
    res = perlayer.ort_per_layer(prepped, final, calib, tmp)
    entry = res.summary(WORST)
    if float_layers:
        plain = perlayer.ort_per_layer(prepped, quantize_plain(tmp / "plain.int8.onnx"), calib,
                                       tmp)
        entry["kept_in_float"] = _kept_in_float(float_layers, plain,
                                                (search or {}).get("sensitivity", {}))
    entry["seconds"] = round(time.perf_counter() - t0, 2)
    _log_worst(log, "onnxruntime", entry)
    return entry


def ov_per_layer(fp32_xml: Path, final_xml: Path, plain_xml: Path | None, calib: np.ndarray, *,
                 float_layers: list[str], log: Callable[[str], None],
                 progress: Any) -> dict[str, Any]:
    """quantize.json's `per_layer` entry of the OpenVINO int8 IR `final_xml` (one compiled model
    per layer: see runtimes.openvino.tapped_outputs)."""
    import openvino as ov

    from edgemml.quantization import perlayer

    t0 = time.perf_counter()
    layers = len(perlayer.ov_layers(ov.Core().read_model(str(final_xml))))
    with progress("per-layer int8 error (openvino)", layers) as bar:
        res = perlayer.ov_per_layer(fp32_xml, final_xml, calib, progress=bar.advance)
    entry = res.summary(WORST)
    if float_layers:
        plain = (perlayer.ov_per_layer(fp32_xml, plain_xml, calib) if plain_xml is not None
                 else None)
        entry["kept_in_float"] = _kept_in_float(float_layers, plain, {})
    entry["seconds"] = round(time.perf_counter() - t0, 2)
    _log_worst(log, "openvino", entry)
    return entry


def _log_worst(log: Callable[[str], None], backend: str, entry: dict[str, Any]) -> None:
    worst = entry.get("worst") or []
    if not worst:
        log(f"{backend} per-layer error: no layer matched ({entry.get('note')})")
        return
    w = worst[0]
    log(f"{backend} per-layer error on {entry['samples']} calibration samples: median SQNR "
        f"{entry['median_sqnr_db']} dB over {entry['layers']} layers; worst {w['layer']} "
        f"({w['op']}) {w['sqnr_db']} dB, cosine {w['cosine']}")
