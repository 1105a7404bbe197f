"""Do the benchmarks, the validate stage and OpenVINO's own benchmark_app agree on one IR's latency?

Issue 18 found compare.py's OpenVINO batch-1 latency 1.45x benchmark_app's and validate's on the same
IR. This measures, back to back and repeated (so that the load of a shared machine hits every
method alike), the batch-1 median of one OpenVINO IR by:

- validate:        edgemml.runtimes.measure_latency (the IR alone: warm-up, then timed calls);
- compare.py:      edgemml.runtimes.time_calls, interleaved in rounds with the other variants
                   compare.py times (ONNX Runtime int8 and torch fp32 of the same model);
- old compare.py:  the same interleaving with the 20 ms sleep before every block that the
                   benchmarks used before the runtime layer (reimplemented here, only to measure it;
                   edgemml's timer now pauses 50 ms, see "after another runtime");
- benchmark_app:   OpenVINO's tool (sync API, one stream, the same thread count, -hint none as its
                   UI requires for -nstreams/-nthreads; PERFORMANCE_HINT reads LATENCY anyway).

"After another runtime" then times each model right after a block of another, with pauses of 0 to
60 ms between them: why edgemml's timer pauses before every block.

Usage:  .venv/bin/python benchmarks/timers.py --make            # a 224x224 resnet18 pruned to ~0.5
        .venv/bin/python benchmarks/timers.py --ir RUN/NN-quantize/openvino-int8 --onnx ... --torch ...
Writes benchmarks/results/timers.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_note, machine_info, md_table, write_results  # noqa: E402

OLD_PAUSE_S = 0.02


def old_interleaved(calls: dict[str, Callable[[], Any]], *, warmup: int, repeats: int,
                    rounds: int) -> dict[str, float]:
    """The benchmarks' timer before the runtime layer (benchmarks/common.py at 7f205a8): the same
    interleaved rounds as edgemml.runtimes.time_calls, plus a 20 ms sleep before each block."""
    names = list(calls)
    for name in names:
        for _ in range(warmup):
            calls[name]()
    per_round = [repeats // rounds + (1 if r < repeats % rounds else 0) for r in range(rounds)]
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            time.sleep(OLD_PAUSE_S)
            calls[name]()
            for _ in range(per_round[r]):
                t0 = time.perf_counter_ns()
                calls[name]()
                times[name].append((time.perf_counter_ns() - t0) / 1e6)
    return {n: float(np.median(t)) for n, t in times.items()}


AFTER_PAUSES_MS = (0, 5, 15, 30, 60)


def interference(calls: dict[str, Callable[[], Any]], *, reps: int, block: int = 4,
                 pauses_ms: tuple[int, ...] = AFTER_PAUSES_MS) -> dict[str, Any]:
    """Each call timed right after another call's block, with a pause of 0..60 ms between them,
    relative to the call timed after its own block: does one runtime's wake slow the next, and
    for how long? Cells are shuffled and repeated `reps` times so drift hits all alike; each cell
    is 3 calls of the previous one, the pause, one untimed call, then `block` timed calls."""
    import random

    names = list(calls)
    cells = [(p, c, ms) for p in names for c in names for ms in pauses_ms
             if p != c or ms == 0]
    times: dict[tuple[str, str, int], list[float]] = {k: [] for k in cells}
    rng = random.Random(0)
    for _ in range(reps):
        rng.shuffle(cells)
        for prev, cur, ms in cells:
            for _ in range(3):
                calls[prev]()
            time.sleep(ms / 1000)
            calls[cur]()
            for _ in range(block):
                t0 = time.perf_counter_ns()
                calls[cur]()
                times[(prev, cur, ms)].append((time.perf_counter_ns() - t0) / 1e6)
    alone = {c: float(np.median(times[(c, c, 0)])) for c in names}
    return {"pauses_ms": list(pauses_ms), "alone_ms": {c: round(v, 4) for c, v in alone.items()},
            "after": {cur: {prev: [round(float(np.median(times[(prev, cur, ms)])) / alone[cur], 3)
                                   for ms in pauses_ms] for prev in names if prev != cur}
                      for cur in names}}


def benchmark_app(xml: Path, *, threads: int, shape: list[int], seconds: int) -> float:
    """Median latency (ms) reported by OpenVINO's benchmark_app, run as a user would."""
    # the benchmark_app entry point, with the interpreter edgemml runs in (same openvino)
    cmd = [sys.executable, "-c", "import sys; from openvino.tools.benchmark.main import main; "
           "sys.argv[0] = 'benchmark_app'; sys.exit(main())", "-m", str(xml), "-d", "CPU",
           "-api", "sync", "-hint", "none", "-nstreams", "1", "-nthreads", str(threads),
           "-t", str(seconds), "-shape", "[" + ",".join(map(str, shape)) + "]"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    match = re.search(r"Median:\s+([0-9.]+)\s*ms", text)
    if proc.returncode != 0 or match is None:
        sys.exit(f"benchmark_app failed ({proc.returncode}):\n{text[-2000:]}")
    return float(match.group(1))


def make_models(folder: Path, size: int, keep: float) -> dict[str, Any]:
    """A 1-channel resnet18 at size x size pruned to `keep` of its MACs (BatchNorm estimated on
    noise), as OpenVINO int8 and ONNX Runtime int8 (edgemml.quantization.quick), plus its module."""
    import torch
    from torch.utils.data import TensorDataset

    from edgemml import pruning as P
    from edgemml.config import ModelConfig
    from edgemml.models import build_model
    from edgemml.quantization.quick import quick_artifact
    from edgemml.training import recalibrate_bn

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="torchvision/resnet18"), num_classes=10, in_chans=1).eval()
    x = torch.zeros(1, 1, size, size)
    layers = [n for n in P.prunable_layers(model) if n != "fc"]
    settings = P.PruneSettings(head="fc", min_keep=P.min_keep_channels(P.layer_table(model, x),
                                                                        0.8, 8))
    found = P.prune_to_target(model, x, target=keep, tolerance=0.02, metric="macs",
                              reference=P.measure(model, x, layers), channel_layers=layers,
                              settings=settings, max_ratio=0.8, iterations=16)
    pruned = found.model.eval()
    noise = TensorDataset(torch.randn(32, 1, size, size), torch.zeros(32, dtype=torch.long))
    recalibrate_bn(pruned, noise, batches=2, batch_size=16)
    calib = torch.randn(8, 1, size, size).numpy()
    ov_dir = quick_artifact(pruned, x, "openvino-int8", calib, folder / "ov")
    onnx = quick_artifact(pruned, x, "onnx-int8", calib, folder / "ort")
    return {"ir": ov_dir, "onnx": onnx, "module": pruned, "macs_fraction": found.fraction}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ir", type=Path, help="OpenVINO IR folder (or model.xml)")
    ap.add_argument("--onnx", type=Path, help="an ONNX artifact interleaved with it, as compare.py")
    ap.add_argument("--torch", type=Path, help="an edgemml model folder interleaved with it")
    ap.add_argument("--make", action="store_true", help="build a pruned 224x224 resnet18 instead")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="back-to-back repetitions")
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--app-seconds", type=int, default=15)
    ap.add_argument("--stem", default="timers")
    ap.add_argument("--interference-reps", type=int, default=16,
                    help="repetitions of the after-another-runtime measurement (0: skip it)")
    args = ap.parse_args()

    import torch

    from edgemml import runtimes
    from edgemml.machine import ForeignLoad
    from edgemml.models import load_model
    from edgemml.runtimes.openvino import xml_path

    torch.set_num_threads(args.threads)
    info = machine_info()
    foreign = ForeignLoad().__enter__()  # other processes' CPU share while this runs
    tmp = Path(tempfile.mkdtemp(prefix="edgemml-timers-"))
    module = None
    if args.make:
        made = make_models(tmp, args.size, 0.48)
        args.ir, args.onnx, module = made["ir"], made["onnx"], made["module"]
    elif args.torch:
        module, _ = load_model(args.torch)
    if args.ir is None:
        sys.exit("give --ir (or --make)")
    t = args.threads
    ov = runtimes.open_artifact(args.ir, threads=t)
    shape = [1, *[int(d) for d in re.findall(r"\d+", ov.io["input_shape"])[1:]]]
    if len(shape) < 4:
        shape = [1, 1, args.size, args.size]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    others: dict[str, Any] = {}
    if args.onnx:
        others["ort-int8"] = runtimes.open_artifact(args.onnx, threads=t)
    if module is not None:
        others["torch-fp32"] = runtimes.backend("torch").open_module(module, threads=t)
    calls = {"ov-int8": lambda: ov(x), **{k: (lambda r=r: r(x)) for k, r in others.items()}}

    reps = []
    for rep in range(args.repeats):
        row: dict[str, Any] = {"loadavg": round(os.getloadavg()[0], 2)}
        lat = runtimes.measure_latency(ov, x, warmup=5, runs=50, batch=1, throughput_runs=1)
        row["validate"] = lat.batch1_median_ms
        timed = runtimes.time_calls(calls, warmup=5, runs=args.runs, rounds=args.rounds)
        row["compare_now"] = timed["ov-int8"].median_ms
        row["compare_now_others"] = {k: v.median_ms for k, v in timed.items() if k != "ov-int8"}
        old = old_interleaved(calls, warmup=5, repeats=args.runs, rounds=args.rounds)
        row["compare_old_pause"] = old["ov-int8"]
        row["benchmark_app"] = benchmark_app(xml_path(Path(args.ir)), threads=t, shape=shape,
                                             seconds=args.app_seconds)
        for k in ("validate", "compare_now", "compare_old_pause"):
            row[f"{k}_vs_app"] = round(row[k] / row["benchmark_app"], 3)
        reps.append(row)
        print(f"rep {rep + 1}: load {row['loadavg']}: validate {row['validate']:.3f} ms, "
              f"compare.py {row['compare_now']:.3f}, old compare.py (20 ms pauses) "
              f"{row['compare_old_pause']:.3f}, benchmark_app {row['benchmark_app']:.3f}",
              flush=True)
    after = None
    if args.interference_reps and others:
        print("after another runtime: each timed right after another's block, 0-60 ms pauses",
              flush=True)
        after = interference(calls, reps=args.interference_reps)
    info["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    foreign.__exit__(None, None, None)
    info["foreign_load"] = None if foreign.fraction is None else round(foreign.fraction, 3)
    summary = {k: round(statistics.median(r[f"{k}_vs_app"] for r in reps), 3)
               for k in ("validate", "compare_now", "compare_old_pause")}
    result = {"benchmark": "timers", "machine": info, "ir": str(args.ir), "made": args.make,
              "shape": shape, "threads": t, "runs": args.runs, "rounds": args.rounds,
              "interleaved_with": list(others), "repetitions": reps, "after_another": after,
              "median_ratio_to_benchmark_app": summary}
    md = render_md(result)
    js, mdp = write_results(args.stem, result, md)
    print(md)
    print(f"wrote {js} and {mdp}")


def render_md(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = ["# timers: validate vs compare.py vs benchmark_app on one IR", "",
             f"{m['cpu']}, {r['threads']} threads, {m['date']}; {load_note(m)}. IR: "
             f"`{r['ir']}` ({'a 224x224 resnet18 pruned to ~0.48 of the MACs, built by --make' if r['made'] else 'from a run'}), "
             f"input {r['shape']}; compare.py interleaves it with {', '.join(r['interleaved_with']) or 'nothing'}.",
             "", "Batch-1 median latency (ms) of the same OpenVINO int8 IR, four ways, back to "
             "back; x = ratio to benchmark_app's median in the same repetition.", ""]
    rows = []
    for i, rep in enumerate(r["repetitions"], 1):
        rows.append([i, rep["loadavg"], f"{rep['validate']:.3f} ({rep['validate_vs_app']:.2f}x)",
                     f"{rep['compare_now']:.3f} ({rep['compare_now_vs_app']:.2f}x)",
                     f"{rep['compare_old_pause']:.3f} ({rep['compare_old_pause_vs_app']:.2f}x)",
                     f"{rep['benchmark_app']:.3f}"])
    lines.append(md_table(["rep", "load (1 min)", "validate (measure_latency)",
                           "compare.py now (interleaved, 50 ms pause per block)",
                           "old compare.py (20 ms pause per block)", "benchmark_app"], rows,
                          "lrrrrr"))
    s = r["median_ratio_to_benchmark_app"]
    lines += ["", f"Median ratio to benchmark_app: validate {s['validate']:.2f}x, compare.py "
              f"{s['compare_now']:.2f}x, old compare.py {s['compare_old_pause']:.2f}x.", ""]
    after = r.get("after_another")
    if after:
        pauses = after["pauses_ms"]
        lines += ["After another runtime: median latency of each model timed right after a block "
                  "of another (3 calls), with a pause between them, as a multiple of its latency "
                  "right after its own block (its ms in brackets). edgemml's timer pauses "
                  "50 ms before every block (runtimes.SETTLE_S).", ""]
        rows = [[f"{cur} ({after['alone_ms'][cur]:.3f} ms)", f"after {prev}",
                 *[f"{v:.2f}x" for v in vals]]
                for cur, by_prev in after["after"].items() for prev, vals in by_prev.items()]
        lines += [md_table(["timed", "right after", *[f"{ms} ms pause" for ms in pauses]], rows,
                           "ll" + "r" * len(pauses)), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
