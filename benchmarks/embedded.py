"""ExecuTorch (.pte) and LiteRT (.tflite), fp32 and int8, side by side with edgemml's ONNX Runtime
int8 and OpenVINO int8 (issue 14).

For each torchvision model (resnet18, mobilenet_v3_small; 1000 classes, random init) at 224x224:

1. BatchNorm statistics are estimated on real photographs (random crops of scikit-learn's two
   sample images: benchmarks/quantize.py's make_crops / prepare_model), because a random-init
   network with default statistics gives near-constant outputs and quantizing it would mean nothing;
2. `edgemml run` runs the real stages: load -> quantize (backends onnxruntime, openvino, executorch,
   litert, the same calibration crops for all four) -> export (ONNX, OpenVINO IR, fp32 .pte and
   .tflite);
3. every artifact and torch fp32 eager are opened through edgemml's runtime layer with the same
   thread count, compared with torch fp32 on held-out crops (top-1 agreement, logit cosine) and
   timed at batch 1 in interleaved rounds (edgemml's one timer): latency as a ratio to torch fp32
   eager from the same run, and file size.

x86 timings say little about ARM: XNNPACK (behind both ExecuTorch and LiteRT) is tuned for ARM
NEON / dotprod and is a secondary path on x86, where ONNX Runtime and OpenVINO use VNNI / AMX kernels.
Read the ExecuTorch / LiteRT rows here as "runs and agrees", not as the speed a phone would see.

Writes benchmarks/results/embedded.{json,md} (embedded.<size>.* when --size is not 224). Every
number is measured by this script; the load average at start and end is recorded with it.

Usage: nice .venv/bin/python benchmarks/embedded.py [--models resnet18,mobilenet_v3_small]
       [--size 224] [--repeats 40] [--rounds 8] [--threads 2] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (REPO, fmt, interleaved_latency, load_note, machine_info, mb,  # noqa: E402
                    md_table, median_ratio, write_results)
from quantize import IMAGENET, make_crops, prepare_model  # noqa: E402

PIPELINE = """
name: {name}
seed: 0
preprocess: {preprocess}
data: {{source: crops.npz}}
stages:
  - type: load
    path: {model_dir}
  - type: quantize
    backends: [onnxruntime, openvino, executorch, litert]
    calibration: {{samples: {calibration}}}
  - type: export
    parity_samples: 8
    executorch: {{enabled: true}}
    litert: {{enabled: true}}
    bundle: {{archive: false, samples: 0}}
"""

#: key, label, (stage folder, file) of the artifact; torch is the reference
VARIANTS = [
    ("torch-fp32", "torch fp32 eager", None),
    ("onnx-int8", "ONNX Runtime int8", ("02-quantize", "model.int8.onnx")),
    ("openvino-int8", "OpenVINO int8 (deployed)", ("02-quantize", "openvino-int8")),
    ("executorch-fp32", "ExecuTorch fp32 .pte (XNNPACK)", ("03-export", "model.fp32.pte")),
    ("executorch-int8", "ExecuTorch int8 .pte (XNNPACK)", ("02-quantize", "model.int8.pte")),
    ("litert-fp32", "LiteRT fp32 .tflite", ("03-export", "model.fp32.tflite")),
    ("litert-int8", "LiteRT int8 .tflite", ("02-quantize", "model.int8.tflite")),
]


def run_pipeline(work: Path, arch: str, model_dir: Path, size: int,
                 calibration: int) -> tuple[Path, dict[str, Any]]:
    """`edgemml run` of the saved model -> quantize (4 backends) -> export; run dir and timings."""
    pre = json.dumps({"size": [size, size], "channels": "rgb", **IMAGENET})
    name = f"be-{arch.replace('_', '-')}-{size}"
    (work / f"{name}.yaml").write_text(textwrap.dedent(PIPELINE).format(
        name=name, preprocess=pre, model_dir=model_dir.name, calibration=calibration).lstrip())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(work), str(REPO), os.environ.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "edgemml.cli", "run", f"{name}.yaml", "-q"],
                          cwd=work, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"edgemml run failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    run_dir = work / "runs" / name
    stages = {}
    for rec in sorted(run_dir.glob("*/stage.json")):
        r = json.loads(rec.read_text())
        stages[r["stage"]] = r["wall_time_s"]
    return run_dir, {"wall_s": round(time.perf_counter() - t0, 1), "stage_wall_s": stages}


def bench_model(arch: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from edgemml import runtimes
    from edgemml.config import DataConfig, PreprocessConfig
    from edgemml.data import load_data
    from edgemml.data.datasets import as_arrays
    from edgemml.metrics import output_diversity, parity
    from edgemml.models import load_model

    print(f"== {arch} at {args.size}x{args.size}", flush=True)
    model_dir, bn = prepare_model(arch, args.size, work, args.bn_images)
    run_dir, pipeline = run_pipeline(work, arch, model_dir, args.size, args.calibration)
    print(f"   edgemml run: {pipeline['wall_s']} s {pipeline['stage_wall_s']}", flush=True)
    qrep = json.loads((run_dir / "02-quantize" / "quantize.json").read_text())
    pre = PreprocessConfig(size=(args.size, args.size), channels="rgb", **IMAGENET)
    splits = load_data(DataConfig(source=str(work / "crops.npz")), pre, seed=0, base_dir=work)
    test_x, _ = as_arrays(splits.test)
    model, _ = load_model(run_dir / "01-load" / "model")
    t = args.threads
    runners: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    ref = None
    for key, label, where in VARIANTS:
        if where is None:
            runner, size = runtimes.backend("torch").open_module(model, threads=t), None
        else:
            path = run_dir / where[0] / where[1]
            runner, size = runtimes.open_artifact(path, threads=t), runtimes.size_bytes(path)
        runners[key] = runner
        logits = runtimes.predict(runner, test_x, batch_size=16)
        ref = logits if ref is None else ref
        p = parity(logits, ref, None, None)
        rows.append({"key": key, "label": label, "runs_in": runner.precision, "size_bytes": size,
                     "top1_agreement": round(p["agreement"], 4), "cosine": round(p["cosine"], 5),
                     "io": runner.io if key.startswith("litert") else None})
    one = np.ascontiguousarray(test_x[:1])
    calls = {k: (lambda r=r: r(one)) for k, r in runners.items()}
    print(f"   timing batch 1: {len(calls)} variants x {args.repeats} runs", flush=True)
    load_before = round(os.getloadavg()[0], 2)
    lat = interleaved_latency(calls, warmup=args.warmup, repeats=args.repeats, rounds=args.rounds)
    for k in lat:
        lat[k]["speedup_vs_torch"] = median_ratio(lat["torch-fp32"], lat[k])
        lat[k]["latency_ratio_to_torch"] = (round(lat[k]["median_ms"]
                                                  / lat["torch-fp32"]["median_ms"], 4)
                                            if lat["torch-fp32"]["median_ms"] else None)
    return {"arch": f"torchvision/{arch}", "input": [3, args.size, args.size],
            "num_classes": 1000, "weights": "random init (seed 0), BatchNorm statistics "
            "estimated on photo crops", **bn, "edgemml_pipeline": pipeline,
            "calibration": qrep["calibration"], "test_images": int(len(test_x)),
            "val_agreement_with_fp32": {k: qrep.get(k, {}).get("top1_agreement_with_fp32")
                                        for k in ("onnxruntime", "openvino", "executorch",
                                                  "litert")},
            "torch_fp32_output_diversity": output_diversity(ref, ref.argmax(1)),
            "variants": rows, "latency_batch1": lat,
            "loadavg_around_timing": [load_before, round(os.getloadavg()[0], 2)]}


def render_md(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"# embedded targets benchmark ({result['size']}x{result['size']})", "",
             f"{m['cpu']}, {m['cpu_count']} cores, {result['threads']} threads, {m['date']}; "
             f"{load_note(m)}. Run with `nice` on a machine shared with other jobs: absolute "
             "milliseconds are inflated; the ratios come from one interleaved run.", "",
             "**x86 timings say little about ARM.** XNNPACK (behind ExecuTorch and LiteRT) is "
             "tuned for ARM NEON / dotprod; on this x86 CPU ONNX Runtime and OpenVINO use VNNI "
             "kernels. Read the .pte / .tflite rows as *runs and agrees with torch*, not as the "
             "speed a phone or board would see.", "",
             f"Batch 1, medians of {result['repeats']} timed calls per variant in "
             f"{result['rounds']} interleaved rounds (p90 in brackets); latency ratio = artifact "
             "median / torch fp32 eager median (below 1 = faster than torch). Agreement: top-1 "
             "agreement with torch fp32 on held-out photo crops; cosine: mean cosine of logits.",
             ""]
    for r in result["models"]:
        div = r["torch_fp32_output_diversity"]
        lines += [f"## {r['arch']} {r['input'][1]}x{r['input'][2]}", "",
                  f"torch fp32 predicts {div['distinct_predictions']} distinct classes on "
                  f"{r['test_images']} crops (random weights; agreement is meaningful as far as "
                  f"these differ). Calibration: {r['calibration']['samples']} crops, the same "
                  "for all four int8 backends.", ""]
        rows = []
        for v in r["variants"]:
            s = r["latency_batch1"][v["key"]]
            rows.append([v["label"], v["runs_in"], f"{s['median_ms']:.2f} ({s['p90_ms']:.2f})",
                         fmt(s["latency_ratio_to_torch"], 3),
                         f"{100 * v['top1_agreement']:.1f}%", f"{v['cosine']:.4f}",
                         mb(v["size_bytes"]) if v["size_bytes"] else "-"])
        lines += [md_table(["variant", "runs in", "batch 1 ms", "latency / torch", "agreement",
                            "cosine", "size MB"], rows, "llrrrrr"), ""]
        lite = next((v["io"] for v in r["variants"] if v["key"] == "litert-int8"), None) or {}
        if "input_scale" in lite:
            lines += [f"LiteRT int8 takes {lite['input_dtype']} input (scale "
                      f"{lite['input_scale']:.6g}, zero point {lite['input_zero_point']}) and "
                      f"gives {lite['output_dtype']} output; edgemml's runtime layer feeds and "
                      f"reads it through those.", ""]
        p = r["edgemml_pipeline"]
        lines += [f"edgemml run (quantize 4 backends + export): {p['wall_s']} s; stages: "
                  + ", ".join(f"{k} {v:.1f} s" for k, v in p["stage_wall_s"].items())
                  + f". Load average around the timing: {r['loadavg_around_timing']}.", ""]
    lines += [f"Total benchmark time: {result['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,mobilenet_v3_small")
    ap.add_argument("--size", type=int, default=224, help="input height = width (default 224)")
    ap.add_argument("--repeats", type=int, default=40, help="timed batch-1 calls per variant")
    ap.add_argument("--rounds", type=int, default=8, help="interleaved rounds")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=160, help="photo crops made")
    ap.add_argument("--calibration", type=int, default=32, help="calibration crops")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: temp)")
    args = ap.parse_args()
    args.bn_images = 128

    import torch

    torch.set_num_threads(args.threads)
    info = machine_info()
    t_start = time.perf_counter()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="edgemml-bench-embedded-"))
    work.mkdir(parents=True, exist_ok=True)
    make_crops(args.images, args.size, 0, work / "crops.npz")
    models = []
    stem = "embedded" if args.size == 224 else f"embedded.{args.size}"
    for arch in args.models.split(","):
        models.append(bench_model(arch, args, work))
        info["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
        result = {"benchmark": "embedded", "machine": info, "threads": args.threads,
                  "size": args.size, "repeats": args.repeats, "rounds": args.rounds,
                  "warmup": args.warmup, "images": args.images, "models": models,
                  "seconds": round(time.perf_counter() - t_start, 1), "workdir": str(work)}
        js, md = write_results(stem, result, render_md(result))  # after each model: partial
    print(f"wrote {js} and {md}")


if __name__ == "__main__":
    main()
