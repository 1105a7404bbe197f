"""Refuse, before anything runs, a pipeline whose stages cannot work on its architecture.

The runner calls `check_pipeline` when it plans a run, so `edgemml check` and `edgemml run` both
exit 2 with one line naming the stage, the architecture and why (from the measured capability table
in edgemml.arch_capabilities), instead of failing after minutes of training. The model is
followed through the pipeline: a stage with its own `model:` (finetune) or `target:` (migrate)
builds that architecture at the stage's input size; a `load` stage reads the folder's model.json;
every other stage works on its input stage's model. Each stage type says what it does with its
model (`Stage.model_needs`: build, train, prune, export).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgemml.config import ModelConfig, PreprocessConfig
from edgemml.errors import ConfigError

if TYPE_CHECKING:
    from edgemml.config import LoadedPipeline, StageConfig
    from edgemml.stages.base import Stage


@dataclass(frozen=True)
class _Model:
    arch: str | None
    options: dict[str, Any]
    size: tuple[int, int]


def _stage_size(cfg: StageConfig, pipeline: LoadedPipeline) -> tuple[int, int]:
    pre = getattr(cfg, "preprocess", None) or pipeline.config.preprocess
    return tuple(pre.size)  # type: ignore[return-value]


def _from_config(model: ModelConfig, size: tuple[int, int]) -> _Model:
    arch = model.arch
    if arch is not None and "/" not in arch:
        arch = "torchvision/" + arch
    return _Model(arch, dict(model.options), size)


def _from_folder(folder: Path, size: tuple[int, int]) -> _Model | None:
    """The architecture a saved model folder names (None when unreadable: the load stage says
    why when it runs)."""
    try:
        spec = json.loads((folder / "model.json").read_text(encoding="utf-8"))
        pre = spec.get("extra", {}).get("preprocess")
        if pre:
            size = tuple(PreprocessConfig.model_validate(pre).size)  # type: ignore[assignment]
        return _Model(spec.get("arch"), dict(spec.get("options") or {}), size)
    except (OSError, ValueError, AttributeError, TypeError):
        return None


def _model_of(cfg: StageConfig, pipeline: LoadedPipeline, upstream: _Model | None) -> _Model | None:
    size = _stage_size(cfg, pipeline)
    own = getattr(cfg, "model", None)
    if isinstance(own, ModelConfig):
        return _from_config(own, size)
    if cfg.type == "migrate":
        target = getattr(cfg, "target", None) or pipeline.config.model
        return _from_config(target, size) if isinstance(target, ModelConfig) else None
    if cfg.type == "load":
        return _from_folder(pipeline.resolve_path(getattr(cfg, "path")), size)
    if upstream is not None and cfg.type == "finetune":
        return _Model(upstream.arch, upstream.options, size)  # trained at this stage's size
    return upstream


def _available_mb() -> float | None:
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is a dependency
        return None
    return psutil.virtual_memory().available / 2**20


def _line(pipeline: LoadedPipeline, index: int) -> int | None:
    from edgemml.yamlfile import parse_yaml

    try:
        _, lines = parse_yaml(pipeline.path.read_text(encoding="utf-8"), str(pipeline.path))
    except (OSError, UnicodeDecodeError, ConfigError):
        return None
    return lines.get(("stages", index))


def check_pipeline(plan: list[tuple[str, StageConfig, type[Stage], str | None]],
                   pipeline: LoadedPipeline) -> None:
    """Raise ConfigError (exit 2) naming every stage that cannot work on its model (the first
    one's file line and key lead the message).

    `plan`: (stage name, config, stage class, input stage name) in order.
    """
    from edgemml.arch_capabilities import refusals

    models: dict[str, _Model | None] = {}
    available = None
    found: list[tuple[int, str, str, Any]] = []
    for index, (name, cfg, cls, input_name) in enumerate(plan):
        model = _model_of(cfg, pipeline, models.get(input_name) if input_name else None)
        needs = cls.model_needs(cfg)
        if model is not None and needs:
            if "train" in needs and available is None:
                available = _available_mb()
            found += [(index, name, cfg.type, r) for r in
                      refusals(model.arch, model.options, model.size, needs,
                               available_mb=available)]
        if "model" in cls.provides:
            models[name] = model
    if not found:
        return
    index, name, stype, first = found[0]
    # one line per distinct reason: an architecture that cannot be built at the input size is
    # refused by every stage that touches it, which would otherwise repeat one sentence per stage
    also: dict[str, list[str]] = {}
    for _, n, _, r in found:
        also.setdefault(r.reason, []).append(repr(n))
    message = f"stage {name!r} ({stype}): {first.reason}"
    if len(also[first.reason]) > 1:
        message += f" (also stages {', '.join(also[first.reason][1:])})"
    shown = {first.reason}
    for i, n, t, r in found[1:]:
        if r.reason in shown:
            continue
        shown.add(r.reason)
        message += f"\n  stages[{i}]: stage {n!r} ({t}): {r.reason}"
    raise ConfigError(message, file=str(pipeline.path), line=_line(pipeline, index),
                      key=f"stages[{index}]", hint=first.hint)
