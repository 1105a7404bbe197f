"""`migrate`: move pretrained weights into a target model that differs from their source.

The target may have other key names, another number of input channels (RGB -> gray or RGB-D),
another label set, and its weights may come from several sources fused together. The matching and
adaptation logic lives in edgemml.models.transfer; this stage loads the sources, builds the target,
re-estimates BatchNorm statistics on the target data, measures zero-shot accuracy and writes
`migration.json` + `migration.md`: for every target tensor its source or "initialised".

The file is a little over the ~400-line guide because it keeps the config (with its checks that
`edgemml check` runs) next to the orchestration; mapping, fusion, growth and the report tables are
in edgemml.models.transfer, _grow.py, _migrate_sources.py and _migrate_report.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, create_model, field_validator, model_validator

from edgemml.config import (
    STAGE_NAME_RE,
    DataConfig,
    ModelConfig,
    PreprocessConfig,
    StageConfig,
    StrictModel,
)
from edgemml.errors import ConfigError, StageError
from edgemml.paths import check_input_file
from edgemml.stages import _grow
from edgemml.stages import _migrate_report as mreport
from edgemml.stages._migrate_sources import TORCHVISION_REF, Source, load_source, map_onto
from edgemml.stages._grow import GrowConfig, Growth
from edgemml.stages.base import Stage, StageContext
from edgemml.stages.common import (
    data_config,
    load_stage_data,
    preprocess_config,
    save_model_output,
    stage_data_files,
    write_json,
)

if TYPE_CHECKING:
    from torch import nn

    from edgemml.config import LoadedPipeline
    from edgemml.models.transfer import Fused



class SourceConfig(StrictModel):
    """One source of weights: an earlier stage's model or a checkpoint."""

    stage: str | None = Field(None, description="Earlier stage whose model (model.json + "
                              "model.safetensors) is the source.")
    checkpoint: str | None = Field(
        None, description="Checkpoint file (.pt/.pth/.bin/.ckpt/.safetensors, relative to the "
        "pipeline file) or torchvision:<Model>_Weights.<NAME> from the local torch hub cache.")
    weight: float = Field(1.0, gt=0, description="Weight of this source in `fuse: average`.")
    classes: list[str] | None = Field(
        None, description="Class names of the source's output rows (default: from the checkpoint "
        "or model.json); lets shared classes keep their classifier rows.")
    arch: ModelConfig | None = Field(
        None, description="Architecture of the checkpoint, used only to order its keys for "
        "alignment (safetensors files store keys sorted, not in module order).")

    @field_validator("stage")
    @classmethod
    def _stage_name(cls, value: str | None) -> str | None:
        if value is not None and not STAGE_NAME_RE.match(value):
            raise ValueError("use letters, digits, '_' and '-', starting with a letter")
        return value

    @model_validator(mode="after")
    def _one_of(self) -> SourceConfig:
        if (self.stage is None) == (self.checkpoint is None):
            raise ValueError("give exactly one of stage (an earlier stage name) or checkpoint")
        return self


class _RenameRule(StrictModel):
    """A regex rename rule applied to source keys, in order (re.sub)."""

    @field_validator("from", check_fields=False)
    @classmethod
    def _compiles(cls, value: str) -> str:
        import re

        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"invalid regular expression: {exc}") from None
        return value


# `from` is a Python keyword, so the model is created dynamically: the YAML key, the schema, the
# error messages and their did-you-mean all say `from`, as the user writes it.
RenameConfig = create_model(
    "RenameConfig", __base__=_RenameRule,
    __doc__="A regex rename rule applied to source keys, in order (re.sub).",
    **{"from": (str, Field(..., description="Regular expression searched in each source key.")),
       "to": (str, Field(..., description="Replacement (\\1 refers to a group)."))},
)


class MigrateConfig(StageConfig):
    type: Literal["migrate"]
    sources: list[SourceConfig] = Field(..., min_length=1, description="Where weights come from, "
                                        "in order of precedence: [{stage: NAME} | {checkpoint: PATH}].")
    fuse: Literal["first", "average"] = Field(
        "first", description="Several sources: first = each tensor from the first source that has "
        "it; average = weighted mean of the tensors (model soup).")
    target: ModelConfig | None = Field(
        None, description="Target architecture (default: the pipeline's `model:`); num_classes "
        "defaults to the data's classes, in_chans to preprocess.channels.")
    rename: list[RenameConfig] = Field(  # type: ignore[valid-type]
        default_factory=list, description="Regex rules renaming source keys, in order: "
        "[{from: '^backbone\\.', to: ''}].")
    align: bool = Field(True, description="Pair what names leave unmatched by module order and "
                        "shapes within each layer type (re-implementations with other names).")
    in_chans_rule: Literal["auto", "sum", "repeat", "zeros"] = Field(
        "auto", description="Stem kernel for another input-channel count: sum (3->1), repeat "
        "(cyclic, scaled by C_src/C_dst), zeros (new channels zero); auto: sum when reducing, "
        "repeat when adding.")
    stem: str | None = Field(None, description="Target stem conv module (default: the first conv "
                             "the input reaches).")
    head: str | None = Field(None, description="Target classifier module (default: the layer "
                             "producing the logits).")
    label_map: dict[str, str | int] | None = Field(
        None, description="{target class: source class name or row index} for classifier rows, "
        "on top of pairing by equal class names.")
    shape_mismatch: Literal["error", "skip"] = Field(
        "error", description="A matched tensor of another shape (not the stem or the head): error "
        "fails the stage naming it; skip leaves it initialised (listed in the report).")
    recalibrate_bn: Literal["auto"] | bool = Field(
        "auto", description="Re-estimate BatchNorm statistics on the target train split; auto: when "
        "input channels, data source or preprocessing differ from a source's.")
    bn_batches: int = Field(20, ge=1, description="Batches (of 64) for BatchNorm re-estimation.")
    min_coverage: float = Field(0.0, ge=0, le=1, description="Fail (exit 2) when fewer of the "
                                "target's parameters (outside allow_init) come from a source.")
    allow_init: list[str] = Field(
        ["head"], description="Tensors initialised on purpose, left out of min_coverage: 'head' "
        "(the classifier) or fnmatch patterns of tensor names.")
    zero_shot: bool = Field(True, description="Measure accuracy of the migrated model on the "
                            "target val split (test when val is empty), before any training.")
    grow: GrowConfig | None = Field(
        None, description="Grow the source into a larger target of its family: new residual "
        "blocks start as identities, wider layers by Net2WiderNet; tensors are paired by name "
        "(alignment is off), and migration.json reports the measured function match.")
    min_function_match: float | None = Field(
        None, ge=0, le=1, description="Fail (exit 2) when the migrated model's logits depart "
        "from the source's on real target samples (eval mode, before any training) by more than "
        "this allows: match = 1 - max|delta logit| / max|source logit|; 0.9999 demands exact "
        "growth. Measured whenever grow is set or this is given.")
    function_samples: int = Field(256, ge=1, description="Target samples (val, else train) on "
                                  "which the function match is measured.")
    data: DataConfig | None = Field(None, description="Target data (classes, BN re-estimation, "
                                    "zero-shot accuracy).")
    preprocess: PreprocessConfig | None = Field(None, description="Target preprocessing.")

    @model_validator(mode="after")
    def _no_input(self) -> MigrateConfig:
        if self.input is not None:
            raise ValueError(f"migrate reads its `sources:`, not `input:`; write sources: "
                             f"[{{stage: {self.input}}}]")
        if self.grow is not None and len(self.sources) != 1:
            raise ValueError(f"grow starts from one source; {len(self.sources)} are given")
        if self.min_function_match is not None and len(self.sources) != 1:
            raise ValueError("min_function_match compares the target with one source; "
                             f"{len(self.sources)} are given")
        return self


@dataclass
class _Target:
    sources: list[Source]
    model: nn.Module
    splits: Any
    preprocess: PreprocessConfig
    config: ModelConfig
    num_classes: int
    classes: list[str]
    in_chans: int


class Migrate(Stage[MigrateConfig]):
    """Transfer weights from sources into the target architecture and report every tensor."""

    type = "migrate"
    Config = MigrateConfig
    provides = ("model", "report", "table")
    requires = ("torch", "torchvision")

    @classmethod
    def needs_input(cls, config: MigrateConfig) -> bool:
        return False

    @classmethod
    def check_pipeline(cls, config: MigrateConfig, earlier: list[StageConfig],
                       model: ModelConfig | None) -> tuple[str, str, str | None] | None:
        if config.grow is None:
            return None
        from edgemml.stages._grow import check_family

        return check_family(config.sources, config.target, earlier, model)

    @classmethod
    def model_needs(cls, config: MigrateConfig) -> tuple[str, ...]:
        return ("build",)

    @classmethod
    def references(cls, config: MigrateConfig) -> list[tuple[str, str]]:
        refs = super().references(config)
        refs += [(f"sources.{i}.stage", s.stage) for i, s in enumerate(config.sources) if s.stage]
        return refs

    @classmethod
    def data_files(cls, config: MigrateConfig, pipeline: LoadedPipeline) -> list[Path]:
        files = stage_data_files(config, pipeline)
        for i, s in enumerate(config.sources):
            if s.checkpoint is None:
                continue
            if s.checkpoint.startswith(TORCHVISION_REF):
                from edgemml.errors import InputError
                from edgemml.models.checkpoints import torchvision_weights_path

                try:
                    files.append(torchvision_weights_path(s.checkpoint[len(TORCHVISION_REF):])[0])
                except InputError:
                    continue  # unknown name: run() reports it
            else:  # a regular file of bounded size, checked before it is hashed
                files.append(check_input_file(pipeline.resolve_path(s.checkpoint), what="checkpoint",
                                              key=f"sources[{i}].checkpoint"))
        return files

    # --------------------------------------------------------------------------------------------

    def run(self, ctx: StageContext, config: MigrateConfig) -> dict[str, Path]:
        """The stage's order, read top to bottom: map every source onto the target, fuse, grow,
        measure the function match, refuse low coverage (after writing the tables that explain
        it), re-estimate BatchNorm, measure again, save. Kept as one function (~85 lines) because
        the report written on refusal and on success is the same closure over these locals."""
        import torch

        from edgemml.models import ModelSpec
        from edgemml.models.registry import versioned_state
        from edgemml.models.transfer import RenameRule, coverage, fuse

        t = self._target(ctx, config)
        sources, model, splits, preprocess = t.sources, t.model, t.splits, t.preprocess
        target_cfg, num_classes, target_classes, in_chans = (t.config, t.num_classes, t.classes,
                                                             t.in_chans)
        stem = self._module(model, config.stem, "stem", in_chans)
        head = self._module(model, config.head, "head", in_chans)

        target_state = model.state_dict()
        rules = [RenameRule.parse(getattr(r, "from"), r.to, key=f"rename[{i}].from")
                 for i, r in enumerate(config.rename)]
        growth = Growth(config.grow) if config.grow is not None else None
        maps = [map_onto(ctx, config, i, src, model, target_state, rules, growth, stem, head,
                         target_classes) for i, src in enumerate(sources)]
        fused = fuse(maps, config.fuse)
        merged = {**target_state, **{k: f.value for k, f in fused.items()}}
        model.load_state_dict(versioned_state(merged, model), strict=True)
        batches = _grow.sample_batches(splits, config.function_samples)
        example = batches[0][:8] if batches else torch.zeros(2, in_chans, *preprocess.size)
        grown = _grow.init_new(growth, model, fused, head, example) if growth else set()

        params = dict(model.named_parameters())
        allowed = mreport.allowed_init(config.allow_init, list(params), head)
        allowed |= {k for k in grown if k in params}  # new blocks are new on purpose
        match: dict[str, Any] = {}
        if growth is not None or config.min_function_match is not None:
            src_model, why_not = _grow.source_model(sources[0], in_chans)
            rows = _grow.class_rows(target_classes, sources[0], config.label_map, num_classes,
                                    fused, head)
            match["before_bn"] = asdict(_grow.measure(src_model, why_not, model, batches, rows))
        share_all, taken, total = coverage(params, fused)
        share, _, _ = coverage(params, fused, excluded=allowed)

        if taken == 0:
            ctx.warn("no tensor was taken from a source: the model is as initialised")

        def write_reports(bn: dict[str, Any]) -> tuple[dict[str, Any], Path, Path]:
            summary = mreport.summary(config, target_cfg, in_chans, num_classes, stem, head, maps,
                                    fused, share_all, share, taken, total, bn)
            if match:
                summary["function_match"] = match
            if growth is not None:
                summary["growth"] = growth.report(match)
            tensors = mreport.tensor_rows(target_state, params, fused, maps, allowed)
            for row in tensors:
                init = growth.new_tensors().get(row["target"]) if growth is not None else None
                if init is not None:
                    row["status"], row["reason"] = "new", init
            report = {"summary": summary, "tensors": tensors,
                      "unused_source_tensors": {m.label: m.unused for m in maps}}
            table = ctx.path("migration.md")
            table.write_text(mreport.markdown(ctx.name, summary, tensors, maps), encoding="utf-8")
            return summary, write_json(ctx, "migration.json", report), table

        if share < config.min_coverage:
            _, _, table_path = write_reports({"setting": config.recalibrate_bn, "ran": False,
                                              "reasons": ["coverage below min_coverage"]})
            missing = mreport.largest_missing(target_state, params, fused, maps, allowed)
            raise StageError(
                f"coverage {share:.1%} is below min_coverage {config.min_coverage:.1%}; largest "
                f"tensors not taken from a source: {missing}", key="min_coverage",
                hint=f"add rename rules, list tensors initialised on purpose in allow_init, or "
                f"lower min_coverage; every tensor is listed in {table_path}")
        bn = self._recalibrate(ctx, config, model, splits, sources, fused, preprocess)
        if match and bn["ran"]:
            match["after_bn"] = asdict(_grow.measure(src_model, why_not, model, batches, rows))
        summary, report_path, table_path = write_reports(bn)
        _grow.check_match(config.min_function_match, match, growth, table_path)

        spec = ModelSpec.from_config(
            target_cfg, num_classes=num_classes, in_chans=in_chans, class_names=target_classes,
            preprocess=preprocess.model_dump(mode="json"),
            migration={k: summary[k] for k in ("coverage", "coverage_required", "rules", "stem",
                                               "head", "sources")})
        folder = save_model_output(ctx, model, spec)
        metrics, lines = mreport.metrics(summary)
        ctx.record(**metrics)
        for line in lines:
            ctx.highlight(line)
        return {"model": folder, "report": report_path, "table": table_path}

    # --------------------------------------------------------------------------------------------

    @staticmethod
    def _target(ctx: StageContext, config: MigrateConfig) -> _Target:
        """The sources and the target model, built and seeded, with what decides its shape: the
        data's classes (else a source's), the input channels, the preprocessing."""
        import torch

        from edgemml.models import build_model

        data_cfg = data_config(config, ctx.pipeline, required=False)
        preprocess = preprocess_config(config, ctx.pipeline)
        splits = load_stage_data(ctx, config) if data_cfg is not None else None
        target_cfg = config.target or ctx.pipeline.config.model
        if target_cfg is None:
            raise ConfigError("migrate needs a target architecture", key="target",
                              hint="add `target: {arch: torchvision/resnet18}` to the stage or a "
                              "top-level `model:` section")
        sources = [load_source(ctx, i, s) for i, s in enumerate(config.sources)]

        classes = list(splits.classes) if splits is not None else None
        num_classes = target_cfg.num_classes or (len(classes) if classes else None) or next(
            (len(s.classes) for s in sources if s.classes), None)
        if num_classes is None:
            raise ConfigError("cannot tell the target's number of classes", key="target.num_classes",
                              hint="set target.num_classes or give the stage data")
        target_classes = next((c for c in [classes] + [s.classes for s in sources]
                               if c and len(c) == num_classes), [])
        in_chans = target_cfg.in_chans or preprocess.num_channels
        torch.manual_seed(ctx.seed)  # initialised tensors are reproducible
        model = build_model(target_cfg, num_classes=num_classes, in_chans=in_chans)
        return _Target(sources, model, splits, preprocess, target_cfg, num_classes, target_classes,
                       in_chans)

    @staticmethod
    def _module(model: nn.Module, name: str | None, what: str, in_chans: int) -> str:
        import difflib

        from torch import nn

        from edgemml.models import find_classifier, find_stem_conv

        if name is None:
            try:
                return find_stem_conv(model, in_chans) if what == "stem" else find_classifier(
                    model, in_chans)
            except (ValueError, RuntimeError) as exc:
                raise ConfigError(f"cannot find the target's {what} automatically: {exc}", key=what,
                                  hint=f"name the module with `{what}: <module name>`") from None
        modules = dict(model.named_modules())
        kinds = (nn.Conv2d,) if what == "stem" else (nn.Linear, nn.Conv2d)
        if not isinstance(modules.get(name), kinds):
            candidates = [n for n, m in modules.items() if isinstance(m, kinds)]
            close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
            raise ConfigError(f"{name!r} is not a {' or '.join(k.__name__ for k in kinds)} of the "
                              f"target", key=what,
                              hint=f"did you mean {close[0]!r}?" if close else
                              f"candidates: {', '.join(candidates[:8])}")
        return name

    def _recalibrate(self, ctx: StageContext, config: MigrateConfig, model: nn.Module,
                     splits: Any, sources: list[Source], fused: dict[str, Fused],
                     preprocess: PreprocessConfig) -> dict[str, Any]:
        from torch import nn

        from edgemml.training import evaluate, recalibrate_bn

        reasons: list[str] = []
        if any(p.adaptation and p.adaptation.startswith("stem")
               for f in fused.values() for p in f.provenance):
            reasons.append("input channels changed")
        target_source = splits.source if splits is not None else None
        own = preprocess.model_dump(mode="json")
        for s in sources:
            if s.data_source is None:
                reasons.append(f"{s.label} was trained on other data")
            elif s.data_source != target_source:
                reasons.append(f"{s.label} was trained on {s.data_source}")
            elif s.preprocess is not None and s.preprocess != own:
                reasons.append(f"{s.label} used other preprocessing")
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        wanted = config.recalibrate_bn is True or (config.recalibrate_bn == "auto" and bool(reasons))
        info: dict[str, Any] = {"setting": config.recalibrate_bn, "ran": False,
                                "reasons": reasons if config.recalibrate_bn == "auto" else []}
        split = None
        if splits is not None and config.zero_shot:
            split = "val" if len(splits.val) else ("test" if len(splits.test) else None)
        classes = splits.classes if splits is not None else None
        if split is not None:
            info["zero_shot_split"] = split
            info["zero_shot_before_bn"] = evaluate(model, splits.split(split), classes=classes)
        if wanted and has_bn:
            if splits is None:
                if config.recalibrate_bn is True:
                    raise ConfigError("recalibrate_bn: true needs target data", key="recalibrate_bn",
                                      hint="add a `data:` section (pipeline or stage)")
                ctx.warn("BatchNorm statistics come from the source domain and no target data "
                         "is configured to re-estimate them")
            else:
                with ctx.progress("re-estimate BatchNorm statistics", None):
                    info["samples"] = recalibrate_bn(model, splits.train, batches=config.bn_batches,
                                                     seed=ctx.seed)
                info["ran"] = True
                if split is not None:
                    info["zero_shot_after_bn"] = evaluate(model, splits.split(split),
                                                          classes=classes)
        model.eval()
        return info

STAGE = Migrate
