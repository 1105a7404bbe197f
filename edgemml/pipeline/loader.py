"""Loading a pipeline file: read, override, validate every stage against its registered config.

Above the stage layer on purpose: validating `stages:` needs the stage registry (each type's
Config), and the registry lives in edgemml.stages. edgemml.config below holds the schema of the
shared sections, the YAML parser with line numbers and the error formatting, and never imports a
stage. `edgemml validate FILE` (a validate stage alone, from a flat file) is loaded here too.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from edgemml import stages as stage_registry
from edgemml.config import (
    LoadedPipeline,
    ModelConfig,
    PipelineConfig,
    StageConfig,
    canonical_arch,
    known_architectures,
    stage_name,
)
from edgemml.yamlfile import (
    _SHARED_MERGE_KEYS,
    ErrorContext,
    _deep_merge,
    _did_you_mean,
    apply_overrides,
    parse_yaml,
)
from edgemml.errors import ConfigError, InputError
from edgemml.yamlsafe import read_yaml_text


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> LoadedPipeline:
    """Read, override and validate a pipeline file. Every problem raises ConfigError with the line."""
    path = Path(path)
    file = str(path)
    raw, lines = parse_yaml(read_yaml_text(path), file)
    if not isinstance(raw, dict):
        raise ConfigError("a pipeline file must be a mapping with name and stages", file=file, line=1)
    origins = apply_overrides(raw, list(overrides or []))
    ctx = ErrorContext(file, lines, origins)

    try:
        top = PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        ctx.raise_for(exc, PipelineConfig, (), "")
        raise  # unreachable

    for plugin in top.plugins:
        stage_registry.import_plugin(plugin, file=file, line=ctx.line_for(("plugins",)))

    shared_raw = {k: raw.get(k) for k in _SHARED_MERGE_KEYS if isinstance(raw.get(k), dict)}
    stage_items, sweeps = _expand_sweeps(raw["stages"], file, ctx)
    configs: list[StageConfig] = []
    for i, item in stage_items:
        where = ("stages", i)
        if not isinstance(item, dict):
            raise ConfigError("each stage must be a mapping with a type", file=file,
                              line=ctx.line_for(where), key=f"stages[{i}]")
        stype = item.get("type")
        if not isinstance(stype, str):
            raise ConfigError("stage has no type", file=file, line=ctx.line_for(where),
                              key=f"stages[{i}]",
                              hint=f"add `type:` with one of: {', '.join(stage_registry.names())}")
        try:
            stage_cls = stage_registry.get(stype)
        except KeyError:
            known = stage_registry.names()
            hint = _did_you_mean(stype, known)
            raise ConfigError(f"unknown stage type {stype!r} (known: {', '.join(known)})",
                              file=file, line=ctx.line_for(where + ("type",)),
                              key=f"stages[{i}].type", hint=hint) from None
        merged = dict(item)
        for key, shared in shared_raw.items():
            if key in stage_cls.Config.model_fields:
                own = item.get(key)
                merged[key] = _deep_merge(shared, own) if isinstance(own, dict) else (
                    own if own is not None else copy.deepcopy(shared))
        try:
            cfg = stage_cls.Config.model_validate(merged)
        except ValidationError as exc:
            label = stype if "name" not in item or item is raw["stages"][i] else item["name"]
            ctx.raise_for(exc, stage_cls.Config, where, f"stages[{i}].{label}",
                          fallback_prefix=())
            raise
        configs.append(cfg)

    _check_architectures(top, configs, file, ctx)
    _check_stage_graph(configs, file, ctx, top.model)
    loaded = LoadedPipeline(top, configs, path, raw)
    #: the file's sweeps (edgemml.sweep.Sweep), for the stages that present them (validate)
    loaded.sweeps = sweeps  # type: ignore[attr-defined]
    return loaded


def _expand_sweeps(stages: list[Any], file: str,
                   ctx: ErrorContext) -> tuple[list[tuple[int, Any]], list[Any]]:
    """A stage with `sweep:` and the stages after it, once per point (edgemml.sweep); errors name
    the line of the `sweep:` key."""
    from edgemml import sweep

    def cls_of(item: dict[str, Any]) -> Any:
        try:
            return stage_registry.get(str(item.get("type")))
        except KeyError:
            return None

    def provides_model(item: dict[str, Any]) -> bool:
        cls = cls_of(item)
        return cls is not None and "model" in cls.provides

    def gathers(item: dict[str, Any]) -> bool:
        cls = cls_of(item)
        try:
            return cls is not None and cls.reads_all_earlier and not cls.needs_input(item)
        except Exception:  # noqa: BLE001 - a plugin's needs_input may expect a validated config
            return False

    try:
        return sweep.expand(stages, provides_model=provides_model, gathers=gathers)
    except ConfigError as exc:
        if exc.file is None:
            index = next((i for i, s in enumerate(stages)
                          if isinstance(s, dict) and sweep.SWEEP_KEY in s), 0)
            exc.file = file
            exc.line = ctx.line_for(("stages", index, sweep.SWEEP_KEY))
        raise


def _model_configs(model: BaseModel, path: tuple[Any, ...]) -> list[tuple[tuple[Any, ...],
                                                                          ModelConfig]]:
    """(key path, ModelConfig) of every model section inside a validated config."""
    found: list[tuple[tuple[Any, ...], ModelConfig]] = []
    for name in type(model).model_fields:
        value = getattr(model, name)
        items = list(enumerate(value)) if isinstance(value, list) else [(None, value)]
        for i, item in items:
            where = path + ((name,) if i is None else (name, i))
            if isinstance(item, ModelConfig):
                found.append((where, item))
            elif isinstance(item, BaseModel):
                found += _model_configs(item, where)
    return found


def _check_architectures(top: PipelineConfig, configs: list[StageConfig], file: str,
                         ctx: ErrorContext) -> None:
    """Refuse, at load time (so `edgemml check` does too), an architecture torchvision does not
    have: `run` would refuse it only when the stage builds the model."""
    found = [(("model",), "model", top.model)] if top.model is not None else []
    for i, cfg in enumerate(configs):
        found += [(("stages", i) + p, f"stages[{i}].{cfg.type}" + "".join(
            f"[{k}]" if isinstance(k, int) else f".{k}" for k in p), m)
            for p, m in _model_configs(cfg, ())]
    found = [f for f in found if f[2].arch is not None]
    if not found:
        return
    known = known_architectures()
    for where, key, model in found:
        if canonical_arch(str(model.arch)) not in known:
            hint = _did_you_mean(canonical_arch(str(model.arch)), known)
            raise ConfigError(f"unknown architecture {model.arch!r}: not one of torchvision's "
                              f"{len(known)} classification models",
                              file=file, line=ctx.line_for(where + ("arch",)), key=f"{key}.arch",
                              hint=(hint + " " if hint else "") + "or use model.python: "
                              "package.module:factory for your own architecture")


def _check_stage_graph(configs: list[StageConfig], file: str, ctx: ErrorContext,
                       model: ModelConfig | None = None) -> None:
    from edgemml import stages as stage_registry

    seen: list[str] = []
    for i, cfg in enumerate(configs):
        name = stage_name(cfg)
        if name in seen:
            raise ConfigError(f"stage name {name!r} is used twice", file=file,
                              line=ctx.line_for(("stages", i)), key=f"stages[{i}].name",
                              hint="give each stage a unique `name:`")
        stage_cls = stage_registry.get(cfg.type)
        for ref_key, ref in stage_cls.references(cfg):
            if ref not in seen:
                hint = _did_you_mean(ref, seen)
                later = ref in [stage_name(c) for c in configs[i:]]
                msg = (f"refers to stage {ref!r}, which comes later; a stage can only read earlier "
                       f"stages" if later else f"refers to unknown stage {ref!r}")
                raise ConfigError(msg, file=file,
                                  line=ctx.line_for(("stages", i) + tuple(
                                      int(k) if k.isdigit() else k for k in ref_key.split("."))),
                                  key=f"stages[{i}].{cfg.type}.{ref_key}",
                                  hint=hint or (f"earlier stages: {', '.join(seen)}" if seen else None))
        issue = stage_cls.check_pipeline(cfg, configs[:i], model)
        if issue is not None:
            key, message, hint = issue
            where = tuple(int(k) if k.isdigit() else k for k in key.split("."))
            raise ConfigError(message, file=file, line=ctx.line_for(("stages", i) + where),
                              key=f"stages[{i}].{cfg.type}.{key}", hint=hint)
        seen.append(name)


_TOP_ONLY = ("name", "seed", "output_dir", "plugins")


def load_standalone(path: Path, overrides: list[str] | None = None) -> LoadedPipeline:
    """A one-stage pipeline from a file holding the validate options at its top level (plus name,
    seed, data, preprocess). Errors name the file's lines like pipeline errors do; relative paths
    are relative to the file."""
    from edgemml.stages._validate_plan import safe_name
    from edgemml.stages.validate import ValidateConfig

    path = Path(path)
    file = str(path)
    if not path.exists():
        raise InputError(f"validation file not found: {path}",
                         hint="give a YAML file with artifacts:, data: and gates:")
    raw, lines = parse_yaml(read_yaml_text(path, "validation file"), file)
    if not isinstance(raw, dict):
        raise ConfigError("the file must be a mapping (artifacts:, data:, gates: ...)", file=file,
                          line=1)
    if "stages" in raw:
        raise ConfigError("this is a pipeline file (it has stages:)", file=file, key="stages",
                          hint=f"run it with: edgemml run {path}")
    origins = apply_overrides(raw, list(overrides or []))
    errors = ErrorContext(file, lines, origins)
    top_raw = {k: raw[k] for k in (*_TOP_ONLY, "data", "preprocess") if k in raw}
    top_raw.setdefault("name", safe_name(path.stem))
    top_raw["stages"] = [{"type": "validate"}]
    try:
        top = PipelineConfig.model_validate(top_raw)
    except ValidationError as exc:
        errors.raise_for(exc, PipelineConfig, (), "")
        raise
    for plugin in top.plugins:
        stage_registry.import_plugin(plugin, file=file)
    stage_raw = {k: v for k, v in raw.items() if k not in _TOP_ONLY}
    stage_raw.setdefault("type", "validate")
    try:
        cfg = ValidateConfig.model_validate(stage_raw)
    except ValidationError as exc:
        errors.raise_for(exc, ValidateConfig, (), "")
        raise
    return LoadedPipeline(top, [cfg], path, raw)
