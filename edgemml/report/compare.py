"""Differences between two validation reports (`edgemml compare RUN_A RUN_B`), artifact by artifact.

Only figures are compared, never re-measured: a branch's run against main's run shows what moved.
"""

from __future__ import annotations

from typing import Any

#: (label, path in an artifact entry, higher is better?)
COMPARED: list[tuple[str, tuple[str, ...], bool]] = [
    ("top-1 %", ("accuracy", "top1_pct"), True),
    ("top-5 %", ("accuracy", "top5_pct"), True),
    ("worst class %", ("accuracy", "worst_class_pct"), True),
    ("agreement", ("parity", "agreement"), True),
    ("max abs diff", ("parity", "max_abs_diff"), False),
    ("correlation", ("parity", "correlation"), True),
    ("p50 ms (b1)", ("latency", "batch1_median_ms"), False),
    ("p90 ms (b1)", ("latency", "batch1_p90_ms"), False),
    ("img/s", ("latency", "throughput_ips"), True),
    ("size MB", ("size_mb",), False),
    ("M MACs", ("mmacs",), False),
]


def _get(entry: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = entry
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    return node


def compare_reports(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows {artifact, metric, a, b, delta, better} for every artifact in either report; an
    artifact only in one report has None on the other side."""
    ea = {e["name"]: e for e in a.get("artifacts", [])}
    eb = {e["name"]: e for e in b.get("artifacts", [])}
    names = list(ea) + [n for n in eb if n not in ea]
    rows = []
    for name in names:
        for label, path, higher_better in COMPARED:
            va = _get(ea[name], path) if name in ea else None
            vb = _get(eb[name], path) if name in eb else None
            if va is None and vb is None:
                continue
            delta = (vb - va) if (va is not None and vb is not None) else None
            better = None
            if delta:
                better = (delta > 0) == higher_better
            rows.append({"artifact": name, "metric": label, "a": va, "b": vb, "delta": delta,
                         "better": better})
    return rows


def gate_changes(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Gates whose status differs between the two reports (keyed by gate and artifact)."""
    ga = {(r["gate"], r["artifact"]): r["status"] for r in a.get("gates", [])}
    gb = {(r["gate"], r["artifact"]): r["status"] for r in b.get("gates", [])}
    out = []
    for key in list(ga) + [k for k in gb if k not in ga]:
        if ga.get(key) != gb.get(key):
            out.append({"gate": key[0], "artifact": key[1], "a": ga.get(key), "b": gb.get(key)})
    return out
