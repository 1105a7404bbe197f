"""Gates, metrics and report rendering on hand-made figures (no models, fast)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np
import pytest

from edgemml.errors import InputError
from edgemml.metrics import accuracy, output_diversity, parity
from edgemml.report import SCHEMA, load_report, render_from, write_reports
from edgemml.report.compare import compare_reports, gate_changes
from edgemml.report.gates import evaluate_gates, failure_lines, matches


def _entry(name: str, fmt: str = "onnx", precision: str = "fp32", mode: str = "deployed",
           top1: float = 90.0, latency: float = 2.0, size: int = 1_000_000,
           agreement: float = 1.0) -> dict:
    backend = {"onnx": "onnxruntime", "openvino": "openvino", "torch": "torch"}[fmt]
    return {"name": name, "key": name, "stage": "s", "format": fmt, "backend": backend,
            "precision": precision, "mode": mode, "runtime_precision": "f32", "path": name,
            "reference": "torch", "size_bytes": size, "size_mb": size / 1e6, "params": 10,
            "mparams": 1e-5, "macs": 100, "mmacs": 1e-4,
            "accuracy": {"n": 10, "top1_pct": top1, "top5_pct": None,
                         "per_class_pct": {"a": top1, "b": 100.0}, "worst_class_pct": top1},
            "parity": {"agreement": agreement, "max_abs_diff": 1e-6, "mean_abs_diff": 1e-7,
                       "cosine": 1.0, "cosine_min": 1.0, "correlation": 1.0,
                       "accuracy_drop_pp": 90.0 - top1},
            "diversity": {}, "latency": {"batch1_median_ms": latency, "batch1_p90_ms": latency,
                                         "throughput_ips": 1000 / latency, "batch": 8,
                                         "threads": 1},
            "passed": True, "recommended": False, "notes": {"top5_pct": "10 classes"}}


ENTRIES = [_entry("torch", "torch", mode="reference"), _entry("onnx-fp32"),
           _entry("onnx-int8", precision="int8", top1=88.0, latency=3.0, agreement=0.97),
           _entry("openvino-fp32", "openvino"), _entry("openvino-fp32[f32]", "openvino",
                                                       mode="exact")]


def test_selectors_cover_groups_but_all_excludes_the_reference() -> None:
    def names(sel: str) -> list[str]:
        return [e["name"] for e in ENTRIES if matches(sel, e)]

    assert names("all") == ["onnx-fp32", "onnx-int8", "openvino-fp32", "openvino-fp32[f32]"]
    assert names("torch") == ["torch"]
    assert names("int8") == ["onnx-int8"]
    assert names("openvino") == ["openvino-fp32", "openvino-fp32[f32]"]
    assert names("exact") == ["openvino-fp32[f32]"]
    assert names("openvino-fp32") == ["openvino-fp32"]


def test_gate_rows_pass_fail_and_unmeasurable() -> None:
    rows = evaluate_gates(ENTRIES, {
        "int8": {"max_accuracy_drop": 1.0, "min_agreement": 0.98},
        "all": {"max_latency_ms": 2.5},
        "onnx-fp16": {"max_abs_diff": 1e-3},  # no such artifact: a failed gate, not a silent one
        "onnx-fp32": {"min_top5": 50.0},  # not measured (10 classes): fails, says why
    }, None)
    status = {(r["gate"], r["artifact"]): r["status"] for r in rows}
    assert status[("int8.max_accuracy_drop", "onnx-int8")] == "fail"  # 2 points > 1
    assert status[("int8.min_agreement", "onnx-int8")] == "fail"
    assert status[("all.max_latency_ms", "onnx-fp32")] == "pass"
    assert status[("all.max_latency_ms", "onnx-int8")] == "fail"  # 3 ms
    assert status[("onnx-fp16.max_abs_diff", None)] == "fail"
    assert status[("onnx-fp32.min_top5", "onnx-fp32")] == "fail"
    lines = failure_lines(rows)
    assert "int8.max_accuracy_drop: onnx-int8 max_accuracy_drop 2 > 1 pp" in lines
    assert "all.max_latency_ms: onnx-int8 max_latency_ms 3 > 2.5 ms" in lines
    assert any("no artifact matches 'onnx-fp16'" in line for line in lines)
    assert any("10 classes" in line for line in lines)


def test_regression_gates_against_a_baseline() -> None:
    baseline = {"artifacts": [_entry("onnx-fp32", top1=92.0, latency=1.6, size=800_000),
                              _entry("onnx-int8", precision="int8", top1=88.5)]}
    rows = evaluate_gates(ENTRIES, {"onnx": {"max_regression": {
        "top1_pp": 1.0, "latency_pct": 20.0, "size_pct": 10.0}}}, baseline)
    by = {(r["metric"], r["artifact"]): r for r in rows}
    assert by[("regression.top1_pp", "onnx-fp32")]["value"] == pytest.approx(2.0)
    assert by[("regression.top1_pp", "onnx-fp32")]["status"] == "fail"
    assert by[("regression.top1_pp", "onnx-int8")]["status"] == "pass"  # 0.5 points
    assert by[("regression.latency_pct", "onnx-fp32")]["value"] == pytest.approx(25.0)
    assert by[("regression.latency_pct", "onnx-fp32")]["status"] == "fail"
    assert by[("regression.size_pct", "onnx-fp32")]["value"] == pytest.approx(25.0)
    no_base = evaluate_gates(ENTRIES, {"all": {"max_regression": {"top1_pp": 1.0}}}, None)
    # no baseline (a CI gate's first run on main): skipped and said so, not failed
    assert [r["status"] for r in no_base] == ["skip"] and "baseline" in no_base[0]["message"]
    assert failure_lines(no_base) == []
    new = evaluate_gates([_entry("onnx-fp16", precision="fp16")],
                         {"all": {"max_regression": {"top1_pp": 1.0}}}, baseline)
    assert [r["status"] for r in new] == ["skip"]


def test_parity_catches_a_near_constant_output() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 20)
    ref = rng.normal(size=(200, 10)).astype(np.float32) * 0.01 + 5.0  # barely varies
    ref[np.arange(200), labels] += 0.02
    const = np.full_like(ref, 5.0)
    const[:, 3] += 0.001
    par = parity(const, ref, 50.0, 10.0)
    assert par["max_abs_diff"] < 0.05 and par["cosine"] > 0.999  # small diff, near-equal cosine
    assert abs(par["correlation"]) < 0.05  # but no correlation with the varying part
    assert par["accuracy_drop_pp"] == pytest.approx(40.0)
    follows = parity(ref * 1.001, ref, 50.0, 50.0)
    assert follows["correlation"] > 0.999 and follows["agreement"] == 1.0
    div = output_diversity(const, labels)
    assert div["distinct_predictions"] == 1 and div["distinct_fraction"] == pytest.approx(0.1)
    assert div["majority_share"] == 1.0


def test_classification_metrics_top5_only_above_10_classes() -> None:
    labels = np.array([0, 1, 2, 3])
    logits = np.zeros((4, 12), np.float32)
    logits[np.arange(4), [0, 1, 5, 6]] = 2.0  # two right
    logits[2, 2] = 1.0  # class 2 is its second guess
    logits[3, 3] = -5.0  # class 3 is its last guess
    m = accuracy(logits, labels, [f"c{i}" for i in range(12)]).as_dict()
    assert m["top1_pct"] == 50.0 and m["top5_pct"] == 75.0
    assert m["per_class_pct"] == {"c0": 100.0, "c1": 100.0, "c2": 0.0, "c3": 0.0}
    assert m["worst_class_pct"] == 0.0
    ten = accuracy(logits[:, :10], labels, []).as_dict()
    assert ten["top5_pct"] is None


def _report(status: str = "failed") -> dict:
    rows = evaluate_gates(ENTRIES, {"int8": {"min_agreement": 0.98}, "all": {"max_size_mb": 5}},
                          None)
    return {"schema": SCHEMA, "version": 1, "created": "2026-01-01T00:00:00+00:00",
            "pipeline": "p", "stage": "validate", "status": status,
            "environment": {"threads": 1, "machine": "x86_64", "processor": "cpu"},
            "data": {"source": "builtin:digits", "split": "test", "n": 10, "classes": ["a", "b"]},
            "reference": {"name": "torch", "diversity": {}}, "artifacts": ENTRIES, "gates": rows,
            "gate_failures": failure_lines(rows), "recommended": {"onnxruntime": "onnx-fp32"},
            "baseline": None, "stages": [{"name": "train", "type": "finetune",
                                          "wall_time_s": 3.0}, _quantize_stage()],
            "curves": {"train": [{"epoch": 1, "train_loss": 1.0}, {"epoch": 2, "train_loss": 0.5}]},
            "bundle": None}


def _quantize_stage() -> dict:
    per = {"samples": 32, "layers": 21, "matched_by": "name", "median_sqnr_db": 24.1,
           "min_sqnr_db": 7.98, "worst": [
               {"layer": "/conv3/Conv", "op": "Conv", "sqnr_db": 7.98, "cosine": 0.92425,
                "quantized": True}],
           "kept_in_float": [{"layer": "/fc/Gemm", "logits_error_when_only_it_is_int8": 0.0123,
                              "sqnr_db_when_int8": 9.5}]}
    return {"name": "quantize", "type": "quantize", "wall_time_s": 9.0,
            "per_layer": {"onnxruntime": per}}


def test_reports_render_and_rerender_identically(tmp_path: Path) -> None:
    report = _report()
    paths = write_reports(report, tmp_path / "a")
    md = paths["report-md"].read_text()
    assert "❌ 1 of 5 gate(s) failed" in md
    assert "| `int8.min_agreement` | onnx-int8 | >= 0.98 | 0.97 | ❌ **FAIL** |" in md
    suite = ET.parse(paths["junit"]).getroot().find("testsuite")
    assert suite is not None and suite.get("tests") == "5" and suite.get("failures") == "1"
    failure = [c for c in suite.iter("testcase") if c.find("failure") is not None]
    assert [c.get("name") for c in failure] == ["int8.min_agreement"]
    html = paths["report-html"].read_text()
    for pid in ("tradeoff", "latency", "per-class", "curves", "stages"):
        assert f'id="plot-{pid}"' in html
    assert not re.search(r'(src|href)="(https?:)?//', html)  # self-contained: nothing fetched
    # per-layer int8 error: the worst layers and why the budget kept a layer in float
    for text in (html, md):
        assert "Per-layer int8 error" in text and "quantize: onnxruntime, 21 layers" in text
        assert "/conv3/Conv" in text and "7.98" in text
        assert "kept in float (int8: 9.5 dB, logits error alone 0.0123)" in text
    again = render_from(paths["report"], tmp_path / "b")
    for key in ("report-md", "junit", "report-html"):
        assert again[key].read_bytes() == paths[key].read_bytes(), key


def test_load_report_rejects_other_files(tmp_path: Path) -> None:
    other = tmp_path / "x.json"
    other.write_text(json.dumps({"schema": 1}))
    with pytest.raises(InputError, match="not an edgemml validation report"):
        load_report(other)
    newer = tmp_path / "y.json"
    newer.write_text(json.dumps({"schema": SCHEMA, "version": 99}))
    with pytest.raises(InputError, match="newer"):
        load_report(newer)


def test_compare_reports_rows_and_gate_changes() -> None:
    a, b = _report("passed"), _report()
    b = json.loads(json.dumps(b))
    b["artifacts"][1]["accuracy"]["top1_pct"] = 85.0
    b["gates"][0]["status"] = "pass"
    rows = compare_reports(a, b)
    row = next(r for r in rows if r["artifact"] == "onnx-fp32" and r["metric"] == "top-1 %")
    assert row["delta"] == -5.0 and row["better"] is False
    same = next(r for r in rows if r["artifact"] == "torch" and r["metric"] == "top-1 %")
    assert same["delta"] == 0 and same["better"] is None
    changes = gate_changes(a, b)
    assert changes and changes[0]["a"] != changes[0]["b"]


def test_achieved_compute_against_a_roofline():
    """The fraction of peak divides by the peak of the same runtime in the same precision."""
    from edgemml.evaluation import achieved_compute
    from edgemml.roofline import Roofline, Row
    from edgemml.runtimes import Latency

    roof = Roofline({"cpu": "x"}, 128, [Row("onnxruntime", "int8", "int8", 1.0, 1.0, 400.0),
                                        Row("openvino", "fp32", "bf16", 1.0, 1.0, 200.0),
                                        Row("openvino", "fp32", "f32", 1.0, 1.0, 100.0)])
    lat = Latency(batch1_median_ms=2.0, batch1_p90_ms=2.0, batch1_min_ms=2.0, batch1_input=1,
                  runs=1, warmup=0, threads=1, batch=8, batch_median_ms=4.0, throughput_ips=2000,
                  throughput_runs=1)
    out = achieved_compute(20_000_000, lat, "onnxruntime", "int8", roof)
    assert out["gmacs_per_s_batch1"] == pytest.approx(10.0)   # 20 MMAC in 2 ms
    assert out["gmacs_per_s_batch"] == pytest.approx(40.0)    # 8 x 20 MMAC in 4 ms
    assert out["fraction_of_peak_batch"] == pytest.approx(0.1)
    assert out["peak_runtime"] == "onnxruntime" and out["peak_dtype"] == "int8"
    bf16 = achieved_compute(20_000_000, lat, "openvino", "bf16", roof)
    assert bf16["peak_gmacs_per_s"] == 200.0 and bf16["fraction_of_peak_batch"] == pytest.approx(0.2)
    # no peak measured for that runtime and precision: the rate is reported, the fraction is not
    none = achieved_compute(20_000_000, lat, "torch", "f32", roof)
    assert none["gmacs_per_s_batch"] == pytest.approx(40.0) and none["fraction_of_peak_batch"] is None
    assert achieved_compute(None, lat, "onnxruntime", "int8", roof)["gmacs_per_s_batch1"] is None


def _front_entry(name, backend, top1, ms, mode="deployed", reference="torch", passed=True):
    return {"name": name, "backend": backend, "mode": mode, "reference": reference,
            "runtime_precision": "int8", "accuracy": {"top1_pct": top1},
            "latency": {"batch1_median_ms": ms}, "passed": passed, "stage": None}


def test_recommend_policies_and_the_front():
    """fastest picks the quickest passing artifact per backend, most_accurate the most accurate
    one (ties to the faster); the front marks the Pareto-optimal artifacts and the chosen one."""
    from edgemml.report.front import build_front, pareto
    from edgemml.report.gates import recommend

    fe = _front_entry
    entries = [fe("torch", "torch", 95.0, 20.0, mode="reference", reference=None),
               fe("a", "onnxruntime", 94.0, 2.0), fe("b", "onnxruntime", 95.5, 4.0),
               fe("c", "onnxruntime", 96.0, 9.0), fe("d", "openvino", 95.5, 3.0),
               fe("e", "openvino", 95.5, 3.5)]
    rows = [{"gate": "all.max_latency_ms", "selector": "all", "artifact": "c", "metric":
             "max_latency_ms", "op": "<=", "limit": 5.0, "value": 9.0, "unit": "ms",
             "status": "fail", "message": ""}]
    assert recommend(entries, rows, "fastest") == {"onnxruntime": "a", "openvino": "d"}
    for e in entries:
        e["recommended"] = False
    assert recommend(entries, rows, "most_accurate") == {"onnxruntime": "b", "openvino": "d"}
    front = build_front(entries, rows, primary="torch", policy="most_accurate", sweeps=[])
    assert front["chosen"] == "d"  # 95.5 % like b and e, and the fastest of them
    assert front["budget_ms"] == 5.0
    assert set(pareto(entries)) == {"a", "d", "c"}  # torch (20 ms, 95 %) is beaten by d
    row = next(r for r in front["artifacts"] if r["name"] == "d")
    assert row["chosen"] and row["pareto"] and row["top1_vs_reference_pp"] == pytest.approx(0.5)
