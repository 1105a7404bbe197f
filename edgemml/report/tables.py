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
