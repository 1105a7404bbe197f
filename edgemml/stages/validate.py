"""validate: every artifact of the run (or given files) on held-out data, against gates.

Each artifact (the torch reference, every ONNX and OpenVINO model, fp32/fp16/int8) runs on the same
real test samples through the same preprocessing: accuracy, parity with the reference, latency at
a fixed thread count, size, parameters and MACs. Gates turn those figures into pass/fail; a failed
gate does not raise here: every report is written first, then the runner exits 1 (also when this
stage is cached, so a CI re-run stays red).


The stage is split in three: what to measure (_validate_plan.py), measuring one artifact
(edgemml.evaluation, through the runtime layer), and gates and reports (edgemml.report). This module
holds the options and the orchestration.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from edgemml.artifacts import read_json, sha256_file, write_json_atomic
from edgemml.config import DataConfig, LoadedPipeline, PreprocessConfig, StageConfig, StrictModel
from edgemml.errors import StageError
from edgemml.report.gates import GateLimits, check_selector
from edgemml.stages import common
from edgemml.stages._validate_robustness import GATE_METRICS, RobustnessConfig
from edgemml.stages.base import Stage, StageContext

if TYPE_CHECKING:
    from edgemml.evaluation import Measured
    from edgemml.report.schema import Report
    from edgemml.stages._validate_plan import Plan

NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.@-]*$")


class LatencyConfig(StrictModel):
    """How latency is measured: warm-up calls, then the median and p90 of timed calls."""

    runs: int = Field(50, ge=1, description="Timed batch-1 calls per artifact.")
    warmup: int = Field(5, ge=0, description="Untimed calls before timing.")
    batch: int = Field(32, ge=1, description="Batch size of the throughput measurement.")
    throughput_runs: int = Field(10, ge=1, description="Timed calls at that batch size.")


class ArtifactSpec(StrictModel):
    """A model file to validate that no earlier stage produced (a model made elsewhere)."""

    path: Path = Field(..., description="An .onnx file, an OpenVINO folder (model.xml + model.bin) "
                       "or .xml file, an ExecuTorch .pte, a LiteRT .tflite, or an edgemml model "
                       "folder (model.json + model.safetensors).")
    name: str | None = Field(None, description="Name in the report and in gate selectors "
                             "(default: <format>-<precision> read from the graph).")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not NAME_RE.match(value):
            raise ValueError("use letters, digits, '_', '-', '.', '@', starting with a letter")
        return value


class ValidateConfig(StageConfig):
    """Options of the validate stage."""

    type: Literal["validate"] = Field(..., description="validate")
    data: DataConfig | None = Field(None, description="Data (default: the pipeline's).")
    preprocess: PreprocessConfig | None = Field(
        None, description="Preprocessing when the reference model does not record its own.")
    split: Literal["test", "val"] = Field("test", description="Split evaluated (held-out data).")
    samples: int | None = Field(None, ge=1, description="Evaluate only this many samples of the "
                                "split (stratified, seeded); default all.")
    batch_size: int = Field(64, ge=1, description="Batch size of the accuracy pass.")
    threads: int = Field(1, ge=1, description="Threads of every runtime (fixed and recorded so "
                         "timings compare across artifacts and runs).")
    latency: LatencyConfig = Field(default_factory=LatencyConfig, description="Latency settings.")
    gates: dict[str, GateLimits] = Field(
        default_factory=dict, description="{selector: limits}; a selector is an artifact name "
        "(onnx-fp32, openvino-int8, openvino-fp32[f32], litert-int8, torch) or a group (all, onnx, "
        "openvino, executorch, litert, fp32, fp16, int8, deployed, exact). `all` covers every "
        "artifact but not the reference.")
    baseline: Path | None = Field(None, description="report.json of an earlier run: enables "
                                  "`max_regression` gates and shows the differences.")
    min_correlation: float | None = Field(
        0.9, ge=-1, le=1, description="Always-on parity sanity gate for every artifact: "
        "correlation with the reference's logits over the samples (null disables).")
    min_reference_diversity: float | None = Field(
        0.5, ge=0, le=1, description="Always-on gate: the reference must predict at least this "
        "fraction of the classes present, or parity proves nothing (null disables).")
    artifacts: list[ArtifactSpec] = Field(default_factory=list,
                                          description="Extra model files to validate.")
    reference: Path | None = Field(
        None, description="Reference model (edgemml model folder, or an artifact file) when no "
        "earlier stage provides one; default: the nearest earlier model, else the first artifact.")
    bundle: Path | None = Field(None, description="A bundle folder (manifest.json) made elsewhere: "
                                "its models are validated and its manifest copy marked.")
    robustness: RobustnessConfig | None = Field(
        None, description="Opt-in: every artifact's top-1 under adversarial inputs (FGSM/PGD "
        "crafted white-box on the torch reference, replayed on the others: a transfer attack) and "
        "common corruptions; gates min_robust_top1 / max_robust_drop read it.")
    roofline: Literal["auto", "off"] | Path = Field(
        "auto", description="Peak MAC rates each artifact's achieved rate is divided by (`% of "
        "peak`). auto: this machine's, per runtime and precision at `threads`, measured on first "
        "use and cached (`edgemml roofline`); off: only GMAC/s is reported; a path: a "
        "file written by `edgemml roofline --out`, used only when it was measured on this CPU, "
        "with these libraries and at this thread count (otherwise it is ignored, with a warning).")
    require: Literal["auto", "all", "chosen"] = Field(
        "auto", description="When the run fails (exit 1): all: any gate of any artifact fails; "
        "chosen: no artifact passes every gate (the others' failed gates are reported as not "
        "required: in a sweep the slower points are expected to miss a latency budget); auto: "
        "chosen with a `sweep:`, else all.")
    recommend: Literal["auto", "fastest", "most_accurate"] = Field(
        "auto", description="Which passing artifact is recommended: fastest (per backend, the "
        "fastest artifact passing every gate), most_accurate (the most accurate one passing every "
        "gate, e.g. the best point of a sweep that meets max_latency_ms), auto: most_accurate "
        "when the pipeline has a `sweep:`, else fastest.")

    @field_validator("roofline", mode="before")
    @classmethod
    def _roofline_words(cls, value: Any) -> Any:
        """YAML reads a bare `off` as false (and `on` as true): take them as the words."""
        if value is False or value is None:
            return "off"
        return "auto" if value is True else value

    @field_validator("gates")
    @classmethod
    def _selectors(cls, value: dict[str, GateLimits]) -> dict[str, GateLimits]:
        for key in value:
            check_selector(key)
        return value

    @model_validator(mode="after")
    def _robust_gates_need_the_pass(self) -> ValidateConfig:
        used = [f"{sel}.{m}" for sel, lim in self.gates.items() for m in GATE_METRICS
                if getattr(lim, m) is not None]
        if used and self.robustness is None:
            raise ValueError(f"gates {', '.join(used)} read robustness figures: add a "
                             "`robustness: {}` block (defaults) to this stage")
        return self


class ValidateStage(Stage[ValidateConfig]):
    """Accuracy parity, latency and size of every artifact; gates; report.{json,md,html}, junit."""

    type = "validate"
    Config = ValidateConfig
    version = 2
    requires = ("torch", "onnx", "onnxruntime", "openvino", "torch-pruning", "numpy", "executorch",
                "ai-edge-litert")
    provides = ("report", "report-md", "junit", "report-html", "bundle-manifest")
    reads_all_earlier = True

    @classmethod
    def needs_input(cls, config: ValidateConfig) -> bool:
        return False  # it reads every earlier stage, and may validate files alone

    @classmethod
    def data_files(cls, config: ValidateConfig, pipeline: LoadedPipeline) -> list[Path]:
        paths = common.stage_data_files(config, pipeline)
        roofline = config.roofline if isinstance(config.roofline, Path) else None
        for p in [config.baseline, config.reference, config.bundle, roofline,
                  *(a.path for a in config.artifacts)]:
            if p is not None:
                paths.append(pipeline.resolve_path(p))
        return paths

    def run(self, ctx: StageContext, config: ValidateConfig) -> dict[str, Path]:
        from edgemml.data.datasets import stratified_sample
        from edgemml.roofline import describe as describe_roofline
        from edgemml.stages._validate_plan import check_bundle_labels, make_plan

        plan = make_plan(ctx, config)
        preprocess, _ = common.model_preprocess(plan.preprocess, config, ctx.pipeline,
                                                source="the reference model", warn=ctx.warn)
        splits = common.load_stage_data(ctx, config, preprocess=preprocess)
        dataset = splits.split(config.split)
        if config.samples is not None and config.samples < len(dataset):
            dataset = dataset.subset(stratified_sample(dataset.labels, config.samples, ctx.seed),
                                     config.split)
        if len(dataset) == 0:
            raise StageError(f"the {config.split} split is empty: there is nothing to validate on",
                             key="data.split", hint="raise data.split.test or give data.splits")
        classes = list(splits.classes)
        if plan.classes and list(plan.classes) != classes:
            raise StageError(f"the model's classes ({', '.join(plan.classes[:12])}) differ from "
                             f"the data's ({', '.join(classes[:12])})", key="data",
                             hint="validate on data with the label set the model was trained on")
        if plan.bundle is not None:
            check_bundle_labels(plan.bundle[1], classes)
        entries, roof = _measure_all(ctx, config, plan, dataset, classes)
        section = None
        if config.robustness is not None:
            from edgemml.stages._validate_robustness import run_robustness

            robust, section = run_robustness(ctx, config, plan, dataset,
                                             preprocess.model_dump(mode="json"))
            for e in entries:
                e["robustness"] = robust.get(e["name"])
        report = _build_report(ctx, config, plan, len(dataset), classes, preprocess, entries)
        report["robustness"] = section
        report["roofline"] = None if roof is None else describe_roofline(roof)
        return _finish(ctx, config, plan, report)


def _measure_all(ctx: StageContext, config: ValidateConfig, plan: Plan, dataset: Any,
                 classes: list[str]) -> tuple[list[dict[str, Any]], Any]:
    """Every subject on the same samples, references first (their logits are what artifacts are
    compared with)."""
    from edgemml.evaluation import (LatencySettings, Samples, check_input_shape, count_macs,
                                    measure, open_subject)

    samples = Samples(dataset, config.batch_size)
    lat = config.latency
    settings = LatencySettings(warmup=lat.warmup, runs=lat.runs, batch=lat.batch,
                               throughput_runs=lat.throughput_runs)
    latency_x = samples.first(lat.batch)
    roof = _roofline(ctx, config)
    measured: dict[str, Measured] = {}
    with ctx.progress("evaluating artifacts", total=len(plan.subjects)) as bar:
        for subject in plan.subjects:
            bar.update(description=f"{ctx.name}: {subject.name}")
            runner = open_subject(subject, config.threads)
            check_input_shape(subject, runner, samples.shape, dataset.spec)
            ref = subject.reference or subject.name
            measured[subject.name] = measure(
                subject, runner, samples, classes, reference=measured.get(ref),
                latency=settings, latency_x=latency_x, roofline=roof,
                macs=count_macs(subject, samples.shape, measured))
            bar.advance()
    return [m.entry for m in measured.values()], roof  # type: ignore[misc]


def _roofline(ctx: StageContext, config: ValidateConfig) -> Any:
    """This machine's peaks at the run's thread count (cached per CPU, libraries and threads), a
    given roofline file when it was measured here, or None."""
    from edgemml import roofline

    setting = config.roofline
    if setting == "off":
        return None
    if setting == "auto":
        path = roofline.cache_path(config.threads)
        if not path.is_file():
            ctx.log(f"measuring this machine's peak MAC rates at {config.threads} thread(s) "
                    f"(once; cached in {path.parent})")
        with ctx.progress("roofline (peak MAC rates)", None):
            return roofline.cached(config.threads, warn=ctx.warn)
    path = ctx.resolve(setting)
    try:
        return roofline.load(path, threads=config.threads)
    except roofline.RooflineMismatch as exc:
        ctx.warn(f"{exc.message}: not used, so `% of peak` is not reported (roofline: auto "
                 f"measures it here)")
        return None


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


def _build_report(ctx: StageContext, config: ValidateConfig, plan: Plan, n: int,
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
                         min_correlation=config.min_correlation)
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


def _finish(ctx: StageContext, config: ValidateConfig, plan: Plan,
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


STAGE = ValidateStage
