"""Latency of edgemml's int8/fp32 artifacts vs torch eager, NNCF and ORT defaults (issue 7).

For each torchvision model (resnet18, mobilenet_v3_small; 1000 classes, random init) at 224x224:

1. BatchNorm statistics are estimated on real photographs (random crops of scikit-learn's two
   sample images), because a random-init network with default statistics gives near-constant
   outputs and quantizing it would mean nothing;
2. `edgemml run` runs the real stages on it (the built-in `load` stage hands over the model): quantize
   (defaults: the CPU-aware recipe) -> export (ONNX fp32, OpenVINO IR fp32);
3. outside edgemml, the same fp32 ONNX file is quantized with ONNX Runtime's `quantize_static` and
   with `nncf.quantize`, every option at its default, on the same calibration crops;
4. every variant is timed at batch 1 and batch 8 with 2 threads, interleaved (A B C A B C ...), and
   compared with torch fp32 on held-out crops: top-1 agreement and logit cosine.

OpenVINO figures are labelled with the precision the compiled model reports and with the precision
each compute layer of its execution graph runs in (bf16 by default on this AVX-512-BF16 CPU).

Writes benchmarks/results/quantize.{json,md} (quantize.quick.* with --quick) and the table in
benchmarks/README.md. Every number is measured by this script.

Usage: .venv/bin/python benchmarks/quantize.py [--models resnet18,mobilenet_v3_small] [--size 224]
       [--batches 1,8] [--repeats 60] [--quick]
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
from common import (REPO, Variant, fmt, interleaved_latency, load_note, machine_info,  # noqa: E402
                    mb, md_table, median_ratio, nncf_default_int8, ort_default_int8,
                    ort_precision, ov_layer_precisions, precision_label, update_readme_section,
                    write_results)

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}

PIPELINE = """
name: {name}
seed: 0
preprocess: {preprocess}
data: {{source: crops.npz}}
stages:
  - type: load
    path: {model_dir}
  - type: quantize
{quantize_extra}
  - type: export
    parity_samples: {parity}
    bundle: {{archive: false, samples: 0}}
"""

VARIANTS = [  # key, label, source
    ("torch-fp32", "torch fp32 eager", "torch"),
    ("ort-fp32", "ONNX Runtime fp32", "edgemml export"),
    ("ort-int8", "ONNX Runtime int8", "edgemml quantize"),
    ("ort-int8-default", "ONNX Runtime int8", "ORT quantize_static defaults"),
    ("ov-fp32-f32", "OpenVINO fp32 (f32 pinned)", "edgemml export"),
    ("ov-fp32", "OpenVINO fp32 IR, default precision", "edgemml export"),
    ("ov-int8", "OpenVINO int8", "edgemml quantize"),
    ("ov-int8-nncf-default", "OpenVINO int8", "nncf.quantize defaults"),
]


def make_crops(n: int, size: int, seed: int, out: Path) -> None:
    """n random square crops (scale 25-100 % of the short side, random flips) of scikit-learn's two
    sample photographs, resized to size x size; label = which photograph."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for i in range(n):
        k = i % len(photos)
        img = photos[k]
        h, w = img.shape[:2]
        side = int(rng.uniform(0.25, 1.0) * min(h, w))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(img[top:top + side, left:left + side]).resize(
            (size, size), Image.BILINEAR)
        arr = np.asarray(crop)
        xs.append(arr[:, ::-1] if rng.random() < 0.5 else arr)
        ys.append(k)
    np.savez(out, x=np.stack(xs).astype(np.uint8), y=np.asarray(ys, np.int64),
             classes=np.asarray(["china", "flower"]))


def prepare_model(arch: str, size: int, work: Path, bn_images: int) -> tuple[Path, dict[str, Any]]:
    """A random-init torchvision model whose BatchNorm statistics are estimated on the crops,
    saved as an edgemml model folder (with its preprocessing spec)."""
    import torch

    from edgemml.config import DataConfig, ModelConfig, PreprocessConfig
    from edgemml.data import load_data
    from edgemml.models import ModelSpec, build_model, save_model
    from edgemml.training import recalibrate_bn

    pre = PreprocessConfig(size=(size, size), channels="rgb", **IMAGENET)
    splits = load_data(DataConfig(source=str(work / "crops.npz")), pre, seed=0, base_dir=work)
    torch.manual_seed(0)
    cfg = ModelConfig(arch=f"torchvision/{arch}")
    model = build_model(cfg, num_classes=1000, in_chans=3)
    t0 = time.perf_counter()
    seen = recalibrate_bn(model, splits.train, batches=max(1, bn_images // 32), batch_size=32)
    spec = ModelSpec.from_config(cfg, num_classes=1000, in_chans=3,
                                 class_names=[f"class{i}" for i in range(1000)],
                                 preprocess=pre.model_dump(mode="json"))
    folder = work / f"{arch}-baseline"
    save_model(model.eval(), spec, folder)
    return folder, {"bn_images": seen, "bn_seconds": round(time.perf_counter() - t0, 2)}


def run_pipeline(work: Path, arch: str, model_dir: Path, size: int,
                 quick: bool) -> tuple[Path, dict[str, Any]]:
    """`edgemml run` of saved model -> quantize -> export; returns the run dir and stage times."""
    pre = json.dumps({"size": [size, size], "channels": "rgb", **IMAGENET})
    name = f"bq-{arch.replace('_', '-')}"
    extra = "    calibration: {samples: 32}\n    sensitivity_samples: 16" if quick else ""
    (work / f"{name}.yaml").write_text(textwrap.dedent(PIPELINE).format(
        name=name, preprocess=pre, model_dir=model_dir.name, quantize_extra=extra,
        parity=16 if quick else 64).lstrip())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(work), str(REPO), os.environ.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "edgemml.cli", "run", f"{name}.yaml", "-q"],
                          cwd=work, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"edgemml run failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    run_dir = work / "runs" / name
    stages = {}
    for rec in sorted(run_dir.glob("*/stage.json")):
        r = json.loads(rec.read_text())
        stages[r["stage"]] = r["wall_time_s"]
    return run_dir, {"wall_s": round(wall, 2), "stage_wall_s": stages}


def bench_model(arch: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from edgemml.config import DataConfig, PreprocessConfig
    from edgemml.data import load_data
    from edgemml import runtimes
    from edgemml.data.datasets import as_arrays, evenly_spaced
    from edgemml.metrics import output_diversity, parity
    from edgemml.models import load_model

    print(f"== {arch} at {args.size}x{args.size}", flush=True)
    model_dir, bn = prepare_model(arch, args.size, work, args.bn_images)
    run_dir, pipeline = run_pipeline(work, arch, model_dir, args.size, args.quick)
    print(f"   edgemml run: {pipeline['wall_s']} s {pipeline['stage_wall_s']}", flush=True)
    q_dir, e_dir = run_dir / "02-quantize", run_dir / "03-export"
    qrep = json.loads((q_dir / "quantize.json").read_text())

    pre = PreprocessConfig(size=(args.size, args.size), channels="rgb", **IMAGENET)
    splits = load_data(DataConfig(source=str(work / "crops.npz")), pre, seed=0, base_dir=work)
    # the calibration samples edgemml used: quantize's default split (train: no data.calibration)
    n_cal = qrep["calibration"]["samples"]
    calib, _ = as_arrays(splits.train, evenly_spaced(len(splits.train), n_cal))
    fp32_onnx = e_dir / "model.fp32.onnx"
    ort_def = work / f"{arch}.ort-default.int8.onnx"
    nncf_def = work / f"{arch}-nncf-default"
    baselines = {"ort-int8-default": ort_default_int8(fp32_onnx, ort_def, calib),
                 "ov-int8-nncf-default": nncf_default_int8(fp32_onnx, nncf_def, calib)}

    model, _ = load_model(run_dir / "01-load" / "model")
    t = args.threads
    ort_rt, ov_rt = runtimes.backend("onnxruntime"), runtimes.backend("openvino")
    preds = {
        "torch-fp32": (runtimes.backend("torch").open_module(model, threads=t), model_dir),
        "ort-fp32": (ort_rt.open(fp32_onnx, threads=t), fp32_onnx),
        "ort-int8": (ort_rt.open(q_dir / "model.int8.onnx", threads=t),
                     q_dir / "model.int8.onnx"),
        "ort-int8-default": (ort_rt.open(ort_def, threads=t), ort_def),
        "ov-fp32-f32": (ov_rt.open(e_dir / "openvino-fp32", threads=t, exact=True),
                        e_dir / "openvino-fp32"),
        "ov-fp32": (ov_rt.open(e_dir / "openvino-fp32", threads=t, exact=False),
                    e_dir / "openvino-fp32"),
        "ov-int8": (ov_rt.open(q_dir / "openvino-int8", threads=t, exact=False),
                    q_dir / "openvino-int8"),
        "ov-int8-nncf-default": (ov_rt.open(nncf_def, threads=t, exact=False), nncf_def),
    }
    variants: list[Variant] = []
    for key, label, source in VARIANTS:
        runner, path = preds[key]
        if runner.backend == "openvino":
            layers = ov_layer_precisions(path / "model.xml", threads=t,
                                         precision="f32" if key == "ov-fp32-f32" else "default")
            precision = precision_label(runner.precision, layers)
        elif runner.backend == "onnxruntime":
            precision = ort_precision(path)
        else:
            precision = "f32"
        variants.append(Variant(key, label, source, runner, precision, path,
                                runtimes.size_bytes(path)))

    # agreement with torch fp32 on held-out crops
    test_x, test_y = as_arrays(splits.test)
    ref = variants[0].runner(test_x)
    agreement = {}
    for v in variants:
        logits = runtimes.predict(v.runner, test_x, batch_size=16)
        p = parity(logits, ref, None, None)
        agreement[v.key] = {"top1_agreement": round(p["agreement"], 4),
                            "cosine": round(p["cosine"], 5)}
    diversity = output_diversity(ref, ref.argmax(1))

    latency: dict[str, Any] = {}
    load_after: dict[str, float] = {}  # 1-minute load average right after each timing
    for b in args.batches:
        x = np.resize(test_x, (b, *test_x.shape[1:])).astype(np.float32)
        calls = {v.key: (lambda v=v: v.runner(x)) for v in variants}
        repeats = args.repeats
        print(f"   timing batch {b}: {len(calls)} variants x {repeats} runs", flush=True)
        res = interleaved_latency(calls, warmup=args.warmup, repeats=repeats, rounds=args.rounds)
        ref_lat = res["torch-fp32"]
        for k in res:
            res[k]["speedup_vs_torch"] = median_ratio(ref_lat, res[k])
        latency[f"batch{b}"] = res
        load_after[f"batch{b}"] = round(os.getloadavg()[0], 2)
    return {
        "arch": f"torchvision/{arch}", "input": [3, args.size, args.size], "num_classes": 1000,
        "weights": "random init (seed 0), BatchNorm statistics estimated on photo crops", **bn,
        "edgemml_pipeline": pipeline,
        "edgemml_quantize": {"ort_recipe": qrep.get("onnxruntime", {}).get("recipe"),
                             "openvino_settings": qrep.get("openvino", {}).get("settings"),
                             "calibration": qrep["calibration"],
                             "val_agreement_with_fp32": {
                                 k: qrep.get(k, {}).get("top1_agreement_with_fp32")
                                 for k in ("onnxruntime", "openvino")}},
        "defaults_outside_edgemml": baselines,
        "test_images": int(len(test_x)),
        "torch_fp32_output_diversity": diversity,
        "variants": [{"key": v.key, "label": v.label, "source": v.source,
                      "runs_in": v.precision, "size_bytes": v.size_bytes,
                      **agreement[v.key]} for v in variants],
        "latency": latency, "loadavg_after_timing": load_after,
    }


def render_md(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"# quantize latency benchmark ({result['mode']})", "",
             f"{m['cpu']}, {m['cpu_count']} cores ({', '.join(m['int8_bf16_flags'])}), "
             f"{result['threads']} threads, {m['date']}; {load_note(m)}.", "",
             f"Medians of {result['repeats']} timed calls per variant and batch, interleaved in "
             f"{result['rounds']} rounds; p90 in brackets; x = speed-up over torch fp32 eager "
             f"at the same batch, from the same run. Agreement: top-1 agreement with torch fp32 "
             f"on held-out photo crops; cosine: mean cosine similarity of the logits to torch "
             f"fp32's.", ""]
    batches = result["batches"]
    for r in result["models"]:
        div = r["torch_fp32_output_diversity"]
        lines += [f"## {r['arch']} {r['input'][1]}x{r['input'][2]}", "",
                  f"torch fp32 predicts {div['distinct_predictions']} distinct classes on "
                  f"{r['test_images']} crops (random weights; agreement is meaningful only as far "
                  f"as these differ).", ""]
        header = ["variant", "made by", "runs in"]
        for b in batches:
            header += [f"batch {b} ms", "x"]
        header += ["agreement", "cosine", "size MB"]
        rows = []
        for v in r["variants"]:
            row = [v["label"], v["source"], v["runs_in"]]
            for b in batches:
                s = r["latency"][f"batch{b}"][v["key"]]
                row += [f"{s['median_ms']:.2f} ({s['p90_ms']:.2f})",
                        fmt(s["speedup_vs_torch"], 2, "x")]
            row += [f"{100 * v['top1_agreement']:.1f}%", f"{v['cosine']:.4f}", mb(v["size_bytes"])]
            rows.append(row)
        lines += [md_table(header, rows, "lll" + "rr" * len(batches) + "rrr"), ""]
        p = r["edgemml_pipeline"]
        lines += [f"edgemml run (quantize + export): {p['wall_s']} s; stages: "
                  + ", ".join(f"{k} {v:.1f} s" for k, v in p["stage_wall_s"].items()), ""]
    lines += [f"Total benchmark time: {result['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=None, help="comma-separated torchvision names "
                    "(default resnet18,mobilenet_v3_small)")
    ap.add_argument("--size", type=int, default=None, help="input height = width (default 224)")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed calls per variant and batch (default 60)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 10)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 5)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=None, help="photo crops made (default 480)")
    ap.add_argument("--quick", action="store_true", help="smoke test: mobilenet_v3_small and "
                    "resnet18 at 64x64, few images and runs; writes quantize.quick.*, not README")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: temp)")
    args = ap.parse_args()
    q = args.quick
    args.models = (args.models or "resnet18,mobilenet_v3_small").split(",")
    args.size = args.size or (64 if q else 224)
    args.batches = [int(b) for b in (args.batches or "1,8").split(",")]
    args.repeats = args.repeats or (6 if q else 60)
    args.rounds = args.rounds or (3 if q else 10)
    args.warmup = args.warmup if args.warmup is not None else (2 if q else 5)
    args.images = args.images or (120 if q else 480)
    args.bn_images = 64 if q else 256

    import torch

    torch.set_num_threads(args.threads)  # torch_predictor pins it per call too
    info = machine_info()
    t_start = time.perf_counter()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="edgemml-bench-quantize-"))
    work.mkdir(parents=True, exist_ok=True)
    make_crops(args.images, args.size, 0, work / "crops.npz")
    models = [bench_model(arch, args, work) for arch in args.models]
    info["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    result = {"benchmark": "quantize", "mode": "quick" if q else "full", "machine": info,
              "threads": args.threads, "size": args.size, "batches": args.batches,
              "repeats": args.repeats, "rounds": args.rounds, "warmup": args.warmup,
              "images": args.images, "models": models,
              "seconds": round(time.perf_counter() - t_start, 1), "workdir": str(work)}
    md = render_md(result)
    stem = "quantize.quick" if q else "quantize"
    js, mdp = write_results(stem, result, md)
    section = md.split("\n", 1)[1].strip().replace("\n## ", "\n#### ")  # under README's "##"
    if not q and update_readme_section("quantize", section):
        print("updated benchmarks/README.md")
    print(md)
    print(f"wrote {js} and {mdp}")


if __name__ == "__main__":
    main()
