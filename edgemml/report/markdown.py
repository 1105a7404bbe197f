"""report.md: the gate table first (what CI readers need), then every artifact's figures.

Plain GitHub-flavoured Markdown tables, small enough for `$GITHUB_STEP_SUMMARY` (1 MiB limit).
"""

from __future__ import annotations

from typing import Any

from edgemml.report.gates import fmt


def _cell(value: Any) -> str:
    return fmt(value).replace("|", "\\|")


def gate_table(report: dict[str, Any], *, emoji: bool = True) -> list[str]:
    rows = report.get("gates", [])
    if not rows:
        return ["No gates configured."]
    lines = ["| gate | artifact | limit | measured | result |", "|---|---|---:|---:|---|"]
    for r in rows:
        unit = f" {r['unit']}" if r.get("unit") else ""
        measured = _cell(r["value"]) + (unit if r["value"] is not None else "")
        if r.get("message"):
            measured += f" ({r['message']})".replace("|", "\\|")
        mark = {"pass": "pass", "fail": "**FAIL**", "skip": "skip"}[r["status"]]
        if emoji:
            mark = {"pass": "✅ ", "fail": "❌ ", "skip": "⏭ "}[r["status"]] + mark
        lines.append(f"| `{r['gate']}` | {r['artifact'] or '-'} | {r['op']} {_cell(r['limit'])}"
                     f"{unit} | {measured} | {mark} |")
    return lines


def artifact_table(report: dict[str, Any]) -> list[str]:
    lines = ["| artifact | backend | runs in | top-1 % | top-5 % | agreement | max abs diff | "
             "correlation | p50 ms (b1) | p90 ms (b1) | img/s (batch) | size MB | M params | "
             "M MACs | GMAC/s (batch) | % of peak | gates |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for a in report.get("artifacts", []):
        acc, par, lat = a.get("accuracy") or {}, a.get("parity") or {}, a.get("latency") or {}
        comp = a.get("compute") or {}
        frac = comp.get("fraction_of_peak_batch")
        star = " ★" if a.get("recommended") else ""
        thr = lat.get("throughput_ips")
        batch = f" ({lat.get('batch')})" if thr is not None else ""
        lines.append(
            f"| **{a['name']}**{star} | {a['backend']} | {a.get('runtime_precision', '-')} | "
            f"{_cell(acc.get('top1_pct'))} | {_cell(acc.get('top5_pct'))} | "
            f"{_cell(par.get('agreement'))} | {_cell(par.get('max_abs_diff'))} | "
            f"{_cell(par.get('correlation'))} | {_cell(lat.get('batch1_median_ms'))} | "
            f"{_cell(lat.get('batch1_p90_ms'))} | "
            f"{_cell(thr)}{batch} | "
            f"{_cell(a.get('size_mb'))} | {_cell(a.get('mparams'))} | {_cell(a.get('mmacs'))} | "
            f"{_cell(comp.get('gmacs_per_s_batch'))} | "
            f"{_cell(frac * 100) if frac is not None else '-'} | "
            f"{'pass' if a.get('passed') else 'FAIL'} |")
    return lines


def rewrite_sections(report: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """Per `rewrite` stage of the run: (one summary line, a table) comparing the int8 artifacts of
    its input model (the original) with those of its output (the rewritten model).

    An int8 artifact belongs to whichever torch reference it was measured against, so the two
    sides are told apart by the references' stages: the rewrite stage's `input_stage` (from its
    recorded metrics) and the rewrite stage itself. Only figures already in report.json are used.
    """
    arts = report.get("artifacts") or []
    torch_by_stage = {a.get("stage"): a for a in arts if a.get("format") == "torch"}
    out: list[tuple[str, list[str]]] = []
    for st in report.get("stages") or []:
        if st.get("type") != "rewrite":
            continue
        metrics = st.get("metrics") or {}
        ref_old = torch_by_stage.get(metrics.get("input_stage"))
        ref_new = torch_by_stage.get(st["name"])
        if ref_old is None or ref_new is None:
            continue
        top = {k: (r.get("accuracy") or {}).get("top1_pct") for k, r in
               (("old", ref_old), ("new", ref_new))}
        loss = None if None in top.values() else top["old"] - top["new"]
        line = (f"Rewrite `{st['name']}` of `{metrics.get('input_stage')}` "
                f"({metrics.get('replaced')} activations replaced, {metrics.get('se_removed')} "
                f"SE blocks removed): fp32 top-1 {fmt(top['old'])} % -> {fmt(top['new'])} % "
                f"({fmt(loss)} points lost); int8 drop is each int8 artifact against its own fp32 "
                f"model, agreement likewise.")
        rows = ["| model | int8 artifact | runs in | fp32 top-1 % | int8 top-1 % | int8 drop "
                "(points) | int8 agreement | p50 ms (b1) |", "|---|---|---|---:|---:|---:|---:|---:|"]
        for label, ref in (("original", ref_old), ("rewritten", ref_new)):
            for a in arts:
                if a.get("precision") != "int8" or a.get("reference") != ref["name"]:
                    continue
                par, lat = a.get("parity") or {}, a.get("latency") or {}
                rows.append(f"| {label} | {a['name']} | {a.get('runtime_precision', '-')} | "
                            f"{_cell(top['old' if label == 'original' else 'new'])} | "
                            f"{_cell((a.get('accuracy') or {}).get('top1_pct'))} | "
                            f"{_cell(par.get('accuracy_drop_pp'))} | {_cell(par.get('agreement'))} "
                            f"| {_cell(lat.get('batch1_median_ms'))} |")
        out.append((line, rows))
    return out


def render_markdown(report: dict[str, Any]) -> str:
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
    out += ["## Gates", ""] + gate_table(report) + [""]
    ref_name = (report.get("reference") or {}).get("name")
    out += ["## Artifacts", "",
            f"Parity is measured against the reference `{ref_name}` (each exported artifact "
            "against the torch model it was made from) on the same samples. OpenVINO artifacts "
            "appear twice: as deployed (the CPU's default precision, shown in \"runs in\") and "
            "as `[f32]` with `INFERENCE_PRECISION_HINT=f32` for exact parity. ★ = recommended.",
            ""] + artifact_table(report) + [""]
    for line, rows in rewrite_sections(report):
        out += ["## Rewrite: original vs rewritten in int8", "", line, ""] + rows + [""]
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
    stages = report.get("stages") or []
    if stages:
        out += ["## Stages", "", "| stage | type | seconds |", "|---|---|---:|"]
        out += [f"| {s['name']} | {s['type']} | {_cell(s.get('wall_time_s'))} |" for s in stages]
        out.append("")
    return "\n".join(out) + "\n"
