"""What validate's robustness pass costs and finds on a finished pipeline run (issue 17).

    .venv/bin/edgemml run pipelines/quickstart.yaml            # once: the run to measure
    .venv/bin/python benchmarks/robustness.py runs/quickstart  # ~3 min on 2 quiet cores
      options: --pipeline pipelines/quickstart.yaml --threads 2 (validate's latency threads)
               --set KEY=VALUE (more overrides of the robustness run, e.g.
               'stages.validate.robustness.threads=2')

Runs the pipeline's validate stage twice on the run's artifacts (`--only validate`: earlier stages
are taken from the run folder as they are): without the robustness block, then with its default
settings, and reports the extra wall and CPU seconds of the whole process (user + system, every
thread) and the robustness table. Writes results/robustness.{json,md}. The run folder's validate
stage is left as the robustness run wrote it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, load_note, machine_info, write_results  # noqa: E402


def _validate(pipeline: Path, run_dir: Path, sets: list[str]) -> dict[str, Any]:
    """One `edgemml run --only validate` in a child process: its wall and CPU seconds, its report."""
    cmd = [sys.executable, "-m", "edgemml.cli", "run", str(pipeline), "--out", str(run_dir),
           "--only", "validate", "--quiet"]
    for s in sets:
        cmd += ["--set", s]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"error: {' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    (report_path,) = sorted(run_dir.glob("*-validate/report.json"))[-1:]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "exit": proc.returncode,
            "report": json.loads(report_path.read_text())}


def _table(report: dict[str, Any]) -> list[str]:
    from edgemml.report.tables import robustness_gap_table, robustness_table, to_markdown

    out = to_markdown(robustness_table(report), emoji=False)  # type: ignore[arg-type]
    gaps = robustness_gap_table(report)  # type: ignore[arg-type]
    return out + ([""] + to_markdown(gaps, emoji=False) if gaps else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished run of the pipeline")
    parser.add_argument("--pipeline", type=Path, default=REPO / "pipelines" / "quickstart.yaml")
    parser.add_argument("--threads", type=int, default=None,
                        help="validate's threads (default: the pipeline's)")
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        help="extra overrides of the robustness run")
    args = parser.parse_args()
    run_dir = args.run_dir.resolve()
    base = [f"stages.validate.threads={args.threads}"] if args.threads else []
    info = machine_info()
    info["loadavg_start"] = list(os.getloadavg())
    plain = _validate(args.pipeline, run_dir, base)
    robust = _validate(args.pipeline, run_dir, base + ["stages.validate.robustness={}"]
                       + args.sets)
    info["loadavg_end"] = list(os.getloadavg())
    report = robust["report"]
    section = report["robustness"]
    extra = {"wall_s": round(robust["wall_s"] - plain["wall_s"], 2),
             "cpu_s": round(robust["cpu_s"] - plain["cpu_s"], 2)}
    result = {"machine": info, "pipeline": str(args.pipeline), "run_dir": str(run_dir),
              "overrides": base + args.sets, "without": {k: plain[k] for k in ("wall_s", "cpu_s")},
              "with": {k: robust[k] for k in ("wall_s", "cpu_s")}, "extra": extra,
              "pass": section["timing"], "n": section["n"], "settings": section["settings"],
              "artifacts": {a["name"]: a["robustness"] for a in report["artifacts"]},
              "references": section["references"], "gaps": section["gaps"]}
    phases = section["timing"]["phases"]
    md = [f"# Robustness pass on {run_dir.name} ({args.pipeline.name}, default settings)", "",
          f"{info['cpu']}, {info['cpu_count']} cores; {load_note(info)}.", "",
          "| | wall s | CPU s (user + sys, all threads) |", "|---|---:|---:|",
          f"| validate without robustness | {plain['wall_s']} | {plain['cpu_s']} |",
          f"| validate with robustness | {robust['wall_s']} | {robust['cpu_s']} |",
          f"| **extra** | **{extra['wall_s']}** | **{extra['cpu_s']}** |",
          f"| the pass itself (report.json) | {section['timing']['wall_s']} | "
          f"{section['timing']['cpu_s']} |", "",
          "| phase | wall s | CPU s |", "|---|---:|---:|"]
    md += [f"| {k} | {v['wall_s']:.1f} | {v['cpu_s']:.1f} |" for k, v in phases.items()]
    md += ["", f"{section['n']} samples; settings: `{json.dumps(section['settings'])}`.", ""]
    md += _table(report)
    js, out = write_results("robustness", result, "\n".join(md))
    print(f"wrote {js} and {out}")


if __name__ == "__main__":
    main()
