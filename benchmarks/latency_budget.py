"""The accuracy-latency front of a finished sweep run, timed in one interleaved run (issue 18).

Run by hand after `edgemml run pipelines/latency-budget.yaml` (resnet18 at 224x224, three points):

1. from the run's validate report it takes the unpruned torch model (the report's reference) and
   every deployed artifact of every sweep point, with the test top-1 validate measured on them;
2. it times all of them at batch 1 with the same threads, interleaved in rounds by edgemml's one
   timer (so the ratios to torch fp32 hold on a loaded machine), and measures this machine's peak
   MAC rates (edgemml.roofline, not cached: now, on this machine) right after;
3. it reports each artifact's speed-up over the unpruned torch fp32 model, whether it meets the
   pipeline's budget (validate's `min_speedup` / `max_latency_ms` gates), its loss against the
   unpruned model, its achieved GMAC/s and % of the peak of its runtime and precision, and whether
   the artifact validate chose (the most accurate one passing every gate) meets the budget here.

Writes benchmarks/results/latency-budget.{json,md} and the table in benchmarks/README.md.

Usage: .venv/bin/python benchmarks/latency_budget.py [--run-dir runs/latency-budget] [--runs 60]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (REPO, fmt, load_note, machine_info, md_table,  # noqa: E402
                    update_readme_section, write_results)


def find_report(run_dir: Path) -> Path:
    found = sorted(run_dir.glob("[0-9][0-9]-*/report.json"))
    if not found:
        sys.exit(f"{run_dir} has no validate report: run the pipeline first, e.g. "
                 f"edgemml run pipelines/latency-budget.yaml")
    return found[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", type=Path, default=REPO / "runs" / "latency-budget")
    ap.add_argument("--threads", type=int, default=None, help="default: the report's")
    ap.add_argument("--runs", type=int, default=60, help="timed calls per artifact")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--roofline-size", type=int, default=1024)
    ap.add_argument("--stem", default="latency-budget")
    args = ap.parse_args()

    import torch

    from edgemml import roofline, runtimes
    from edgemml.machine import ForeignLoad
    from edgemml.data.datasets import as_arrays
    from edgemml.models import load_model

    t_start = time.perf_counter()
    info = machine_info()
    foreign = ForeignLoad().__enter__()  # other processes' CPU share while this runs
    report_path = find_report(args.run_dir)
    report = json.loads(report_path.read_text())
    threads = args.threads or report["settings"]["threads"]
    torch.set_num_threads(threads)
    front = report["front"]
    entries = {e["name"]: e for e in report["artifacts"]}
    ref = entries[front["reference"]]
    chosen = front["chosen"]
    # the inputs: real test samples through the run's preprocessing
    from edgemml.config import DataConfig, PreprocessConfig
    from edgemml.data import load_data

    data = load_data(DataConfig.model_validate({"source": report["data"]["source"]}),
                     PreprocessConfig.model_validate(report["data"]["preprocess"]), seed=0,
                     base_dir=args.run_dir)
    x = as_arrays(data.test, [0])[0]

    subjects = [ref] + [e for e in report["artifacts"] if e["mode"] == "deployed"]
    runners = {}
    for e in subjects:
        if e["format"] == "torch":
            model, _ = load_model(Path(e["path"]))
            runners[e["name"]] = runtimes.backend("torch").open_module(model, threads=threads)
        else:
            runners[e["name"]] = runtimes.open_artifact(Path(e["path"]), threads=threads)
    print(f"timing {len(runners)} models interleaved ({args.runs} calls each, {args.rounds} "
          f"rounds, {threads} threads)", flush=True)
    load_before = round(os.getloadavg()[0], 2)
    timed = runtimes.time_calls({k: (lambda r=r: r(x)) for k, r in runners.items()}, warmup=5,
                                runs=args.runs, rounds=args.rounds)
    load_after = round(os.getloadavg()[0], 2)
    print("measuring this machine's peak MAC rates", flush=True)
    roof = roofline.measure(threads, size=args.roofline_size)
    ref_ms = timed[ref["name"]].median_ms
    budget_speedup = next((float(g["limit"]) for g in report["gates"]
                           if g["metric"] == "min_speedup"), None)
    budget_ms = next((float(g["limit"]) for g in report["gates"]
                      if g["metric"] == "max_latency_ms"), None)
    rows = []
    for e in subjects:
        t = timed[e["name"]]
        precision = "int8" if e["precision"] == "int8" else e["runtime_precision"]
        peak = roof.peak(e["backend"], precision)
        macs = e.get("macs")
        rate = macs / (t.median_ms / 1e3) / 1e9 if macs else None
        rate_min = macs / (t.min_ms / 1e3) / 1e9 if macs else None
        speedup = ref_ms / t.median_ms
        meets = ((budget_speedup is None or speedup >= budget_speedup)
                 and (budget_ms is None or t.median_ms <= budget_ms))
        top1 = e["accuracy"]["top1_pct"]
        rows.append({
            "name": e["name"], "point": e.get("point"), "backend": e["backend"],
            "runs_in": precision, "mmacs": e.get("mmacs"), "top1_pct": top1,
            "vs_reference_pp": (top1 - ref["accuracy"]["top1_pct"]) if top1 is not None else None,
            "median_ms": t.median_ms, "p90_ms": t.p90_ms, "min_ms": t.min_ms,
            "speedup_vs_torch": speedup, "meets_budget": meets if e is not ref else None,
            "validate_passed": e.get("passed"), "chosen": e["name"] == chosen,
            "validate_median_ms": e["latency"]["batch1_median_ms"],
            "gmacs_per_s": rate, "peak_gmacs_per_s": peak,
            "pct_of_peak": 100 * rate / peak if rate and peak else None,
            "pct_of_peak_fastest_call": 100 * rate_min / peak if rate_min and peak else None})
    info["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    foreign.__exit__(None, None, None)
    info["foreign_load"] = None if foreign.fraction is None else round(foreign.fraction, 3)
    chosen_row = next((r for r in rows if r["chosen"]), None)
    result = {
        "benchmark": "latency-budget", "machine": info, "run_dir": str(args.run_dir.resolve()),
        "report": str(report_path), "pipeline": report["pipeline"],
        "input": report["data"]["preprocess"]["size"], "threads": threads,
        "test_samples": report["data"]["n"], "runs": args.runs, "rounds": args.rounds,
        "loadavg_timing": [load_before, load_after],
        "budget": {"min_speedup": budget_speedup, "max_latency_ms": budget_ms,
                   "ms_here": ref_ms / budget_speedup if budget_speedup else budget_ms},
        "reference": {"name": ref["name"], "top1_pct": ref["accuracy"]["top1_pct"],
                      "median_ms": ref_ms},
        "chosen": chosen_row, "points": [p["tag"] for s in front["sweeps"] for p in s["points"]],
        "rows": rows, "roofline": roofline.describe(roof),
        "seconds": round(time.perf_counter() - t_start, 1)}
    md = render_md(result)
    js, mdp = write_results(args.stem, result, md)
    if update_readme_section("latency-budget", md.split("\n", 1)[1].strip()):
        print("updated benchmarks/README.md")
    print(md)
    print(f"wrote {js} and {mdp}")


def render_md(r: dict[str, Any]) -> str:
    m = r["machine"]
    h, w = r["input"]
    b = r["budget"]
    budget = (f"at least {b['min_speedup']:g}x faster than the unpruned torch fp32 model "
              f"({b['ms_here']:.2f} ms here)" if b["min_speedup"] else
              f"{b['max_latency_ms']:g} ms" if b["max_latency_ms"] else "none")
    lines = ["# latency-budget benchmark", "",
             f"Run `{r['pipeline']}` ({r['run_dir']}): resnet18, 1x{h}x{w} input, "
             f"{r['test_samples']} test samples. {m['cpu']}, {r['threads']} threads, "
             f"{m['date']}; {load_note(m)} (during the timing: {r['loadavg_timing'][0]} -> "
             f"{r['loadavg_timing'][1]}).", "",
             f"Every model timed at batch 1 in one interleaved run ({r['runs']} calls each in "
             f"{r['rounds']} rounds, medians); top-1 as validate measured it on the test split; "
             f"budget: {budget}; ★ = the artifact validate chose (the most accurate passing "
             f"every gate). % of peak: achieved GMAC/s over this machine's peak for the same "
             f"runtime and precision, measured right after (fastest-call based in brackets).", ""]
    rows = []
    for x in r["rows"]:
        rows.append([x["name"] + (" ★" if x["chosen"] else ""), x["point"] or "reference",
                     f"{x['backend']} {x['runs_in']}", fmt(x["mmacs"], 0),
                     fmt(x["top1_pct"], 2, "%"), fmt(x["vs_reference_pp"], 2),
                     f"{x['median_ms']:.2f}", fmt(x["speedup_vs_torch"], 1, "x"),
                     "-" if x["meets_budget"] is None else ("yes" if x["meets_budget"] else "no"),
                     f"{fmt(x['pct_of_peak'], 0, '%')} ({fmt(x['pct_of_peak_fastest_call'], 0, '%')})"])
    lines.append(md_table(["artifact", "point", "runs in", "M MACs", "test top-1", "vs unpruned (pp)",
                           "ms (b1)", "x torch", "meets budget", "% of peak"], rows,
                          "lllrrrrrlr"))
    c = r["chosen"]
    if c:
        lines += ["", f"Chosen by validate: **{c['name']}** — {c['speedup_vs_torch']:.1f}x faster "
                  f"than the unpruned torch fp32 model here ({'meets' if c['meets_budget'] else 'MISSES'}"
                  f" the budget), {c['vs_reference_pp']:+.2f} pp test top-1 "
                  f"({c['top1_pct']:.2f}% vs {r['reference']['top1_pct']:.2f}%)."]
    peaks = ", ".join(f"{p['runtime']} {p.get('kernel', 'matmul')} {p['precision']} "
                      f"{p['gmacs_per_s']:.0f}"
                      for p in r["roofline"]["peaks"])
    lines += ["", f"Peak GMAC/s measured here (a {r['roofline']['size']}^3 product as a MatMul and "
              f"as a 1x1 Conv, fastest call; runtime kernel precision): "
              f"{peaks}.", "", f"Total benchmark time: {r['seconds']:.0f} s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
