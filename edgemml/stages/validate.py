"""validate: every artifact of the run (or given files) on held-out data, against gates.

Each artifact (the torch reference, every ONNX and OpenVINO model, fp32/fp16/int8) runs on the same
real test samples through the same preprocessing: accuracy, parity with the reference, latency at
a fixed thread count, size, parameters and MACs. Gates turn those figures into pass/fail; a failed
gate does not raise here: every report is written first, then the runner exits 1 (also when this
stage is cached, so a CI re-run stays red).
"""

from __future__ import annotations

import platform
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from edgemml.artifacts import read_json, sha256_file, write_json_atomic
from edgemml.config import (
    DataConfig,
    LoadedPipeline,
    PreprocessConfig,
    StageConfig,
    StrictModel,
    stage_name,
)
from edgemml.errors import InputError, StageError
from edgemml.report.gates import GateLimits, check_selector
from edgemml.stages import common
from edgemml.stages.base import Stage, StageContext

if TYPE_CHECKING:
    from edgemml.evaluation import Predictor

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
                       "or .xml file, or an edgemml model folder (model.json + model.safetensors).")
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
        "(onnx-fp32, openvino-int8, openvino-fp32[f32], torch) or a group (all, onnx, openvino, "
        "fp32, fp16, int8, deployed, exact). `all` covers every artifact but not the reference.")
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
    roofline: Path | None = Field(
        None, description="roofline.json written by benchmarks/roofline.py on this machine: each "
        "artifact's achieved MAC rate is also given as a fraction of the measured int8 / fp32 "
        "peak. Without it, only the achieved GMAC/s is reported.")

    @field_validator("gates")
    @classmethod
    def _selectors(cls, value: dict[str, GateLimits]) -> dict[str, GateLimits]:
        for key in value:
            check_selector(key)
        return value


class ValidateStage(Stage[ValidateConfig]):
    """Accuracy parity, latency and size of every artifact; gates; report.{json,md,html}, junit."""

    type = "validate"
    Config = ValidateConfig
    version = 1
    requires = ("torch", "onnx", "onnxruntime", "openvino", "torch-pruning", "numpy")
    code = ("edgemml.models", "edgemml.data", "edgemml.stages.common", "edgemml.evaluation",
            "edgemml.report", "edgemml.exporters", "edgemml.training")
    provides = ("report", "report-md", "junit", "report-html", "bundle-manifest")
    reads_all_earlier = True

    @classmethod
    def needs_input(cls, config: ValidateConfig) -> bool:
        return False  # it reads every earlier stage, and may validate files alone

    @classmethod
    def data_files(cls, config: ValidateConfig, pipeline: LoadedPipeline) -> list[Path]:
        paths = common.stage_data_files(config, pipeline)
        for p in [config.baseline, config.reference, config.bundle, config.roofline,
                  *(a.path for a in config.artifacts)]:
            if p is not None:
                paths.append(pipeline.resolve_path(p))
        return paths

    def run(self, ctx: StageContext, config: ValidateConfig) -> dict[str, Path]:
        plan = _plan(ctx, config)
        preprocess = _preprocess(ctx, config, plan)
        splits = common.load_stage_data(ctx, config, preprocess=preprocess)
        dataset = splits.split(config.split)
        if config.samples is not None and config.samples < len(dataset):
            from edgemml.data.datasets import stratified_sample

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
        entries = _Evaluator(ctx, config, dataset, classes).run_all(plan.items)
        baseline = _load_baseline(ctx, config)
        report = _build_report(ctx, config, plan, dataset, classes, preprocess, entries, baseline)
        return _finish(ctx, config, plan, report)



# --------------------------------------------------------------------------------------------------
# What to validate
# --------------------------------------------------------------------------------------------------


class _Item:
    """One evaluation: a model file in one runtime mode, and the entry it compares against."""

    def __init__(self, name: str, fmt: str, precision: str, mode: str, path: Path, *,
                 key: str | None = None, stage: str | None = None, reference: str | None = None,
                 model: Any = None, spec: Any = None, macs_from: str | None = None) -> None:
        self.name, self.format, self.precision, self.mode, self.path = name, fmt, precision, mode, path
        self.key, self.stage, self.reference = key or name, stage, reference
        self.model, self.spec, self.macs_from = model, spec, macs_from


class _Plan:
    def __init__(self) -> None:
        self.items: list[_Item] = []
        self.primary: str | None = None
        self.preprocess: dict[str, Any] | None = None
        self.classes: list[str] | None = None
        self.bundle: tuple[str | None, Path] | None = None


def _torch_item(name: str, folder: Path, stage: str | None) -> _Item:
    from edgemml.models import load_model

    model, spec = load_model(folder)
    return _Item(name, "torch", "fp32", "reference", folder, key="torch", stage=stage,
                 model=model, spec=spec)


def _artifact_items(name: str, path: Path, *, key: str | None = None, stage: str | None = None,
                    reference: str | None = None, macs_from: str | None = None) -> list[_Item]:
    """One item per runtime mode: ONNX once, OpenVINO as deployed and with f32 pinned."""
    from edgemml import evaluation as ev

    fmt = ev.artifact_format(path)
    if fmt == "torch":
        raise InputError(f"{path} is a torch model folder; give it as `reference:`", file=path)
    precision = key.rsplit("-", 1)[1] if key else ev.artifact_precision(path)
    common_args = dict(key=key or f"{fmt}-{precision}", stage=stage, reference=reference,
                       macs_from=macs_from)
    if fmt == "onnx":
        return [_Item(name, fmt, precision, "deployed", path, **common_args)]
    return [_Item(name, fmt, precision, "deployed", path, **common_args),
            _Item(f"{name}[f32]", fmt, precision, "exact", path, **common_args)]


def _safe(text: str) -> str:
    text = re.sub(r"[^A-Za-z0-9_-]", "_", text)
    return text if text[:1].isalpha() else f"m{text}"


def _scan_bundle(folder: Path) -> tuple[dict[str, Any], list[Path]]:
    """A bundle made elsewhere: its manifest and the model files inside it."""
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise InputError(f"{folder} is not a bundle: manifest.json is missing", file=folder)
    try:
        manifest = read_json(manifest_path)
    except (OSError, ValueError) as exc:
        raise InputError(f"unreadable bundle manifest: {exc}", file=manifest_path) from None
    files = sorted(p for p in folder.rglob("*.onnx"))
    files += sorted(p.parent if p.name == "model.xml" else p for p in folder.rglob("*.xml")
                    if p.with_suffix(".bin").is_file())
    return manifest if isinstance(manifest, dict) else {}, files


def _manifest_meta(plan: _Plan, manifest: dict[str, Any], folder: Path) -> None:
    pre = manifest.get("preprocess")
    if not isinstance(pre, dict) and (folder / "preprocess.json").is_file():
        pre = read_json(folder / "preprocess.json")
    if isinstance(pre, dict) and plan.preprocess is None:
        plan.preprocess = pre
    for key in ("class_names", "classes", "labels"):
        if isinstance(manifest.get(key), list) and plan.classes is None:
            plan.classes = [str(c) for c in manifest[key]]
            break


def _plan(ctx: StageContext, config: ValidateConfig) -> _Plan:
    """The references and artifacts to evaluate, references first."""
    from edgemml import evaluation as ev

    plan = _Plan()
    order = {n: i for i, n in enumerate(ctx.pipeline.stage_names())}
    stages = sorted(ctx.inputs.values(), key=lambda o: order.get(o.name, len(order)))
    model_stages = [o for o in stages if o.get("model") is not None]
    refs: dict[str, _Item] = {}

    inputs = {stage_name(c): c.input for c in ctx.pipeline.stages}

    def ref_for(name: str) -> str:
        """The torch model an artifact was made from: the model stage its stage names as `input:`
        (e.g. the int8 of the model before a rewrite), else the nearest model stage up to its own."""
        own = any(o.name == name for o in model_stages)
        named = [] if own else [o for o in model_stages if o.name == inputs.get(name)]
        src = named or [o for o in model_stages if order[o.name] <= order[name]]
        if not src:
            return plan.primary or ""
        o = src[-1]
        name = "torch" if o is model_stages[-1] else f"torch@{o.name}"
        if name not in refs:
            refs[name] = _torch_item(name, o["model"], o.name)
        return name

    explicit: str | None = None
    if config.input:
        out = ctx.input(config.input)
        if out.get("model") is None:
            raise StageError(f"stage {config.input!r} has no model to use as the reference",
                             key="input")
        refs["torch"] = _torch_item("torch", out["model"], out.name)
        explicit = plan.primary = "torch"
    elif config.reference is not None:
        path = ctx.resolve(config.reference)
        if ev.artifact_format(path) == "torch":
            refs["torch"] = _torch_item("torch", path, None)
            explicit = plan.primary = "torch"
    elif model_stages:
        plan.primary = ref_for(model_stages[-1].name)

    arts: list[_Item] = []
    keys = [k for o in stages for k in o.outputs if ev.ARTIFACT_KEY_RE.match(k)]
    for o in stages:
        for key, path in o.outputs.items():
            if not ev.ARTIFACT_KEY_RE.match(key):
                continue
            name = key if keys.count(key) == 1 else f"{key}@{o.name}"
            ref = explicit or (ref_for(o.name) if model_stages else None)
            arts += _artifact_items(name, path, key=key, stage=o.name, reference=ref, macs_from=ref)
        bundle = o.get("bundle")
        if bundle is not None and (bundle / "manifest.json").is_file():
            plan.bundle = (o.name, bundle)

    given: list[tuple[str | None, Path]] = [(a.name, ctx.resolve(a.path)) for a in config.artifacts]
    if config.bundle is not None:
        folder = ctx.resolve(config.bundle)
        manifest, files = _scan_bundle(folder)
        _manifest_meta(plan, manifest, folder)
        plan.bundle = (None, folder)
        given += [(None, f) for f in files]
    if config.reference is not None and plan.primary is None:
        given.insert(0, (None, ctx.resolve(config.reference)))
    taken = {i.name for i in arts} | set(refs)
    for i, (name, path) in enumerate(given):
        if name is None:
            name = f"{ev.artifact_format(path)}-{ev.artifact_precision(path)}"
            if name in taken:
                name = f"{name}@{_safe(path.stem if path.suffix else path.name)}"
        if name in taken:
            raise StageError(f"two artifacts are named {name!r}", key="artifacts",
                             hint="give each entry of `artifacts:` its own `name:`")
        taken.add(name)
        items = _artifact_items(name, path, reference=plan.primary)
        if plan.primary is None:  # no torch model anywhere: the first file is the reference
            plan.primary = items[-1].name  # OpenVINO: its f32 twin, the exact one
            items = items[::-1]
            for it in items:
                it.reference = plan.primary
        arts += items

    if plan.primary is None:
        raise StageError("nothing to validate: no earlier stage produced a model or an artifact, "
                         "and no `artifacts:`, `reference:` or `bundle:` is given",
                         hint="put validate after export/quantize, or list model files under "
                              "`artifacts:`")
    primary_ref = refs.get(plan.primary)
    if primary_ref is not None:
        for name, item in refs.items():
            item.reference = plan.primary
        pre = primary_ref.spec.extra.get("preprocess")
        if isinstance(pre, dict):
            plan.preprocess = pre
        if primary_ref.spec.class_names:
            plan.classes = list(primary_ref.spec.class_names)
    ordered_refs = ([refs[plan.primary]] if primary_ref is not None else []) + [
        r for n, r in refs.items() if n != plan.primary]
    plan.items = ordered_refs + arts
    return plan


def _preprocess(ctx: StageContext, config: ValidateConfig, plan: _Plan) -> PreprocessConfig:
    """The reference's recorded preprocessing (what it was trained with), else the stage's."""
    own = common.preprocess_config(config, ctx.pipeline)
    if plan.preprocess is None:
        return own
    try:
        recorded = PreprocessConfig.model_validate(plan.preprocess)
    except ValueError as exc:
        raise StageError(f"the reference's recorded preprocessing is invalid: {exc}") from None
    if recorded != own:
        ctx.warn("validating with the preprocessing recorded with the model, which differs from "
                 "the pipeline's `preprocess:`")
    return recorded


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------


class _Evaluator:
    """Runs each item on the dataset and times it; keeps reference logits for parity."""

    def __init__(self, ctx: StageContext, config: ValidateConfig, dataset: Any,
                 classes: list[str]) -> None:
        from edgemml import evaluation as ev

        self.ctx, self.config, self.dataset, self.classes = ctx, config, dataset, classes
        self.shape = (1, *tuple(dataset[0][0].shape))
        self.latency_inputs = ev.sample_inputs(dataset, config.latency.batch)
        self.logits: dict[str, Any] = {}
        self.entries: dict[str, dict[str, Any]] = {}
        self.peaks = (ev.roofline_peaks(ctx.resolve(config.roofline))
                      if config.roofline is not None else None)

    def run_all(self, items: list[_Item]) -> list[dict[str, Any]]:
        with self.ctx.progress("evaluating artifacts", total=len(items)) as bar:
            for item in items:
                bar.update(description=f"{self.ctx.name}: {item.name}")
                self.entries[item.name] = self.evaluate(item)
                bar.advance()
        return list(self.entries.values())

    def _predictor(self, item: _Item) -> Predictor:
        from edgemml import evaluation as ev

        threads = self.config.threads
        if item.format == "torch":
            return ev.torch_predictor(item.model, threads=threads, name=item.name)
        if item.format == "onnx":
            return ev.onnx_predictor(item.path, threads=threads, name=item.name)
        return ev.openvino_predictor(item.path, threads=threads, exact=item.mode == "exact",
                                     name=item.name)

    def evaluate(self, item: _Item) -> dict[str, Any]:
        from edgemml import evaluation as ev

        cfg = self.config
        pred = self._predictor(item)
        logits, labels = ev.predict(pred, self.dataset, batch_size=cfg.batch_size)
        if logits.shape[1] != len(self.classes):
            raise StageError(f"{item.name} outputs {logits.shape[1]} values per sample but the data "
                             f"has {len(self.classes)} classes", hint="validate a classifier "
                             "trained on this label set")
        self.logits[item.name] = logits
        accuracy = ev.classification_metrics(logits, labels, self.classes)
        ref = item.reference or item.name
        ref_logits = self.logits.get(ref, logits)
        ref_top1 = (self.entries[ref]["accuracy"]["top1_pct"] if ref in self.entries
                    else accuracy["top1_pct"])
        parity = ev.parity_metrics(logits, ref_logits, labels, ref_top1, accuracy["top1_pct"])
        latency = ev.measure_latency(pred, self.latency_inputs, warmup=cfg.latency.warmup,
                                     runs=cfg.latency.runs,
                                     throughput_runs=cfg.latency.throughput_runs)
        notes: dict[str, str] = {}
        if logits.shape[1] <= 10:
            notes["top5_pct"] = "top-5 is reported for more than 10 classes only"
        macs: int | None
        params: int | None
        if item.model is not None:
            macs, params = ev.torch_macs_params(item.model, self.shape)
        elif item.macs_from in self.entries:
            src = self.entries[item.macs_from]
            macs, params = src["macs"], src["params"]
            notes["macs"] = f"counted on {item.macs_from}, the torch model it was exported from"
        elif item.format == "onnx":
            macs, params = ev.onnx_macs_params(item.path)
            notes["macs"] = "counted from the ONNX graph (Conv, Gemm, MatMul)"
        else:
            macs = params = None
            notes["macs"] = "not counted: an OpenVINO IR without its torch model"
        size = ev.size_bytes(item.path)
        backend = {"torch": "torch", "onnx": "onnxruntime", "openvino": "openvino"}[item.format]
        compute = ev.achieved_compute(macs, latency, "int8" if item.precision == "int8" else "fp32",
                                      self.peaks)
        return {
            "name": item.name, "key": item.key, "stage": item.stage, "format": item.format,
            "backend": backend, "precision": item.precision, "mode": item.mode,
            "runtime_precision": "int8" if (item.format == "onnx" and item.precision == "int8")
            else pred.runtime_precision, "path": str(item.path),
            "reference": item.reference, "size_bytes": size, "size_mb": size / 1e6,
            "params": params, "mparams": params / 1e6 if params is not None else None,
            "macs": macs, "mmacs": macs / 1e6 if macs is not None else None,
            "accuracy": accuracy, "parity": parity,
            "diversity": ev.output_diversity(logits, labels), "latency": latency,
            "compute": compute, "passed": None, "recommended": False, "notes": notes,
        }


# --------------------------------------------------------------------------------------------------
# Gates, recommendation, report
# --------------------------------------------------------------------------------------------------


def _load_baseline(ctx: StageContext, config: ValidateConfig) -> dict[str, Any] | None:
    if config.baseline is None:
        return None
    from edgemml.report import load_report

    path = ctx.resolve(config.baseline)
    report = load_report(path)
    report["_path"] = str(path)
    return report


def _builtin_gates(config: ValidateConfig, entries: list[dict[str, Any]],
                   primary: str) -> list[dict[str, Any]]:
    """The always-on honesty checks: a diverse reference, and artifacts that follow it."""
    from edgemml.report.gates import evaluate_gates

    rows: list[dict[str, Any]] = []
    ref = next(e for e in entries if e["name"] == primary)
    if config.min_reference_diversity is not None:
        div = ref["diversity"]
        ok = div["distinct_fraction"] >= config.min_reference_diversity
        rows.append({"gate": "reference.min_diversity", "selector": "reference",
                     "artifact": primary, "metric": "distinct_fraction", "op": ">=",
                     "limit": config.min_reference_diversity, "value": div["distinct_fraction"],
                     "unit": "", "status": "pass" if ok else "fail",
                     "message": f"{div['distinct_predictions']} of {div['classes_in_labels']} "
                                f"classes predicted; parity against a near-constant model "
                                f"proves nothing" if not ok else ""})
    if config.min_correlation is not None:
        others = [e for e in entries if e["name"] != e["reference"]]
        for row in evaluate_gates(others, {"all": {"min_correlation": config.min_correlation}},
                                  None):
            row["gate"], row["selector"] = "parity.min_correlation", "builtin"
            rows.append(row)
        # the secondary torch references (e.g. the unpruned model) are not gated by `all`
    return rows


def _recommend(entries: list[dict[str, Any]], rows: list[dict[str, Any]]) -> dict[str, str | None]:
    """Per backend, the fastest deployed artifact (batch-1 median) passing every gate, its exact
    OpenVINO twin's and its reference's included."""
    failed = {r["artifact"] for r in rows if r["status"] == "fail" and r["artifact"]}
    unmatched = any(r["status"] == "fail" and not r["artifact"] for r in rows)
    for e in entries:
        e["passed"] = e["name"] not in failed
    by_name = {e["name"]: e for e in entries}
    out: dict[str, str | None] = {}
    for backend in ("onnxruntime", "openvino"):
        cands = [e for e in entries if e["backend"] == backend and e["mode"] == "deployed"]
        if not cands:
            continue
        ok = [e for e in cands if e["passed"] and not unmatched
              and by_name.get(f"{e['name']}[f32]", e)["passed"]
              and by_name.get(e["reference"] or e["name"], e)["passed"]]
        best = min(ok, key=lambda e: e["latency"]["batch1_median_ms"], default=None)
        out[backend] = best["name"] if best else None
        if best:
            best["recommended"] = True
    return out


def _environment(threads: int) -> dict[str, Any]:
    from edgemml.pipeline import RECORDED_DISTRIBUTIONS, dist_version

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass  # not Linux: platform.processor() is what there is
    return {"threads": threads, "machine": platform.machine(), "processor": cpu,
            "python": platform.python_version(),
            "versions": {d: dist_version(d) for d in RECORDED_DISTRIBUTIONS}}


def _run_context(ctx: StageContext) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Timings of the run's earlier stages (their stage.json) and training curves (history)."""
    order = {n: i for i, n in enumerate(ctx.pipeline.stage_names())}
    stages, curves = [], {}
    for o in sorted(ctx.inputs.values(), key=lambda o: order.get(o.name, len(order))):
        record_path = o.dir / "stage.json"
        record = read_json(record_path) if record_path.is_file() else {}
        metrics = {k: v for k, v in (record.get("metrics") or {}).items()
                   if isinstance(v, (int, float, str, bool)) or v is None}
        stages.append({"name": o.name, "type": o.type, "wall_time_s": record.get("wall_time_s"),
                       "started": record.get("started"), "metrics": metrics})
        hist = o.get("history")
        if hist is not None and hist.is_file():
            doc = read_json(hist)
            rows = doc.get("epochs") or doc.get("history") if isinstance(doc, dict) else doc
            keep = ("epoch", "train_loss", "val_loss", "train_accuracy", "val_accuracy")
            curves[o.name] = [{k: r[k] for k in keep if k in r} for r in rows or []
                              if isinstance(r, dict)]
    return stages, curves


def _build_report(ctx: StageContext, config: ValidateConfig, plan: _Plan, dataset: Any,
                  classes: list[str], preprocess: PreprocessConfig,
                  entries: list[dict[str, Any]], baseline: dict[str, Any] | None) -> dict[str, Any]:
    from edgemml import report as rep
    from edgemml.report.gates import evaluate_gates, failure_lines

    assert plan.primary is not None
    gates = {k: v.model_dump(exclude_none=True) for k, v in config.gates.items()}
    rows = _builtin_gates(config, entries, plan.primary) + evaluate_gates(entries, gates, baseline)
    recommended = _recommend(entries, rows)
    stages, curves = _run_context(ctx)
    data = common.data_config(config, ctx.pipeline, required=False)
    failures = failure_lines(rows)
    return {
        "schema": rep.SCHEMA, "version": rep.VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "pipeline": ctx.pipeline.config.name, "stage": ctx.name,
        "status": "failed" if failures else "passed",
        "environment": _environment(config.threads),
        "data": {"source": data.source if data else None, "split": config.split,
                 "n": len(dataset), "classes": classes,
                 "preprocess": preprocess.model_dump(mode="json")},
        "settings": {"threads": config.threads, "batch_size": config.batch_size,
                     "latency": config.latency.model_dump()},
        "reference": {"name": plan.primary,
                      "diversity": next(e["diversity"] for e in entries
                                        if e["name"] == plan.primary)},
        "artifacts": entries, "gates": rows, "gate_failures": failures,
        "recommended": recommended,
        "baseline": None if baseline is None else {
            "path": baseline["_path"], "created": baseline.get("created"),
            "pipeline": baseline.get("pipeline"), "status": baseline.get("status")},
        "stages": stages, "curves": curves, "bundle": None,
    }


def _bundle_manifest(ctx: StageContext, plan: _Plan, report: dict[str, Any]) -> Path | None:
    """A copy of the bundle's manifest with the recommended artifact per backend marked (the
    bundle itself belongs to its stage and is never modified)."""
    if plan.bundle is None:
        return None
    from edgemml import evaluation as ev

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
        files = [by_hash.get(sha256_file(f)) for f in ev.artifact_files(Path(e["path"]))]
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


def _finish(ctx: StageContext, config: ValidateConfig, plan: _Plan,
            report: dict[str, Any]) -> dict[str, Path]:
    from edgemml.report import write_reports

    outputs: dict[str, Path] = {}
    manifest = _bundle_manifest(ctx, plan, report)
    if manifest is not None:
        outputs["bundle-manifest"] = manifest
    outputs.update(write_reports(report, ctx.work_dir))
    final = ctx.work_dir.parent / f"{ctx.index + 1:02d}-{ctx.name}"
    rows = report["gates"]
    n_fail = sum(r["status"] == "fail" for r in rows)
    highlights = [f"gates: {len(rows) - n_fail} passed, {n_fail} failed"]
    for backend, name in report["recommended"].items():
        highlights.append(f"recommended for {backend}: {name or 'none (no artifact passes)'}")
    highlights.append(f"report: {final / 'report.html'} (also report.md, report.json, junit.xml)")
    ctx.record(
        status=report["status"], samples=report["data"]["n"], threads=config.threads,
        recommended=report["recommended"], gate_failures=report["gate_failures"], gates=rows,
        artifacts={e["name"]: {"top1_pct": e["accuracy"]["top1_pct"],
                               "agreement": e["parity"].get("agreement"),
                               "batch1_median_ms": e["latency"]["batch1_median_ms"],
                               "size_mb": e["size_mb"]} for e in report["artifacts"]},
        highlights=highlights)
    for line in report["gate_failures"]:
        ctx.warn(f"gate failed: {line}")
    skipped = [r["gate"] for r in rows if r["status"] == "skip" and r["artifact"] is None]
    if skipped:
        ctx.warn(f"not checked, no baseline report given: {', '.join(sorted(set(skipped)))}")
    return outputs


# --------------------------------------------------------------------------------------------------
# `edgemml validate FILE`: the stage alone, on files made elsewhere
# --------------------------------------------------------------------------------------------------

_TOP_ONLY = ("name", "seed", "output_dir", "plugins")


def load_standalone(path: Path, overrides: list[str] | None = None) -> LoadedPipeline:
    """A one-stage pipeline from a file holding the validate options at its top level (plus name,
    seed, data, preprocess). Errors name the file's lines like pipeline errors do; relative paths
    are relative to the file."""
    from pydantic import ValidationError

    from edgemml import stages as registry
    from edgemml.config import (
        PipelineConfig,
        _ErrorContext,
        apply_overrides,
        parse_yaml,
    )
    from edgemml.errors import ConfigError

    path = Path(path)
    file = str(path)
    if not path.is_file():
        raise InputError(f"validation file not found: {path}",
                         hint="give a YAML file with artifacts:, data: and gates:")
    raw, lines = parse_yaml(path.read_text(encoding="utf-8"), file)
    if not isinstance(raw, dict):
        raise ConfigError("the file must be a mapping (artifacts:, data:, gates: ...)", file=file,
                          line=1)
    if "stages" in raw:
        raise ConfigError("this is a pipeline file (it has stages:)", file=file, key="stages",
                          hint=f"run it with: edgemml run {path}")
    origins = apply_overrides(raw, list(overrides or []))
    errors = _ErrorContext(file, lines, origins)
    top_raw = {k: raw[k] for k in (*_TOP_ONLY, "data", "preprocess") if k in raw}
    top_raw.setdefault("name", _safe(path.stem))
    top_raw["stages"] = [{"type": "validate"}]
    try:
        top = PipelineConfig.model_validate(top_raw)
    except ValidationError as exc:
        errors.raise_for(exc, PipelineConfig, (), "")
        raise
    for plugin in top.plugins:
        registry.import_plugin(plugin, file=file)
    stage_raw = {k: v for k, v in raw.items() if k not in _TOP_ONLY}
    stage_raw.setdefault("type", "validate")
    try:
        cfg = ValidateConfig.model_validate(stage_raw)
    except ValidationError as exc:
        errors.raise_for(exc, ValidateConfig, (), "")
        raise
    return LoadedPipeline(top, [cfg], path, raw)


STAGE = ValidateStage
