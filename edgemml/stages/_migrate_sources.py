"""The migrate stage's sources: each one loaded (an earlier stage's model, a checkpoint file or a
torchvision reference), its keys put in module order, then matched and mapped onto the target
(widened first when growing). Apart from stages/migrate.py so the stage file holds the config and
the orchestration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgemml.config import ModelConfig, stage_name
from edgemml.errors import StageError
from edgemml.stages import _grow
from edgemml.stages.common import data_config

if TYPE_CHECKING:
    import torch
    from torch import nn

    from edgemml.models.transfer import SourceMap
    from edgemml.stages._grow import Growth
    from edgemml.stages.base import StageContext

# stages/migrate.py imports this module, so its config is not imported back, not even for
# type checking (no import cycle): annotations name it through this alias.
MigrateConfig = Any
SourceConfig = Any

TORCHVISION_REF = "torchvision:"


@dataclass
class Source:
    """One source checkpoint (or an earlier stage's model), its state dict in module order."""

    label: str
    weight: float
    state: dict[str, torch.Tensor]
    classes: list[str] | None
    data_source: str | None  # what it was trained on, None when unknown
    preprocess: dict[str, Any] | None
    notes: list[str] = field(default_factory=list)
    model: nn.Module | None = None  # runnable source (a stage's model), for the function match
    arch: ModelConfig | None = None


def load_source(ctx: StageContext, i: int, cfg: SourceConfig) -> Source:
    from edgemml.errors import InputError
    from edgemml.models import build_model, load_model, read_checkpoint
    from edgemml.models.transfer import natural_order, normalize_key

    if cfg.stage is not None:
        model, spec = load_model(ctx.input(cfg.stage)["model"])
        stage_cfg = next(c for c in ctx.pipeline.stages if stage_name(c) == cfg.stage)
        data = data_config(stage_cfg, ctx.pipeline, required=False)
        return Source(f"stage:{cfg.stage}", cfg.weight, dict(model.state_dict()),
                       cfg.classes or spec.class_names or None,
                       data.source if data is not None else None,
                       spec.extra.get("preprocess"), model=model)
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
    return Source(ref, cfg.weight, state, cfg.classes or ckpt.class_names, None, None, notes,
                   arch=cfg.arch)


def map_onto(ctx: StageContext, config: MigrateConfig, i: int, src: Source,
                model: nn.Module, target_state: dict[str, torch.Tensor], rules: list[Any],
                growth: Growth | None, stem: str, head: str,
                target_classes: list[str]) -> SourceMap:
    """One source's tensors matched to the target's (widened first when growing) and mapped
    into target shapes; a tensor that cannot fit is an error unless shape_mismatch: skip."""
    from edgemml.models.transfer import map_source, match_keys

    shapes = {k: tuple(v.shape) for k, v in target_state.items()}
    # Growth pairs tensors by name only: alignment by shapes would pair unrelated layers.
    matches, notes = match_keys(shapes, {k: tuple(v.shape) for k, v in src.state.items()},
                                rules=rules, align=config.align and growth is None,
                                stem=stem, head=head)
    state = src.state
    if growth is not None:
        state = _grow.widen(ctx, growth, model, src.label, src.state, matches, stem, head)
    smap = map_source(src.label, target_state, state, matches, weight=src.weight,
                      stem=stem, head=head, in_chans_rule=config.in_chans_rule,
                      target_classes=target_classes, source_classes=src.classes,
                      label_map=config.label_map)
    for w in growth.widened if growth is not None else ():
        if w.tensor in smap.mapped:
            smap.mapped[w.tensor].adaptation = w.how
    smap.notes = src.notes + notes + smap.notes
    fatal = [m for m in smap.mismatched if m.fatal]
    if fatal and config.shape_mismatch == "error":
        more = f" (and {len(fatal) - 1} more)" if len(fatal) > 1 else ""
        why = [p for p in (growth.problems if growth else []) if
               p.startswith(fatal[0].target + ":")]
        raise StageError(
            f"source {src.label}: tensor {fatal[0].target} needs shape "
            f"{list(fatal[0].target_shape)} but the source's {fatal[0].source_key} has "
            f"{list(fatal[0].source_shape)} (matched by {fatal[0].rule}){more}; the source "
            f"does not fit the target" + (f" ({why[0].split(': ', 1)[1]})" if why else ""),
            key=f"sources[{i}]",
            hint="growth only enlarges channel counts and adds blocks: grow into a larger "
            "model of the same family" if growth is not None else
            "check the target architecture and its options, or set "
            "`shape_mismatch: skip` to leave such tensors initialised")
    for note in smap.notes:
        ctx.log(f"{src.label}: {note}")
    return smap


def _is_safetensors(path: Path) -> bool:
    """The safetensors header: an 8-byte little-endian length followed by '{'."""
    import struct

    with open(path, "rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 0 < struct.unpack("<Q", head[:8])[0] <= (
        path.stat().st_size - 8)
