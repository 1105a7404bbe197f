"""Gates: limits on measured figures, per artifact or artifact group, and their pass/fail table.

Why a table and not an exception: CI needs every gate's limit and measured value side by side (in
report.md, junit.xml and the console) to see at once what drifted and by how much. A gate whose
figure could not be measured, or whose selector matches no artifact, fails: a gate that silently
gates nothing is worse than none.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field

from edgemml.config import StrictModel

#: artifact formats a gate selector may name as a group (every artifact of that format)
FORMAT_GROUPS = ("onnx", "openvino", "executorch", "litert")
#: groups a gate selector may name besides an artifact's own name
GROUPS = ("all", *FORMAT_GROUPS, "fp32", "fp16", "int8", "deployed", "exact", "torch")
SELECTOR_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.@-]*(\[f32\])?$")


class RegressionLimits(StrictModel):
    """How much worse than the baseline report an artifact of the same name may be."""

    top1_pp: float | None = Field(None, ge=0, description="Top-1 may drop by this many points.")
    top5_pp: float | None = Field(None, ge=0, description="Top-5 may drop by this many points.")
    agreement: float | None = Field(None, ge=0, le=1,
                                    description="Agreement with the reference may drop by this.")
    latency_pct: float | None = Field(None, ge=0,
                                      description="Batch-1 median latency may rise by this %.")
    throughput_pct: float | None = Field(None, ge=0,
                                         description="Throughput at batch N may fall by this %.")
    size_pct: float | None = Field(None, ge=0, description="File size may grow by this %.")


class GateLimits(StrictModel):
    """Limits for the artifacts a selector names. Accuracy in percent, agreement as a fraction."""

    max_abs_diff: float | None = Field(None, ge=0,
                                       description="Largest |logit - reference logit| allowed.")
    max_mean_abs_diff: float | None = Field(None, ge=0,
                                            description="Mean |logit - reference logit| allowed.")
    min_cosine: float | None = Field(None, ge=-1, le=1,
                                     description="Mean per-sample cosine similarity to the reference.")
    min_correlation: float | None = Field(
        None, ge=-1, le=1, description="Correlation with the reference's logits, centred per class "
        "over the samples (a near-constant output cannot pass).")
    min_agreement: float | None = Field(None, ge=0, le=1,
                                        description="Fraction of samples whose top-1 matches the "
                                        "reference's.")
    max_accuracy_drop: float | None = Field(None, description="Top-1 points below the reference.")
    min_top1: float | None = Field(None, ge=0, le=100, description="Top-1 accuracy, percent.")
    min_top5: float | None = Field(None, ge=0, le=100,
                                   description="Top-5 accuracy, percent (more than 10 classes).")
    min_class_accuracy: float | None = Field(None, ge=0, le=100,
                                             description="Accuracy of the worst class, percent.")
    max_size_mb: float | None = Field(None, gt=0, description="File size in MB (10^6 bytes).")
    max_latency_ms: float | None = Field(None, gt=0, description="Batch-1 median latency, ms.")
    max_p90_latency_ms: float | None = Field(None, gt=0, description="Batch-1 p90 latency, ms.")
    min_speedup: float | None = Field(
        None, gt=0, description="Batch-1 median latency of the report's reference (in a sweep: "
        "the unpruned model) divided by the artifact's, measured in the same run: a latency "
        "budget that holds on any machine (12: at most 1/12 of the reference's latency).")
    min_throughput: float | None = Field(None, gt=0, description="Images/s at the batch size.")
    max_mparams: float | None = Field(None, gt=0, description="Parameters, millions.")
    max_mmacs: float | None = Field(None, gt=0, description="MACs per image, millions.")
    min_robust_top1: float | None = Field(
        None, ge=0, le=100, description="Worst top-1 over every adversarial and corrupted set of "
        "validate's `robustness:` pass, percent.")
    max_robust_drop: float | None = Field(
        None, description="Largest drop below the reference under the same attack or corruption, "
        "points (int8/ONNX/OpenVINO: vs the torch model on the same inputs; the pruned reference: "
        "vs the unpruned model, each attacked white-box).")
    max_regression: RegressionLimits | None = Field(
        None, description="Limits relative to the same artifact in the `baseline` report.")


# metric -> (path in the artifact entry, comparison, unit)
METRICS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "max_abs_diff": (("parity", "max_abs_diff"), "<=", ""),
    "max_mean_abs_diff": (("parity", "mean_abs_diff"), "<=", ""),
    "min_cosine": (("parity", "cosine"), ">=", ""),
    "min_correlation": (("parity", "correlation"), ">=", ""),
    "min_agreement": (("parity", "agreement"), ">=", ""),
    "max_accuracy_drop": (("parity", "accuracy_drop_pp"), "<=", "pp"),
    "min_top1": (("accuracy", "top1_pct"), ">=", "%"),
    "min_top5": (("accuracy", "top5_pct"), ">=", "%"),
    "min_class_accuracy": (("accuracy", "worst_class_pct"), ">=", "%"),
    "max_size_mb": (("size_mb",), "<=", "MB"),
    "max_latency_ms": (("latency", "batch1_median_ms"), "<=", "ms"),
    "max_p90_latency_ms": (("latency", "batch1_p90_ms"), "<=", "ms"),
    "min_speedup": (("speedup",), ">=", "x"),
    "min_throughput": (("latency", "throughput_ips"), ">=", "img/s"),
    "max_mparams": (("mparams",), "<=", "M"),
    "max_mmacs": (("mmacs",), "<=", "M"),
    "min_robust_top1": (("robustness", "worst_top1_pct"), ">=", "%"),
    "max_robust_drop": (("robustness", "worst_drop_pp"), "<=", "pp"),
}
# metric -> where the entry says which case the figure comes from (shown with the gate's value)
WHERE: dict[str, tuple[str, ...]] = {
    "min_robust_top1": ("robustness", "worst_top1_set"),
    "max_robust_drop": ("robustness", "worst_drop_set"),
}

# regression metric -> (path, direction where "worse" is higher(+1)/lower(-1), relative?, unit)
REGRESSIONS: dict[str, tuple[tuple[str, ...], int, bool, str]] = {
    "top1_pp": (("accuracy", "top1_pct"), -1, False, "pp"),
    "top5_pp": (("accuracy", "top5_pct"), -1, False, "pp"),
    "agreement": (("parity", "agreement"), -1, False, ""),
    "latency_pct": (("latency", "batch1_median_ms"), 1, True, "%"),
    "throughput_pct": (("latency", "throughput_ips"), -1, True, "%"),
    "size_pct": (("size_bytes",), 1, True, "%"),
}


def check_selector(value: str) -> str:
    if not SELECTOR_RE.match(value):
        raise ValueError(f"invalid gate selector {value!r}: use an artifact name (onnx-int8, "
                         f"openvino-fp32[f32], torch) or a group ({', '.join(GROUPS)})")
    return value


def matches(selector: str, entry: dict[str, Any]) -> bool:
    """Whether a selector names this artifact entry. `all` covers every artifact but not the torch
    reference (gate it as `torch`); a precision/backend group covers both OpenVINO modes."""
    name = entry["name"]
    if selector == name:
        return True
    is_ref = entry["format"] == "torch"
    if selector == "torch":
        return is_ref
    if is_ref:
        return False
    if selector == "all":
        return True
    if selector in FORMAT_GROUPS:
        return entry["format"] == selector
    if selector in ("fp32", "fp16", "int8"):
        return entry["precision"] == selector
    if selector in ("deployed", "exact"):
        return entry["mode"] == selector
    return False


def _get(entry: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = entry
    for part in path:
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _passes(value: float, op: str, limit: float) -> bool:
    return value <= limit if op == "<=" else value >= limit


def _row(gate: str, selector: str, artifact: str | None, metric: str, op: str, limit: Any,
         value: Any, unit: str, status: str, message: str = "") -> dict[str, Any]:
    return {"gate": gate, "selector": selector, "artifact": artifact, "metric": metric, "op": op,
            "limit": limit, "value": value, "unit": unit, "status": status, "message": message}


def evaluate_gates(entries: list[dict[str, Any]], gates: dict[str, dict[str, Any]],
                   baseline: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per (gate, matched artifact). `gates` is {selector: GateLimits as a dict}."""
    rows: list[dict[str, Any]] = []
    base_entries = {e["name"]: e for e in (baseline or {}).get("artifacts", [])}
    for selector, limits in gates.items():
        matched = [e for e in entries if matches(selector, e)]
        for metric, limit in limits.items():
            if limit is None:
                continue
            if metric == "max_regression":
                rows += _regression_rows(selector, matched, limit, base_entries, baseline)
                continue
            path, op, unit = METRICS[metric]
            gate = f"{selector}.{metric}"
            if not matched:
                rows.append(_row(gate, selector, None, metric, op, limit, None, unit, "fail",
                                 f"no artifact matches {selector!r}"))
                continue
            for e in matched:
                value = _get(e, path)
                if value is None:
                    rows.append(_row(gate, selector, e["name"], metric, op, limit, None, unit,
                                     "fail", f"{'.'.join(path)} was not measured"
                                     + (f": {e['notes'][path[-1]]}" if path[-1] in
                                        e.get("notes", {}) else "")))
                    continue
                status = "pass" if _passes(float(value), op, float(limit)) else "fail"
                where = _get(e, WHERE[metric]) if metric in WHERE else None
                rows.append(_row(gate, selector, e["name"], metric, op, limit, value, unit, status,
                                 f"on {where}" if where else ""))
    return rows


def _regression_rows(selector: str, matched: list[dict[str, Any]], limits: dict[str, Any],
                     base_entries: dict[str, dict[str, Any]],
                     baseline: dict[str, Any] | None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for key, limit in limits.items():
        if limit is None:
            continue
        path, worse, relative, unit = REGRESSIONS[key]
        gate = f"{selector}.max_regression.{key}"
        if baseline is None:
            # Skipped, not failed: the first run of a CI gate (on main) has nothing to compare
            # with. The validate stage warns, and the skip is visible in every report.
            rows.append(_row(gate, selector, None, f"regression.{key}", "<=", limit, None, unit,
                             "skip", "no baseline report given (set `baseline:`): not checked"))
            continue
        if not matched:
            rows.append(_row(gate, selector, None, f"regression.{key}", "<=", limit, None, unit,
                             "fail", f"no artifact matches {selector!r}"))
        for e in matched:
            base = base_entries.get(e["name"])
            if base is None:
                rows.append(_row(gate, selector, e["name"], f"regression.{key}", "<=", limit, None,
                                 unit, "skip", "not in the baseline report (new artifact)"))
                continue
            now, before = _get(e, path), _get(base, path)
            if now is None or before is None:
                rows.append(_row(gate, selector, e["name"], f"regression.{key}", "<=", limit, None,
                                 unit, "fail", f"{'.'.join(path)} missing in "
                                 f"{'this report' if now is None else 'the baseline'}"))
                continue
            delta = (float(now) - float(before)) * worse  # > 0 means worse
            if relative:
                delta = 100.0 * delta / abs(float(before)) if float(before) != 0 else 0.0
            status = "pass" if delta <= float(limit) else "fail"
            rows.append(_row(gate, selector, e["name"], f"regression.{key}", "<=", limit, delta,
                             unit, status, f"baseline {before:.6g}, now {now:.6g}"))
    return rows


def required_failures(rows: list[dict[str, Any]]) -> int:
    """Failed rows that fail the run (`required` is False for the gates of artifacts a sweep's
    front did not choose, under validate's `require: chosen`)."""
    return sum(r["status"] == "fail" and r.get("required", True) for r in rows)


def failure_lines(rows: list[dict[str, Any]]) -> list[str]:
    """`<gate>: <artifact> <metric> <value> > <limit>` for each failed row that is required (the
    runner exits 1 when there is any)."""
    out = []
    for r in rows:
        if r["status"] != "fail" or not r.get("required", True):
            continue
        what = r["artifact"] or r["selector"]
        if r["value"] is None:
            out.append(f"{r['gate']}: {what}: {r['message']}")
        else:
            bad = ">" if r["op"] == "<=" else "<"
            out.append(f"{r['gate']}: {what} {r['metric']} {fmt(r['value'])} {bad} "
                       f"{fmt(r['limit'])}{(' ' + r['unit']) if r['unit'] else ''}")
    return out


def builtin_gates(entries: list[dict[str, Any]], primary: str, *, min_reference_diversity:
                  float | None, min_correlation: float | None,
                  min_batch1_agreement: float | None = None) -> list[dict[str, Any]]:
    """The always-on honesty checks: a diverse reference, artifacts that follow it, and that give
    one sample at a time what they give batched (the failing ones only: a dynamic-batch artifact
    that passes has batch1_* figures in its parity)."""
    rows: list[dict[str, Any]] = []
    ref = next(e for e in entries if e["name"] == primary)
    if min_reference_diversity is not None:
        div = ref["diversity"]
        ok = div["distinct_fraction"] >= min_reference_diversity
        rows.append(_row("reference.min_diversity", "reference", primary, "distinct_fraction",
                         ">=", min_reference_diversity, div["distinct_fraction"], "",
                         "pass" if ok else "fail",
                         "" if ok else f"{div['distinct_predictions']} of "
                         f"{div['classes_in_labels']} classes predicted; parity against a "
                         f"near-constant model proves nothing"))
    for e in entries:  # the same answer one sample at a time as batched (evaluation.batch_of_one)
        agree = (e.get("parity") or {}).get("batch1_agreement")
        if min_batch1_agreement is not None and agree is not None and agree < min_batch1_agreement:
            n = e["parity"]["batch1_samples"]
            rows.append(_row("parity.batch1", "builtin", e["name"], "batch1_agreement", ">=",
                             min_batch1_agreement, agree, "", "fail",
                             f"one sample at a time, {e['name']} predicts another class than "
                             f"batched on {round((1 - agree) * n)} of {n} samples (max |Δlogit| "
                             f"{e['parity']['batch1_max_rel_diff']:.3g} of the logits' range): "
                             f"its accuracy, measured batched, is not what batch 1 gives"))
    if min_correlation is not None:
        # every artifact against its own reference; the secondary torch references (e.g. the
        # unpruned model) are not gated by `all`
        others = [e for e in entries if e["name"] != e["reference"]]
        for row in evaluate_gates(others, {"all": {"min_correlation": min_correlation}}, None):
            row["gate"], row["selector"] = "parity.min_correlation", "builtin"
            rows.append(row)
    return rows


Policy = Literal["fastest", "most_accurate"]


def recommend(entries: list[dict[str, Any]], rows: list[dict[str, Any]],
              policy: Policy = "fastest") -> dict[str, str | None]:
    """Per backend, the deployed artifact passing every gate — its exact twin's and its
    reference's included — that is the fastest (batch-1 median; `fastest`) or the most accurate
    (top-1, ties to the faster; `most_accurate`: e.g. the best point of a sweep that still meets
    max_latency_ms). Sets each entry's `passed` and `recommended`."""
    failed = {r["artifact"] for r in rows if r["status"] == "fail" and r["artifact"]}
    unmatched = any(r["status"] == "fail" and not r["artifact"] for r in rows)
    for e in entries:
        e["passed"] = e["name"] not in failed
    out: dict[str, str | None] = {}
    backends = list(dict.fromkeys(e["backend"] for e in entries if e["mode"] == "deployed"))
    for backend in backends:
        best = best_passing([e for e in entries if e["backend"] == backend], entries, unmatched,
                            policy)
        out[backend] = best["name"] if best else None
        if best:
            best["recommended"] = True
    return out


def passing(entries: list[dict[str, Any]], everything: list[dict[str, Any]],
            unmatched: bool = False) -> list[dict[str, Any]]:
    """Deployed artifacts that pass, with their exact twin and their reference."""
    by_name = {e["name"]: e for e in everything}
    return [e for e in entries if e["mode"] == "deployed" and e["passed"] and not unmatched
            and by_name.get(f"{e['name']}[f32]", e)["passed"]
            and by_name.get(e["reference"] or e["name"], e)["passed"]]


def rank_key(policy: Policy) -> Any:
    """Sort key: the best artifact first under a policy."""
    def key(e: dict[str, Any]) -> tuple[float, float]:
        lat = e["latency"]["batch1_median_ms"]
        top1 = e["accuracy"]["top1_pct"]
        top1 = -1.0 if top1 is None else top1
        return (lat, -top1) if policy == "fastest" else (-top1, lat)
    return key


def best_passing(entries: list[dict[str, Any]], everything: list[dict[str, Any]],
                 unmatched: bool, policy: Policy) -> dict[str, Any] | None:
    ok = passing(entries, everything, unmatched)
    return min(ok, key=rank_key(policy), default=None)


def fmt(value: Any) -> str:
    """Numbers as people read them in a table: 4 significant digits, scientific when tiny."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) < 1e-3 or abs(value) >= 1e6:
            return f"{value:.3e}"
        return f"{value:.4g}"
    return str(value)
