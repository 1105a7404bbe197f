"""The validate stage's reports: report.json assembled from the measured entries, the run's
earlier stages (timings, curves, per-layer int8 error) and the gates, the bundle's manifest marked,
then report.md / .html / junit.xml written and the run told which gates failed. Apart from
stages/validate.py so the stage file holds the options and the orchestration.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgemml.artifacts import read_json, sha256_file, write_json_atomic
from edgemml.errors import StageError
from edgemml.stages import common

if TYPE_CHECKING:
    from edgemml.config import PreprocessConfig
    from edgemml.report.schema import Report
    from edgemml.stages._validate_plan import Plan
    from edgemml.stages.base import StageContext

# stages/validate.py imports this module, so its config is not imported back, not even for
# type checking (no import cycle): annotations name it through this alias.
ValidateConfig = Any


def _load_baseline(ctx: StageContext, config: ValidateConfig) -> dict[str, Any] | None:
    if config.baseline is None:
        return None
    from edgemml.report import load_report

    path = ctx.resolve(config.baseline)
    report = load_report(path)
    report["_path"] = str(path)
    return report


def _run_context(ctx: StageContext) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Timings of the run's earlier stages (their stage.json) and training curves (history)."""
    order = {n: i for i, n in enumerate(ctx.pipeline.stage_names())}
    stages, curves = [], {}
    for o in sorted(ctx.inputs.values(), key=lambda o: order.get(o.name, len(order))):
        record_path = o.dir / "stage.json"
        record = read_json(record_path) if record_path.is_file() else {}
        metrics = {k: v for k, v in (record.get("metrics") or {}).items()
                   if isinstance(v, (int, float, str, bool)) or v is None}
        row = {"name": o.name, "type": o.type, "wall_time_s": record.get("wall_time_s"),
               "started": record.get("started"), "metrics": metrics}
        quant = o.get("report") if o.type == "quantize" else None
        if quant is not None and quant.is_file():  # per-layer int8 error, for report.html
            doc = read_json(quant)
            row["per_layer"] = {b: doc[b]["per_layer"] for b in ("onnxruntime", "openvino")
                                if isinstance(doc.get(b), dict) and doc[b].get("per_layer")}
        stages.append(row)
        hist = o.get("history")
        if hist is not None and hist.is_file():
            doc = read_json(hist)
            rows = doc.get("epochs") or doc.get("history") if isinstance(doc, dict) else doc
            keep = ("epoch", "train_loss", "val_loss", "train_top1_pct", "val_top1_pct")
            curves[o.name] = [{k: r[k] for k in keep if k in r} for r in rows or []
                              if isinstance(r, dict)]
    return stages, curves


def build_report(ctx: StageContext, config: ValidateConfig, plan: Plan, n: int,
                  classes: list[str], preprocess: PreprocessConfig,
                  entries: list[dict[str, Any]]) -> Report:
    from edgemml import report as rep
    from edgemml.machine import environment
    from edgemml.report.front import build_front
    from edgemml.report.gates import builtin_gates, evaluate_gates, failure_lines, recommend

    if plan.primary is None:
        raise StageError("no reference to compare with")
    baseline = _load_baseline(ctx, config)
    gates = {k: v.model_dump(exclude_none=True) for k, v in config.gates.items()}
    rows = builtin_gates(entries, plan.primary,
                         min_reference_diversity=config.min_reference_diversity,
                         min_correlation=config.min_correlation,
                         min_batch1_agreement=config.min_batch1_agreement)
    _speedups(entries, plan.primary)
    rows += evaluate_gates(entries, gates, baseline)
    sweeps = [s.as_dict() for s in getattr(ctx.pipeline, "sweeps", [])]
    policy = config.recommend if config.recommend != "auto" else (
        "most_accurate" if sweeps else "fastest")
    recommended = recommend(entries, rows, policy)
    front = build_front(entries, rows, primary=plan.primary, policy=policy, sweeps=sweeps)
    require = config.require if config.require != "auto" else ("chosen" if sweeps else "all")
    if require == "chosen":
        _only_the_chosen_is_required(rows, entries, front["chosen"])
    stages, curves = _run_context(ctx)
    data = common.data_config(config, ctx.pipeline, required=False)
    failures = failure_lines(rows)
    if require == "chosen" and front["chosen"] is None and not failures:
        failures = ["no artifact passes every gate (require: chosen)"]
    return {
        "schema": rep.SCHEMA, "version": rep.VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "pipeline": ctx.pipeline.config.name, "stage": ctx.name,
        "status": "failed" if failures else "passed",
        "environment": environment(config.threads),
        "data": {"source": data.source if data else None, "split": config.split, "n": n,
                 "classes": classes, "preprocess": preprocess.model_dump(mode="json")},
        "settings": {"threads": config.threads, "batch_size": config.batch_size,
                     "require": require, "recommend": policy,
                     "latency": config.latency.model_dump()},
        "reference": {"name": plan.primary,
                      "diversity": next(e["diversity"] for e in entries
                                        if e["name"] == plan.primary)},
        "artifacts": entries,  # type: ignore[typeddict-item]
        "gates": rows,  # type: ignore[typeddict-item]
        "gate_failures": failures, "recommended": recommended,
        "baseline": None if baseline is None else {
            "path": baseline["_path"], "created": baseline.get("created"),
            "pipeline": baseline.get("pipeline"), "status": baseline.get("status")},
        "stages": stages, "curves": curves, "bundle": None, "front": front,
    }


def _only_the_chosen_is_required(rows: list[dict[str, Any]], entries: list[dict[str, Any]],
                                 chosen: str | None) -> None:
    """require: chosen — the gates of artifacts other than the chosen one (and its exact twin and
    its reference) do not fail the run; with nothing chosen, every failed gate does."""
    if chosen is None:
        return
    ref = next(e["reference"] for e in entries if e["name"] == chosen)
    keep = {chosen, f"{chosen}[f32]", ref}
    for r in rows:
        r["required"] = r["artifact"] is None or r["artifact"] in keep or (
            r["selector"] == "reference")


def _speedups(entries: list[dict[str, Any]], primary: str) -> None:
    """Each entry's batch-1 speed-up over the primary reference, from the same run's medians."""
    ref = next(e for e in entries if e["name"] == primary)["latency"]["batch1_median_ms"]
    for e in entries:
        ms = e["latency"]["batch1_median_ms"]
        e["speedup"] = ref / ms if ref and ms else None


def _bundle_manifest(ctx: StageContext, plan: Plan, report: Report) -> Path | None:
    """A copy of the bundle's manifest with the recommended artifact per backend marked (the
    bundle itself belongs to its stage and is never modified)."""
    if plan.bundle is None:
        return None
    from edgemml.runtimes import artifact_files

    stage, folder = plan.bundle
    manifest = read_json(folder / "manifest.json")
    manifest = manifest if isinstance(manifest, dict) else {"manifest": manifest}
    by_hash: dict[str, str] = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            by_hash.setdefault(sha256_file(p), p.relative_to(folder).as_posix())
    entries = {e["name"]: e for e in report["artifacts"]}
    marked: dict[str, Any] = {}
    for backend, name in report["recommended"].items():
        if name is None:
            marked[backend] = None
            continue
        e = entries[name]
        files = [by_hash.get(sha256_file(f)) for f in artifact_files(Path(e["path"]))]
        marked[backend] = {
            "artifact": name, "files_in_bundle": [f for f in files if f] or None,
            "top1_pct": e["accuracy"]["top1_pct"], "agreement": e["parity"].get("agreement"),
            "batch1_median_ms": e["latency"]["batch1_median_ms"], "size_mb": e["size_mb"],
            "runtime_precision": e["runtime_precision"]}
    manifest["recommended"] = marked
    manifest["validation"] = {"status": report["status"], "report": "report.json",
                              "gates_failed": len(report["gate_failures"]),
                              "threads": report["environment"]["threads"],
                              "split": report["data"]["split"], "samples": report["data"]["n"]}
    path = ctx.path("bundle-manifest.json")
    write_json_atomic(path, manifest)
    report["bundle"] = {"stage": stage, "source": str(folder), "manifest": path.name}
    return path


def finish(ctx: StageContext, config: ValidateConfig, plan: Plan,
            report: Report) -> dict[str, Path]:
    from edgemml.report import write_reports
    from edgemml.report.gates import required_failures

    outputs: dict[str, Path] = {}
    manifest = _bundle_manifest(ctx, plan, report)
    if manifest is not None:
        outputs["bundle-manifest"] = manifest
    outputs.update(write_reports(report, ctx.work_dir))
    rows = report["gates"]
    n_fail = sum(r["status"] == "fail" for r in rows)
    optional = n_fail - required_failures(rows)
    ctx.highlight(f"gates: {len(rows) - n_fail} passed, {n_fail} failed"
                  + (f" ({optional} of artifacts not chosen: not required)" if optional else ""))
    front = report["front"]
    for backend, name in report["recommended"].items():
        ctx.highlight(f"recommended for {backend}: {name or 'none (no artifact passes)'}")
    if front["sweeps"] or front["policy"] == "most_accurate":
        ctx.highlight(_front_line(front))
    ctx.highlight(f"report: {ctx.final_dir / 'report.html'} (also report.md, report.json, "
                  f"junit.xml)")
    ctx.record(
        status=report["status"], samples=report["data"]["n"], threads=config.threads,
        recommended=report["recommended"], gates=rows, front_chosen=front["chosen"],
        artifacts={e["name"]: {"top1_pct": e["accuracy"]["top1_pct"],
                               "agreement": e["parity"].get("agreement"),
                               "batch1_median_ms": e["latency"]["batch1_median_ms"],
                               "size_mb": e["size_mb"]} for e in report["artifacts"]})
    ctx.fail_gates(report["gate_failures"])
    for line in report["gate_failures"]:
        ctx.warn(f"gate failed: {line}")
    skipped = [r["gate"] for r in rows if r["status"] == "skip" and r["artifact"] is None]
    if skipped:
        ctx.warn(f"not checked, no baseline report given: {', '.join(sorted(set(skipped)))}")
    return outputs


def _front_line(front: dict[str, Any]) -> str:
    chosen = next((r for r in front["artifacts"] if r["chosen"]), None)
    if chosen is None:
        return "front: no artifact passes every gate"
    parts = [f"top-1 {chosen['top1_pct']:.2f}%" if chosen["top1_pct"] is not None else None,
             f"{chosen['top1_vs_reference_pp']:+.2f} pp vs {front['reference']}"
             if chosen["top1_vs_reference_pp"] is not None else None,
             f"{chosen['batch1_median_ms']:.3f} ms",
             f"{chosen['speedup']:.1f}x faster" if chosen["speedup"] else None]
    what = ("the most accurate artifact passing every gate" if front["policy"] == "most_accurate"
            else "the fastest artifact passing every gate")
    return f"front: {what} is {chosen['name']} ({', '.join(p for p in parts if p)})"
