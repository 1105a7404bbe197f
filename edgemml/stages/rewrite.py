"""The `rewrite` stage: replace the activations int8 targets handle badly, optionally remove
squeeze-excitation gates, then recover accuracy by distillation from the unrewritten model.

Why a stage of its own rather than options of `migrate` or `prune`:
* it changes a *trained* model's function and must recover it by training; `migrate` moves
  weights between architectures and never trains, and `prune` removes channels — a user may want
  either without the other, and a rewrite belongs after fine-tuning and before pruning (so pruning
  ranks the channels of the model that will ship);
* its outputs are its own (the rewritten model, rewrite.json), so the runner caches it on its own:
  changing the mapping re-runs the rewrite and what follows, not the training before it;
* its input stays in the run folder, so the int8 comparison the rewrite exists for is made by
  composing stages: quantize the input (`input:` the stage before) and the output, and `validate`
  measures both int8 artifacts on the test split (pipelines/rewrite.yaml).

The surgery itself is edgemml.models.rewrite; recovery is the shared trainer (edgemml.training),
distilling from the unrewritten model. Top-1 figures in rewrite.json (`top1_pct`, percent, from
edgemml.metrics through the trainer's evaluate) are on the val split: before, right after the
surgery, after BatchNorm re-estimation, and after recovery.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from edgemml.activation_names import check_name
from edgemml.config import DataConfig, PreprocessConfig, StageConfig
from edgemml.errors import StageError
from edgemml.metrics import drop_pp
from edgemml.stages import common
from edgemml.stages.base import Stage, StageContext
from edgemml.training_config import TrainConfig

if TYPE_CHECKING:
    from torch import nn

    from edgemml.config import LoadedPipeline
    from edgemml.models import ModelSpec
    from edgemml.models.rewrite import RewriteResult


class RewriteConfig(StageConfig):
    """Options of the rewrite stage (give `activations`, `squeeze_excitation: remove`, or both)."""

    type: Literal["rewrite"]
    activations: dict[str, str] = Field(
        default_factory=dict, description="{activation to replace: its replacement}, torch.nn class "
        "names spelled as torch does (SiLU, Hardswish, GELU, Hardsigmoid, ReLU6 ...) or edgemml's "
        "aliases (Hardtanh01 = Hardtanh(0, 1), Swish = SiLU), e.g. {SiLU: ReLU6, Hardswish: ReLU6, "
        "GELU: ReLU, Hardsigmoid: Hardtanh01}. Matched by exact module type.")
    squeeze_excitation: Literal["keep", "remove"] = Field(
        "keep", description="remove: replace every squeeze-excitation block by Identity (its "
        "fitted per-channel scale folded into the next convolution, see se_fold).")
    se_fold: bool = Field(True, description="Fold each removed SE gate's constant per-channel "
                          "scale (least squares on train images) into the convolution consuming "
                          "its output, so removal starts close to the original function.")
    exclude: list[str] = Field(default_factory=list, description="Module path patterns (fnmatch) "
                               "left as they are, e.g. ['classifier.*'].")
    fit_batches: int = Field(8, ge=1, description="Train batches (of bn_batch_size) used to fit "
                             "the SE scales.")
    bn_reestimate: bool = Field(True, description="Re-estimate BatchNorm statistics on train "
                                "images after the surgery (activations feed BN layers other "
                                "statistics than the ones they were trained with).")
    bn_batches: int = Field(20, ge=1, description="Train batches for BatchNorm re-estimation.")
    bn_batch_size: int = Field(64, ge=2, description="Batch size for BN re-estimation and fits.")
    recover: TrainConfig | None = Field(
        default_factory=lambda: TrainConfig(epochs=5),
        description="Recovery training with the finetune trainer's options (default when omitted: "
        "5 epochs); null: no recovery.")
    distill: bool = Field(True, description="Distil from the unrewritten input model during "
                          "recovery (temperature/alpha: recover.distill).")
    data: DataConfig | None = None
    preprocess: PreprocessConfig | None = None

    @field_validator("activations")
    @classmethod
    def _names(cls, value: dict[str, str]) -> dict[str, str]:
        for old, new in value.items():
            for name in (old, new):
                try:
                    check_name(name)
                except ValueError as exc:
                    raise ValueError(f"{old}: {new}: {exc}") from None
            if old == new:
                raise ValueError(f"{old}: {new} replaces an activation by itself")
        return value

    @model_validator(mode="after")
    def _something(self) -> RewriteConfig:
        if not self.activations and self.squeeze_excitation == "keep":
            raise ValueError("nothing to rewrite: give `activations: {SiLU: ReLU6, ...}` and/or "
                             "`squeeze_excitation: remove`")
        return self


class RewriteStage(Stage[RewriteConfig]):
    """Swap activations / remove SE gates, re-estimate BatchNorm, recover by distillation."""

    type = "rewrite"
    Config = RewriteConfig
    requires = ("torch", "torchvision")
    provides = ("model", "report", "table")

    @classmethod
    def data_files(cls, config: RewriteConfig, pipeline: LoadedPipeline) -> list[Path]:
        return common.stage_data_files(config, pipeline)

    def run(self, ctx: StageContext, config: RewriteConfig) -> dict[str, Path]:
        from edgemml.models.rewrite import rewrite_model
        from edgemml.training import (
            evaluate,
            make_loader,
            recalibrate_bn,
            seed_everything,
            train,
        )

        seed_everything(ctx.seed)
        model, spec = common.load_input_model(ctx)
        splits = common.load_stage_data(ctx, config)
        model.eval()
        original = copy.deepcopy(model)
        if len(splits.train) == 0:
            raise StageError("the train split is empty: the rewrite needs images to fit SE scales, "
                             "re-estimate BatchNorm and recover", key="data.split.train")
        batches = [x for i, (x, _) in zip(range(config.fit_batches), make_loader(
            splits.train, config.bn_batch_size, shuffle=True, seed=ctx.seed))]
        example = batches[0][:16]

        def acc(m: nn.Module) -> float | None:
            return evaluate(m, splits.val, batch_size=256)["top1_pct"] if len(splits.val) else None

        if len(splits.val) == 0:
            ctx.warn("the val split is empty: accuracies are not reported")
        acc_before = acc(model)
        try:
            result = rewrite_model(model, config.activations,
                                   squeeze_excitation=config.squeeze_excitation,
                                   exclude=config.exclude, se_fold=config.se_fold,
                                   batches=batches, example=example)
        except ValueError as exc:
            raise StageError(str(exc), stage=ctx.name, key="activations",
                             hint="map activations to elementwise ones, or list the module under "
                             "`exclude:`") from None
        _check_matched(ctx, config, original, result)
        acc_raw = acc(model)
        bn_samples = 0
        if config.bn_reestimate:
            bn_samples = recalibrate_bn(model, splits.train, batches=config.bn_batches,
                                        batch_size=config.bn_batch_size, seed=ctx.seed)
        acc_bn = acc(model)
        recovery = None
        if config.recover is not None:
            teacher = original if config.distill else None
            res = train(model, splits.train, splits.val, config.recover, seed=ctx.seed,
                        teacher=teacher, checkpoint_dir=ctx.work_dir / "recover",
                        progress=ctx.progress, log=ctx.log, classes=splits.classes)
            model = res.model.cpu()
            original.cpu()
            recovery = {"epochs": len(res.history), "steps": res.steps,
                        "best_epoch": res.best_epoch, "seconds": res.seconds,
                        "distilled": teacher is not None, "history": res.history}
        top1 = {"split": "val", "n": len(splits.val), "before": acc_before,
                "right_after": acc_raw, "after_bn_reestimation": acc_bn,
                "recovered": acc(model) if recovery is not None else None}
        report = _report(ctx, config, result, top1, (original, model), bn_samples, recovery)
        return _write_outputs(ctx, model, spec, report, example, list(splits.classes))


def _write_outputs(ctx: StageContext, model: nn.Module, spec: ModelSpec, report: dict[str, Any],
                   example: Any, classes: list[str]) -> dict[str, Path]:
    """model/ (checked to reload identically), rewrite.json, rewrite.md, the stage's metrics."""
    from edgemml.models.serialize import reloads_identically

    config: RewriteConfig = ctx.config  # type: ignore[assignment]
    model.eval()
    spec = spec.model_copy(deep=True)
    spec.extra["preprocess"] = common.preprocess_config(config, ctx.pipeline).model_dump(
        mode="json")
    spec.extra["rewrite"] = {**report["settings"], "replaced": len(report["replaced"]),
                             "se_removed": len(report["squeeze_excitation"]["removed"])}
    if not spec.class_names:
        spec.class_names = classes
    out = common.save_model_output(ctx, model, spec)
    if not reloads_identically(model, out, example):  # model.json records the rewrite
        raise StageError("the saved rewritten model does not reload to identical outputs",
                         stage=ctx.name, hint="this is a bug in edgemml; please report it")
    shutil.rmtree(ctx.work_dir / "recover", ignore_errors=True)
    report_path = common.write_json(ctx, "rewrite.json", report)
    table = ctx.path("rewrite.md")
    table.write_text(_markdown(ctx.name, report), encoding="utf-8")
    _record(ctx, report)
    return {"model": out, "report": report_path, "table": table}


def _check_matched(ctx: StageContext, config: RewriteConfig, original: nn.Module,
                   result: RewriteResult) -> None:
    """Fail when nothing was rewritten; warn per mapping key that matched no module, and about
    activations the model calls as functions (which module surgery cannot reach)."""
    from edgemml.models.rewrite import activation_name, matches_name

    present: dict[str, int] = {}
    for m in original.modules():
        name = activation_name(m)
        if name is not None and name != "Identity":
            present[name] = present.get(name, 0) + 1
    have = ", ".join(f"{n} x{c}" for n, c in present.items()) or "none"
    if not result.replaced and not result.se_removed:
        wanted = ", ".join(config.activations) or "a squeeze-excitation class"
        raise StageError(
            f"nothing was rewritten: no module matches {wanted} (activation modules in the model: "
            f"{have})", stage=ctx.name,
            key="activations", hint="map the activation types the model has (names as listed), "
            "or check `exclude:`")
    done = {r.path for r in result.replaced}
    removed = [s.path for s in result.se_removed]
    for old in config.activations:
        matched = [p for p, m in original.named_modules() if p and matches_name(m, old)]
        if any(p in done for p in matched):
            continue
        inside = [p for p in matched if any(p.startswith(r + ".") for r in removed)]
        if not matched:
            ctx.warn(f"activations: {old} matched no module (the model has: {have})")
        elif inside:
            ctx.log(f"activations: {old}: its {len(inside)} module(s) were inside the removed "
                    f"squeeze-excitation blocks")
        else:
            ctx.warn(f"activations: {old}: every matching module is under `exclude:`")
    for name, n in result.functional.items():
        ctx.warn(f"{n} call(s) of {name} are written as functions in forward(), not modules: they "
                 f"are not replaced")
    for note in result.notes:
        ctx.warn(note)


def _report(ctx: StageContext, config: RewriteConfig, result: RewriteResult,
            top1: dict[str, Any], models: tuple[nn.Module, nn.Module], bn_samples: int,
            recovery: dict[str, Any] | None) -> dict[str, Any]:
    from dataclasses import asdict

    params = [sum(p.numel() for p in m.parameters()) for m in models]
    by_type: dict[str, int] = {}
    for r in result.replaced:
        by_type[r.old] = by_type.get(r.old, 0) + 1
    before = top1["before"]
    after = top1["recovered"] if top1["recovered"] is not None else top1["after_bn_reestimation"]
    return {
        "input_stage": ctx.input_name,
        "settings": {"activations": dict(config.activations),
                     "squeeze_excitation": config.squeeze_excitation, "se_fold": config.se_fold,
                     "exclude": list(config.exclude), "bn_reestimate": config.bn_reestimate,
                     "recover": config.recover is not None, "distill": config.distill},
        "counts": result.counts(), "replaced_by_type": by_type,
        "replaced": [asdict(r) for r in result.replaced],
        "squeeze_excitation": {"removed": [asdict(s) for s in result.se_removed],
                               "kept": result.se_kept},
        "excluded": result.excluded, "functional_calls_left": result.functional,
        "notes": result.notes,
        "params": {"before": params[0], "after": params[1]},
        "bn_reestimation_samples": bn_samples,
        "top1_pct": top1,
        "fp32_drop_pp": drop_pp(before, after),
        "recovery": recovery,
    }


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}%"


def _markdown(name: str, report: dict[str, Any]) -> str:
    acc = report["top1_pct"]
    se = report["squeeze_excitation"]
    out = [f"# Rewrite: {name}", "",
           f"Input: stage `{report['input_stage']}`. Top-1 on {acc['split']} (n={acc['n']}): "
           f"before {_pct(acc['before'])}, right after {_pct(acc['right_after'])}, after BatchNorm "
           f"re-estimation {_pct(acc['after_bn_reestimation'])}, recovered "
           f"{_pct(acc['recovered'])}.", "",
           "| replaced | modules |", "|---|---:|"]
    out += [f"| {k} | {n} |" for k, n in report["counts"].items()]
    out += ["", f"Squeeze-excitation: {len(se['removed'])} removed, {len(se['kept'])} kept. "
            f"Parameters {report['params']['before']:,} -> {report['params']['after']:,}.", ""]
    if se["removed"]:
        out += ["| SE block | channels | folded into | scale mean (min..max) |", "|---|---:|---|---|"]
        for s in se["removed"]:
            scale = "-" if s["scale_mean"] is None else (
                f"{s['scale_mean']:.3f} ({s['scale_min']:.3f}..{s['scale_max']:.3f})")
            out.append(f"| {s['path']} | {s['channels']} | {s['folded_into'] or s['note']} | "
                       f"{scale} |")
        out.append("")
    out += ["| module | was | now |", "|---|---|---|"]
    out += [f"| {r['path']} | {r['old']} | {r['new']} |" for r in report["replaced"]]
    return "\n".join(out) + "\n"


def _record(ctx: StageContext, report: dict[str, Any]) -> None:
    acc = report["top1_pct"]
    se = report["squeeze_excitation"]
    counts = ", ".join(f"{k} x{n}" for k, n in report["counts"].items()) or "no activation"
    ctx.highlight(f"replaced {counts}; squeeze-excitation: {len(se['removed'])} removed "
                  f"({sum(1 for s in se['removed'] if s['folded_into'])} folded), "
                  f"{len(se['kept'])} kept")
    ctx.highlight(f"val top-1 {_pct(acc['before'])} -> {_pct(acc['right_after'])} rewritten -> "
                  f"{_pct(acc['after_bn_reestimation'])} BN re-estimated -> "
                  f"{_pct(acc['recovered'])} recovered")
    ctx.record(input_stage=report["input_stage"], replaced=len(report["replaced"]),
               se_removed=len(se["removed"]), top1_pct_before=acc["before"],
               top1_pct_right_after=acc["right_after"],
               top1_pct_after_bn=acc["after_bn_reestimation"], top1_pct_recovered=acc["recovered"],
               fp32_drop_pp=report["fp32_drop_pp"], counts=report["counts"])


STAGE = RewriteStage
