"""validate: every artifact of the run (or given files) on held-out data, against gates.

Each artifact (the torch reference, every ONNX and OpenVINO model, fp32/fp16/int8) runs on the same
real test samples through the same preprocessing: accuracy, parity with the reference, latency at
a fixed thread count, size, parameters and MACs. Gates turn those figures into pass/fail; a failed
gate does not raise here: every report is written first, then the runner exits 1 (also when this
stage is cached, so a CI re-run stays red).

The stage is split in four: what to measure (_validate_plan.py), measuring one artifact
(edgemml.evaluation, through the runtime layer), the robustness pass (_validate_robustness.py), and
assembling and writing the reports (_validate_report.py, over edgemml.report's gates and
renderers). This module holds the options and the orchestration.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from edgemml.config import DataConfig, LoadedPipeline, PreprocessConfig, StageConfig, StrictModel
from edgemml.errors import StageError
from edgemml.report.gates import GateLimits, check_selector
from edgemml.stages import common
from edgemml.stages._validate_report import build_report, finish
from edgemml.stages._validate_robustness import GATE_METRICS, RobustnessConfig
from edgemml.stages.base import Stage, StageContext

if TYPE_CHECKING:
    from edgemml.evaluation import Measured
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
    min_batch1_agreement: float | None = Field(
        0.9, ge=0, le=1, description="Always-on gate for every artifact whose batch is dynamic: "
        "the first 32 samples run one at a time must predict the class they get batched on "
        "this fraction of them (near-ties aside). Batch-dependent numerics flip a borderline "
        "sample (OpenVINO's int8 convnext_tiny: 1 of 16, its logits differing by up to a third "
        "of their range between batch 1 and 16); a broken batch-1 path flips most (OpenVINO "
        "2026.4.1 int8 depthwise IRs: 88 %). null disables.")
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
        report = build_report(ctx, config, plan, len(dataset), classes, preprocess, entries)
        report["robustness"] = section
        report["roofline"] = None if roof is None else describe_roofline(roof)
        return finish(ctx, config, plan, report)


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


STAGE = ValidateStage
