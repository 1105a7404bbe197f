"""report.md: the gate table first (what CI readers need), then every artifact's figures.

Plain GitHub-flavoured Markdown tables, small enough for `$GITHUB_STEP_SUMMARY` (1 MiB limit).
"""

from __future__ import annotations

from edgemml.report.front import front_table
from edgemml.report.gates import fmt, required_failures
from edgemml.report.schema import Report
from edgemml.report.tables import (artifact_table, gate_table, io_notes, per_layer_tables,
                                   rewrite_tables, robustness_gap_table, robustness_notes,
                                   robustness_table, stage_table, to_markdown)


def render_markdown(report: Report) -> str:
    status = report.get("status", "?")
    failed = required_failures(report.get("gates", []))
    optional = sum(r["status"] == "fail" for r in report.get("gates", [])) - failed
    total = len(report.get("gates", []))
    data = report.get("data", {})
    env = report.get("environment", {})
    head = "✅ passed" if status == "passed" else f"❌ {failed} of {total} gate(s) failed"
    if optional:
        head += (f" ({optional} gate(s) of artifacts the front did not choose failed: not "
                 f"required)")
    out = [f"# edgemml validation: {report.get('pipeline', '')}", "",
           f"**{head}** on {data.get('n', '?')} {data.get('split', 'test')} samples of "
           f"`{data.get('source', '?')}`; latency with {env.get('threads', '?')} thread(s) on "
           f"{env.get('processor') or env.get('machine', '?')}.", ""]
    rec = report.get("recommended") or {}
    front = report.get("front") or {}
    most_accurate = front.get("policy") == "most_accurate"
    if rec:
        out.append("**Recommended** (" + ("the most accurate artifact passing every gate"
                                           if most_accurate else
                                           "fastest artifact passing every gate") + "): " + ", ".join(
            f"{backend}: **{name}**" if name else f"{backend}: none passes"
            for backend, name in rec.items()))
        out.append("")
    gates = gate_table(report)
    out += ["## Gates", ""] + (to_markdown(gates) if gates else ["No gates configured."]) + [""]
    if front.get("sweeps") or most_accurate:
        out += ["## Accuracy-latency front", "",
                f"Chosen: **{front.get('chosen') or 'none passes every gate'}**; top-1 and "
                f"speed-up against the reference `{front.get('reference')}`, measured in this "
                f"run" + (f"; latency budget {fmt(front['budget_ms'])} ms"
                          if front.get("budget_ms") else "") + ".", ""]
        out += to_markdown(front_table(front)) + [""]
    ref_name = (report.get("reference") or {}).get("name")
    out += ["## Artifacts", "",
            f"Parity is measured against the reference `{ref_name}` (each exported artifact "
            "against the torch model it was made from) on the same samples. OpenVINO artifacts "
            "appear twice: as deployed (the CPU's default precision, shown in \"runs in\") and "
            "as `[f32]` with `INFERENCE_PRECISION_HINT=f32` for exact parity. ★ = recommended.",
            ""] + to_markdown(artifact_table(report)) + [""]
    for name, note in io_notes(report):
        out.append(f"`{name}` has integer input/output; the runtime layer quantized and "
                   f"dequantized with the file's own parameters ({note}).")
    if io_notes(report):
        out.append("")
    for line, table in rewrite_tables(report):
        out += ["## Rewrite: original vs rewritten in int8", "", line, ""] + to_markdown(table) + [""]
    ref = report.get("reference") or {}
    div = ref.get("diversity") or {}
    if div:
        out += [f"Reference `{ref.get('name')}` predicts {div.get('distinct_predictions')} distinct "
                f"classes of {div.get('classes_in_labels')} present; most frequent prediction "
                f"share {fmt(div.get('majority_share'))}.", ""]
    robust = robustness_table(report)
    if robust:
        out += ["## Robustness", ""]
        for note in robustness_notes(report):
            out += [note, ""]
        out += to_markdown(robust) + [""]
        gaps = robustness_gap_table(report)
        if gaps:
            out += to_markdown(gaps) + [""]
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
