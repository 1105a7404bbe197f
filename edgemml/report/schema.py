"""The shape of report.json, as types: what gates, markdown, html, junit, compare and the CLI read.

TypedDicts rather than dataclasses because report.json is the contract: it is written once, re-read
by `edgemml report` / `edgemml compare` (possibly by a newer edgemml) and read by CI scripts, so the
JSON shape is what must stay stable; these types let the type checker hold every reader to it.
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict


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
    peak_gmacs_per_s: float | None
    fraction_of_peak_batch1: float | None
    fraction_of_peak_batch: float | None


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
