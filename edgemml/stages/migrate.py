"""`migrate`: move pretrained weights into a target model that differs from their source.

The target may have other key names, another number of input channels (RGB -> gray or RGB-D),
another label set, and its weights may come from several sources fused together. The matching and
adaptation logic lives in edgemml.models.transfer; this stage loads the sources, builds the target,
re-estimates BatchNorm statistics on the target data, measures zero-shot accuracy and writes
`migration.json` + `migration.md`: for every target tensor its source or "initialised".
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field
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
    stage_name,
)
from edgemml.errors import ConfigError, StageError
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
    import torch
    from torch import nn

    from edgemml.config import LoadedPipeline
    from edgemml.models.transfer import Fused, SourceMap

TORCHVISION_REF = "torchvision:"


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
    data: DataConfig | None = Field(None, description="Target data (classes, BN re-estimation, "
                                    "zero-shot accuracy).")
    preprocess: PreprocessConfig | None = Field(None, description="Target preprocessing.")

    @model_validator(mode="after")
    def _no_input(self) -> MigrateConfig:
        if self.input is not None:
            raise ValueError(f"migrate reads its `sources:`, not `input:`; write sources: "
                             f"[{{stage: {self.input}}}]")
        return self


@dataclass
class _Source:
    label: str
    weight: float
    state: dict[str, torch.Tensor]
    classes: list[str] | None
    data_source: str | None  # what it was trained on, None when unknown
    preprocess: dict[str, Any] | None
    notes: list[str] = field(default_factory=list)


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
        for s in config.sources:
            if s.checkpoint is None:
                continue
            if s.checkpoint.startswith(TORCHVISION_REF):
                from edgemml.errors import InputError
                from edgemml.models.checkpoints import torchvision_weights_path

                try:
                    files.append(torchvision_weights_path(s.checkpoint[len(TORCHVISION_REF):])[0])
                except InputError:
                    continue  # unknown name: run() reports it
            else:
                files.append(pipeline.resolve_path(s.checkpoint))
        return files

    # --------------------------------------------------------------------------------------------

    def run(self, ctx: StageContext, config: MigrateConfig) -> dict[str, Path]:
        import torch

        from edgemml.models import ModelSpec, build_model
        from edgemml.models.registry import versioned_state
        from edgemml.models.transfer import (
            RenameRule,
            coverage,
            fuse,
            map_source,
            match_keys,
        )

        data_cfg = data_config(config, ctx.pipeline, required=False)
        preprocess = preprocess_config(config, ctx.pipeline)
        splits = load_stage_data(ctx, config) if data_cfg is not None else None
        target_cfg = config.target or ctx.pipeline.config.model
        if target_cfg is None:
            raise ConfigError("migrate needs a target architecture", key="target",
                              hint="add `target: {arch: torchvision/resnet18}` to the stage or a "
                              "top-level `model:` section")
        sources = [self._load_source(ctx, i, s) for i, s in enumerate(config.sources)]

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
        stem = self._module(model, config.stem, "stem", in_chans)
        head = self._module(model, config.head, "head", in_chans)

        target_state = model.state_dict()
        shapes = {k: tuple(v.shape) for k, v in target_state.items()}
        rules = [RenameRule.parse(getattr(r, "from"), r.to, key=f"rename[{i}].from")
                 for i, r in enumerate(config.rename)]
        maps: list[SourceMap] = []
        for i, src in enumerate(sources):
            matches, notes = match_keys(shapes, {k: tuple(v.shape) for k, v in src.state.items()},
                                        rules=rules, align=config.align, stem=stem, head=head)
            smap = map_source(src.label, target_state, src.state, matches, weight=src.weight,
                              stem=stem, head=head, in_chans_rule=config.in_chans_rule,
                              target_classes=target_classes, source_classes=src.classes,
                              label_map=config.label_map)
            smap.notes = src.notes + notes + smap.notes
            fatal = [m for m in smap.mismatched if m.fatal]
            if fatal and config.shape_mismatch == "error":
                more = f" (and {len(fatal) - 1} more)" if len(fatal) > 1 else ""
                raise StageError(
                    f"source {src.label}: tensor {fatal[0].target} needs shape "
                    f"{list(fatal[0].target_shape)} but the source's {fatal[0].source_key} has "
                    f"{list(fatal[0].source_shape)} (matched by {fatal[0].rule}){more}; the source "
                    f"does not fit the target", key=f"sources[{i}]",
                    hint="check the target architecture and its options, or set "
                    "`shape_mismatch: skip` to leave such tensors initialised")
            for note in smap.notes:
                ctx.log(f"{src.label}: {note}")
            maps.append(smap)
        fused = fuse(maps, config.fuse)
        merged = {**target_state, **{k: f.value for k, f in fused.items()}}
        model.load_state_dict(versioned_state(merged, model), strict=True)

        params = dict(model.named_parameters())
        allowed = self._allowed_init(config.allow_init, list(params), head)
        share_all, taken, total = coverage(params, fused)
        share, _, _ = coverage(params, fused, excluded=allowed)

        if taken == 0:
            ctx.warn("no tensor was taken from a source: the model is as initialised")

        def write_reports(bn: dict[str, Any]) -> tuple[dict[str, Any], Path, Path]:
            summary = self._summary(config, target_cfg, in_chans, num_classes, stem, head, maps,
                                    fused, share_all, share, taken, total, bn)
            tensors = self._tensor_rows(target_state, params, fused, maps, allowed)
            report = {"summary": summary, "tensors": tensors,
                      "unused_source_tensors": {m.label: m.unused for m in maps}}
            table = ctx.path("migration.md")
            table.write_text(_markdown(ctx.name, summary, tensors, maps), encoding="utf-8")
            return summary, write_json(ctx, "migration.json", report), table

        if share < config.min_coverage:
            _, _, table_path = write_reports({"setting": config.recalibrate_bn, "ran": False,
                                              "reasons": ["coverage below min_coverage"]})
            missing = self._largest_missing(target_state, params, fused, maps, allowed)
            raise StageError(
                f"coverage {share:.1%} is below min_coverage {config.min_coverage:.1%}; largest "
                f"tensors not taken from a source: {missing}", key="min_coverage",
                hint=f"add rename rules, list tensors initialised on purpose in allow_init, or "
                f"lower min_coverage; every tensor is listed in {table_path}")
        bn = self._recalibrate(ctx, config, model, splits, sources, fused, preprocess)
        summary, report_path, table_path = write_reports(bn)

        spec = ModelSpec.from_config(
            target_cfg, num_classes=num_classes, in_chans=in_chans, class_names=target_classes,
            preprocess=preprocess.model_dump(mode="json"),
            migration={k: summary[k] for k in ("coverage", "coverage_required", "rules", "stem",
                                               "head", "sources")})
        folder = save_model_output(ctx, model, spec)
        metrics, lines = _metrics(summary)
        ctx.record(**metrics)
        for line in lines:
            ctx.highlight(line)
        return {"model": folder, "report": report_path, "table": table_path}

    # --------------------------------------------------------------------------------------------

    def _load_source(self, ctx: StageContext, i: int, cfg: SourceConfig) -> _Source:
        from edgemml.errors import InputError
        from edgemml.models import build_model, load_model, read_checkpoint
        from edgemml.models.transfer import natural_order, normalize_key

        if cfg.stage is not None:
            model, spec = load_model(ctx.input(cfg.stage)["model"])
            stage_cfg = next(c for c in ctx.pipeline.stages if stage_name(c) == cfg.stage)
            data = data_config(stage_cfg, ctx.pipeline, required=False)
            return _Source(f"stage:{cfg.stage}", cfg.weight, dict(model.state_dict()),
                           cfg.classes or spec.class_names or None,
                           data.source if data is not None else None,
                           spec.extra.get("preprocess"))
        ref = cfg.checkpoint
        assert ref is not None
        where: str | Path = ref if ref.startswith(TORCHVISION_REF) else ctx.resolve(ref)
        try:
            ckpt = read_checkpoint(where, strip_prefixes=False)
        except InputError as exc:
            exc.key = exc.key or f"sources[{i}].checkpoint"
            raise
        state = ckpt.state_dict
        notes = list(ckpt.notes)
        if ckpt.nested_under:
            notes.append(f"weights found under {'/'.join(ckpt.nested_under)}")
        if cfg.arch is not None:
            ref_model = build_model(cfg.arch, num_classes=cfg.arch.num_classes or 10,
                                    in_chans=cfg.arch.in_chans or 3)
            rank = {normalize_key(k): n for n, k in enumerate(ref_model.state_dict())}
            keys = sorted(state, key=lambda k: rank.get(normalize_key(k), len(rank)))
            state = {k: state[k] for k in keys}
        elif isinstance(where, Path) and _is_safetensors(where):
            state = {k: state[k] for k in natural_order(state)}
            notes.append("safetensors stores keys sorted: alignment uses natural key order "
                         "(give `arch:` for the true module order)")
        return _Source(ref, cfg.weight, state, cfg.classes or ckpt.class_names, None, None, notes)

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

    @staticmethod
    def _allowed_init(patterns: list[str], params: list[str], head: str) -> set[str]:
        allowed: set[str] = set()
        for pattern in patterns:
            if pattern == "head":
                hits = {p for p in params if p.startswith(head + ".")}
            else:
                hits = {p for p in params
                        if fnmatch.fnmatchcase(p, pattern) or fnmatch.fnmatchcase(p, pattern + ".*")}
            if not hits:
                raise ConfigError(f"allow_init pattern {pattern!r} matches no target parameter",
                                  key="allow_init",
                                  hint=f"parameter names look like: {', '.join(params[:6])} ...")
            allowed |= hits
        return allowed

    def _recalibrate(self, ctx: StageContext, config: MigrateConfig, model: nn.Module,
                     splits: Any, sources: list[_Source], fused: dict[str, Fused],
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

    @staticmethod
    def _summary(config: MigrateConfig, target_cfg: ModelConfig, in_chans: int, num_classes: int,
                 stem: str, head: str, maps: list[SourceMap], fused: dict[str, Fused],
                 share_all: float, share: float, taken: int, total: int,
                 bn: dict[str, Any]) -> dict[str, Any]:
        rules: dict[str, int] = {}
        for f in fused.values():
            rules[f.provenance[0].rule] = rules.get(f.provenance[0].rule, 0) + 1
        stem_f = fused.get(f"{stem}.weight")
        head_f = fused.get(f"{head}.weight")
        head_rows = (num_classes if head_f.rows is None else int(head_f.rows.sum())) if head_f else 0
        zero = bn.get("zero_shot_after_bn") or bn.get("zero_shot_before_bn")
        return {
            "target": {"arch": target_cfg.arch, "python": target_cfg.python, "in_chans": in_chans,
                       "num_classes": num_classes},
            "fuse": config.fuse,
            "coverage": share_all, "coverage_required": share, "params_from_source": taken,
            "params_total": total, "min_coverage": config.min_coverage,
            "rules": rules,
            "stem": {"module": stem, "adaptation": (
                (stem_f.provenance[0].adaptation or "").removeprefix("stem ") or None
                if stem_f else "initialised")},
            "head": {"module": head, "rows_from_source": head_rows, "rows": num_classes,
                     "how": (head_f.provenance[0].adaptation or "copied") if head_f else
                     "initialised"},
            "sources": [{"source": m.label, "weight": m.weight, "tensors_used": len(m.mapped),
                         "tensors_unused": len(m.unused), "notes": m.notes} for m in maps],
            "bn": {k: v for k, v in bn.items() if not k.startswith("zero_shot")},
            "zero_shot": None if zero is None else {
                "split": bn["zero_shot_split"], "n": zero["n"],
                "top1_pct": zero["top1_pct"],
                "top1_pct_before_bn": bn["zero_shot_before_bn"]["top1_pct"],
                "top1_pct_after_bn": (bn.get("zero_shot_after_bn") or {}).get("top1_pct")},
        }

    @classmethod
    def _largest_missing(cls, target_state: dict[str, torch.Tensor], params: dict[str, Any],
                         fused: dict[str, Fused], maps: list[SourceMap], allowed: set[str]) -> str:
        rows = [t for t in cls._tensor_rows(target_state, params, fused, maps, allowed)
                if t["kind"] == "parameter" and t["status"] in ("initialised", "partial")
                and t["target"] not in allowed]
        rows.sort(key=lambda t: -t["numel"] * (1 - t.get("fraction", 0.0)))
        return "; ".join(f"{t['target']} {t['shape']} ({t['numel']:,} params, "
                         f"{t.get('reason') or t['status']})" for t in rows[:5])

    @staticmethod
    def _tensor_rows(target_state: dict[str, torch.Tensor], params: dict[str, Any],
                     fused: dict[str, Fused], maps: list[SourceMap],
                     allowed: set[str]) -> list[dict[str, Any]]:
        reasons: dict[str, str] = {}
        for m in maps:
            for mm in m.mismatched:
                reasons.setdefault(mm.target, f"{m.label}: {mm.describe()}")
        rows = []
        for key, tensor in target_state.items():
            entry: dict[str, Any] = {"target": key, "shape": list(tensor.shape),
                                     "numel": tensor.numel(),
                                     "kind": "parameter" if key in params else "buffer"}
            f = fused.get(key)
            if f is None:
                entry["status"] = "initialised"
                entry["reason"] = reasons.get(key) or "no source tensor matched"
                if key in allowed:
                    entry["reason"] += " (allow_init)"
            else:
                adapted = any(p.adaptation for p in f.provenance)
                entry["status"] = ("partial" if f.rows is not None else
                                   "adapted" if adapted else "loaded")
                if f.rows is not None:
                    entry["fraction"] = float(f.rows.float().mean())
                entry["from"] = [asdict(p) for p in f.provenance]
            rows.append(entry)
        return rows


def _is_safetensors(path: Path) -> bool:
    """The safetensors header: an 8-byte little-endian length followed by '{'."""
    import struct

    with open(path, "rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 0 < struct.unpack("<Q", head[:8])[0] <= (
        path.stat().st_size - 8)


def _metrics(summary: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    zero = summary["zero_shot"]
    out: dict[str, Any] = {
        "coverage": round(summary["coverage"], 6),
        "coverage_required": round(summary["coverage_required"], 6),
        "tensors_by_rule": summary["rules"], "stem": summary["stem"]["adaptation"],
        "head_rows_from_source": summary["head"]["rows_from_source"],
        "bn_recalibrated": summary["bn"]["ran"]}
    lines = [f"coverage {summary['coverage']:.1%} of parameters from a source "
             f"({', '.join(f'{n} {r}' for r, n in summary['rules'].items())} tensors)"]
    if summary["stem"]["adaptation"]:
        lines.append(f"stem {summary['stem']['module']}: input channels "
                     f"{summary['stem']['adaptation']}")
    lines.append(f"head {summary['head']['module']}: {summary['head']['rows_from_source']}/"
                 f"{summary['head']['rows']} rows from a source")
    if zero is not None:
        out["zero_shot_top1_pct"] = zero["top1_pct"]
        out["zero_shot_split"] = zero["split"]
        out["zero_shot_top1_pct_before_bn"] = zero["top1_pct_before_bn"]
        text = f"zero-shot {zero['split']} accuracy {zero['top1_pct']:.1f}% (n={zero['n']})"
        if zero["top1_pct_after_bn"] is not None:
            text += f"; {zero['top1_pct_before_bn']:.1f}% before BatchNorm re-estimation"
        lines.append(text)
    return out, lines


def _markdown(name: str, summary: dict[str, Any], tensors: list[dict[str, Any]],
              maps: list[SourceMap]) -> str:
    t = summary["target"]
    out = [f"# Migration: {name}", "",
           f"Target: {t['arch'] or t['python']}, {t['in_chans']} input channel(s), "
           f"{t['num_classes']} classes. Sources fused by `{summary['fuse']}`.", "",
           f"**Coverage: {summary['coverage']:.2%}** of parameters taken from a source "
           f"({summary['params_from_source']:,} of {summary['params_total']:,}); "
           f"{summary['coverage_required']:.2%} outside allow_init.", "",
           "| rule | tensors |", "|---|---|"]
    out += [f"| {r} | {n} |" for r, n in summary["rules"].items()]
    out += ["", f"- stem `{summary['stem']['module']}`: {summary['stem']['adaptation'] or 'copied'}",
            f"- head `{summary['head']['module']}`: {summary['head']['rows_from_source']}/"
            f"{summary['head']['rows']} rows from a source ({summary['head']['how']})"]
    bn = summary["bn"]
    out.append("- BatchNorm re-estimation: " + (
        f"ran on {bn.get('samples')} target samples ({'; '.join(bn['reasons']) or 'asked for'})"
        if bn["ran"] else f"not run (recalibrate_bn: {bn['setting']})"))
    zero = summary["zero_shot"]
    if zero is not None:
        text = (f"- zero-shot top-1 on {zero['split']} (n={zero['n']}): "
                f"{zero['top1_pct']:.2f}%")
        if zero["top1_pct_after_bn"] is not None:
            text += f" (before BatchNorm re-estimation: {zero['top1_pct_before_bn']:.2f}%)"
        out.append(text)
    out += ["", "## Sources", "", "| source | weight | tensors used | unused | notes |",
            "|---|---|---|---|---|"]
    for m in maps:
        out.append(f"| {m.label} | {m.weight:g} | {len(m.mapped)} | {len(m.unused)} | "
                   f"{'; '.join(m.notes) or ''} |")
    out += ["", "## Tensors", "", "| target | shape | status | source | key | rule | adaptation |",
            "|---|---|---|---|---|---|---|"]
    for row in tensors:
        shape = "x".join(map(str, row["shape"])) or "scalar"
        if row["status"] == "initialised":
            out.append(f"| {row['target']} | {shape} | initialised | | | | {row['reason']} |")
            continue
        for j, p in enumerate(row["from"]):
            share = f" (w={p['weight']:.3g})" if p["weight"] is not None else ""
            first = (f"| {row['target']} | {shape} | {row['status']} " if j == 0
                     else "| | | ")
            out.append(f"{first}| {p['source']}{share} | {p['key']} | {p['rule']} | "
                       f"{p['adaptation'] or ''} |")
    for m in maps:
        if m.unused:
            out += ["", f"Unused tensors of {m.label} ({len(m.unused)}): "
                    + ", ".join(m.unused[:40]) + (" ..." if len(m.unused) > 40 else "")]
    return "\n".join(out) + "\n"


STAGE = Migrate
