"""The shape of report.json, as types: what gates, markdown, html, junit, compare and the CLI read.

TypedDicts rather than dataclasses because report.json is the contract: it is written once, re-read
by `edgemml report` / `edgemml compare` (possibly by a newer edgemml) and read by CI scripts, so the
JSON shape is what must stay stable; these types let the type checker hold every reader to it.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict


class Accuracy(TypedDict):
    n: int
    top1_pct: float | None
    top5_pct: float | None
    per_class_pct: dict[str, float]
    worst_class_pct: float | None


class Parity(TypedDict, total=False):
    agreement: float
    max_abs_diff: float
    mean_abs_diff: float
    cosine: float
    cosine_min: float
    correlation: float
    accuracy_drop_pp: float | None
    # the first samples one at a time vs batched (evaluation.batch_of_one); absent for a graph
    # with a static batch
    batch1_samples: int
    batch1_agreement: float
    batch1_max_rel_diff: float


class Latency(TypedDict):
    batch1_median_ms: float
    batch1_p90_ms: float
    batch1_min_ms: float
    batch1_input: int
    runs: int
    warmup: int
    threads: int
    batch: int
    batch_median_ms: float
    throughput_ips: float | None
    throughput_runs: int


class Compute(TypedDict):
    gmacs_per_s_batch1: float | None
    gmacs_per_s_batch: float | None
    peak_dtype: str
    peak_runtime: str
    peak_gmacs_per_s: float | None
    fraction_of_peak_batch1: float | None
    fraction_of_peak_batch: float | None


class RobustSet(TypedDict):
    """One artifact on one perturbed set (edgemml.robustness.SetResult)."""

    key: str  # clean | fgsm@4/255 | pgd@4/255 | <corruption>@<severity>
    family: str
    kind: Literal["clean", "adversarial", "corruption"]
    param: float | int | None  # eps in pixel units, or severity
    n: int
    top1_pct: float | None
    drop_from_clean_pp: float | None
    reference_top1_pct: float | None
    drop_vs_reference_pp: float | None


class Robustness(TypedDict):
    """An artifact's robustness (validate's `robustness:` pass), what the robust gates read."""

    artifact: str
    reference: str | None
    reference_inputs: str | None  # same inputs | own white-box inputs
    crafted_on: str | None
    transfer: bool
    clean_top1_pct: float | None
    worst_top1_pct: float | None
    worst_top1_set: str | None
    worst_drop_pp: float | None
    worst_drop_set: str | None
    seconds: float
    cpu_seconds: float
    notes: list[str]
    sets: list[RobustSet]


class RobustnessSection(TypedDict):
    """report.json's `robustness`: settings, the sets, timing, extra references and gaps."""

    attack: str
    settings: dict[str, Any]
    n: int
    table: str | None
    sets: list[dict[str, Any]]
    timing: dict[str, Any]  # {wall_s, cpu_s, phases: {phase: {wall_s, cpu_s}}}
    references: dict[str, Robustness]  # attacked only for comparison (e.g. the unpruned model)
    gaps: list[dict[str, Any]]  # {kind, artifact, baseline, inputs, clean_pp, worst_pp, ...}


class ArtifactEntry(TypedDict):
    """One artifact in one runtime mode (OpenVINO appears as deployed and as exact `[f32]`)."""

    name: str
    key: str
    stage: str | None
    format: str
    backend: str
    precision: str
    mode: Literal["reference", "deployed", "exact"]
    runtime_precision: str
    path: str
    reference: str | None
    size_bytes: int
    size_mb: float
    params: int | None
    mparams: float | None
    macs: int | None
    mmacs: float | None
    accuracy: Accuracy
    parity: Parity
    diversity: dict[str, Any]
    latency: Latency
    compute: Compute
    io: dict[str, Any]
    passed: bool | None
    recommended: bool
    notes: dict[str, str]
    robustness: Robustness | None
    #: batch-1 median of the report's reference / this artifact's (same run)
    speedup: float | None
    #: the sweep point the artifact belongs to (its tag), None outside a sweep
    point: str | None


class GateRow(TypedDict):
    gate: str
    selector: str
    artifact: str | None
    metric: str
    op: str
    limit: Any
    value: Any
    unit: str
    status: Literal["pass", "fail", "skip"]
    message: str
    #: False for a failed gate that does not fail the run (validate's `require: chosen`)
    required: NotRequired[bool]


class Report(TypedDict, total=False):
    schema: str
    version: int
    created: str
    pipeline: str
    stage: str
    status: Literal["passed", "failed"]
    environment: dict[str, Any]
    data: dict[str, Any]
    settings: dict[str, Any]
    reference: dict[str, Any] | None
    artifacts: list[ArtifactEntry]
    gates: list[GateRow]
    gate_failures: list[str]
    recommended: dict[str, str | None]
    baseline: dict[str, Any] | None
    stages: list[dict[str, Any]]
    curves: dict[str, list[dict[str, Any]]]
    bundle: dict[str, Any] | None
    robustness: RobustnessSection | None
    roofline: dict[str, Any] | None
    front: dict[str, Any]
