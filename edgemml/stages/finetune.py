"""`finetune`: train a model on the pipeline's data — from random init (pretraining the source model),
from migrated weights (transfer), or after pruning — optionally distilling from a teacher.

The stage output is the best epoch on the validation split, not the last. An epoch checkpoint in the
stage's work folder lets a re-run after Ctrl-C or a crash resume after the last finished epoch. Under
`torchrun --nproc-per-node N`, every process trains (DDP); rank 0 alone prepares the model, writes
artifacts and reports, and hands the model to the other ranks through torch.distributed, so ranks on
other machines never read rank 0's run directory.

A little over the ~400-line guide: the config, with the distillation and freezing options and their
checks, lives beside the orchestration; the training loop itself is edgemml.training.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, model_validator

from edgemml.config import DataConfig, ModelConfig, PreprocessConfig, StageConfig, StrictModel
from edgemml.errors import ConfigError, InputError
from edgemml.paths import check_input_file
from edgemml.stages import common
from edgemml.stages.base import Stage, StageContext
from edgemml.training_config import TrainOptions

if TYPE_CHECKING:
    from torch import nn

    from edgemml.config import LoadedPipeline
    from edgemml.data import DataSplits
    from edgemml.models import ModelSpec
    from edgemml.training import TrainResult

CHECKPOINT_DIR = "checkpoint"


class TeacherConfig(StrictModel):
    """The teacher of knowledge distillation: an earlier stage's model, or a checkpoint + its model."""

    stage: str | None = Field(None, description="Name of an earlier stage whose model teaches.")
    checkpoint: str | None = Field(
        None, description="Teacher weights: a file (.pt/.pth/.safetensors) or torchvision:<Weights> "
        "(local hub cache only); needs `model:`.")
    model: ModelConfig | None = Field(None, description="Architecture of the checkpoint teacher "
                                      "(num_classes / in_chans default to the student's).")
    temperature: float = Field(4.0, gt=0, description="Softmax temperature of the soft targets.")
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the soft-target (KL) term; 1 - alpha "
                         "weighs the cross-entropy with the labels.")

    @model_validator(mode="after")
    def _one_source(self) -> TeacherConfig:
        if (self.stage is None) == (self.checkpoint is None):
            raise ValueError("give exactly one of stage (an earlier stage) or checkpoint (+ model)")
        if self.checkpoint is not None and self.model is None:
            raise ValueError("a checkpoint teacher needs `model:` (its architecture)")
        if self.stage is not None and self.model is not None:
            raise ValueError("`model:` is only for a checkpoint teacher; a stage's model.json "
                             "already names its architecture")
        return self


class FinetuneConfig(TrainOptions, StageConfig):
    """Train a model on the data (pretrain, transfer, recover after pruning, distil)."""

    type: Literal["finetune"] = Field(..., description="finetune")
    model: ModelConfig | None = Field(
        None, description="Build this architecture fresh (random init, or init_checkpoint) instead "
        "of reading an earlier stage's model; the stage then needs no input.")
    init_checkpoint: str | None = Field(
        None, description="With `model:`: initial weights (file or torchvision:<Weights>); an RGB "
        "stem is adapted to the input channels, a head of another size is left at random init.")
    teacher: TeacherConfig | None = Field(None, description="Knowledge distillation teacher.")
    recalibrate_bn_first: bool = Field(
        False, description="Re-estimate BatchNorm statistics on the train split before training "
        "(useful after migration from another domain).")
    data: DataConfig | None = Field(None, description="Data (merged over the pipeline's `data:`).")
    preprocess: PreprocessConfig | None = Field(
        None, description="Preprocessing (merged over the pipeline's `preprocess:`).")

    @model_validator(mode="after")
    def _init_needs_model(self) -> FinetuneConfig:
        if self.init_checkpoint is not None and self.model is None:
            raise ValueError("init_checkpoint needs `model:` (without it the input stage's weights "
                             "are the starting point)")
        if self.model is not None and self.input is not None:
            raise ValueError("give either `model:` (build a fresh model) or `input:` (read an "
                             "earlier stage's model), not both")
        return self

    def train_options(self) -> Any:
        """The TrainConfig handed to training.train (distillation settings from `teacher`)."""
        from edgemml.training_config import DistillConfig, TrainConfig

        opts = self.model_dump(include=set(TrainOptions.model_fields))
        distill = DistillConfig(temperature=self.teacher.temperature, alpha=self.teacher.alpha) \
            if self.teacher is not None else DistillConfig()
        return TrainConfig.model_validate({**opts, "distill": distill.model_dump()})


def _checkpoint_files(ref: str | None, pipeline: LoadedPipeline, key: str) -> list[Path]:
    if ref is None:
        return []
    if ref.startswith("torchvision:"):
        from edgemml.models.checkpoints import torchvision_weights_path
        return [torchvision_weights_path(ref[len("torchvision:"):])[0]]
    # a regular file of bounded size, checked before it is hashed
    return [check_input_file(pipeline.resolve_path(ref), what="checkpoint", key=key)]


def _resolve_ref(ctx: StageContext, ref: str) -> str | Path:
    return ref if ref.startswith("torchvision:") else ctx.resolve(ref)


def _n_params(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def _rebuild(payload: dict[str, Any]) -> tuple[nn.Module, ModelSpec]:
    """A model from (spec, state dict): how ranks other than 0 receive rank 0's model."""
    from edgemml.models import ModelSpec, build_model
    from edgemml.models.registry import versioned_state
    from edgemml.models.serialize import apply_layer_shapes

    spec = ModelSpec.model_validate(payload["spec"])
    model = build_model(spec.model_cfg(), num_classes=spec.num_classes, in_chans=spec.in_chans)
    apply_layer_shapes(model, spec)
    model.load_state_dict(versioned_state(payload["state"], model), strict=True)
    return model, spec


class Finetune(Stage[FinetuneConfig]):
    """Train on the data: pretrain from random init, adapt migrated weights, recover, distil."""

    type = "finetune"
    Config = FinetuneConfig
    version = 1
    requires = ("torch", "torchvision")
    provides = ("model", "history", "curves", "report", "samples")
    #: every torchrun process runs this stage (DDP); the runner runs other stages on rank 0 alone
    distributed: ClassVar[bool] = True
    #: an interrupted attempt resumes after its last epoch checkpoint (training.train)
    resumable: ClassVar[bool] = True

    @classmethod
    def needs_input(cls, config: FinetuneConfig) -> bool:
        return config.model is None

    @classmethod
    def model_needs(cls, config: FinetuneConfig) -> tuple[str, ...]:
        return ("build", "train")

    @classmethod
    def references(cls, config: FinetuneConfig) -> list[tuple[str, str]]:
        refs = super().references(config)
        if config.teacher is not None and config.teacher.stage is not None:
            refs.append(("teacher.stage", config.teacher.stage))
        return refs

    @classmethod
    def data_files(cls, config: FinetuneConfig, pipeline: LoadedPipeline) -> list[Path]:
        files = common.stage_data_files(config, pipeline)
        files += _checkpoint_files(config.init_checkpoint, pipeline, "init_checkpoint")
        if config.teacher is not None:
            files += _checkpoint_files(config.teacher.checkpoint, pipeline, "teacher.checkpoint")
        return files

    # ---- preparing the student and the teacher (rank 0) -----------------------------------------

    def _student(self, ctx: StageContext, config: FinetuneConfig, splits: DataSplits,
                 preprocess: PreprocessConfig) -> tuple[nn.Module, ModelSpec, dict[str, Any]]:
        from edgemml.models import ModelSpec, build_model, find_stem_conv, load_checkpoint, load_into

        classes = list(splits.classes)
        channels = preprocess.num_channels
        if config.model is None:
            model, spec = common.load_input_model(ctx)
            init: dict[str, Any] = {"from": f"stage {ctx.input_name}"}
            where = f"the model of stage {ctx.input_name!r}"
            if spec.num_classes != len(classes):
                raise InputError(f"{where} has {spec.num_classes} outputs but the data has "
                                 f"{len(classes)} classes", key="data",
                                 hint="add a migrate stage before it to map the label set")
            if spec.class_names and list(spec.class_names) != classes:
                raise InputError(f"{where} was trained on classes {spec.class_names}, the data has "
                                 f"{classes} (order matters)", key="data",
                                 hint="add a migrate stage to map the labels")
            if spec.in_chans != channels:
                raise InputError(f"{where} takes {spec.in_chans} input channels but preprocess."
                                 f"channels={preprocess.channels!r} gives {channels}",
                                 key="preprocess.channels",
                                 hint="add a migrate stage to adapt the stem, or change channels")
            before = spec.extra.get("preprocess")
            if before is not None and before != preprocess.model_dump(mode="json"):
                ctx.warn(f"{where} was trained with other preprocessing; fine-tuning adapts it to "
                         f"this stage's preprocess section")
        else:
            cfg = config.model
            if cfg.num_classes is not None and cfg.num_classes != len(classes):
                raise ConfigError(f"model.num_classes={cfg.num_classes} but the data has "
                                  f"{len(classes)} classes", key="model.num_classes",
                                  hint="remove num_classes (it defaults to the data's)")
            if cfg.in_chans is not None and cfg.in_chans != channels:
                raise ConfigError(f"model.in_chans={cfg.in_chans} but preprocess.channels="
                                  f"{preprocess.channels!r} gives {channels}", key="model.in_chans")
            model = build_model(cfg, num_classes=len(classes), in_chans=channels)
            spec = ModelSpec.from_config(cfg, num_classes=len(classes), in_chans=channels)
            init = {"from": "random init", "arch": cfg.arch or cfg.python}
            if config.init_checkpoint is not None:
                state = load_checkpoint(_resolve_ref(ctx, config.init_checkpoint),
                                        expected_keys=model.state_dict().keys())
                rep = load_into(model, state, stem=find_stem_conv(model))
                if not rep.loaded:
                    raise InputError("no tensor of init_checkpoint fits the model",
                                     file=config.init_checkpoint, key="init_checkpoint",
                                     hint="check that model.arch matches the checkpoint")
                init = {"from": f"checkpoint {config.init_checkpoint}", "loaded": len(rep.loaded),
                        "adapted": rep.adapted, "skipped": rep.skipped, "missing": rep.missing}
                if rep.skipped or rep.missing:
                    ctx.log(f"init_checkpoint: {len(rep.loaded)} tensors loaded; left at random "
                            f"init: {', '.join((rep.skipped + rep.missing)[:6])}")
        spec = spec.model_copy(update={"class_names": classes})
        if config.recalibrate_bn_first:
            from edgemml.training import recalibrate_bn
            init["bn_recalibrated_on"] = recalibrate_bn(model, splits.train, seed=ctx.seed)
        return model, spec, init

    def _teacher(self, ctx: StageContext, config: FinetuneConfig, student: ModelSpec,
                 preprocess: PreprocessConfig) -> tuple[nn.Module, ModelSpec]:
        from edgemml.models import ModelSpec, build_model, find_stem_conv, load_checkpoint, load_into

        t = config.teacher
        assert t is not None
        if t.stage is not None:
            model, spec = common.load_input_model(ctx, t.stage)
            what = f"teacher stage {t.stage!r}"
        else:
            assert t.model is not None and t.checkpoint is not None
            num_classes = t.model.num_classes or student.num_classes
            in_chans = t.model.in_chans or preprocess.num_channels
            model = build_model(t.model, num_classes=num_classes, in_chans=in_chans)
            spec = ModelSpec.from_config(t.model, num_classes=num_classes, in_chans=in_chans)
            state = load_checkpoint(_resolve_ref(ctx, t.checkpoint),
                                    expected_keys=model.state_dict().keys())
            rep = load_into(model, state, stem=find_stem_conv(model))
            if rep.skipped or rep.missing:
                raise InputError(f"teacher checkpoint does not fit teacher.model: "
                                 f"{len(rep.skipped)} tensors of another shape, {len(rep.missing)} "
                                 f"missing (e.g. {', '.join((rep.skipped + rep.missing)[:4])})",
                                 file=t.checkpoint, key="teacher.model",
                                 hint="the teacher must be complete; set teacher.model.num_classes "
                                 "/ arch to the checkpoint's")
            what = f"teacher checkpoint {t.checkpoint}"
        if spec.num_classes != student.num_classes:
            raise InputError(f"{what} has {spec.num_classes} outputs, the student "
                             f"{student.num_classes}", key="teacher",
                             hint="distillation needs the same label set")
        if spec.class_names and student.class_names and spec.class_names != student.class_names:
            raise InputError(f"{what} predicts classes {spec.class_names}, the student "
                             f"{student.class_names}", key="teacher",
                             hint="distillation needs the same classes in the same order")
        if spec.in_chans != student.in_chans and 1 not in (spec.in_chans, student.in_chans):
            raise InputError(f"{what} takes {spec.in_chans} channels, the student "
                             f"{student.in_chans}; only 1 <-> N channels can be adapted",
                             key="teacher")
        return model, spec

    # ---- the run --------------------------------------------------------------------------------

    def _prepare(self, ctx: StageContext, config: FinetuneConfig, splits: DataSplits,
                 preprocess: PreprocessConfig) -> tuple[nn.Module, ModelSpec, nn.Module | None,
                                                        ModelSpec | None, dict[str, Any]]:
        """Student and teacher: built or read by rank 0, then sent to the other ranks."""
        from edgemml.distributed import broadcast_object

        payload: dict[str, Any] | None = None
        if ctx.is_main_process:
            student, spec, init = self._student(ctx, config, splits, preprocess)
            teacher = teacher_spec = None
            if config.teacher is not None:
                teacher, teacher_spec = self._teacher(ctx, config, spec, preprocess)
            if ctx.world_size == 1:
                return student, spec, teacher, teacher_spec, init
            payload = {"student": {"spec": spec.model_dump(mode="json"),
                                   "state": student.state_dict()},
                       "teacher": None if teacher is None or teacher_spec is None else {
                           "spec": teacher_spec.model_dump(mode="json"),
                           "state": teacher.state_dict()}}
        payload = broadcast_object(payload)
        if ctx.is_main_process:
            return student, spec, teacher, teacher_spec, init
        assert payload is not None
        student, spec = _rebuild(payload["student"])
        teacher, teacher_spec = _rebuild(payload["teacher"]) if payload["teacher"] else (None, None)
        return student, spec, teacher, teacher_spec, {}

    def run(self, ctx: StageContext, config: FinetuneConfig) -> dict[str, Path]:
        from edgemml.training import (
            ChannelAdapter,
            TrainingInterrupted,
            evaluate,
            resolve_device,
            seed_everything,
            train,
        )

        t0 = time.perf_counter()
        preprocess = common.preprocess_config(config, ctx.pipeline)
        if preprocess.layout != "NCHW":
            raise ConfigError("finetune trains PyTorch models, which take NCHW input",
                              key="preprocess.layout",
                              hint="train with layout: NCHW (the export stage can emit NHWC)")
        splits = common.load_stage_data(ctx, config)
        train_cfg = config.train_options()
        seed_everything(ctx.seed)  # the random init of a fresh model
        student, spec, teacher, teacher_spec, init = self._prepare(ctx, config, splits, preprocess)

        device = resolve_device(train_cfg.device)
        teacher_info = None
        if teacher is not None and teacher_spec is not None and config.teacher is not None \
                and ctx.is_main_process:
            adapted = ChannelAdapter(teacher, teacher_spec.in_chans).to(device)
            teacher_info = {
                "source": config.teacher.stage or config.teacher.checkpoint,
                "arch": teacher_spec.arch or teacher_spec.python, "params": _n_params(teacher),
                "val_top1_pct": evaluate(adapted, splits.val, device=device)["top1_pct"],
                "temperature": config.teacher.temperature, "alpha": config.teacher.alpha}
        ctx.log(f"training {_n_params(student):,} parameters on {device}"
                f"{f' x {ctx.world_size} processes' if ctx.world_size > 1 else ''}: "
                f"{len(splits.train)} train / {len(splits.val)} val images, "
                f"batch {train_cfg.batch_size}, up to {train_cfg.epochs} epochs")
        ckpt_dir = ctx.work_dir / CHECKPOINT_DIR if ctx.is_main_process else None
        if ckpt_dir is not None:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
        try:
            result = train(student, splits.train, splits.val, train_cfg, seed=ctx.seed,
                           teacher=teacher, checkpoint_dir=ckpt_dir,
                           progress=ctx.progress if ctx.is_main_process else None,
                           log=ctx.log, classes=splits.classes, distributed=ctx.world_size > 1)
        except TrainingInterrupted as stop:
            if ctx.is_main_process and stop.result.best_epoch is not None:
                self._save_interrupted(ctx, stop.result, spec, preprocess)
            raise
        if not ctx.is_main_process:
            return {}  # rank 0 writes every artifact

        return self._finish(ctx, config, result, spec, preprocess, splits, init, teacher_info,
                            train_cfg, ckpt_dir, t0)

    def _finish(self, ctx: StageContext, config: FinetuneConfig, result: TrainResult,
                spec: ModelSpec, preprocess: PreprocessConfig, splits: DataSplits, init: Any,
                teacher_info: dict[str, Any] | None, train_cfg: Any, ckpt_dir: Path | None,
                t0: float) -> dict[str, Path]:
        """Measure the trained model and write its outputs: model, history, curves, report."""
        from edgemml.data import save_sample_grid
        from edgemml.report.curves import draw_curves
        from edgemml.training import evaluate

        model = result.model
        val = evaluate(model, splits.val, device=result.device, classes=splits.classes)
        test = evaluate(model, splits.test, device=result.device, classes=splits.classes)
        spec = spec.model_copy(update={"extra": {
            **spec.extra, "preprocess": preprocess.model_dump(mode="json"), "stage": ctx.name,
            "best_epoch": result.best_epoch, "val_top1_pct": val["top1_pct"],
            "test_top1_pct": test["top1_pct"]}})
        model_dir = common.save_model_output(ctx, model.cpu(), spec)
        history = common.write_json(ctx, "history.json", _history_doc(result))
        curves = ctx.path("curves.png")
        draw_curves(result.history, curves, best_epoch=result.best_epoch,
                    title=f"{ctx.name}: {spec.arch or spec.python}")
        report = {
            "stage": ctx.name,
            "init": init,
            "model": {"arch": spec.arch or spec.python, "num_classes": spec.num_classes,
                      "in_chans": spec.in_chans, "params": _n_params(model)},
            "teacher": teacher_info,
            "data": splits.summary(),
            "train": train_cfg.model_dump(mode="json"),
            "processes": result.world_size,
            "device": result.device,
            "epochs_run": len(result.history),
            "steps": result.steps,
            "frozen_param_tensors": result.frozen_params,
            "best_epoch": result.best_epoch,
            "selected_by": result.metric or "last epoch (no validation split)",
            "stopped_early": result.stopped_early,
            "resumed_from_epoch": result.resumed_from,
            "val": val,
            "test": test,
            "train_seconds": round(result.seconds, 3),
            "wall_time_s": round(time.perf_counter() - t0, 3),
        }
        report_path = common.write_json(ctx, "finetune.json", report)
        # What the model was trained on, visibly: a grid of training images per class.
        samples = save_sample_grid(splits.train, path=ctx.path("samples.png"), per_class=8)
        if ckpt_dir is not None:
            shutil.rmtree(ckpt_dir)  # the epoch checkpoint is for resuming, not an output
        shown = {k: v for k, v in (("val", val["top1_pct"]), ("test", test["top1_pct"]))
                 if v is not None}
        ctx.record(val_top1_pct=val["top1_pct"], test_top1_pct=test["top1_pct"],
                   best_epoch=result.best_epoch, epochs_run=len(result.history),
                   stopped_early=result.stopped_early, resumed_from_epoch=result.resumed_from,
                   processes=result.world_size)
        ctx.highlight(f"best epoch {result.best_epoch} of {len(result.history)}: "
                      + ", ".join(f"{k} accuracy {v:.2f}%" for k, v in shown.items()))
        return {"model": model_dir, "history": history, "curves": curves, "report": report_path,
                "samples": samples}

    def _save_interrupted(self, ctx: StageContext, result: TrainResult, spec: ModelSpec,
                          preprocess: PreprocessConfig) -> None:
        """Keep what Ctrl-C interrupted: the best weights so far and the history, in the partial
        folder (the runner keeps it; a re-run resumes from the epoch checkpoint and overwrites)."""
        spec = spec.model_copy(update={"extra": {
            **spec.extra, "preprocess": preprocess.model_dump(mode="json"), "stage": ctx.name,
            "best_epoch": result.best_epoch, "interrupted": True}})
        folder = common.save_model_output(ctx, result.model.cpu(), spec)
        common.write_json(ctx, "history.json", _history_doc(result))
        ctx.warn(f"interrupted after epoch {len(result.history)}; the best weights so far (epoch "
                 f"{result.best_epoch}) are in {folder}; run the same command to resume")


def _history_doc(result: TrainResult) -> dict[str, Any]:
    return {"metric": result.metric, "best_epoch": result.best_epoch,
            "best_metric": result.best_metric, "stopped_early": result.stopped_early,
            "resumed_from_epoch": result.resumed_from, "processes": result.world_size,
            "epochs": result.history}


STAGE = Finetune
