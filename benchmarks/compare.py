"""edgemml's int8 artifacts vs NNCF and ORT defaults and torch fp32, on one finished run (issue 9).

Run by hand (not in CI), after `edgemml run pipelines/quickstart.yaml` (or any pipeline with a
quantize stage, e.g. the 224x224 resnet18-grayscale one):

1. from the run directory it takes the torch model the pipeline fine-tuned *before* pruning (the
   input of the first prune stage; without one, the quantize stage's input), the model edgemml
   quantized (its pruned model), edgemml's int8 artifacts (the quantize stage's onnx-int8 and
   openvino-int8), and the pipeline's data through the model's own preprocessing;
2. it quantizes the UNPRUNED model the way a user of each library would by default: ONNX
   Runtime's `quantize_static` and `nncf.quantize` with every option at its default, calibrated on
   the same samples edgemml calibrated on;
3. on the test split it measures top-1 accuracy and agreement with torch fp32 (unpruned), and
   latency at batch 1 and 8 with 2 threads (interleaved rounds, medians), as ratios to torch fp32
   eager of the unpruned model, plus file sizes;
4. it reads each stage's wall time from the run's stage.json files and times a fully cached re-run
   of `edgemml run` (a subprocess), after a dry plan confirms that nothing would re-run.

Writes benchmarks/results/compare.{json,md} (compare.quick.* with --quick) and the table in
benchmarks/README.md. Every number is measured by this script.

Usage: .venv/bin/python benchmarks/compare.py [--run-dir runs/quickstart] [--pipeline FILE]
       [--repeats 60] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (REPO, Variant, fmt, human_seconds, interleaved_latency, predict_dataset,  # noqa: E402
                    load_note, machine_info, mb, md_table, median_ratio, nncf_default_int8,
                    ort_default_int8, ort_precision, ov_layer_precisions, precision_label,
                    update_readme_section, write_results)


# --------------------------------------------------------------------------------------------------
# The run directory
# --------------------------------------------------------------------------------------------------


def read_records(run_dir: Path) -> dict[str, dict[str, Any]]:
    """stage name -> its stage.json (with `dir`), in pipeline order."""
    records = {}
    for path in sorted(run_dir.glob("[0-9][0-9]-*/stage.json")):
        rec = json.loads(path.read_text())
        if rec.get("status") == "done":
            rec["dir"] = path.parent
            records[rec["stage"]] = rec
    if not records:
        sys.exit(f"{run_dir} has no finished stages (no NN-<stage>/stage.json): run the pipeline "
                 f"first, e.g. edgemml run pipelines/quickstart.yaml")
    return records


def output(rec: dict[str, Any], key: str) -> Path | None:
    out = rec["outputs"].get(key)
    return rec["dir"] / out["path"] if out else None


def model_input(rec: dict[str, Any], records: dict[str, dict[str, Any]]) -> str:
    """The stage whose "model" a stage read: its `input:` or the nearest earlier model provider."""
    named = rec["config"].get("input")
    if named:
        return named
    cands = [d for d in rec["inputs"] if d in records and "model" in records[d]["outputs"]]
    if not cands:
        sys.exit(f"cannot tell which model stage {rec['stage']!r} read")
    return max(cands, key=lambda d: records[d]["index"])


def locate(records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    quant = [r for r in records.values() if r["type"] == "quantize"]
    if not quant:
        sys.exit("the run has no finished quantize stage: nothing of edgemml's int8 to compare")
    q = quant[-1]
    quantized_from = model_input(q, records)
    prunes = [r for r in records.values() if r["type"] == "prune"]
    unpruned = model_input(prunes[0], records) if prunes else quantized_from
    return {"quantize": q["stage"], "quantized_from": quantized_from, "unpruned": unpruned,
            "prune": prunes[0]["stage"] if prunes else None}


def resolve_pipeline(run_dir: Path, given: Path | None) -> tuple[Path, Path]:
    """(pipeline file, the directory `edgemml run` ran in) — from --pipeline or run.json."""
    if given is not None:
        return given.resolve(), Path.cwd()
    summary = run_dir / "run.json"
    if not summary.is_file():
        sys.exit(f"{run_dir} has no run.json: give --pipeline")
    recorded = Path(json.loads(summary.read_text())["pipeline_file"])
    # run dirs default to runs/<name> relative to where `edgemml run` was started
    for base in (run_dir.resolve().parent.parent, Path.cwd(), REPO):
        p = recorded if recorded.is_absolute() else base / recorded
        if p.is_file():
            return p.resolve(), base
    sys.exit(f"cannot find the pipeline file {recorded} recorded in {summary}: give --pipeline")


def dry_plan(pipeline: Path, run_dir: Path) -> list[dict[str, str]]:
    from edgemml.pipeline.loader import load_pipeline
    from edgemml.pipeline import Runner
    from edgemml.progress import QuietReporter

    runner = Runner(load_pipeline(pipeline), run_dir, QuietReporter())
    return [{"stage": item.name, "plan": status, "why": why}
            for item, status, why in runner.dry_plan()]


def cached_rerun(pipeline: Path, run_dir: Path, cwd: Path) -> dict[str, Any]:
    """Wall time of `edgemml run` when every stage is cached (refused when any would run: that
    would recompute and overwrite the run being measured)."""
    plan = dry_plan(pipeline, run_dir)
    would_run = [p for p in plan if p["plan"] != "cached"]
    if would_run:
        return {"measured": False, "reason": "not every stage is cached, so a re-run would "
                "recompute: " + "; ".join(f"{p['stage']}: {p['why']}" for p in would_run)}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "edgemml.cli", "run", str(pipeline), "--out",
                           str(run_dir.resolve()), "-q"], cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"measured": False, "reason": f"edgemml run exited {proc.returncode}: "
                f"{(proc.stderr or proc.stdout).strip()[-400:]}"}
    summary = json.loads((run_dir / "run.json").read_text())
    statuses = {s["name"]: s["status"] for s in summary["stages"]}
    t1 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import edgemml.cli"], cwd=cwd, check=True)
    import_s = time.perf_counter() - t1
    return {"measured": True, "wall_s": round(wall, 2),
            "runner_wall_s": summary["wall_time_s"], "python_import_cli_s": round(import_s, 2),
            "all_cached": all(s == "cached" for s in statuses.values()), "stages": statuses}


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", type=Path, default=REPO / "runs" / "quickstart")
    ap.add_argument("--pipeline", type=Path, default=None,
                    help="the pipeline file (default: the one recorded in the run's run.json)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed calls per variant and batch (default 60)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 10)")
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-test", type=int, default=None,
                    help="at most this many test samples for accuracy (default: all)")
    ap.add_argument("--no-rerun", action="store_true", help="skip timing the cached re-run")
    ap.add_argument("--quick", action="store_true", help="smoke test: few runs and test samples; "
                    "writes compare.quick.*, not the README")
    args = ap.parse_args()
    q = args.quick
    args.repeats = args.repeats or (6 if q else 60)
    args.rounds = args.rounds or (3 if q else 10)
    args.max_test = args.max_test or (64 if q else None)
    batches = [int(b) for b in args.batches.split(",")]

    import torch

    from edgemml.pipeline.loader import load_pipeline
    from edgemml.data import load_data
    from edgemml import runtimes
    from edgemml.data.datasets import as_arrays, evenly_spaced
    from edgemml.evaluation import Samples
    from edgemml.exporters.onnx import check_onnx, export_onnx
    from edgemml.metrics import accuracy, check_parity, parity
    from edgemml.models import load_model
    from edgemml.stages.common import data_config, model_preprocess

    torch.set_num_threads(args.threads)
    info = machine_info()
    t_start = time.perf_counter()
    run_dir = args.run_dir
    records = read_records(run_dir)
    where = locate(records)
    pipeline_file, run_cwd = resolve_pipeline(run_dir, args.pipeline)
    pipeline = load_pipeline(pipeline_file)
    qrec = records[where["quantize"]]
    qcfg = next(s for s in pipeline.stages if (s.name or s.type) == where["quantize"])
    print(f"run {run_dir}: unpruned model from {where['unpruned']!r}, edgemml quantized "
          f"{where['quantized_from']!r} in {where['quantize']!r}", flush=True)

    unpruned, spec = load_model(output(records[where["unpruned"]], "model"))
    pre, _ = model_preprocess(spec.extra.get("preprocess"), qcfg, pipeline)
    data = load_data(data_config(qcfg, pipeline), pre, seed=pipeline.config.seed,
                     base_dir=pipeline.base_dir)
    test = data.test
    if len(test) == 0:
        sys.exit("the pipeline's test split is empty: nothing to measure accuracy on")
    if args.max_test and len(test) > args.max_test:
        test = test.subset(evenly_spaced(len(test), args.max_test), "test")
    split = qcfg.calibration.split
    calib_set = data.calibration if split == "calibration" else data.split(split)
    calib, _ = as_arrays(calib_set, evenly_spaced(len(calib_set), qcfg.calibration.samples))

    work = Path(tempfile.mkdtemp(prefix="edgemml-bench-compare-"))
    fp32 = work / "unpruned.fp32.onnx"
    exp = export_onnx(unpruned, torch.from_numpy(calib[:2]), fp32, opset=qcfg.onnx.opset,
                      exporter=qcfg.onnx.exporter, input_name=qcfg.onnx.input_name,
                      output_name=qcfg.onnx.output_name, dynamic_batch=True)
    check_onnx(fp32)
    print("quantizing the unpruned model with ORT and NNCF defaults", flush=True)
    ort_def, nncf_def = work / "unpruned.ort-default.int8.onnx", work / "unpruned-nncf-default"
    baselines = {"ort-int8-default": ort_default_int8(fp32, ort_def, calib),
                 "ov-int8-nncf-default": nncf_default_int8(fp32, nncf_def, calib)}

    t = args.threads
    torch_rt, ort_rt = runtimes.backend("torch"), runtimes.backend("onnxruntime")
    ov_rt = runtimes.backend("openvino")
    plan: list[tuple[str, str, str, Any, Path]] = [
        ("torch-fp32", "torch fp32 eager, unpruned", "torch",
         torch_rt.open_module(unpruned, threads=t), output(records[where["unpruned"]], "model"))]
    quantized_model = None
    if where["quantized_from"] != where["unpruned"]:
        quantized_model, _ = load_model(output(records[where["quantized_from"]], "model"))
        plan.append(("torch-fp32-pruned", "torch fp32 eager, pruned (what edgemml quantized)",
                     "edgemml " + where["quantized_from"],
                     torch_rt.open_module(quantized_model, threads=t),
                     output(records[where["quantized_from"]], "model")))
    onnx_int8, ov_int8 = output(qrec, "onnx-int8"), output(qrec, "openvino-int8")
    if onnx_int8:
        plan.append(("ort-int8", "ONNX Runtime int8", "edgemml " + where["quantize"],
                     ort_rt.open(onnx_int8, threads=t), onnx_int8))
    plan.append(("ort-int8-default", "ONNX Runtime int8, unpruned", "ORT quantize_static defaults",
                 ort_rt.open(ort_def, threads=t), ort_def))
    if ov_int8:
        plan.append(("ov-int8", "OpenVINO int8", "edgemml " + where["quantize"],
                     ov_rt.open(ov_int8, threads=t, exact=False), ov_int8))
    plan.append(("ov-int8-nncf-default", "OpenVINO int8, unpruned", "nncf.quantize defaults",
                 ov_rt.open(nncf_def, threads=t, exact=False), nncf_def))

    variants = []
    for key, label, source, runner, path in plan:
        if runner.backend == "openvino":
            precision = precision_label(runner.precision,
                                        ov_layer_precisions(path / "model.xml", threads=t))
        elif runner.backend == "onnxruntime":
            precision = ort_precision(path)
        else:
            precision = "f32"
        variants.append(Variant(key, label, source, runner, precision, path,
                                runtimes.size_bytes(path)))

    print(f"accuracy on {len(test)} test samples", flush=True)
    samples = Samples(test, 64)
    labels = samples.labels
    logits = {v.key: predict_dataset(v.runner, samples) for v in variants}
    ref = logits["torch-fp32"]
    ref_top1 = accuracy(ref, labels, data.classes).top1_pct
    export_parity = check_parity(ref, predict_dataset(ort_rt.open(fp32, threads=t), samples),
                                 tolerance=1e-4).as_dict()
    rows = []
    for v in variants:
        lg = logits[v.key]
        m = accuracy(lg, labels, data.classes).as_dict()
        p = parity(lg, ref, ref_top1, m["top1_pct"])
        row = {"key": v.key, "label": v.label, "source": v.source, "runs_in": v.precision,
               "path": str(v.path), "size_bytes": v.size_bytes, "top1_pct": m["top1_pct"],
               "worst_class_pct": m["worst_class_pct"], "agreement_with_torch_unpruned":
               p["agreement"], "accuracy_drop_pp": p["accuracy_drop_pp"], "cosine": p["cosine"]}
        if "torch-fp32-pruned" in logits and v.key in ("ort-int8", "ov-int8"):
            own = logits["torch-fp32-pruned"]
            row["agreement_with_torch_pruned"] = float((lg.argmax(1) == own.argmax(1)).mean())
        rows.append(row)

    inputs = samples.first(max(batches))
    latency: dict[str, Any] = {}
    load_after: dict[str, float] = {}  # 1-minute load average right after each timing
    for b in batches:
        x = np.ascontiguousarray(inputs[:b])
        calls = {v.key: (lambda v=v: v.runner(x)) for v in variants}
        print(f"timing batch {b}: {len(calls)} variants x {args.repeats} runs", flush=True)
        res = interleaved_latency(calls, warmup=2 if q else 5, repeats=args.repeats,
                                  rounds=args.rounds)
        for k in res:
            res[k]["speedup_vs_torch_unpruned"] = median_ratio(res["torch-fp32"], res[k])
        latency[f"batch{b}"] = res
        load_after[f"batch{b}"] = round(os.getloadavg()[0], 2)

    stages = [{"stage": name, "type": r["type"], "wall_s": r["wall_time_s"],
               "started": r["started"], "dir": r["dir"].name} for name, r in records.items()]
    rerun = {"measured": False, "reason": "--no-rerun"} if args.no_rerun else \
        cached_rerun(pipeline_file, run_dir, run_cwd)
    info["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    result = {
        "benchmark": "compare", "mode": "quick" if q else "full", "machine": info,
        "run_dir": str(run_dir.resolve()), "pipeline": str(pipeline_file),
        "pipeline_name": pipeline.config.name, "models": where,
        "input": [spec.in_chans, *pre.size], "classes": len(data.classes),
        "test_samples": int(len(test)), "calibration_samples": int(len(calib)),
        "calibration_split": split, "unpruned_onnx_export": exp.as_dict(),
        "unpruned_onnx_parity": export_parity, "defaults_outside_edgemml": baselines,
        "threads": t, "batches": batches, "repeats": args.repeats, "rounds": args.rounds,
        "variants": rows, "latency": latency,
        "loadavg_after_timing": load_after, "stage_wall_s": stages,
        "stages_total_wall_s": round(sum(s["wall_s"] for s in stages), 2),
        "cached_rerun": rerun, "seconds": round(time.perf_counter() - t_start, 1)}
    md = render_md(result)
    js, mdp = write_results("compare.quick" if q else "compare", result, md)
    if not q and update_readme_section("compare", md.split("\n", 1)[1].strip()):
        print("updated benchmarks/README.md")
    print(md)
    print(f"wrote {js} and {mdp}")


def render_md(r: dict[str, Any]) -> str:
    m = r["machine"]
    c, h, w = r["input"]
    lines = [f"# compare benchmark ({r['mode']})", "",
             f"Run `{r['pipeline_name']}` ({r['run_dir']}): {c}x{h}x{w} input, {r['classes']} "
             f"classes, {r['test_samples']} test samples; int8 baselines calibrated on the same "
             f"{r['calibration_samples']} samples as edgemml. {m['cpu']}, {r['threads']} threads, "
             f"{m['date']}; {load_note(m)}.", "",
             f"Latency: median of {r['repeats']} timed calls per variant and batch (p90 in "
             f"brackets), interleaved in {r['rounds']} rounds; x = speed-up over torch fp32 eager "
             f"of the unpruned model in the same run. Agreement: top-1 agreement with torch fp32 "
             f"(unpruned) on the test split.", ""]
    header = ["variant", "made by", "runs in", "test top-1", "agreement"]
    for b in r["batches"]:
        header += [f"batch {b} ms", "x"]
    header += ["size MB"]
    rows = []
    for v in r["variants"]:
        agree = fmt(100 * v["agreement_with_torch_unpruned"], 1, "%")
        if v.get("agreement_with_torch_pruned") is not None:
            agree += f" ({100 * v['agreement_with_torch_pruned']:.1f}% with pruned fp32)"
        row = [v["label"], v["source"], v["runs_in"], fmt(v["top1_pct"], 2, "%"), agree]
        for b in r["batches"]:
            s = r["latency"][f"batch{b}"][v["key"]]
            row += [f"{s['median_ms']:.2f} ({s['p90_ms']:.2f})",
                    fmt(s["speedup_vs_torch_unpruned"], 2, "x")]
        row.append(mb(v["size_bytes"]))
        rows.append(row)
    lines += [md_table(header, rows, "lllrr" + "rr" * len(r["batches"]) + "r"), ""]
    lines += ["Stage wall times (from each stage.json, when the stage last ran):", "",
              md_table(["stage", "type", "seconds"],
                       [[s["stage"], s["type"], f"{s['wall_s']:.1f}"] for s in r["stage_wall_s"]]
                       + [["total", "", f"{r['stages_total_wall_s']:.1f}"]], "llr"), ""]
    rr = r["cached_rerun"]
    if rr["measured"]:
        lines.append(f"Fully cached re-run of `edgemml run`: {human_seconds(rr['wall_s'])} wall "
                     f"(runner {rr['runner_wall_s']:.2f} s; Python start + `import edgemml.cli` "
                     f"alone {rr['python_import_cli_s']:.2f} s)"
                     + ("" if rr["all_cached"] else " — NOT every stage was cached: "
                        + json.dumps(rr["stages"])) + ".")
    else:
        lines.append(f"Cached re-run not timed: {rr['reason']}.")
    lines += ["", f"Total benchmark time: {r['seconds']:.0f} s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
