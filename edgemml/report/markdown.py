"""report.md: the gate table first (what CI readers need), then every artifact's figures.

Plain GitHub-flavoured Markdown tables, small enough for `$GITHUB_STEP_SUMMARY` (1 MiB limit).
"""

from __future__ import annotations

from edgemml.report.gates import fmt
from edgemml.report.schema import Report
from edgemml.report.tables import (artifact_table, gate_table, per_layer_tables, stage_table,
                                   to_markdown)


def render_markdown(report: Report) -> str:
    status = report.get("status", "?")
    failed = sum(r["status"] == "fail" for r in report.get("gates", []))
    total = len(report.get("gates", []))
    data = report.get("data", {})
    env = report.get("environment", {})
    head = "✅ passed" if status == "passed" else f"❌ {failed} of {total} gate(s) failed"
    out = [f"# edgemml validation: {report.get('pipeline', '')}", "",
           f"**{head}** on {data.get('n', '?')} {data.get('split', 'test')} samples of "
           f"`{data.get('source', '?')}`; latency with {env.get('threads', '?')} thread(s) on "
           f"{env.get('processor') or env.get('machine', '?')}.", ""]
    rec = report.get("recommended") or {}
    if rec:
        out.append("**Recommended** (fastest artifact passing every gate): " + ", ".join(
            f"{backend}: **{name}**" if name else f"{backend}: none passes"
            for backend, name in rec.items()))
        out.append("")
    gates = gate_table(report)
    out += ["## Gates", ""] + (to_markdown(gates) if gates else ["No gates configured."]) + [""]
    ref_name = (report.get("reference") or {}).get("name")
    out += ["## Artifacts", "",
            f"Parity is measured against the reference `{ref_name}` (each exported artifact "
            "against the torch model it was made from) on the same samples. OpenVINO artifacts "
            "appear twice: as deployed (the CPU's default precision, shown in \"runs in\") and "
            "as `[f32]` with `INFERENCE_PRECISION_HINT=f32` for exact parity. ★ = recommended.",
            ""] + to_markdown(artifact_table(report)) + [""]
    ref = report.get("reference") or {}
    div = ref.get("diversity") or {}
    if div:
        out += [f"Reference `{ref.get('name')}` predicts {div.get('distinct_predictions')} distinct "
                f"classes of {div.get('classes_in_labels')} present; most frequent prediction "
                f"share {fmt(div.get('majority_share'))}.", ""]
    base = report.get("baseline")
    if base:
        out += [f"Baseline: `{base.get('path')}` (pipeline {base.get('pipeline')}, "
                f"{base.get('created')}, status {base.get('status')}).", ""]
    stages = stage_table(report)
    if stages:
        out += ["## Stages", ""] + to_markdown(stages) + [""]
    per_layer = per_layer_tables(report)
    if per_layer:
        out += ["## Per-layer int8 error (worst layers)", "",
                "SQNR of each layer's output against fp32 on calibration samples (cumulative: "
                "what the next layer reads); the first layer far below its predecessors is the "
                "one to keep in float.", ""]
        for title, table in per_layer:
            out += [f"### {title}", ""] + to_markdown(table, emoji=False) + [""]
    return "\n".join(out) + "\n"
