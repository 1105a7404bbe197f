"""report.html: one self-contained file (inline SVG plots, inline CSS, no network) with the figures.

Plots: the accuracy / latency / size trade-off of every artifact (the choice the user makes), the
per-stage timings, the training curves, the per-class accuracy and, with validate's robustness
pass, accuracy against the attack budget and the corruption severity. SVGs are rendered by matplotlib
with a fixed hash salt and no date, so re-rendering the same report.json gives the same bytes.
"""

from __future__ import annotations

import html
import io
import json
from typing import Any

from edgemml.report.front import front_table
from edgemml.report.gates import required_failures
from edgemml.report.schema import Report
from edgemml.report.tables import (artifact_table, gate_table, io_notes, per_layer_tables,
                                   rewrite_tables, robust_columns, robustness_gap_table,
                                   robustness_notes, robustness_table, to_html)

_COLORS = {"torch": "#555555", "onnxruntime": "#1f77b4", "openvino": "#d62728"}
_MARKERS = {"fp32": "o", "fp16": "s", "int8": "^"}


def _svg(fig: Any) -> str:
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": "edgemml", "svg.fonttype": "none"}):
        fig.savefig(buf, format="svg", metadata={"Date": None}, bbox_inches="tight")
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def plot_tradeoff(report: dict[str, Any]) -> str | None:
    """Top-1 against batch-1 latency and against size; marker area follows size, ★ = recommended."""
    arts = [a for a in report.get("artifacts", [])
            if (a.get("accuracy") or {}).get("top1_pct") is not None]
    if not arts:
        return None
    fig = _figure(10, 4.2)
    ax1, ax2 = fig.subplots(1, 2)
    sizes = [a.get("size_mb") or 0 for a in arts]
    smax = max(sizes) or 1
    for a, size in zip(arts, sizes):
        top1 = a["accuracy"]["top1_pct"]
        lat = (a.get("latency") or {}).get("batch1_median_ms")
        color = _COLORS.get(a["backend"], "#2ca02c")
        marker = _MARKERS.get(a["precision"], "o")
        area = 40 + 400 * size / smax
        face = color if a["mode"] != "exact" else "none"
        label = a["name"] + (" ★" if a.get("recommended") else "")
        if lat is not None:
            ax1.scatter([lat], [top1], s=area, c=face, edgecolors=color, marker=marker, alpha=0.8)
            ax1.annotate(label, (lat, top1), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax2.scatter([size], [top1], s=80, c=face, edgecolors=color, marker=marker, alpha=0.8)
        ax2.annotate(label, (size, top1), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax1.set_xscale("log")  # runtimes differ by orders of magnitude (torch eager vs int8)
    ax1.set_xlabel("batch-1 median latency (ms, log scale)")
    ax1.set_ylabel("top-1 accuracy (%)")
    ax1.set_title("accuracy vs latency (marker area ~ size)")
    ax2.set_xlabel("size (MB)")
    ax2.set_title("accuracy vs size")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    return _svg(fig)


_POINT_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf",
                 "#bcbd22", "#d62728", "#7f7f7f"]
_MARKERS = {"onnxruntime": "^", "openvino": "s", "torch": "o"}


def plot_front(report: dict[str, Any]) -> str | None:
    """Top-1 against batch-1 latency of every artifact of every point (colour = point, marker =
    runtime), the Pareto front as a line, the latency budget dashed, the chosen one starred."""
    front = report.get("front") or {}
    if not front.get("sweeps") and front.get("policy") != "most_accurate":
        return None  # without a sweep, the trade-off plot below shows the same artifacts
    rows = [r for r in front.get("artifacts", [])
            if r.get("batch1_median_ms") is not None and r.get("top1_pct") is not None]
    if not rows:
        return None
    points = list(dict.fromkeys(r["point"] for r in rows if r["point"]))
    colour = {p: _POINT_COLORS[i % len(_POINT_COLORS)] for i, p in enumerate(points)}
    fig = _figure(10, 5)
    ax = fig.subplots()
    for point in [None, *points]:
        sel = [r for r in rows if r["point"] == point]
        for backend in dict.fromkeys(r["backend"] for r in sel):
            pts = [r for r in sel if r["backend"] == backend]
            ax.scatter([r["batch1_median_ms"] for r in pts], [r["top1_pct"] for r in pts],
                       c=colour.get(point, "#555555"), marker=_MARKERS.get(backend, "D"), s=55,
                       alpha=0.85, label=f"{point or 'reference'} · {backend}")
    front_pts = sorted((r for r in rows if r.get("pareto")), key=lambda r: r["batch1_median_ms"])
    if len(front_pts) > 1:
        ax.step([r["batch1_median_ms"] for r in front_pts], [r["top1_pct"] for r in front_pts],
                where="post", color="#333333", lw=1, alpha=0.6, label="Pareto front")
    for r in rows:
        if r.get("chosen"):
            ax.scatter([r["batch1_median_ms"]], [r["top1_pct"]], marker="*", s=420,
                       facecolors="none", edgecolors="#000000", linewidths=1.5,
                       label=f"chosen: {r['name']}")
            ax.annotate(r["name"], (r["batch1_median_ms"], r["top1_pct"]), fontsize=8,
                        xytext=(6, -12), textcoords="offset points")
    if front.get("budget_ms"):
        ax.axvline(front["budget_ms"], ls="--", color="#cf222e", lw=1,
                   label=f"budget {front['budget_ms']:.3g} ms")
    ax.set_xscale("log")
    ax.set_xlabel("batch-1 median latency (ms, log scale)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"accuracy-latency front ({front.get('policy')}: ★ = the most accurate passing "
                 f"every gate)" if front.get("policy") == "most_accurate" else
                 "accuracy-latency front (★ = chosen)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    return _svg(fig)


def plot_latency(report: dict[str, Any]) -> str | None:
    arts = [a for a in report.get("artifacts", []) if (a.get("latency") or {}).get("batch1_median_ms")]
    if not arts:
        return None
    fig = _figure(10, 0.5 + 0.35 * len(arts))
    ax = fig.subplots()
    names = [a["name"] for a in arts]
    med = [a["latency"]["batch1_median_ms"] for a in arts]
    p90 = [a["latency"]["batch1_p90_ms"] for a in arts]
    y = list(range(len(arts)))
    ax.barh(y, p90, color="#bbbbbb", label="p90")
    ax.barh(y, med, color=[_COLORS.get(a["backend"], "#2ca02c") for a in arts], label="median")
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel(f"batch-1 latency (ms, log scale), "
                  f"{report.get('environment', {}).get('threads')} thread(s)")
    ax.legend(fontsize=8)
    return _svg(fig)


def plot_stage_times(report: dict[str, Any]) -> str | None:
    stages = [s for s in report.get("stages", []) if s.get("wall_time_s") is not None]
    if not stages:
        return None
    fig = _figure(10, 0.5 + 0.35 * len(stages))
    ax = fig.subplots()
    y = list(range(len(stages)))
    ax.barh(y, [s["wall_time_s"] for s in stages], color="#7f7f7f")
    ax.set_yticks(y, [f"{s['name']} ({s['type']})" for s in stages], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("wall time of the stage's last run (s)")
    return _svg(fig)


def plot_curves(report: dict[str, Any]) -> str | None:
    curves = {k: v for k, v in (report.get("curves") or {}).items() if v}
    if not curves:
        return None
    fig = _figure(10, 3.6 * len(curves))
    axes = fig.subplots(len(curves), 2, squeeze=False)
    for (stage, rows), (ax_loss, ax_acc) in zip(curves.items(), axes):
        epochs = [r.get("epoch", i + 1) for i, r in enumerate(rows)]
        for key, ax in (("loss", ax_loss), ("top1_pct", ax_acc)):
            for split, style in (("train", "-"), ("val", "--")):
                values = [r.get(f"{split}_{key}") for r in rows]
                pts = [(e, v) for e, v in zip(epochs, values) if v is not None]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker=".",
                            label=f"{split} {key}")
            ax.set_xlabel("epoch")
            ax.set_title(f"{stage}: {key}")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    return _svg(fig)


def plot_per_class(report: dict[str, Any], max_classes: int = 40) -> str | None:
    arts = [a for a in report.get("artifacts", []) if (a.get("accuracy") or {}).get("per_class_pct")]
    if not arts:
        return None
    first = arts[0]["accuracy"]["per_class_pct"]
    classes = sorted(first, key=lambda c: first[c])[:max_classes]  # the worst classes first
    classes = [c for c in first if c in classes]
    shown = arts[:8]
    fig = _figure(10, 4)
    ax = fig.subplots()
    width = 0.8 / len(shown)
    for i, a in enumerate(shown):
        per = a["accuracy"]["per_class_pct"]
        xs = [j + i * width for j in range(len(classes))]
        ax.bar(xs, [per.get(c, 0.0) for c in classes], width=width, label=a["name"])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(classes))], classes, fontsize=8,
                  rotation=90 if len(classes) > 15 else 0)
    ax.set_ylabel("accuracy (%)")
    title = "per-class accuracy"
    if len(first) > max_classes:
        title += f" ({max_classes} worst classes of {len(first)})"
    ax.set_title(title)
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7, ncol=4)
    return _svg(fig)


def plot_robustness(report: dict[str, Any]) -> str | None:
    """Top-1 against the attack budget (FGSM as a line from the clean accuracy at 0, PGD as a
    cross) and against corruption severity (mean over the corruptions), one series per artifact."""
    cols = robust_columns(report)  # type: ignore[arg-type]
    if not cols:
        return None
    by_name = {a["name"]: a for a in report.get("artifacts", [])}
    fig = _figure(10, 4.2)
    ax1, ax2 = fig.subplots(1, 2)
    for name, r in cols.items():
        a = by_name.get(name, {"backend": "torch", "mode": "reference", "precision": "fp32"})
        style = {"color": _COLORS.get(a["backend"], "#2ca02c"),
                 "linestyle": "--" if a["mode"] == "exact" or name not in by_name else "-",
                 "marker": _MARKERS.get(a["precision"], "o")}
        sets = r["sets"]
        clean = next((s["top1_pct"] for s in sets if s["kind"] == "clean"), None)
        fgsm = sorted((s["param"] * 255, s["top1_pct"]) for s in sets
                      if s["family"] == "fgsm" and s["top1_pct"] is not None)
        if fgsm and clean is not None:
            pts = [(0.0, clean), *fgsm]
            ax1.plot([p[0] for p in pts], [p[1] for p in pts], label=name, **style)
        for s in sets:
            if s["family"] == "pgd" and s["top1_pct"] is not None:
                ax1.scatter([s["param"] * 255], [s["top1_pct"]], marker="x", s=60,
                            color=style["color"])
        sev: dict[int, list[float]] = {}
        for s in sets:
            if s["kind"] == "corruption" and s["top1_pct"] is not None:
                sev.setdefault(int(s["param"]), []).append(s["top1_pct"])
        if sev and clean is not None:
            pts = [(0, clean), *sorted((k, sum(v) / len(v)) for k, v in sev.items())]
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], label=name, **style)
    ax1.set_xlabel("attack budget eps (grey levels of 255; x = PGD, line = FGSM)")
    ax1.set_ylabel("top-1 accuracy (%)")
    ax1.set_title("accuracy vs eps (others replay torch's: transfer)", fontsize=10)
    ax2.set_xlabel("corruption severity (0 = clean)")
    ax2.set_title("accuracy vs corruption severity (mean)", fontsize=10)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.set_ylim(0, 102)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return _svg(fig)


def _robustness_html(report: Report) -> list[str]:
    table = robustness_table(report)
    if table is None:
        return []
    parts = ["<h2>Robustness</h2>"]
    parts += [f"<p>{html.escape(note)}</p>" for note in robustness_notes(report)]
    parts.append(to_html(table))
    gaps = robustness_gap_table(report)
    if gaps is not None:
        parts.append(to_html(gaps))
    svg = plot_robustness(report)  # type: ignore[arg-type]
    if svg is not None:
        parts.append(f'<figure class="plot" id="plot-robustness">{svg}</figure>')
    return parts


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}
table{border-collapse:collapse;font-size:13px;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}
th,td.l{text-align:left}
.pass{color:#1a7f37}.fail{color:#cf222e;font-weight:bold}.skip{color:#777}
figure.plot{margin:1.5em 0}figure.plot svg{max-width:100%;height:auto}
.status-passed{color:#1a7f37}.status-failed{color:#cf222e}
"""

# Counts the plots the browser actually laid out (non-empty boxes) and records script errors, so a
# headless browser's DOM dump shows whether the page rendered (used by the tests, harmless here).
_SCRIPT = """
window.addEventListener('error',function(e){document.body.dataset.errors=
(document.body.dataset.errors||'')+e.message+';';});
window.addEventListener('load',function(){var n=0;document.querySelectorAll('figure.plot svg')
.forEach(function(s){var r=s.getBoundingClientRect();if(r.width>0&&r.height>0&&
s.querySelectorAll('path,use,text').length>0)n++;});document.body.dataset.plotsRendered=n;});
"""


def _policy_text(report: Report) -> str:
    policy = (report.get("front") or {}).get("policy", "fastest")
    return ("the most accurate artifact passing every gate" if policy == "most_accurate"
            else "fastest artifact passing every gate")


def _front_section(report: Report) -> list[str]:
    """The front's table, with the chosen artifact, when the run has a sweep or recommends the
    most accurate artifact."""
    front = report.get("front") or {}
    if not front.get("sweeps") and front.get("policy") != "most_accurate":
        return []
    chosen = front.get("chosen")
    return ["<h2>Accuracy-latency front</h2>",
            f"<p>Chosen: <b>{html.escape(chosen or 'none passes every gate')}</b> ("
            f"{html.escape(_policy_text(report))}); top-1 and speed-up against the reference "
            f"<code>{html.escape(str(front.get('reference')))}</code>, measured in this run.</p>",
            to_html(front_table(front))]


def render_html(report: Report) -> str:
    status = report.get("status", "?")
    gates = gate_table(report)
    plots = [("front", "Accuracy-latency front", plot_front(report)),
             ("tradeoff", "Accuracy, latency and size", plot_tradeoff(report)),
             ("latency", "Latency", plot_latency(report)),
             ("per-class", "Per-class accuracy", plot_per_class(report)),
             ("curves", "Training curves", plot_curves(report)),
             ("stages", "Stage timings", plot_stage_times(report))]
    rec = report.get("recommended") or {}
    rec_text = ", ".join(f"{html.escape(b)}: <b>{html.escape(n or 'none passes')}</b>"
                         for b, n in rec.items())
    data, env = report.get("data", {}), report.get("environment", {})
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>edgemml validation: {html.escape(str(report.get('pipeline', '')))}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>edgemml validation: {html.escape(str(report.get('pipeline', '')))}</h1>",
        f'<p class="status-{html.escape(status)}"><b>{html.escape(status.upper())}</b>: '
        f"{required_failures(report.get('gates', []))} of "
        f"{len(report.get('gates', []))} gate(s) failed; {data.get('n')} "
        f"{html.escape(str(data.get('split')))} samples of "
        f"<code>{html.escape(str(data.get('source')))}</code>; {env.get('threads')} thread(s) on "
        f"{html.escape(str(env.get('processor') or env.get('machine')))}.</p>",
        f"<p>Recommended ({html.escape(_policy_text(report))}): {rec_text or 'n/a'}</p>",
        "<h2>Gates</h2>", to_html(gates) if gates else "<p>No gates configured.</p>",
        *_front_section(report),
        "<h2>Artifacts</h2>", to_html(artifact_table(report)),
        *_robustness_html(report),
    ]
    parts += [f"<p><code>{html.escape(name)}</code> has integer input/output; the runtime layer "
              f"quantized and dequantized with the file's own parameters "
              f"({html.escape(note)}).</p>" for name, note in io_notes(report)]
    for line, table in rewrite_tables(report):
        parts += ["<h2>Rewrite: original vs rewritten in int8</h2>",
                  f"<p>{html.escape(line.replace('`', ''))}</p>", to_html(table)]
    per_layer = per_layer_tables(report)
    if per_layer:
        parts.append("<h2>Per-layer int8 error (worst layers)</h2>")
        for title, table in per_layer:
            parts += [f"<h3>{html.escape(title)}</h3>", to_html(table)]
    for pid, title, svg in plots:
        if svg is None:
            continue
        parts.append(f'<h2>{html.escape(title)}</h2><figure class="plot" id="plot-{pid}">{svg}'
                     f"</figure>")
    parts.append("<details><summary>report.json</summary><pre>"
                 + html.escape(json.dumps({k: v for k, v in report.items()
                                           if k not in ("artifacts", "curves")}, indent=1))
                 + "</pre></details>")
    parts.append(f"<script>{_SCRIPT}</script></body></html>")
    return "\n".join(parts) + "\n"


__all__ = ["render_html"]
