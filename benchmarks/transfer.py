"""Does migration help? A model pretrained on builtin:printed-digits (RGB) is migrated into a
1-channel model and fine-tuned on builtin:digits; the same architecture trained from scratch with the
same steps, optimizer, schedule, augmentation and labelled samples is the baseline.

Grid: labelled samples per class x optimizer steps x seeds. The seed picks the labelled subset, the
scratch initialisation and the data order; both arms of one (size, steps, seed) cell see exactly the
same samples in the same order. The migrated arm goes through the migrate stage's code path
(edgemml.models.transfer: key matching, 3->1 stem sum, head rows by class name) and BatchNorm
re-estimation on the cell's labelled training images (what `recalibrate_bn: auto` does).
Accuracy is measured on the held-out val + test splits of builtin:digits (never trained on).

    .venv/bin/python benchmarks/transfer.py              # full grid: 9 min measured on 2 busy cores
    .venv/bin/python benchmarks/transfer.py --smoke      # a 1-minute check of the script
    .venv/bin/python benchmarks/transfer.py --per-class all --steps 1000 --tag long
                                                         # where scratch catches up (~10 min)

Writes benchmarks/results/transfer.json (every run) and transfer.md (mean +- std over seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset

from edgemml.config import DataConfig, ModelConfig, PreprocessConfig
from edgemml.data import load_data
from edgemml.data.datasets import per_class_subset
from edgemml.models import build_model, find_classifier, find_stem_conv
from edgemml.models.transfer import coverage, fuse, map_source, match_keys
from edgemml.training import AugmentConfig, TrainConfig, evaluate, recalibrate_bn, train

OUT = Path(__file__).resolve().parent / "results"


def shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def migrate_into(target: torch.nn.Module, source: dict[str, torch.Tensor],
                 classes: list[str]) -> dict[str, Any]:
    """The migrate stage's transfer for one source; returns what it did."""
    stem, head = find_stem_conv(target, 1), find_classifier(target, 1)
    tstate = target.state_dict()
    matches, _ = match_keys(shapes(tstate), shapes(source), stem=stem, head=head)
    smap = map_source("pretrained", tstate, source, matches, stem=stem, head=head,
                      target_classes=classes, source_classes=classes)
    if smap.mismatched:
        raise RuntimeError(f"unexpected shape mismatches: {smap.mismatched[:3]}")
    fused = fuse([smap])
    target.load_state_dict({**tstate, **{k: f.value for k, f in fused.items()}}, strict=True)
    share, _, _ = coverage(dict(target.named_parameters()), fused)
    return {"coverage": share, "stem": fused[f"{stem}.weight"].provenance[0].adaptation,
            "tensors": len(fused)}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="torchvision/shufflenet_v2_x0_5")
    p.add_argument("--size", type=int, default=32, help="input height and width")
    p.add_argument("--per-class", nargs="+", default=["3", "10", "all"])
    p.add_argument("--steps", nargs="+", type=int, default=[40, 120, 360])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--pretrain-samples", type=int, default=6000)
    p.add_argument("--pretrain-steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is fastest on a shared 2-core machine)")
    p.add_argument("--max-minutes", type=float, default=30.0,
                   help="stop starting new cells after this; results so far are written")
    p.add_argument("--pretrain-augment", action="store_true",
                   help="augment the pretraining too (off by default, as in pipelines/quickstart.yaml:"
                        " translate+rotation slowed convergence on printed digits several-fold)")
    p.add_argument("--smoke", action="store_true", help="tiny grid to check the script")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--tag", default="", help="write transfer-TAG.{json,md} (e.g. an extra grid)")
    args = p.parse_args()
    if args.smoke:
        args.per_class, args.steps, args.seeds = ["3"], [5], [0]
        args.pretrain_samples, args.pretrain_steps = 300, 10
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    model_cfg = ModelConfig(arch=args.arch)
    size = (args.size, args.size)
    augment = AugmentConfig(translate=0.1, rotation=10)

    def cfg(steps: int, aug: AugmentConfig = augment, batch_size: int | None = None,
            warmup: float = 0.0) -> TrainConfig:
        return TrainConfig(max_steps=steps, epochs=10_000, batch_size=batch_size or args.batch_size,
                           optimizer="adamw", lr=args.lr, weight_decay=1e-4, schedule="cosine",
                           warmup_epochs=warmup, augment=aug, device="cpu")

    # 1. the source: pretrained on rendered RGB digits
    rgb = PreprocessConfig(size=size, channels="rgb", mean=[0.5], std=[0.5])
    printed = load_data(DataConfig(source="builtin:printed-digits", samples=args.pretrain_samples),
                        rgb, seed=0, base_dir=Path("."))
    torch.manual_seed(0)
    source = build_model(model_cfg, num_classes=10, in_chans=3)
    t0 = time.perf_counter()
    pre_aug = augment if args.pretrain_augment else AugmentConfig()
    # as pipelines/quickstart.yaml's pretrain_source: batch 64 and a short warm-up (without it,
    # AdamW at this learning rate left resnet18 near chance after 300 steps)
    train(source, printed.train, None,
          cfg(args.pretrain_steps, pre_aug, batch_size=64, warmup=0.2), seed=0)
    pretrain = {"samples": args.pretrain_samples, "steps": args.pretrain_steps,
                "augment": pre_aug.model_dump(),
                "seconds": round(time.perf_counter() - t0, 1),
                "printed_test_accuracy": evaluate(source, printed.test)["accuracy"]}
    print(f"pretrained on printed-digits: test accuracy {pretrain['printed_test_accuracy']:.4f} "
          f"({pretrain['seconds']} s)", flush=True)
    source_state = {k: v.detach().clone() for k, v in source.state_dict().items()}

    # 2. the target: gray digits; zero-shot accuracy of the migrated model
    gray = PreprocessConfig(size=size, channels="gray", mean=[0.5], std=[0.5])
    digits = load_data(DataConfig(source="builtin:digits"), gray, seed=0, base_dir=Path("."))
    held_out = ConcatDataset([digits.val, digits.test])
    classes = digits.classes

    def migrated(bn_images: Any, seed: int) -> tuple[torch.nn.Module, dict[str, Any]]:
        torch.manual_seed(seed)
        model = build_model(model_cfg, num_classes=10, in_chans=1)
        info = migrate_into(model, source_state, classes)
        recalibrate_bn(model, bn_images, batches=20, seed=seed)
        return model.eval(), info

    torch.manual_seed(0)
    zs_model = build_model(model_cfg, num_classes=10, in_chans=1)
    migration = migrate_into(zs_model, source_state, classes)
    zero_shot = {"no_bn_reestimation": evaluate(zs_model, held_out)["accuracy"]}
    recalibrate_bn(zs_model, digits.train, batches=20, seed=0)
    zero_shot["bn_reestimated_on_target_train"] = evaluate(zs_model, held_out)["accuracy"]
    print(f"migration: {migration}; zero-shot on digits {zero_shot}", flush=True)

    # 3. the grid
    runs: list[dict[str, Any]] = []
    report: dict[str, Any] = {}
    complete = True

    def write() -> None:
        report.update({
            "benchmark": "transfer", "complete": complete, "arch": args.arch, "input_size": size,
            "train": cfg(1).model_dump(mode="json", exclude={"max_steps", "epochs"}),
            "grid": {"per_class": args.per_class, "steps": args.steps, "seeds": args.seeds},
            "held_out": {"splits": "val+test of builtin:digits", "n": len(held_out)},
            "pretrain": pretrain, "migration": migration, "zero_shot": zero_shot,
            "runs": runs, "table": table(runs),
            "environment": {"torch": torch.__version__, "threads": args.threads,
                            "cpus": os.cpu_count(), "python": platform.python_version(),
                            "machine": platform.machine()},
            "wall_seconds": round(time.perf_counter() - t_start, 1)})
        args.out.mkdir(parents=True, exist_ok=True)
        stem = f"transfer-{args.tag}" if args.tag else "transfer"
        (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / f"{stem}.md").write_text(markdown(report))

    for per_class in args.per_class:
        for seed in args.seeds:
            if per_class == "all":
                subset = digits.train
            else:
                subset = digits.train.subset(per_class_subset(digits.train.labels, int(per_class),
                                                              seed))
            for steps in args.steps:
                if (time.perf_counter() - t_start) / 60 > args.max_minutes:
                    complete = False
                    break
                for arm in ("scratch", "migrated"):
                    if arm == "scratch":
                        torch.manual_seed(seed)
                        model = build_model(model_cfg, num_classes=10, in_chans=1)
                    else:
                        model, _ = migrated(subset, seed)
                    t0 = time.perf_counter()
                    train(model, subset, None, cfg(steps), seed=seed)
                    acc = evaluate(model, held_out)["accuracy"]
                    runs.append({"per_class": per_class, "labelled": len(subset), "steps": steps,
                                 "seed": seed, "arm": arm, "accuracy": acc,
                                 "train_seconds": round(time.perf_counter() - t0, 2)})
                    print(f"{per_class:>4}/class {steps:>4} steps seed {seed} {arm:>8}: {acc:.4f}",
                          flush=True)
                write()
    write()


def table(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean +- std over seeds per (per_class, steps); the gain is paired by seed."""
    rows = []
    keys = list(dict.fromkeys((r["per_class"], r["steps"]) for r in runs))
    for per_class, steps in keys:
        cell = [r for r in runs if (r["per_class"], r["steps"]) == (per_class, steps)]
        by_seed: dict[int, dict[str, float]] = {}
        for r in cell:
            by_seed.setdefault(r["seed"], {})[r["arm"]] = r["accuracy"]
        paired = [v for v in by_seed.values() if len(v) == 2]
        if not paired:
            continue
        s = mean_std([v["scratch"] for v in paired])
        m = mean_std([v["migrated"] for v in paired])
        g = mean_std([v["migrated"] - v["scratch"] for v in paired])
        rows.append({"per_class": per_class, "labelled": cell[0]["labelled"], "steps": steps,
                     "seeds": len(paired), "scratch_mean": s[0], "scratch_std": s[1],
                     "migrated_mean": m[0], "migrated_std": m[1], "gain_mean": g[0],
                     "gain_std": g[1],
                     "migrated_wins": sum(v["migrated"] > v["scratch"] for v in paired)})
    return rows


def markdown(report: dict[str, Any]) -> str:
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    z = report["zero_shot"]
    lines = [
        "# Transfer benchmark: printed-digits (RGB) -> digits (gray)", "",
        f"{report['arch']} at {report['input_size'][0]}x{report['input_size'][1]}; "
        f"AdamW lr {report['train']['lr']:g}, cosine, batch {report['train']['batch_size']}, "
        f"augmentation translate 0.1 + rotation 10 deg, identical for both arms. Accuracy (%) on "
        f"{report['held_out']['n']} held-out digits (val+test), mean ± std over seeds "
        f"{', '.join(map(str, report['grid']['seeds']))}; gain = migrated − scratch, paired by "
        f"seed.", "",
        f"Source: pretrained {report['pretrain']['steps']} steps on "
        f"{report['pretrain']['samples']} printed digits"
        f"{' with' if any(report['pretrain'].get('augment', {}).values()) else ' without'} "
        f"augmentation (printed test accuracy "
        f"{pct(report['pretrain']['printed_test_accuracy'])} %). Migration: coverage "
        f"{pct(report['migration']['coverage'])} % of parameters, stem "
        f"{report['migration']['stem'].removeprefix('stem ')}.", "",
        f"Zero-shot accuracy of the migrated model on digits (no fine-tuning): "
        f"{pct(z['no_bn_reestimation'])} % as migrated, "
        f"{pct(z['bn_reestimated_on_target_train'])} % after BatchNorm re-estimation on the "
        f"target train images (chance: 10 %).", "",
        "| labelled / class | steps | scratch | migrated | gain (pts) | migrated wins |",
        "|---|---|---|---|---|---|"]
    for r in report["table"]:
        lines.append(
            f"| {r['per_class']} ({r['labelled']} images) | {r['steps']} | "
            f"{pct(r['scratch_mean'])} ± {pct(r['scratch_std'])} | "
            f"{pct(r['migrated_mean'])} ± {pct(r['migrated_std'])} | "
            f"{100 * r['gain_mean']:+.1f} ± {pct(r['gain_std'])} | "
            f"{r['migrated_wins']}/{r['seeds']} |")
    if not report["complete"]:
        lines += ["", "**Incomplete**: the time limit stopped the grid early."]
    lines += ["", f"Wall time {report['wall_seconds'] / 60:.1f} min; torch "
              f"{report['environment']['torch']}, {report['environment']['threads']} thread(s), "
              f"{report['environment']['cpus']} CPUs (shared)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
