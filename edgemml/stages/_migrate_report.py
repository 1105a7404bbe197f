"""The migrate stage's report: which target tensors came from which source (`migration.json`,
`migration.md`), the summary figures, the run's highlights, and the allow_init patterns. Pure
functions over what stages/migrate.py measured, apart from it so the stage file holds the stage.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from edgemml.errors import ConfigError
from edgemml.stages import _grow

if TYPE_CHECKING:
    import torch

    from edgemml.config import ModelConfig
    from edgemml.models.transfer import Fused, SourceMap

# stages/migrate.py imports this module, so its config is not imported back, not even for
# type checking (no import cycle): annotations name it through this alias.
MigrateConfig = Any


def allowed_init(patterns: list[str], params: list[str], head: str) -> set[str]:
    allowed: set[str] = set()
    for pattern in patterns:
        if pattern == "head":
            hits = {p for p in params if p.startswith(head + ".")}
        else:
            hits = {p for p in params
                    if fnmatch.fnmatchcase(p, pattern) or fnmatch.fnmatchcase(p, pattern + ".*")}
        if not hits:
            raise ConfigError(f"allow_init pattern {pattern!r} matches no target parameter",
                              key="allow_init",
                              hint=f"parameter names look like: {', '.join(params[:6])} ...")
        allowed |= hits
    return allowed

def summary(config: MigrateConfig, target_cfg: ModelConfig, in_chans: int, num_classes: int,
             stem: str, head: str, maps: list[SourceMap], fused: dict[str, Fused],
             share_all: float, share: float, taken: int, total: int,
             bn: dict[str, Any]) -> dict[str, Any]:
    rules: dict[str, int] = {}
    for f in fused.values():
        rules[f.provenance[0].rule] = rules.get(f.provenance[0].rule, 0) + 1
    stem_f = fused.get(f"{stem}.weight")
    head_f = fused.get(f"{head}.weight")
    head_rows = (num_classes if head_f.rows is None else int(head_f.rows.sum())) if head_f else 0
    zero = bn.get("zero_shot_after_bn") or bn.get("zero_shot_before_bn")
    return {
        "target": {"arch": target_cfg.arch, "python": target_cfg.python, "in_chans": in_chans,
                   "num_classes": num_classes},
        "fuse": config.fuse,
        "coverage": share_all, "coverage_required": share, "params_from_source": taken,
        "params_total": total, "min_coverage": config.min_coverage,
        "rules": rules,
        "stem": {"module": stem, "adaptation": (
            (stem_f.provenance[0].adaptation or "").removeprefix("stem ") or None
            if stem_f else "initialised")},
        "head": {"module": head, "rows_from_source": head_rows, "rows": num_classes,
                 "how": (head_f.provenance[0].adaptation or "copied") if head_f else
                 "initialised"},
        "sources": [{"source": m.label, "weight": m.weight, "tensors_used": len(m.mapped),
                     "tensors_unused": len(m.unused), "notes": m.notes} for m in maps],
        "bn": {k: v for k, v in bn.items() if not k.startswith("zero_shot")},
        "zero_shot": None if zero is None else {
            "split": bn["zero_shot_split"], "n": zero["n"],
            "top1_pct": zero["top1_pct"],
            "top1_pct_before_bn": bn["zero_shot_before_bn"]["top1_pct"],
            "top1_pct_after_bn": (bn.get("zero_shot_after_bn") or {}).get("top1_pct")},
    }

def largest_missing(target_state: dict[str, torch.Tensor], params: dict[str, Any],
                     fused: dict[str, Fused], maps: list[SourceMap], allowed: set[str]) -> str:
    rows = [t for t in tensor_rows(target_state, params, fused, maps, allowed)
            if t["kind"] == "parameter" and t["status"] in ("initialised", "partial")
            and t["target"] not in allowed]
    rows.sort(key=lambda t: -t["numel"] * (1 - t.get("fraction", 0.0)))
    return "; ".join(f"{t['target']} {t['shape']} ({t['numel']:,} params, "
                     f"{t.get('reason') or t['status']})" for t in rows[:5])

def tensor_rows(target_state: dict[str, torch.Tensor], params: dict[str, Any],
                 fused: dict[str, Fused], maps: list[SourceMap],
                 allowed: set[str]) -> list[dict[str, Any]]:
    reasons: dict[str, str] = {}
    for m in maps:
        for mm in m.mismatched:
            reasons.setdefault(mm.target, f"{m.label}: {mm.describe()}")
    rows = []
    for key, tensor in target_state.items():
        entry: dict[str, Any] = {"target": key, "shape": list(tensor.shape),
                                 "numel": tensor.numel(),
                                 "kind": "parameter" if key in params else "buffer"}
        f = fused.get(key)
        if f is None:
            entry["status"] = "initialised"
            entry["reason"] = reasons.get(key) or "no source tensor matched"
            if key in allowed:
                entry["reason"] += " (allow_init)"
        else:
            adapted = any(p.adaptation for p in f.provenance)
            entry["status"] = ("partial" if f.rows is not None else
                               "adapted" if adapted else "loaded")
            if f.rows is not None:
                entry["fraction"] = float(f.rows.float().mean())
            entry["from"] = [asdict(p) for p in f.provenance]
        rows.append(entry)
    return rows


def metrics(summary: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    zero = summary["zero_shot"]
    out: dict[str, Any] = {
        "coverage": round(summary["coverage"], 6),
        "coverage_required": round(summary["coverage_required"], 6),
        "tensors_by_rule": summary["rules"], "stem": summary["stem"]["adaptation"],
        "head_rows_from_source": summary["head"]["rows_from_source"],
        "bn_recalibrated": summary["bn"]["ran"]}
    lines = [f"coverage {summary['coverage']:.1%} of parameters from a source "
             f"({', '.join(f'{n} {r}' for r, n in summary['rules'].items())} tensors)"]
    if summary["stem"]["adaptation"]:
        lines.append(f"stem {summary['stem']['module']}: input channels "
                     f"{summary['stem']['adaptation']}")
    lines.append(f"head {summary['head']['module']}: {summary['head']['rows_from_source']}/"
                 f"{summary['head']['rows']} rows from a source")
    if zero is not None:
        out["zero_shot_top1_pct"] = zero["top1_pct"]
        out["zero_shot_split"] = zero["split"]
        out["zero_shot_top1_pct_before_bn"] = zero["top1_pct_before_bn"]
        text = f"zero-shot {zero['split']} accuracy {zero['top1_pct']:.1f}% (n={zero['n']})"
        if zero["top1_pct_after_bn"] is not None:
            text += f"; {zero['top1_pct_before_bn']:.1f}% before BatchNorm re-estimation"
        lines.append(text)
    _grow.metrics(summary, out, lines)
    return out, lines


def markdown(name: str, summary: dict[str, Any], tensors: list[dict[str, Any]],
              maps: list[SourceMap]) -> str:
    t = summary["target"]
    out = [f"# Migration: {name}", "",
           f"Target: {t['arch'] or t['python']}, {t['in_chans']} input channel(s), "
           f"{t['num_classes']} classes. Sources fused by `{summary['fuse']}`.", "",
           f"**Coverage: {summary['coverage']:.2%}** of parameters taken from a source "
           f"({summary['params_from_source']:,} of {summary['params_total']:,}); "
           f"{summary['coverage_required']:.2%} outside allow_init.", "",
           "| rule | tensors |", "|---|---|"]
    out += [f"| {r} | {n} |" for r, n in summary["rules"].items()]
    out += ["", f"- stem `{summary['stem']['module']}`: {summary['stem']['adaptation'] or 'copied'}",
            f"- head `{summary['head']['module']}`: {summary['head']['rows_from_source']}/"
            f"{summary['head']['rows']} rows from a source ({summary['head']['how']})"]
    bn = summary["bn"]
    out.append("- BatchNorm re-estimation: " + (
        f"ran on {bn.get('samples')} target samples ({'; '.join(bn['reasons']) or 'asked for'})"
        if bn["ran"] else f"not run (recalibrate_bn: {bn['setting']})"))
    zero = summary["zero_shot"]
    if zero is not None:
        text = (f"- zero-shot top-1 on {zero['split']} (n={zero['n']}): "
                f"{zero['top1_pct']:.2f}%")
        if zero["top1_pct_after_bn"] is not None:
            text += f" (before BatchNorm re-estimation: {zero['top1_pct_before_bn']:.2f}%)"
        out.append(text)
    growth = _grow.markdown(summary)
    if growth:
        out += ["", "## Growth and function match", ""] + growth
    out += ["", "## Sources", "", "| source | weight | tensors used | unused | notes |",
            "|---|---|---|---|---|"]
    for m in maps:
        out.append(f"| {m.label} | {m.weight:g} | {len(m.mapped)} | {len(m.unused)} | "
                   f"{'; '.join(m.notes) or ''} |")
    out += ["", "## Tensors", "", "| target | shape | status | source | key | rule | adaptation |",
            "|---|---|---|---|---|---|---|"]
    for row in tensors:
        shape = "x".join(map(str, row["shape"])) or "scalar"
        if row["status"] in ("initialised", "new"):
            out.append(f"| {row['target']} | {shape} | {row['status']} | | | | {row['reason']} |")
            continue
        for j, p in enumerate(row["from"]):
            share = f" (w={p['weight']:.3g})" if p["weight"] is not None else ""
            first = (f"| {row['target']} | {shape} | {row['status']} " if j == 0
                     else "| | | ")
            out.append(f"{first}| {p['source']}{share} | {p['key']} | {p['rule']} | "
                       f"{p['adaptation'] or ''} |")
    for m in maps:
        if m.unused:
            out += ["", f"Unused tensors of {m.label} ({len(m.unused)}): "
                    + ", ".join(m.unused[:40]) + (" ..." if len(m.unused) > 40 else "")]
    return "\n".join(out) + "\n"
