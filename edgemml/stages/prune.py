"""The `prune` stage: structured channel pruning (torch-pruning) to a MACs / params / channel target,
with BatchNorm re-estimation and recovery fine-tuning (optionally distilled from the unpruned model).

Whole channels are removed, so the pruned model is a smaller dense model that is faster on any CPU
runtime; unstructured sparsity is not offered because CPUs do not run it faster. Every figure in
prune.json is measured here: MACs and parameters by torch-pruning's counter, accuracy on the val
split, latency of the input and the pruned model timed in the same interleaved run.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from edgemml.config import DataConfig, PreprocessConfig, StageConfig, StrictModel
from edgemml.errors import StageError
from edgemml.stages import common
from edgemml.stages.base import Stage, StageContext
from edgemml.training_config import TrainConfig

if TYPE_CHECKING:
    from torch import nn

    from edgemml.config import LoadedPipeline


class LatencyConfig(StrictModel):
    """Torch CPU latency of the input and the pruned model, timed interleaved in one run."""

    threads: int = Field(1, ge=1, description="torch.set_num_threads during timing (fixed, so "
                         "before/after compare like with like).")
    batch_size: int = Field(1, ge=1, description="Batch size of the timed input.")
    warmup: int = Field(10, ge=0, description="Untimed calls per model before timing.")
    repeats: int = Field(50, ge=1, description="Timed calls per model (median reported).")


class PruneConfig(StageConfig):
    """Options of the prune stage (give exactly one of target_macs, target_params, channel_sparsity)."""

    type: Literal["prune"]
    target_macs: float | None = Field(None, gt=0, lt=1, description="Fraction of the input model's "
                                      "MACs to keep, e.g. 0.5.")
    target_params: float | None = Field(None, gt=0, lt=1, description="Fraction of the input "
                                        "model's parameters to keep.")
    channel_sparsity: float | None = Field(None, gt=0, lt=1, description="Fraction of the output "
                                           "channels of prunable Conv/Linear layers to remove.")
    tolerance: float = Field(0.02, gt=0, lt=0.5, description="Accepted absolute distance of the kept "
                             "fraction from the target (0.02: 0.48..0.52 for a 0.5 target).")
    importance: Literal["l1", "l2", "bn_scale", "taylor"] = Field(
        "l2", description="Channel ranking (torch-pruning): weight magnitude l1/l2, BatchNorm scale, "
        "or first-order Taylor (uses importance_batches batches of the train split).")
    importance_batches: int = Field(4, ge=1, description="Train batches for Taylor gradients.")
    global_pruning: bool = Field(False, description="Rank channels across all layers (true) or "
                                 "prune every layer by the same ratio (false).")
    round_to: int | None = Field(8, ge=1, description="Keep channel counts multiples of this "
                                 "(SIMD/NPU friendly; odd counts made ORT 2.3x slower). null: off.")
    ignore: list[str] = Field(default_factory=list, description="Module name patterns (fnmatch) "
                              "whose shapes are kept whole; the classifier head's outputs are "
                              "always kept.")
    max_layer_sparsity: float = Field(0.8, gt=0, lt=1, description="No layer loses more than this "
                                      "fraction of its original output channels.")
    steps: int = Field(1, ge=1, description="Iterative pruning: reach the target in this many "
                       "equal steps, re-estimating BatchNorm (and recovering) after each.")
    max_iterations: int = Field(16, ge=2, description="Bisection trials per step (and per refine "
                                "pass) to reach the target within tolerance.")
    recover: TrainConfig | None = Field(
        default_factory=lambda: TrainConfig(epochs=5),
        description="Recovery fine-tuning with the finetune trainer's options (default when omitted: "
        "5 epochs, otherwise the trainer's defaults); null: no recovery.")
    recover_after: Literal["each_step", "last_step"] = Field(
        "each_step", description="Recover after every pruning step or only after the last.")
    distill: bool = Field(True, description="Distil from the unpruned input model during recovery "
                          "(temperature/alpha: recover.distill).")
    bn_batches: int = Field(20, ge=1, description="Train batches used to re-estimate BatchNorm "
                            "statistics after each pruning step (before any accuracy is reported).")
    bn_batch_size: int = Field(64, ge=2, description="Batch size for BatchNorm re-estimation.")
    latency: LatencyConfig | None = Field(default_factory=LatencyConfig,
                                          description="Latency measurement; null: skip.")
    data: DataConfig | None = None
    preprocess: PreprocessConfig | None = None

    @model_validator(mode="after")
    def _one_target(self) -> PruneConfig:
        given = [k for k in ("target_macs", "target_params", "channel_sparsity")
                 if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of target_macs, target_params, channel_sparsity"
                             + (f" (got {', '.join(given)})" if given else ""))
        return self

    def target(self) -> tuple[str, float]:
        """(metric, fraction to keep)."""
        if self.target_macs is not None:
            return "macs", self.target_macs
        if self.target_params is not None:
            return "params", self.target_params
        assert self.channel_sparsity is not None
        return "channels", 1.0 - self.channel_sparsity


class PruneStage(Stage[PruneConfig]):
    """Prune channels to a target, re-estimate BatchNorm, recover, measure, save."""

    type = "prune"
    Config = PruneConfig
    requires = ("torch", "torchvision", "torch-pruning")
    code = ("edgemml.models", "edgemml.data", "edgemml.stages.common", "edgemml.training",
            "edgemml.training_config", "edgemml.pruning")
    provides = ("model", "report")

    @classmethod
    def data_files(cls, config: PruneConfig, pipeline: LoadedPipeline) -> list[Path]:
        return common.stage_data_files(config, pipeline)

    def run(self, ctx: StageContext, config: PruneConfig) -> dict[str, Path]:
        import torch

        from edgemml import pruning
        from edgemml.models import find_classifier
        from edgemml.training import evaluate, recalibrate_bn, seed_everything, train

        seed_everything(ctx.seed)
        model, spec = common.load_input_model(ctx)
        splits = common.load_stage_data(ctx, config)
        pre = common.preprocess_config(config, ctx.pipeline)
        h, w = pre.size
        example = torch.zeros(1, spec.in_chans, h, w)
        metric, keep = config.target()
        model.eval()
        original = copy.deepcopy(model)

        # What is never pruned: the head's outputs, the user's patterns, what we cannot record.
        head = find_classifier(model, spec.in_chans)
        frozen: dict[str, str] = {}
        for pattern, names in pruning.match_patterns(model, config.ignore).items():
            for n in names:
                frozen.setdefault(n, f"ignore: {pattern}")
        for n, reason in pruning.unsafe_modules(model).items():
            if n not in frozen:
                frozen[n] = reason
                ctx.warn(f"{n} is kept unpruned automatically: {reason}")
        ctx.log(f"classifier head {head} keeps its {spec.num_classes} outputs (its inputs follow "
                f"the last features)")
        channel_layers = [n for n in pruning.prunable_layers(model)
                          if n != head and not _inside(n, frozen)]
        layers_before = pruning.layer_table(model, example)
        size0 = pruning.measure(model, example, channel_layers)
        settings = pruning.PruneSettings(
            importance=config.importance, global_pruning=config.global_pruning,
            round_to=config.round_to, head=head, frozen=set(frozen),
            min_keep=pruning.min_keep_channels(layers_before, config.max_layer_sparsity,
                                               config.round_to))

        def acc(m: nn.Module) -> float | None:
            if len(splits.val) == 0:
                return None
            return evaluate(m, splits.val, batch_size=256)["accuracy"]

        def reestimate_bn(m: nn.Module) -> int:
            return recalibrate_bn(m, splits.train, batches=config.bn_batches,
                                  batch_size=config.bn_batch_size, seed=ctx.seed)

        compute_grads = _taylor_grads(splits.train, config, ctx.seed) \
            if config.importance == "taylor" else None
        if len(splits.val) == 0:
            ctx.warn("the val split is empty: accuracies are not reported")
        acc_before = acc(model)
        teacher = original if (config.distill and config.recover is not None) else None

        steps: list[dict[str, Any]] = []
        for k in range(1, config.steps + 1):
            step_target = 1.0 - (1.0 - keep) * k / config.steps
            with ctx.progress(f"prune step {k}/{config.steps}: search",
                              config.max_iterations * 2) as bar:
                try:
                    found = pruning.prune_to_target(
                        model, example, target=step_target, tolerance=config.tolerance,
                        metric=metric, reference=size0, channel_layers=channel_layers,
                        settings=settings, max_ratio=config.max_layer_sparsity,
                        iterations=config.max_iterations, compute_grads=compute_grads,
                        tick=lambda: bar.advance(1))
                except RuntimeError as exc:  # a pruned trial copy no longer runs
                    raise StageError(
                        f"torch-pruning broke the model: {str(exc).splitlines()[0]}",
                        stage=ctx.name, key="ignore", hint="add the modules involved to `ignore:` "
                        "(their shapes are then kept whole)") from None
            if not found.within_tolerance:
                nothing = all(t.fraction >= 1.0 - 1e-9 for t in found.trials)
                raise StageError(
                    f"step {k}: could not reach {metric} {step_target:.3f} +- {config.tolerance} of "
                    f"the input model; closest was {found.fraction:.3f} after "
                    f"{len(found.trials)} trials", stage=ctx.name, key="tolerance",
                    hint=("no trial removed any channel: every channel ranks the same (e.g. "
                          "bn_scale on an untrained model) or `ignore:` freezes everything; try "
                          "importance: l2" if nothing else
                          "raise tolerance or max_iterations, use a smaller round_to or a larger "
                          "max_layer_sparsity, or ignore fewer modules"))
            model = found.model
            model.zero_grad(set_to_none=True)
            _check_forward(model, example, spec.num_classes, ctx.name)
            acc_raw = acc(model)
            bn_samples = reestimate_bn(model)
            row: dict[str, Any] = {
                "step": k, "target": step_target, "achieved": found.fraction,
                "ratio": found.ratio, "refine_global_ratio": found.refine_ratio,
                "macs": found.size.macs, "params": found.size.params,
                "channels": found.size.channels, "trials": [t.as_dict() for t in found.trials],
                "accuracy_before_bn_reestimation": acc_raw, "bn_reestimation_samples": bn_samples,
                "accuracy_after_pruning": acc(model)}
            ctx.log(f"step {k}: {metric} {found.fraction:.3f} of the input (target "
                    f"{step_target:.3f}), val accuracy {_pct(acc_raw)} -> "
                    f"{_pct(row['accuracy_after_pruning'])} "
                    f"after BatchNorm re-estimation")
            if config.recover is not None and (config.recover_after == "each_step"
                                               or k == config.steps):
                result = train(model, splits.train, splits.val, config.recover, seed=ctx.seed + k,
                               teacher=teacher, checkpoint_dir=ctx.work_dir / f"recover-{k}",
                               progress=ctx.progress, log=ctx.log, classes=splits.classes)
                model = result.model.cpu()
                original.cpu()
                row["recovery"] = {"epochs": len(result.history), "steps": result.steps,
                                   "best_epoch": result.best_epoch, "seconds": result.seconds,
                                   "history": result.history}
                row["accuracy_after_recovery"] = acc(model)
            steps.append(row)
        model.eval()

        size1 = pruning.measure(model, example, channel_layers)
        layers_after = pruning.layer_table(model, example)
        latency = None
        if config.latency is not None:
            lat = config.latency
            x = torch.zeros(lat.batch_size, *example.shape[1:])
            with ctx.progress("latency", None):
                latency = pruning.torch_latency({"before": original, "after": model}, x,
                                                threads=lat.threads, warmup=lat.warmup,
                                                repeats=lat.repeats)
            latency["speedup"] = latency["before"]["median_ms"] / latency["after"]["median_ms"]
            latency.update(threads=lat.threads, batch_size=lat.batch_size)

        last = steps[-1]
        acc_pruned = last["accuracy_after_pruning"]
        acc_final = last.get("accuracy_after_recovery", acc_pruned)
        spec = spec.model_copy(deep=True)
        spec.extra["preprocess"] = pre.model_dump(mode="json")
        spec.extra["prune"] = {"metric": metric, "target": keep, "achieved": size1.fraction_of(
            size0, metric), "macs": size1.macs, "params": size1.params}
        if not spec.class_names:
            spec.class_names = list(splits.classes)
        out = common.save_model_output(ctx, model, spec)
        _check_reload(model, out, example, ctx.name)

        report = {
            "target": {"metric": metric, "keep": keep, "tolerance": config.tolerance},
            "achieved": {"macs": size1.macs / size0.macs, "params": size1.params / size0.params,
                         "channels": size1.channels / max(1, size0.channels)},
            "within_tolerance": abs(size1.fraction_of(size0, metric) - keep) <= config.tolerance,
            "macs": {"before": size0.macs, "after": size1.macs},
            "params": {"before": size0.params, "after": size1.params},
            "channels": {"before": size0.channels, "after": size1.channels},
            "accuracy": {"split": "val", "n": len(splits.val), "before": acc_before,
                         "after_pruning": acc_pruned, "after_recovery": acc_final
                         if config.recover is not None else None},
            "latency_torch_cpu": latency,
            "settings": {"importance": config.importance, "global_pruning": config.global_pruning,
                         "round_to": config.round_to, "steps": config.steps,
                         "max_layer_sparsity": config.max_layer_sparsity,
                         "recover": config.recover is not None, "distill": teacher is not None},
            "head": head, "kept_whole": frozen,
            "layers": {n: {"type": b["type"], "in": [b["in"], layers_after[n]["in"]],
                           "out": [b["out"], layers_after[n]["out"]],
                           "macs": [b["macs"], layers_after[n]["macs"]],
                           "params": [b["params"], layers_after[n]["params"]],
                           "kept_whole": _inside(n, frozen) or None}
                       for n, b in layers_before.items()},
            "steps": steps,
        }
        report_path = common.write_json(ctx, "prune.json", report)
        for k in range(1, config.steps + 1):
            shutil.rmtree(ctx.work_dir / f"recover-{k}", ignore_errors=True)

        highlights = [f"{metric}: {size1.fraction_of(size0, metric):.3f} of the input (target "
                      f"{keep:g} +- {config.tolerance:g}); MACs {size0.macs / 1e6:.1f}M -> "
                      f"{size1.macs / 1e6:.1f}M, params {size0.params / 1e6:.2f}M -> "
                      f"{size1.params / 1e6:.2f}M",
                      f"val accuracy {_pct(acc_before)} -> {_pct(acc_pruned)} pruned -> "
                      f"{_pct(acc_final)} recovered"]
        if latency is not None:
            highlights.append(f"torch CPU latency (batch {latency['batch_size']}, "
                              f"{latency['threads']} thread(s)): {latency['before']['median_ms']:.2f}"
                              f" -> {latency['after']['median_ms']:.2f} ms "
                              f"({latency['speedup']:.2f}x)")
        ctx.record(macs_before=size0.macs, macs_after=size1.macs, params_before=size0.params,
                   params_after=size1.params, metric=metric, target=keep,
                   achieved=size1.fraction_of(size0, metric), accuracy_before=acc_before,
                   accuracy_after_pruning=acc_pruned, accuracy_after_recovery=report["accuracy"][
                       "after_recovery"],
                   latency_before_ms=latency["before"]["median_ms"] if latency else None,
                   latency_after_ms=latency["after"]["median_ms"] if latency else None,
                   latency_speedup=latency["speedup"] if latency else None,
                   highlights=highlights)
        return {"model": out, "report": report_path}


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _inside(name: str, frozen: dict[str, str]) -> bool:
    return any(name == f or name.startswith(f + ".") for f in frozen)


def _taylor_grads(train_set: Any, config: PruneConfig, seed: int) -> Any:
    """A function that fills `.grad` of a model with the loss gradient over a few train batches."""
    import torch
    import torch.nn.functional as F

    from edgemml.training import make_loader

    batch = config.recover.batch_size if config.recover is not None else 64

    def compute(model: nn.Module) -> None:
        model.eval()  # BatchNorm statistics stay as they are
        model.zero_grad(set_to_none=True)
        for i, (x, y) in enumerate(make_loader(train_set, batch, shuffle=True, seed=seed)):
            if i >= config.importance_batches:
                break
            F.cross_entropy(model(x), torch.as_tensor(y)).backward()
    return compute


def _check_forward(model: nn.Module, example: Any, num_classes: int, stage: str) -> None:
    import torch

    try:
        with torch.no_grad():
            out = model.eval()(example)
    except RuntimeError as exc:
        raise StageError(f"the pruned model no longer runs: {str(exc).splitlines()[0]}", stage=stage,
                         key="ignore", hint="torch-pruning could not follow a dependency in this "
                         "architecture; add the modules named above to `ignore:`") from None
    if tuple(out.shape) != (example.shape[0], num_classes):
        raise StageError(f"the pruned model outputs shape {tuple(out.shape)}, expected "
                         f"{(example.shape[0], num_classes)}", stage=stage, key="ignore",
                         hint="add the output layer to `ignore:`")


def _check_reload(model: nn.Module, folder: Path, example: Any, stage: str) -> None:
    """The saved model must rebuild into the same module: same outputs bit for bit."""
    import torch

    from edgemml.models.serialize import reloads_identically

    x = torch.randn(2, *example.shape[1:], generator=torch.Generator().manual_seed(0))
    if not reloads_identically(model, folder, x):
        raise StageError("the saved pruned model does not reload to identical outputs",
                         stage=stage, hint="this is a bug in edgemml; please report it")


STAGE = PruneStage
