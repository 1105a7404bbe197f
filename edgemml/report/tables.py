"""The report's tables as rows of cells, rendered to Markdown (report.md) and HTML (report.html).

One builder per table, two renderers: the same rows reach both files, so they cannot disagree, and
HTML is never parsed back out of Markdown.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

from edgemml.report.gates import fmt
from edgemml.report.schema import Report


@dataclass
class Cell:
    text: str
    #: pass | fail | skip: coloured in HTML, marked in Markdown
    status: str | None = None
    strong: bool = False
    code: bool = False


@dataclass
class Table:
    header: list[str]
    #: "l" or "r" per column
    align: str
    rows: list[list[Cell]] = field(default_factory=list)


def _num(value: Any, suffix: str = "") -> Cell:
    return Cell(fmt(value) + (suffix if value is not None else ""))


_MARKS = {"pass": "pass", "fail": "FAIL", "skip": "skip"}
_EMOJI = {"pass": "✅ ", "fail": "❌ ", "skip": "⏭ "}


def gate_table(report: Report) -> Table | None:
    rows = report.get("gates", [])
    if not rows:
        return None
    table = Table(["gate", "artifact", "limit", "measured", "result"], "llrrl")
    for r in rows:
        unit = f" {r['unit']}" if r.get("unit") else ""
        measured = fmt(r["value"]) + (unit if r["value"] is not None else "")
        if r.get("message"):
            measured += f" ({r['message']})"
        table.rows.append([Cell(r["gate"], code=True), Cell(r["artifact"] or "-"),
                           Cell(f"{r['op']} {fmt(r['limit'])}{unit}"), Cell(measured),
                           Cell(_MARKS[r["status"]], status=r["status"],
                                strong=r["status"] == "fail")])
    return table


def io_notes(report: Report) -> list[tuple[str, str]]:
    """(artifact, how it was fed and read) for artifacts with integer input / output (a fully int8
    .tflite): the report says that their figures went through the file's own scale / zero point."""
    return [(a["name"], a["notes"]["io"]) for a in report.get("artifacts", [])
            if (a.get("notes") or {}).get("io")]


def artifact_table(report: Report) -> Table:
    table = Table(["artifact", "backend", "runs in", "top-1 %", "top-5 %", "agreement",
                   "max abs diff", "correlation", "p50 ms (b1)", "p90 ms (b1)", "img/s (batch)",
                   "size MB", "M params", "M MACs", "GMAC/s (batch)", "% of peak", "gates"],
                  "lll" + "r" * 13 + "l")
    for a in report.get("artifacts", []):
        acc, par, lat = a.get("accuracy") or {}, a.get("parity") or {}, a.get("latency") or {}
        comp = a.get("compute") or {}
        frac = comp.get("fraction_of_peak_batch")
        thr = lat.get("throughput_ips")
        passed = "pass" if a.get("passed") else "fail"
        table.rows.append([
            Cell(a["name"] + (" ★" if a.get("recommended") else ""), strong=True),
            Cell(a["backend"]), Cell(a.get("runtime_precision", "-")),
            _num(acc.get("top1_pct")), _num(acc.get("top5_pct")), _num(par.get("agreement")),
            _num(par.get("max_abs_diff")), _num(par.get("correlation")),
            _num(lat.get("batch1_median_ms")), _num(lat.get("batch1_p90_ms")),
            Cell(fmt(thr) + (f" ({lat.get('batch')})" if thr is not None else "")),
            _num(a.get("size_mb")), _num(a.get("mparams")), _num(a.get("mmacs")),
            _num(comp.get("gmacs_per_s_batch")),
            _num(frac * 100 if frac is not None else None),
            Cell(_MARKS[passed], status=passed)])
    return table


def stage_table(report: Report) -> Table | None:
    stages = report.get("stages") or []
    if not stages:
        return None
    table = Table(["stage", "type", "seconds"], "llr")
    for s in stages:
        table.rows.append([Cell(s["name"]), Cell(s["type"]), _num(s.get("wall_time_s"))])
    return table


def rewrite_tables(report: Report) -> list[tuple[str, Table]]:
    """Per `rewrite` stage of the run: (one summary line, a table) comparing the int8 artifacts of
    its input model (the original) with those of its output (the rewritten model).

    An int8 artifact belongs to whichever torch reference it was measured against, so the two
    sides are told apart by the references' stages: the rewrite stage's `input_stage` (from its
    recorded metrics) and the rewrite stage itself. Only figures already in report.json are used.
    The summary line marks names with backticks (Markdown); the HTML renderer drops them.
    """
    arts = report.get("artifacts") or []
    torch_by_stage = {a.get("stage"): a for a in arts if a.get("format") == "torch"}
    out: list[tuple[str, Table]] = []
    for st in report.get("stages") or []:
        if st.get("type") != "rewrite":
            continue
        metrics = st.get("metrics") or {}
        ref_old = torch_by_stage.get(metrics.get("input_stage"))
        ref_new = torch_by_stage.get(st["name"])
        if ref_old is None or ref_new is None:
            continue
        top = {k: (r.get("accuracy") or {}).get("top1_pct") for k, r in
               (("original", ref_old), ("rewritten", ref_new))}
        loss = None if None in top.values() else top["original"] - top["rewritten"]
        line = (f"Rewrite `{st['name']}` of `{metrics.get('input_stage')}` "
                f"({metrics.get('replaced')} activations replaced, {metrics.get('se_removed')} "
                f"SE blocks removed): fp32 top-1 {fmt(top['original'])} % -> "
                f"{fmt(top['rewritten'])} % ({fmt(loss)} points lost); int8 drop is each int8 "
                f"artifact against its own fp32 model, agreement likewise.")
        table = Table(["model", "int8 artifact", "runs in", "fp32 top-1 %", "int8 top-1 %",
                       "int8 drop (points)", "int8 agreement", "p50 ms (b1)"], "lll" + "r" * 5)
        for label, ref in (("original", ref_old), ("rewritten", ref_new)):
            for a in arts:
                if a.get("precision") != "int8" or a.get("reference") != ref["name"]:
                    continue
                par, lat = a.get("parity") or {}, a.get("latency") or {}
                table.rows.append([
                    Cell(label), Cell(a["name"]), Cell(a.get("runtime_precision", "-")),
                    _num(top[label]), _num((a.get("accuracy") or {}).get("top1_pct")),
                    _num(par.get("accuracy_drop_pp")), _num(par.get("agreement")),
                    _num(lat.get("batch1_median_ms"))])
        out.append((line, table))
    return out


def robust_columns(report: Report) -> dict[str, dict[str, Any]]:
    """Artifact name -> its robustness entry, in report order, then the references attacked only
    for comparison (the unpruned model)."""
    cols = {a["name"]: a["robustness"] for a in report.get("artifacts", [])
            if a.get("robustness")}
    section = report.get("robustness") or {}
    cols.update(section.get("references") or {})
    return cols  # type: ignore[return-value]


def _delta(drop: float | None) -> str:
    """A drop below the reference as the signed difference a reader expects (-1.1 = lower)."""
    return "" if drop is None or abs(drop) < 0.05 else f" ({-drop:+.1f})"


def robustness_table(report: Report) -> Table | None:
    """Top-1 per set (rows) and artifact (columns), the difference to its reference in brackets."""
    cols = robust_columns(report)
    if not cols:
        return None
    table = Table(["set", *cols], "l" + "r" * len(cols))
    table.rows.append([Cell("crafted on", strong=True)] + [
        Cell("white-box" if r.get("crafted_on") == name else
             f"transfer from {r['crafted_on']}" if r.get("crafted_on") else "no gradients")
        for name, r in cols.items()])
    keys = list(dict.fromkeys(s["key"] for r in cols.values() for s in r["sets"]))
    for key in keys:
        row = [Cell(key, code=True)]
        for r in cols.values():
            s = next((s for s in r["sets"] if s["key"] == key), None)
            top1 = None if s is None else s["top1_pct"]
            row.append(Cell("-" if top1 is None else f"{top1:.1f}" + _delta(
                s.get("drop_vs_reference_pp") if s is not None else None)))
        table.rows.append(row)
    return table


def robustness_notes(report: Report) -> list[str]:
    """The sentences that go with the robustness tables (Markdown and HTML alike)."""
    section = report.get("robustness")
    if not section:
        return []
    timing = section.get("timing") or {}
    sets = section.get("sets") or []
    adversarial = [s["key"] for s in sets if s["kind"] == "adversarial"]
    notes = [f"Top-1 % of every artifact on {section.get('n')} samples under {len(sets) - 1} "
             f"perturbed sets; in brackets the difference in points to the model it is compared "
             f"with under the same attack or corruption (negative: lower). "
             f"Measured in {fmt(timing.get('wall_s'))} s wall, {fmt(timing.get('cpu_s'))} s CPU."]
    if adversarial:
        notes.append(f"Adversarial sets ({', '.join(adversarial)}, untargeted, L-inf, in pixel "
                     "units before normalisation, snapped to whole grey levels) are crafted "
                     "white-box on each torch model and replayed on every artifact made from it: "
                     "for ONNX / OpenVINO / int8 artifacts this is a transfer attack, a lower "
                     "bound on what an attacker holding that graph could do.")
    if section.get("table"):
        notes.append(f"Corruptions use the {section['table']} severity constants (Hendrycks & "
                     "Dietterich), applied to the 8-bit image at the model's input resolution.")
    if section.get("references"):
        names = ", ".join(section["references"])
        notes.append(f"{names}: attacked for comparison only (the model the reference was "
                     f"pruned from); the reference's brackets are its difference to it, each "
                     f"attacked with its own white-box inputs.")
    return notes


def robustness_gap_table(report: Report) -> Table | None:
    """int8 vs its fp32 twin, pruned vs unpruned: points lost on clean data and at worst."""
    gaps = (report.get("robustness") or {}).get("gaps") or []
    if not gaps:
        return None
    table = Table(["comparison", "artifact", "vs", "inputs", "drop on clean (pp)",
                   "worst drop (pp)", "on"], "llllrrl")

    def pp(value: float | None) -> Cell:
        return Cell("-" if value is None else f"{value:.1f}")

    for g in gaps:
        table.rows.append([Cell(g["kind"]), Cell(g["artifact"], strong=True), Cell(g["baseline"]),
                           Cell(g["inputs"]), pp(g.get("clean_pp")), pp(g.get("worst_pp")),
                           Cell(g.get("worst_set") or "-", code=bool(g.get("worst_set")))])
    return table


def per_layer_tables(report: Report) -> list[tuple[str, Table]]:
    """Per quantize stage and backend: the int8 layers with the lowest SQNR against fp32 (on
    calibration samples, cumulative: what the next layer reads), and the layers the accuracy
    budget kept in float with the error they had in int8."""
    out: list[tuple[str, Table]] = []
    for s in report.get("stages") or []:
        for backend, entry in (s.get("per_layer") or {}).items():
            table = Table(["layer", "op", "SQNR dB", "cosine", "in int8"], "llrrl")
            for r in entry.get("worst") or []:
                table.rows.append([Cell(r["layer"], code=True), Cell(r["op"]),
                                   _num(r["sqnr_db"]), _num(r["cosine"]),
                                   Cell("yes" if r.get("quantized") else "no")])
            for r in entry.get("kept_in_float") or []:
                why = "kept in float"
                if r.get("sqnr_db_when_int8") is not None:
                    why += f" (int8: {fmt(r['sqnr_db_when_int8'])} dB"
                    if r.get("logits_error_when_only_it_is_int8") is not None:
                        why += f", logits error alone {fmt(r['logits_error_when_only_it_is_int8'])}"
                    why += ")"
                table.rows.append([Cell(r["layer"], code=True), Cell("-"), Cell("-"), Cell("-"),
                                   Cell(why)])
            title = (f"{s['name']}: {backend}, {entry.get('layers')} layers on "
                     f"{entry.get('samples')} calibration samples, median SQNR "
                     f"{fmt(entry.get('median_sqnr_db'))} dB")
            if table.rows:
                out.append((title, table))
    return out


# ---- renderers ------------------------------------------------------------------------------


def to_markdown(table: Table, *, emoji: bool = True) -> list[str]:
    def cell(c: Cell) -> str:
        text = c.text.replace("|", "\\|")
        if c.code:
            text = f"`{text}`"
        if c.strong:
            text = f"**{text}**"
        if c.status and emoji:
            text = _EMOJI[c.status] + text
        return text

    sep = "|" + "|".join("---:" if a == "r" else "---" for a in table.align) + "|"
    lines = ["| " + " | ".join(table.header) + " |", sep]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in table.rows]
    return lines


def to_html(table: Table) -> str:
    def cell(c: Cell, align: str) -> str:
        text = html.escape(c.text)
        if c.code:
            text = f"<code>{text}</code>"
        if c.strong:
            text = f"<b>{text}</b>"
        classes = [c.status] if c.status else []
        if align == "l":
            classes.append("l")
        attr = f' class="{" ".join(classes)}"' if classes else ""
        return f"<td{attr}>{text}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)
    body = "".join("<tr>" + "".join(cell(c, a) for c, a in zip(row, table.align)) + "</tr>"
                   for row in table.rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
