"""The validation report: one JSON document (report.json) and its renderings.

report.json is the single source: report.md (GitHub job summary), junit.xml (one test case per
gate, shown natively by CI systems) and report.html (one self-contained file with the plots) are
rendered from it alone, so `edgemml report RUN_DIR` can re-render them later and `edgemml compare`
can diff two runs without re-measuring anything.

Schema (`"schema": "edgemml.validate-report"`, `"version": 1`), stable within a version:
    status                 "passed" | "failed"
    created, pipeline, stage, environment {threads, machine, processor, python, versions}
    data                   {source, split, n, classes, preprocess}
    settings               {threads, batch_size, latency: {runs, warmup, batch, throughput_runs}}
    reference              {name, diversity} of the torch reference, or null
    artifacts[]            {name, key, stage, format, backend, precision, mode, runtime_precision,
                            path, reference, size_bytes, size_mb, params, mparams, macs, mmacs,
                            accuracy {n, top1_pct, top5_pct, per_class_pct, worst_class_pct},
                            parity {agreement, max_abs_diff, mean_abs_diff, cosine, cosine_min,
                                    correlation, accuracy_drop_pp, batch1_samples,
                                    batch1_agreement, batch1_max_rel_diff},
                            diversity, latency {batch1_median_ms, batch1_p90_ms, batch1_min_ms,
                            runs, warmup, threads, batch, batch_median_ms, throughput_ips},
                            passed, recommended, notes,
                            robustness {reference, reference_inputs, crafted_on, transfer,
                                        clean_top1_pct, worst_top1_pct, worst_top1_set,
                                        worst_drop_pp, worst_drop_set, sets[]} or null}
    gates[]                {gate, selector, artifact, metric, op, limit, value, unit, status, message}
    gate_failures[]        one line per failed gate
    recommended            {backend: artifact name or null}
    baseline               {path, created, pipeline, status} or null
    stages[]               {name, type, wall_time_s, started, metrics} of the run's earlier stages
    curves                 {stage: [{epoch, train_loss, val_loss, train_top1_pct, val_top1_pct}]}
    bundle                 {stage, source, manifest} or null
    robustness             {attack, settings, n, table, sets[], timing, references, gaps[]} or
                           null (validate's opt-in `robustness:` pass; schema.RobustnessSection)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgemml.artifacts import read_json, write_json_atomic, write_text_atomic
from edgemml.errors import InputError

SCHEMA = "edgemml.validate-report"
VERSION = 1
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
JUNIT_XML = "junit.xml"
REPORT_HTML = "report.html"


def load_report(path: Path) -> dict[str, Any]:
    """A report.json, checked to be one this version of edgemml can read."""
    path = Path(path)
    if path.is_dir():
        path = find_report(path)
    if not path.is_file():
        raise InputError(f"report not found: {path}", file=path,
                         hint="give a report.json written by the validate stage, or its run folder")
    try:
        data = read_json(path)
    except (OSError, ValueError) as exc:
        raise InputError(f"unreadable report: {exc}", file=path) from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise InputError(f"{path.name} is not an edgemml validation report "
                         f"(schema {data.get('schema') if isinstance(data, dict) else None!r})",
                         file=path)
    if not isinstance(data.get("version"), int) or data["version"] > VERSION:
        raise InputError(f"report version {data.get('version')!r} is newer than this edgemml "
                         f"reads ({VERSION})", file=path, hint="upgrade edgemml")
    return data


def find_report(folder: Path) -> Path:
    """report.json in a folder, or in the (last) validate stage folder of a run directory."""
    folder = Path(folder)
    direct = folder / REPORT_JSON
    if direct.is_file():
        return direct
    found = sorted(p for p in folder.glob(f"*/{REPORT_JSON}")
                   if not p.parent.name.startswith("."))
    if not found:
        raise InputError(f"no {REPORT_JSON} in {folder} or its stage folders", file=folder,
                         hint="run a pipeline with a validate stage first")
    return found[-1]


def write_reports(report: dict[str, Any], folder: Path) -> dict[str, Path]:
    """Write report.json, report.md, junit.xml and report.html into folder; returns their paths."""
    from edgemml.report.html import render_html
    from edgemml.report.junit import render_junit
    from edgemml.report.markdown import render_markdown

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"report": folder / REPORT_JSON, "report-md": folder / REPORT_MD,
             "junit": folder / JUNIT_XML, "report-html": folder / REPORT_HTML}
    write_json_atomic(paths["report"], report)
    write_text_atomic(paths["report-md"], render_markdown(report))
    write_text_atomic(paths["junit"], render_junit(report))
    write_text_atomic(paths["report-html"], render_html(report))
    return paths


def render_from(report_path: Path, out_dir: Path) -> dict[str, Path]:
    """Re-render the Markdown, JUnit and HTML of an existing report.json into out_dir."""
    from edgemml.report.html import render_html
    from edgemml.report.junit import render_junit
    from edgemml.report.markdown import render_markdown

    report = load_report(report_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"report-md": out_dir / REPORT_MD, "junit": out_dir / JUNIT_XML,
             "report-html": out_dir / REPORT_HTML}
    write_text_atomic(paths["report-md"], render_markdown(report))
    write_text_atomic(paths["junit"], render_junit(report))
    write_text_atomic(paths["report-html"], render_html(report))
    return paths


__all__ = ["JUNIT_XML", "REPORT_HTML", "REPORT_JSON", "REPORT_MD", "SCHEMA", "VERSION",
           "find_report", "load_report", "render_from", "write_reports"]
