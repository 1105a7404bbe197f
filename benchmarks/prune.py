"""Benchmark of the prune stage on the default task: resnet18 (1 input channel, 32x32) on builtin:digits.

1. trains the baseline with edgemml's trainer (the finetune stage's loop) and saves it;
2. runs `edgemml run` on a pipeline that feeds it to the `prune` stage with its defaults
   (target_macs 0.5, l2, round_to 8, 5 recovery epochs distilled from the unpruned model), plus an
   ablation without channel rounding (round_to: null, no recovery) for the latency effect;
3. measures accuracy on the held-out test split and CPU latency of baseline vs pruned models in
   torch and in ONNX Runtime (fp32, fixed threads, interleaved so machine load hits both alike).

Writes benchmarks/results/prune.json and prune.md. Every number is measured by this script.
Usage: .venv/bin/python benchmarks/prune.py [--epochs 5] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgemml.config import DataConfig, ModelConfig, PreprocessConfig
from edgemml.data import load_data
from edgemml.models import ModelSpec, build_model, load_model, save_model
from edgemml import runtimes
from edgemml.training import TrainConfig, evaluate, train

REPO = Path(__file__).resolve().parent.parent
PRE = PreprocessConfig(channels="gray", size=(32, 32), mean=[0.5], std=[0.5])

PIPELINE = """
name: bench-prune
seed: 0
preprocess: {size: [32, 32], channels: gray, mean: [0.5], std: [0.5]}
data: {source: "builtin:digits"}
model: {arch: torchvision/resnet18}
stages:
  - name: baseline
    type: load
    path: baseline
  - name: prune
    type: prune
    target_macs: 0.5
  - name: prune-noround
    type: prune
    input: baseline
    target_macs: 0.5
    round_to: null
    recover: null
    latency: null
"""


def export_onnx(model: torch.nn.Module, path: Path, channels: int) -> Path:
    torch.onnx.export(model.eval(), (torch.zeros(1, channels, 32, 32),), str(path), dynamo=False,
                      opset_version=17, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}})
    return path


def latency(runners: dict[str, Any], x: np.ndarray, repeats: int,
            rounds: int = 5) -> dict[str, dict[str, float]]:
    """Median ms per call of each runner, interleaved, by edgemml's one timer."""
    from edgemml.runtimes import time_calls

    timed = time_calls({k: (lambda r=r: r(x)) for k, r in runners.items()}, warmup=3,
                       runs=repeats, rounds=rounds)
    return {k: {"median_ms": t.median_ms, "runs": t.runs} for k, t in timed.items()}


def parity(model: torch.nn.Module, path: Path, x: torch.Tensor) -> float:
    from edgemml import runtimes

    with torch.no_grad():
        ref = model.eval()(x).numpy()
    got = runtimes.predict(runtimes.open_artifact(path, threads=None), x.numpy())
    return float(np.abs(got - ref).max() / max(1e-12, np.abs(ref).max()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5, help="baseline training epochs")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the run here (default: temp)")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="edgemml-bench-prune-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    splits = load_data(DataConfig(source="builtin:digits"), PRE, seed=0, base_dir=work)
    arch = ModelConfig(arch="torchvision/resnet18")
    baseline = build_model(arch, num_classes=10, in_chans=1)
    t0 = time.perf_counter()
    res = train(baseline, splits.train, splits.val, TrainConfig(epochs=args.epochs, lr=2e-3), seed=0)
    train_s = time.perf_counter() - t0
    spec = ModelSpec.from_config(arch, num_classes=10, in_chans=1, class_names=splits.classes,
                                 preprocess=PRE.model_dump(mode="json"))
    save_model(baseline, spec, work / "baseline")
    (work / "pipeline.yaml").write_text(textwrap.dedent(PIPELINE).lstrip())

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(work), os.environ.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "edgemml.cli", "run", "pipeline.yaml"], cwd=work,
                          env=env, capture_output=True, text=True)
    pipeline_s = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"edgemml run failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    run_dir = work / "runs" / "bench-prune"
    report = json.loads((run_dir / "02-prune" / "prune.json").read_text())
    report_nr = json.loads((run_dir / "03-prune-noround" / "prune.json").read_text())
    pruned, _ = load_model(run_dir / "02-prune" / "model")
    noround, _ = load_model(run_dir / "03-prune-noround" / "model")

    models = {"baseline": baseline.eval(), "pruned": pruned, "pruned_noround": noround}
    test_acc = {k: evaluate(m, splits.test)["top1_pct"] / 100 for k, m in models.items()}
    onnx = {k: export_onnx(m, work / f"{k}.onnx", 1) for k, m in models.items()}
    xs = torch.from_numpy(np.random.default_rng(1).standard_normal((8, 1, 32, 32)).astype(np.float32))
    onnx_parity = {k: parity(m, onnx[k], xs) for k, m in models.items()}
    lat: dict[str, Any] = {}
    for batch, threads in ((1, 1), (64, 1), (64, 2)):
        x = np.random.default_rng(0).standard_normal((batch, 1, 32, 32)).astype(np.float32)
        reps, rounds = (100, 10) if batch == 1 else (20, 5)
        torch_runners = {k: runtimes.backend("torch").open_module(m, threads=threads)
                         for k, m in models.items()}
        ort_runners = {k: runtimes.open_artifact(p, threads=threads) for k, p in onnx.items()}
        lat[f"torch_b{batch}_t{threads}"] = latency(torch_runners, x, reps, rounds)
        lat[f"ort_b{batch}_t{threads}"] = latency(ort_runners, x, reps, rounds)
    speedups = {key: {k: v["baseline"]["median_ms"] / v[k]["median_ms"]
                      for k in ("pruned", "pruned_noround")} for key, v in lat.items()}

    acc_drop_pp = 100 * (test_acc["baseline"] - test_acc["pruned"])
    result = {
        "task": "torchvision/resnet18, in_chans 1, 10 classes, 32x32 gray, builtin:digits "
                "(sklearn digits: 1257 train / 270 val / 270 test)",
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "note": "shared machine: compare ratios measured in the same run"},
        "baseline": {"epochs": args.epochs, "train_seconds": train_s, "best_epoch": res.best_epoch},
        "prune_stage": {"settings": dict(report["settings"], recover_epochs=len(
                            report["steps"][-1].get("recovery", {}).get("history", []))), "achieved": report["achieved"],
                        "macs": report["macs"], "params": report["params"],
                        "val_top1_pct": report["top1_pct"],
                        "torch_latency_in_stage": report["latency_torch_cpu"],
                        "search_trials": len(report["steps"][0]["trials"]),
                        "refine_global_ratio": report["steps"][0]["refine_global_ratio"]},
        "noround_ablation": {"achieved": report_nr["achieved"], "val_top1_pct": report_nr["top1_pct"],
                             "odd_channel_layers": sorted(
                                 n for n, r in report_nr["layers"].items()
                                 if r["out"][1] % 8 and r["out"][1] != r["out"][0])},
        "test_accuracy": test_acc,
        "test_accuracy_drop_pp": acc_drop_pp,
        "target_met": acc_drop_pp <= 1.0,
        "onnx_parity_max_rel_err": onnx_parity,
        "latency_ms": lat,
        "speedup_vs_baseline": speedups,
        "pipeline_seconds": pipeline_s,
        "total_seconds": time.perf_counter() - t_start,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prune.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    (args.out / "prune.md").write_text(render_md(result))
    print(render_md(result))


def render_md(r: dict[str, Any]) -> str:
    p = r["prune_stage"]
    acc = r["test_accuracy"]
    lines = [
        "# prune benchmark", "", f"Task: {r['task']}.", "",
        f"Prune stage defaults (target_macs 0.5, {p['settings']['importance']}, round_to "
        f"{p['settings']['round_to']}, recovery with distillation): MACs "
        f"{p['macs']['before'] / 1e6:.1f}M -> {p['macs']['after'] / 1e6:.1f}M "
        f"({p['achieved']['macs']:.3f}), params {p['params']['before'] / 1e6:.2f}M -> "
        f"{p['params']['after'] / 1e6:.2f}M, {p['search_trials']} search trials.", "",
        "| model | test accuracy | val accuracy |", "|---|---|---|",
        f"| baseline | {100 * acc['baseline']:.2f}% | {p['val_top1_pct']['before']:.2f}% |",
        f"| pruned, BN re-estimated, before recovery | - | "
        f"{p['val_top1_pct']['after_pruning']:.2f}% |",
        f"| pruned + recovery | {100 * acc['pruned']:.2f}% | "
        f"{p['val_top1_pct']['after_recovery']:.2f}% |",
        f"| pruned, round_to null, no recovery | {100 * acc['pruned_noround']:.2f}% | "
        f"{r['noround_ablation']['val_top1_pct']['after_pruning']:.2f}% |", "",
        f"Test accuracy lost: {r['test_accuracy_drop_pp']:.2f} pp (target <= 1 pp: "
        f"{'met' if r['target_met'] else 'NOT met'}). A negative loss is a gain: recovery trains "
        f"{p['settings'].get('recover_epochs', 'a few')} more epochs (distilled from the baseline), "
        f"and the baseline had only {r['baseline']['epochs']} epochs.", "",
        "| runtime, batch, threads | baseline ms | pruned ms | speed-up | pruned (no rounding) "
        "speed-up |", "|---|---|---|---|---|"]
    for key, v in r["latency_ms"].items():
        s = r["speedup_vs_baseline"][key]
        lines.append(f"| {key} | {v['baseline']['median_ms']:.2f} | {v['pruned']['median_ms']:.2f} "
                     f"| {s['pruned']:.2f}x | {s['pruned_noround']:.2f}x |")
    lines += ["", "ONNX parity (max |ort - torch| / max |torch|): "
              + ", ".join(f"{k} {v:.1e}" for k, v in r["onnx_parity_max_rel_err"].items()), "",
              f"Machine: {r['machine']['platform']}, {r['machine']['cpu_count']} CPUs (shared; "
              "latencies are medians of interleaved runs, compare ratios).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
