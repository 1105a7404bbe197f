"""migrate's growth: the glue between the migrate stage and edgemml.models.growth.

Kept beside migrate.py (not in it) because it is one feature with its own config, its own checks
at load time (the family of source and target, known from the pipeline file) and at run time (every
source tensor must land in the target by name), and its own part of migration.json.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from edgemml.arch_families import family, short_name, weights_arch
from edgemml.config import ModelConfig, StageConfig, StrictModel, stage_name
from edgemml.errors import StageError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from edgemml.models.growth import FunctionMatch, NewBlock, Widened


class GrowConfig(StrictModel):
    """Grow the source into a larger target of its family (more blocks, wider layers) so that the
    target starts out computing exactly the source's function (Net2Net)."""

    depth: Literal["identity", "random"] = Field(
        "identity", description="New blocks (no source counterpart): identity = zero the weight "
        "and bias of the last BatchNorm each runs, so a residual block starts as the identity; "
        "random = leave them as initialised (not function-preserving).")
    split: Literal["random", "equal"] = Field(
        "random", description="Net2WiderNet: how the weights reading a copied channel are split "
        "between the copies; both are exact; random shares break the symmetry between copies, "
        "equal shares keep copies identical under training.")


# --------------------------------------------------------------------------------------------------
# At load time: the family of source and target, from the pipeline file alone
# --------------------------------------------------------------------------------------------------


def static_arch(name: str, earlier: list[StageConfig], model: ModelConfig | None) -> str | None:
    """The architecture an earlier stage's model has, read from the configs (None when unknown:
    a `load` stage, a `python:` model, a checkpoint without `arch:`)."""
    from edgemml import stages as registry

    configs = {stage_name(c): c for c in earlier}
    seen: set[str] = set()
    while name in configs and name not in seen:
        seen.add(name)
        cfg = configs[name]
        own = getattr(cfg, "model", None) if cfg.type == "finetune" else None
        if isinstance(own, ModelConfig):
            return own.arch
        if cfg.type == "migrate":
            target = getattr(cfg, "target", None) or model
            return target.arch if target is not None else None
        if cfg.type == "load":
            return None
        if cfg.input:
            name = cfg.input
            continue
        before = earlier[: earlier.index(cfg)]
        providers = [c for c in before if "model" in registry.get(c.type).provides]
        if not providers:
            return model.arch if (model is not None and cfg.type == "finetune") else None
        name = stage_name(providers[-1])
    return None


def check_family(sources: list[Any], target: ModelConfig | None, earlier: list[StageConfig],
                 model: ModelConfig | None) -> tuple[str, str, str | None] | None:
    """(key, message, hint) when growth is asked between architectures of different families."""
    target = target or model
    if target is None or target.arch is None or not sources:
        return None
    src = sources[0]
    if src.stage is not None:
        arch = static_arch(src.stage, earlier, model)
    elif src.arch is not None:
        arch = src.arch.arch
    else:
        arch = weights_arch(src.checkpoint or "")
    a, b = family(arch), family(target.arch)
    if a is None or b is None or a == b:
        return None
    return ("grow", f"growth maps every source tensor into the target by name, so source and "
            f"target must be one family: the source is {short_name(arch or '')} ({a}), the "
            f"target {short_name(target.arch)} ({b})",
            f"grow into a larger {a} (e.g. resnet18 -> resnet34, efficientnet_b0 -> b1, a larger "
            f"width_mult), or remove `grow:` to migrate what matches")


# --------------------------------------------------------------------------------------------------
# At run time
# --------------------------------------------------------------------------------------------------


@dataclass
class Growth:
    """What growth did, for migration.json."""

    config: GrowConfig
    widened: list[Widened] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    blocks: list[NewBlock] = field(default_factory=list)
    loose: list[str] = field(default_factory=list)  # new tensors outside a new block

    def new_tensors(self) -> dict[str, str]:
        """{tensor: how it was initialised} for every target tensor with no source."""
        out: dict[str, str] = {}
        for b in self.blocks:
            for t in b.tensors:
                out[t] = (f"zeros: makes new block {b.module} an identity" if t in b.zeroed
                          else f"random init (new block {b.module})")
        out.update({t: "random (not in a new block)" for t in self.loose})
        return out

    def report(self, match: dict[str, Any]) -> dict[str, Any]:
        exact = [b for b in self.blocks if b.is_identity]
        return {
            "settings": self.config.model_dump(),
            "widened": [asdict(w) for w in self.widened],
            "new_blocks": [{**asdict(b), "is_identity": b.is_identity} for b in self.blocks],
            "new_tensors": self.new_tensors(),
            "problems": self.problems,
            "function_preserving": not self.problems and not self.loose
            and len(exact) == len(self.blocks) and bool((match.get("before_bn") or {}).get(
                "match", 0) >= 1 - 1e-4),
            "function_match": match,
        }


def widen(ctx: Any, growth: Growth, target: nn.Module, label: str,
          source: dict[str, torch.Tensor], matches: dict[str, Any], stem: str,
          head: str) -> dict[str, torch.Tensor]:
    """Every source tensor must land in the target; widened copies of those that grew."""
    from edgemml.models.growth import widen_source

    used = {m.source for m in matches.values()}
    unused = [k for k in source if k not in used]
    if unused:
        first = unused[0]
        raise StageError(
            f"grow: {len(unused)} of the source's {len(source)} tensors have no counterpart in the "
            f"target by name (first: {first} {list(source[first].shape)}, module "
            f"{first.rpartition('.')[0] or first}); growth keeps every source tensor",
            stage=ctx.name, key="grow", hint="grow within one family (resnet18 -> resnet34, "
            "efficientnet_b0 -> b1, a larger width_mult), add `rename:` rules, or remove "
            "`grow:` to migrate what matches")
    grown, widened, problems = widen_source(
        target, source, {t: m.source for t, m in matches.items()}, stem=stem, head=head,
        split=growth.config.split, seed=ctx.seed)
    for w in widened:
        w.how = f"{label}: {w.how}"
    growth.widened += widened
    growth.problems += problems
    return {**source, **grown}


def init_new(growth: Growth, model: nn.Module, fused: dict[str, Any], head: str,
             example: torch.Tensor) -> set[str]:
    """Initialise tensors no source provided (the head excepted); returns their names."""
    from edgemml.models.growth import block_identity, init_identity_blocks, new_blocks

    new = [k for k in model.state_dict() if k not in fused and not k.startswith(head + ".")]
    blocks, loose = new_blocks(model, new)
    if growth.config.depth == "identity":
        growth.blocks = init_identity_blocks(model, blocks, example)
    else:
        from edgemml.models.growth import NewBlock

        growth.blocks = [NewBlock(p, ts, "random (depth: random)") for p, ts in blocks]
    block_identity(model, growth.blocks, example)
    growth.loose = loose
    for b in growth.blocks:
        if not b.is_identity:
            growth.problems.append(f"new block {b.module} is not an identity on real inputs "
                                   f"(max |out - in| = {b.identity_max_abs:.3g}): "
                                   + ("its input and output shapes differ"
                                      if b.identity_max_abs == float("inf") else
                                      "it is not a residual block whose last layer was zeroed"))
    if loose:
        growth.problems.append(f"{len(loose)} new tensor(s) sit in modules that also hold source "
                               f"tensors (first: {loose[0]}): initialised at random")
    return set(new)


def source_model(src: Any, in_chans: int) -> tuple[nn.Module | None, str | None]:
    """A runnable source model: the source stage's, or the checkpoint's in its architecture
    (`arch:`, or the one torchvision weights name), else (None, why)."""
    from edgemml.models import build_model
    from edgemml.models.transfer import normalize_key

    if src.model is not None:
        return src.model, None
    arch = src.arch.arch if src.arch is not None else weights_arch(src.label)
    if arch is None:
        return None, "the source's architecture is unknown (give sources[0].arch)"
    head_rows = [v.shape[0] for v in src.state.values() if v.dim() == 2]
    stems = [v.shape[1] for v in src.state.values() if v.dim() == 4]
    try:
        model = build_model(ModelConfig(arch=arch), num_classes=head_rows[-1] if head_rows else 1000,
                            in_chans=stems[0] if stems else in_chans)
        model.load_state_dict({normalize_key(k): v for k, v in src.state.items()}, strict=True)
    except Exception as exc:  # noqa: BLE001 - any failure: the match is reported as not measured
        return None, f"the checkpoint does not load into {arch}: {str(exc).splitlines()[0][:200]}"
    return model.eval(), None


def measure(source: nn.Module | None, why_not: str | None, model: nn.Module, batches: list[Any],
            rows: list[tuple[int, int]] | None) -> FunctionMatch:
    """Function match of source vs target (and, when not exact, where they part)."""
    from edgemml.models.growth import FunctionMatch, first_divergence, function_match
    from edgemml.training import input_channels

    if source is None:
        return FunctionMatch(False, why_not)
    if batches and input_channels(source) not in (None, batches[0].shape[1]):
        return FunctionMatch(False, f"the source takes {input_channels(source)} input channels, "
                             f"the target {batches[0].shape[1]}: they do not see the same input")
    if rows is not None and not rows:
        return FunctionMatch(False, "no class row of the target comes from the source")
    result = function_match(source, model, batches, rows)
    if result.measured and result.match is not None and result.match < 1 - 1e-4:
        result.first_divergence = first_divergence(source, model, batches[0][:16])
    return result


def sample_batches(splits: Any, n: int, batch_size: int = 64) -> list[torch.Tensor]:
    """Up to n real target samples (val, else train), in order, as batches."""
    from edgemml.training import make_loader

    if splits is None:
        return []
    dataset = splits.val if len(splits.val) else splits.train
    out: list[torch.Tensor] = []
    taken = 0
    for x, _ in make_loader(dataset, batch_size, shuffle=False):
        out.append(x[: n - taken])
        taken += out[-1].shape[0]
        if taken >= n:
            break
    return out


def class_rows(target_classes: list[str], src: Any, label_map: Any, num_classes: int,
               fused: dict[str, Any], head: str) -> list[tuple[int, int]]:
    """(target row, source row) of every classifier row the target took from the source."""
    from edgemml.models.transfer import head_rows

    f = fused.get(f"{head}.weight")
    if f is None:
        return []
    n_src = int(src.state[f.provenance[0].key].shape[0])
    rows, _ = head_rows(target_classes, src.classes, label_map, num_classes, n_src)
    pairs = [(t, r) for t, r in enumerate(rows) if r is not None]
    if not pairs and f.rows is None and num_classes == n_src:
        pairs = [(t, t) for t in range(num_classes)]  # copied as is (names unknown)
    return pairs


def check_match(minimum: float | None, match: dict[str, Any], growth: Growth | None,
                table: Any) -> None:
    """min_function_match: exit 2 when the target does not compute the source's function."""
    if minimum is None:
        return
    fm = match.get("before_bn") or {}
    if not fm.get("measured"):
        raise StageError(f"min_function_match {minimum}: the function match cannot be measured: "
                         f"{fm.get('reason')}", key="min_function_match",
                         hint="give the stage target data and a source whose architecture is "
                         "known, or remove min_function_match")
    if fm["match"] < minimum:
        where = f"; the outputs first differ at module {fm['first_divergence']}" \
            if fm.get("first_divergence") else ""
        why = f"; {growth.problems[0]}" if growth is not None and growth.problems else ""
        raise StageError(
            f"function match {fm['match']:.6f} is below min_function_match {minimum} (max |delta "
            f"logit| {fm['max_abs_delta']:.4g} vs max |logit| {fm['max_abs_logit']:.4g} on "
            f"{fm['n']} samples){where}{why}", key="min_function_match",
            hint=f"this growth is not function-preserving (see {table}); lower "
            "min_function_match to accept it")


# --------------------------------------------------------------------------------------------------
# migration.json / migration.md / stage.json
# --------------------------------------------------------------------------------------------------


def metrics(summary: dict[str, Any], out: dict[str, Any], lines: list[str]) -> None:
    """Growth and function-match figures for stage.json's metrics and highlights."""
    fm = (summary.get("function_match") or {}).get("before_bn")
    if fm:
        out["function_match"] = fm["match"]
        out["max_abs_delta_logit"] = fm["max_abs_delta"]
        lines.append(f"function match vs the source before training: {fm['match']:.6f} (max "
                     f"|delta logit| {fm['max_abs_delta']:.3g}, n={fm['n']})" if fm["measured"]
                     else f"function match not measured: {fm['reason']}")
    grow = summary.get("growth")
    if grow:
        blocks = grow["new_blocks"]
        out.update(new_blocks=len(blocks), widened_tensors=len(grow["widened"]),
                   new_tensors=len(grow["new_tensors"]),
                   function_preserving=grow["function_preserving"])
        lines.append(f"grew: {len(blocks)} new block(s) ({sum(bool(b['is_identity']) for b in blocks)}"
                     f" identities), {len(grow['widened'])} tensor(s) widened; function-preserving:"
                     f" {'yes' if grow['function_preserving'] else 'no'}")


def markdown(summary: dict[str, Any]) -> list[str]:
    """The growth section of migration.md: the function match, new blocks, widened tensors."""
    out: list[str] = []
    for when, fm in (summary.get("function_match") or {}).items():
        label = "before any training" if when == "before_bn" else "after BatchNorm re-estimation"
        out.append(f"- function match {label}: " + (
            f"max |delta logit| {fm['max_abs_delta']:.4g}, largest |logit| "
            f"{fm['max_abs_logit']:.4g}, relative {fm['relative']:.3g} (match {fm['match']:.6f}); "
            f"top-1 agreement {fm['agreement']:.4f} on {fm['n']} samples, {fm['rows']} classes"
            + (f"; first differing module: {fm['first_divergence']}" if fm["first_divergence"]
               else "") if fm["measured"] else f"not measured ({fm['reason']})"))
    grow = summary.get("growth")
    if not grow:
        return out
    out += [f"- function-preserving growth: **{'yes' if grow['function_preserving'] else 'no'}**"]
    out += [f"  - {p}" for p in grow["problems"]]
    if grow["new_blocks"]:
        out += ["", "| new block | tensors | init | max abs(out - in) |", "|---|---:|---|---:|"]
        for b in grow["new_blocks"]:
            diff = b["identity_max_abs"]
            out.append(f"| {b['module']} | {len(b['tensors'])} | {b['init']} | "
                       f"{'-' if diff is None else format(diff, '.3g')} |")
    if grow["widened"]:
        out += ["", "| widened tensor | source shape | target shape | how |", "|---|---|---|---|"]
        out += [f"| {w['tensor']} | {w['source_shape']} | {w['target_shape']} | {w['how']} |"
                for w in grow["widened"]]
    return out
