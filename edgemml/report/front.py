"""The accuracy-latency front: every artifact of every sweep point, which are Pareto-optimal, which
one is chosen, and the plot and table that show it.

Why a section of its own: with a sweep the question is not "which runtime is fastest" but "how much
accuracy does each millisecond cost, and which artifact is the most accurate one inside my budget".
The front answers it with figures measured in one validate run: top-1 on the test split against
batch-1 latency, each artifact's loss against the run's reference (the unpruned model) and its
speed-up over it.
"""

from __future__ import annotations

from typing import Any

from edgemml.report.gates import Policy, best_passing
from edgemml.report.tables import Cell, Table, _num


def _latency(e: dict[str, Any]) -> float | None:
    return (e.get("latency") or {}).get("batch1_median_ms")


def _top1(e: dict[str, Any]) -> float | None:
    return (e.get("accuracy") or {}).get("top1_pct")


def pareto(entries: list[dict[str, Any]]) -> list[str]:
    """Names of the entries no other entry beats on both latency (lower) and top-1 (higher)."""
    pts = [e for e in entries if _latency(e) is not None and _top1(e) is not None]
    out = []
    for e in pts:
        dominated = any((_latency(o) <= _latency(e) and _top1(o) >= _top1(e))  # type: ignore[operator]
                        and (_latency(o) < _latency(e) or _top1(o) > _top1(e))  # type: ignore[operator]
                        for o in pts)
        if not dominated:
            out.append(e["name"])
    return out


def budget_ms(rows: list[dict[str, Any]], reference_ms: float | None) -> float | None:
    """The tightest latency budget the gates set (max_latency_ms, or min_speedup over the
    reference), for drawing it."""
    limits = [float(r["limit"]) for r in rows if r["metric"] == "max_latency_ms"]
    if reference_ms:
        limits += [reference_ms / float(r["limit"]) for r in rows if r["metric"] == "min_speedup"]
    return min(limits) if limits else None


def build_front(entries: list[dict[str, Any]], rows: list[dict[str, Any]], *, primary: str,
                policy: Policy, sweeps: list[dict[str, Any]]) -> dict[str, Any]:
    """The `front` section of report.json. Sets each entry's `point` (its sweep point's tag)."""
    stage_point = {stage: p["tag"] for s in sweeps for p in s["points"]
                   for stage in p["stages"].values()}
    for e in entries:
        e["point"] = stage_point.get(e.get("stage") or "")
    ref = next((e for e in entries if e["name"] == primary), None)
    ref_top1 = _top1(ref) if ref else None
    deployed = [e for e in entries if e["mode"] in ("deployed", "reference")]
    unmatched = any(r["status"] == "fail" and not r["artifact"] for r in rows)
    chosen = best_passing([e for e in entries if e["mode"] == "deployed"], entries, unmatched,
                          policy)
    on_front = set(pareto(deployed))
    table = []
    for e in deployed:
        top1 = _top1(e)
        table.append({
            "name": e["name"], "point": e["point"], "backend": e["backend"],
            "runtime_precision": e["runtime_precision"], "mode": e["mode"],
            "mmacs": e.get("mmacs"), "top1_pct": top1,
            "top1_vs_reference_pp": (top1 - ref_top1 if top1 is not None and ref_top1 is not None
                                     else None),
            "batch1_median_ms": _latency(e), "speedup": e.get("speedup"),
            "passed": e.get("passed"), "pareto": e["name"] in on_front,
            "chosen": chosen is not None and e["name"] == chosen["name"]})
    return {"policy": policy, "reference": primary, "reference_top1_pct": ref_top1,
            "reference_ms": _latency(ref) if ref else None,
            "budget_ms": budget_ms(rows, _latency(ref) if ref else None),
            "chosen": chosen["name"] if chosen else None, "sweeps": sweeps,
            "artifacts": sorted(table, key=lambda r: (r["batch1_median_ms"] or 0.0))}


def front_table(front: dict[str, Any]) -> Table:
    table = Table(["artifact", "point", "runs in", "M MACs", "top-1 %", "vs reference (pp)",
                   "p50 ms (b1)", "speed-up", "gates", "Pareto"], "lllrrrrrll")
    for r in front.get("artifacts", []):
        passed = "pass" if r.get("passed") else "fail"
        table.rows.append([
            Cell(r["name"] + (" ★" if r.get("chosen") else ""), strong=bool(r.get("chosen"))),
            Cell(r.get("point") or "-"), Cell(f"{r['backend']} {r['runtime_precision']}"),
            _num(r.get("mmacs")), _num(r.get("top1_pct")), _num(r.get("top1_vs_reference_pp")),
            _num(r.get("batch1_median_ms")),
            _num(r.get("speedup"), "x") if r.get("speedup") is not None else Cell("-"),
            Cell("-" if r["mode"] == "reference" else passed,
                 status=None if r["mode"] == "reference" else passed),
            Cell("yes" if r.get("pareto") else "")])
    return table
