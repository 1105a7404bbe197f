"""Structured channel pruning to a MACs / params / channel target: a thin layer over torch-pruning.

torch-pruning finds which layers are coupled (residual adds, depthwise convs, concatenations) and
removes whole channels from every coupled layer at once. What it does not do is reach a *target*:
its `pruning_ratio` is a per-layer channel fraction, and with `round_to` the kept channel counts move
in jumps (a 64-channel layer goes 64 -> 56 -> 48 ...), so the MACs do too. `prune_to_target` searches
the ratio by bisection on copies of the model and, when the configured ranking jumps over the
tolerance window, closes the remaining gap with a second, global-ranking pass (8-channel steps in
single layers are fine-grained enough). Every trial is recorded so the report can show how the target
was reached.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal

import torch
import torch_pruning as tp
from torch import nn

from edgemml.errors import ConfigError
from edgemml.models.serialize import layer_args
from edgemml.prune_rules import ArchRules, tp_kwargs

Importance = Literal["l1", "l2", "bn_scale", "taylor"]
Metric = Literal["macs", "params", "channels"]


def make_importance(name: Importance) -> tp.importance.Importance:
    """torch-pruning's group importance estimators, by the names used in pipeline.yaml."""
    if name == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if name == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "bn_scale":
        return tp.importance.BNScaleImportance()
    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    raise ValueError(f"unknown importance {name!r}")


# --------------------------------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------------------------------


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Conv and Linear layers by name: the layers whose channels pruning removes."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))}


def count_channels(model: nn.Module, names: Iterable[str]) -> int:
    """Sum of output channels (features) of the named Conv/Linear layers."""
    mods = dict(model.named_modules())
    total = 0
    for n in names:
        m = mods[n]
        total += m.out_features if isinstance(m, nn.Linear) else m.out_channels
    return total


@dataclass
class Size:
    """MACs and parameters from torch-pruning's counter, plus output channels of the counted layers."""

    macs: int
    params: int
    channels: int

    def fraction_of(self, ref: Size, metric: Metric) -> float:
        return getattr(self, metric) / max(1, getattr(ref, metric))


def measure(model: nn.Module, example: torch.Tensor, channel_layers: Iterable[str]) -> Size:
    was_training = model.training
    model.eval()
    macs, params = tp.utils.count_ops_and_params(model, example)
    model.train(was_training)
    return Size(int(macs), int(params), count_channels(model, channel_layers))


def layer_table(model: nn.Module, example: torch.Tensor) -> dict[str, dict[str, Any]]:
    """Per Conv/Linear layer: input and output channels, MACs and parameters (torch-pruning's
    layer-wise counter), so a report can show where the network got thinner."""
    was_training = model.training
    model.eval()
    _, _, layer_macs, layer_params = tp.utils.count_ops_and_params(model, example, layer_wise=True)
    model.train(was_training)
    table: dict[str, dict[str, Any]] = {}
    for name, m in prunable_layers(model).items():
        lin = isinstance(m, nn.Linear)
        table[name] = {"type": type(m).__name__,
                       "in": m.in_features if lin else m.in_channels,
                       "out": m.out_features if lin else m.out_channels,
                       "macs": int(layer_macs.get(m) or 0), "params": int(layer_params.get(m) or 0)}
    return table


# --------------------------------------------------------------------------------------------------
# What must not be pruned
# --------------------------------------------------------------------------------------------------


def match_patterns(model: nn.Module, patterns: Iterable[str]) -> dict[str, list[str]]:
    """Module names matching each `ignore:` pattern (fnmatch; `layer4` also matches `layer4.*`)."""
    names = [n for n, _ in model.named_modules() if n]
    out: dict[str, list[str]] = {}
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)
                or fnmatch.fnmatchcase(n, pattern + ".*")]
        if not hits:
            sample = ", ".join(sorted({n.split(".")[0] for n in names})[:12])
            raise ConfigError(f"ignore pattern {pattern!r} matches no module of the model",
                              key="ignore", hint=f"top-level modules: {sample}; patterns are fnmatch "
                              "patterns on dotted module names, e.g. layer4.* or features.1*")
        out[pattern] = hits
    return out


#: layer types whose forward reads shape attributes set by their constructor (normalized_shape,
#: in_features, ...): pruned, they must be rebuilt from recorded constructor arguments
_SHAPED_LAYERS = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase, nn.LayerNorm,
                  nn.GroupNorm, nn.PReLU, nn.MultiheadAttention, nn.Embedding)


def unsafe_modules(model: nn.Module) -> dict[str, str]:
    """Layers that edgemml cannot re-create at a pruned shape: kept whole, with the reason.

    Only layer types whose constructor arguments the model spec does not record (e.g. a Linear
    subclass of the user's) are unsafe, and only they are kept, not their children. A module that
    merely owns a bare parameter (ConvNeXt's layer_scale, ViT's class_token) is safe: model.json
    records bare parameters at their pruned shape (`param_shapes`). Freezing such a module with all
    its children used to freeze every ConvNeXt block and the whole ViT. A layer rebuilt by its
    recorded parent (MultiheadAttention's out_proj) is safe too.
    """
    out: dict[str, str] = {}
    rebuilt = [n for n, m in model.named_modules() if layer_args(m) is not None]
    for name, m in model.named_modules():
        if not isinstance(m, _SHAPED_LAYERS) or layer_args(m) is not None:
            continue
        if not list(m.parameters(recurse=False)):
            continue
        if any(name.startswith(p + ".") for p in rebuilt if p):
            continue
        out[name or "(model)"] = (f"{type(m).__name__} is a {type(m).__mro__[1].__name__} subclass "
                                  f"whose constructor arguments the saved model spec cannot record")
    return out


# --------------------------------------------------------------------------------------------------
# One pruning pass
# --------------------------------------------------------------------------------------------------


@dataclass
class PruneSettings:
    """How channels are ranked and which layers keep their shapes."""

    importance: Importance = "l2"
    global_pruning: bool = False
    round_to: int | None = 8
    head: str | None = None                        # output channels kept, input channels follow
    frozen: set[str] = field(default_factory=set)  # shapes kept entirely (in and out)
    min_keep: dict[str, int] = field(default_factory=dict)  # layer -> fewest output channels allowed
    rules: ArchRules = field(default_factory=ArchRules)     # the architecture's torch-pruning options


def min_keep_channels(original: dict[str, dict[str, Any]], max_sparsity: float,
                      round_to: int | None) -> dict[str, int]:
    """Fewest output channels each layer may keep: (1 - max_sparsity) of its original count,
    rounded up to `round_to` (but never more than the original)."""
    r = round_to or 1
    out = {}
    for name, row in original.items():
        keep = max(1, math.ceil(row["out"] * (1 - max_sparsity)))
        out[name] = min(row["out"], int(math.ceil(keep / r) * r))
    return out


class _Pruner(tp.pruner.BasePruner):
    """torch-pruning's BasePruner, with `round_to` applied to the whole layer of grouped channels.

    torch-pruning (1.6.0 and 1.6.1) ranks the channels of a grouped convolution (RegNet, ResNeXt)
    or of attention heads per group, removes the same indices from every group, and then rounds
    with `_round_to(n_pruned_per_group, channels_of_the_whole_layer, round_to)`: the per-group
    count is rounded as if it were the layer's. A 32-channel layer in 2 groups of 16 loses 8 of
    each group, half the layer, at any ratio above 0: RegNetX-400MF kept 0.44 of its MACs at a
    uniform ratio of 0.0001, so the search fell back to a global ranking and recovery never
    regained 3 pp. Here the per-group count is rounded so that the layer keeps a multiple of
    round_to channels (a multiple of round_to / gcd(round_to, groups) per group), never fewer than
    one such step per group. Where that step is over a quarter of a group (RegNet's 400 channels
    in 25 groups of 16 could keep only 400 or 200) it is halved until it is not: a grouped
    convolution runs one small product per group, so its per-group width is what SIMD sees.

    torch-pruning hands the grouping nowhere but its own loop, so it is read from the caller's
    frame (`ch_groups`, `group_size`); where they are absent (another torch-pruning) the upstream
    rounding is kept, and tests/unit/test_pruning_groups.py fails.
    """

    def _round_to(self, n_pruned: int, current_channels: int, round_to: int) -> int:
        caller = sys._getframe(1).f_locals
        groups, size = caller.get("ch_groups"), caller.get("group_size")
        if not isinstance(groups, int) or groups <= 1 or not isinstance(size, int) or size <= 0:
            return super()._round_to(n_pruned, current_channels, round_to)
        step = round_to // math.gcd(round_to, groups)
        while step > 1 and step > size // 4:  # 25 groups of 16 could keep only 400 or 200
            step //= 2
        kept = size - n_pruned
        kept = max(kept - kept % step, step)
        return max(size - kept, 0)


def _touches(group: Any, modules: set[int]) -> bool:
    return any(id(dep.target.module) in modules for dep, _ in group)


def prune_step(model: nn.Module, example: torch.Tensor, ratio: float, settings: PruneSettings, *,
               global_pruning: bool | None = None) -> int:
    """Prune `model` in place with one torch-pruning pass at channel ratio `ratio`.

    Groups that touch a frozen layer (as input or output) are skipped, so frozen layers keep their
    whole shape; a group that would take a layer below its `min_keep` is trimmed to its least
    important channels (except grouped channels, e.g. attention heads, which are pruned whole or
    not at all). The architecture's rules (edgemml.prune_rules) add torch-pruning's options.
    Returns the number of groups pruned.
    """
    if ratio <= 0:
        return 0
    rules = settings.rules
    mods = dict(model.named_modules())
    names = {id(m): n for n, m in mods.items()}
    ignored = [mods[n] for n in settings.frozen if n in mods] + rules.ignored(model)
    if settings.head:
        ignored.append(mods[settings.head])
    # ignore: patterns already name every submodule; an unsafe layer is kept alone
    frozen_ids = {id(mods[n]) for n in settings.frozen if n in mods}
    kwargs = tp_kwargs(rules, model)
    model.eval()
    with rules.trace_patch():
        pruner = _Pruner(
            model, example, importance=make_importance(settings.importance),
            global_pruning=settings.global_pruning if global_pruning is None else global_pruning,
            pruning_ratio=ratio, ignored_layers=ignored,
            round_to=rules.round_to(model, settings.round_to), **kwargs)
    grouped = bool(kwargs.get("out_channel_groups"))
    groups = 0
    for group in list(pruner.step(interactive=True)):
        if frozen_ids and _touches(group, frozen_ids):
            continue
        root, handler, idxs = group[0].dep.target.module, group[0].dep.handler, list(group[0].idxs)
        current = pruner.DG.get_out_channels(root)
        floor = settings.min_keep.get(names.get(id(root), ""), 1)
        allowed = (current - floor) if current is not None else len(idxs)
        if allowed <= 0:
            continue
        if len(idxs) > allowed:
            if grouped or pruner._get_channel_groups(group) > 1:  # equal groups: whole or none
                continue
            # ranked on the whole layer's group: torch-pruning's importance of a partial group
            # indexes by channel and overflows (RegNetY's squeeze-excitation: index 24 of 24)
            imp = None if current is None else pruner.estimate_importance(
                pruner.DG.get_pruning_group(root, handler, list(range(current))))
            if imp is not None and len(imp) == current:
                idxs = sorted(idxs, key=lambda i: float(imp[i]))
            keep_idxs = sorted(idxs[:allowed])
            group = pruner.DG.get_pruning_group(root, handler, keep_idxs)
            if not pruner.DG.check_pruning_group(group):
                continue
        group.prune()
        groups += 1
    rules.post_prune(model)
    return groups


# --------------------------------------------------------------------------------------------------
# Reaching a target
# --------------------------------------------------------------------------------------------------


@dataclass
class Trial:
    phase: str
    ratio: float
    fraction: float
    macs: int
    params: int
    channels: int

    def as_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "ratio": round(self.ratio, 6),
                "fraction": round(self.fraction, 6), "macs": self.macs, "params": self.params,
                "channels": self.channels}


@dataclass
class SearchResult:
    model: nn.Module
    size: Size
    fraction: float
    ratio: float                 # channel ratio of the first (configured-ranking) pass
    refine_ratio: float | None   # global-ranking ratio of the second pass, when one was needed
    trials: list[Trial]
    within_tolerance: bool


GradFn = Callable[[nn.Module], None]


def copy_with_grads(model: nn.Module) -> nn.Module:
    """deepcopy does not copy `.grad`; Taylor importance on the copy needs the original's."""
    clone = copy.deepcopy(model)
    for (_, src), (_, dst) in zip(model.named_parameters(), clone.named_parameters()):
        if src.grad is not None:
            dst.grad = src.grad.detach().clone()
    return clone


def _trial(model: nn.Module, example: torch.Tensor, ratio: float, settings: PruneSettings,
           metric: Metric, reference: Size, channel_layers: list[str], phase: str,
           global_pruning: bool | None = None) -> tuple[nn.Module, Size, Trial]:
    candidate = copy_with_grads(model)
    prune_step(candidate, example, ratio, settings, global_pruning=global_pruning)
    size = measure(candidate, example, channel_layers)
    frac = size.fraction_of(reference, metric)
    return candidate, size, Trial(phase, ratio, frac, size.macs, size.params, size.channels)


def _bisect(model: nn.Module, example: torch.Tensor, target: float, tolerance: float,
            settings: PruneSettings, metric: Metric, reference: Size, channel_layers: list[str],
            iterations: int, hi: float, phase: str, trials: list[Trial],
            global_pruning: bool | None = None,
            tick: Callable[[], None] | None = None
            ) -> tuple[tuple[nn.Module, Size, Trial] | None, tuple[nn.Module, Size, Trial] | None]:
    """Bisection on the channel ratio. Returns (hit within tolerance or None, the closest candidate
    that is still above the window (keeps more than target + tolerance), or None)."""
    lo = 0.0
    above: tuple[nn.Module, Size, Trial] | None = None
    for _ in range(iterations):
        mid = (lo + hi) / 2
        cand = _trial(model, example, mid, settings, metric, reference, channel_layers, phase,
                      global_pruning)
        trials.append(cand[2])
        if tick is not None:
            tick()
        frac = cand[2].fraction
        if abs(frac - target) <= tolerance:
            return cand, above
        if frac > target:
            lo = mid
            if above is None or frac < above[2].fraction:
                above = cand
        else:
            hi = mid
    return None, above


def prune_to_target(model: nn.Module, example: torch.Tensor, *, target: float, tolerance: float,
                    metric: Metric, reference: Size, channel_layers: list[str],
                    settings: PruneSettings, max_ratio: float, iterations: int,
                    compute_grads: GradFn | None = None,
                    tick: Callable[[], None] | None = None) -> SearchResult:
    """A pruned copy of `model` whose `metric` is `target` (a fraction of `reference`) +- tolerance.

    1. bisection of the channel ratio with the configured ranking (local or global);
    2. if a rounding jump skips the window, take the closest model above it and bisect again with
       global ranking on that model, which removes channels where they matter least.
    The input model's weights are not modified. `compute_grads` fills `.grad` (Taylor importance)
    on each model that trials are copied from.
    """
    trials: list[Trial] = []
    if compute_grads is not None:
        compute_grads(model)
    hit, above = _bisect(model, example, target, tolerance, settings, metric, reference,
                         channel_layers, iterations, max_ratio, "ratio", trials, tick=tick)
    if hit is not None:
        m, size, trial = hit
        return SearchResult(m, size, trial.fraction, trial.ratio, None, trials, True)
    # The closest model above the window (or the input itself when every ratio overshot).
    base, first_ratio = (above[0], above[2].ratio) if above is not None else (model, 0.0)
    if base is not model and compute_grads is not None:
        compute_grads(base)
    hit, _ = _bisect(base, example, target, tolerance, settings, metric, reference,
                     channel_layers, iterations, max_ratio, "refine-global", trials,
                     global_pruning=True, tick=tick)
    if hit is not None:
        m, size, trial = hit
        return SearchResult(m, size, trial.fraction, first_ratio, trial.ratio, trials, True)
    best = min(trials, key=lambda t: abs(t.fraction - target))
    return SearchResult(model, reference, best.fraction, best.ratio, None, trials, False)
