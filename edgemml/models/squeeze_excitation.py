"""Remove squeeze-excitation (SE) gates from a trained model, keeping as much of its function as a
constant can: the gate becomes nn.Identity and the per-channel scale that best replaces it is
folded into the convolution that reads its output.

Why fold: dropping a sigmoid gate outright rescales every channel (gates average ~0.5), and the
network's later layers were trained on the gated scale. The scale is fitted on real data by least
squares, s_c = sum(out * in) / sum(in * in) over batch and space (weighting each sample by its
energy, unlike a plain mean of the gate). The consumer is found by tensor identity during a forward
pass (the leaf module whose input *is* the SE output); module hooks cannot see a tensor consumed
outside a module (a residual add), which is why every fold is checked on real data against the
model with the gate frozen to its constant, and undone (and reported) where it does not hold.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from edgemml.models.registry import set_submodule

# Squeeze-excitation classes recognised by name (torchvision's, and the names timm and common
# re-implementations use); each is also checked to keep its input's shape before it is removed.
SE_CLASS_NAMES = frozenset({"SqueezeExcitation", "SqueezeExcite", "SEModule", "SELayer", "SEBlock",
                            "EffectiveSEModule", "SqueezeExciteBlock"})


@dataclass
class SERemoval:
    path: str
    channels: int
    folded_into: str | None  # the convolution that took the per-channel scale, or None
    scale_mean: float | None  # the fitted constant scale (mean, min, max over channels)
    scale_min: float | None
    scale_max: float | None
    note: str | None = None



def find_squeeze_excitation(model: nn.Module) -> list[str]:
    """Paths of squeeze-excitation modules (outermost only), in module order."""
    from torchvision.ops.misc import SqueezeExcitation

    found: list[str] = []
    for path, module in model.named_modules():
        if not path or any(path.startswith(f + ".") for f in found):
            continue
        if isinstance(module, SqueezeExcitation) or type(module).__name__ in SE_CLASS_NAMES:
            found.append(path)
    return found


class _ConstantScale(nn.Module):
    """Multiplies channels by fixed scales: an SE gate frozen to its fitted constant (a check)."""

    def __init__(self, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.reshape(-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.reshape(1, -1, *([1] * (x.dim() - 2)))


@dataclass
class _SEFit:
    scale: torch.Tensor
    consumers: set[str]
    shape_kept: bool


@torch.no_grad()
def fit_se_scales(model: nn.Module, paths: list[str],
                  batches: Iterable[torch.Tensor]) -> dict[str, _SEFit]:
    """Per SE module: the constant per-channel scale that best replaces its gate on these batches
    (least squares), and the modules that consumed its output directly."""
    mods = dict(model.named_modules())
    num: dict[str, torch.Tensor] = {}
    den: dict[str, torch.Tensor] = {}
    kept: dict[str, bool] = {p: True for p in paths}
    consumers: dict[str, set[str]] = {p: set() for p in paths}
    live: list[tuple[str, torch.Tensor]] = []

    def se_hook(path: str) -> Any:
        def hook(_m: nn.Module, inputs: tuple[Any, ...], out: Any) -> None:
            x = inputs[0]
            if not isinstance(out, torch.Tensor) or out.shape != x.shape or x.dim() < 2:
                kept[path] = False
                return
            dims = [0] + list(range(2, x.dim()))
            num[path] = num.get(path, 0) + (out * x).double().sum(dims)
            den[path] = den.get(path, 0) + (x * x).double().sum(dims)
            live.append((path, out))
        return hook

    def consumer_hook(name: str) -> Any:
        def hook(_m: nn.Module, inputs: tuple[Any, ...]) -> None:
            if inputs and isinstance(inputs[0], torch.Tensor):
                for path, out in live:
                    if inputs[0] is out:
                        consumers[path].add(name)
        return hook

    hooks = [mods[p].register_forward_hook(se_hook(p)) for p in paths]
    # Leaf modules only: a container (Sequential) receives the same tensor as its first child.
    hooks += [m.register_forward_pre_hook(consumer_hook(n)) for n, m in mods.items()
              if n and not any(True for _ in m.children())
              and not any(n == p or n.startswith(p + ".") for p in paths)]
    model.eval()
    try:
        for x in batches:
            live.clear()
            model(x)
    finally:
        live.clear()
        for h in hooks:
            h.remove()
    out: dict[str, _SEFit] = {}
    for p in paths:
        if p not in num:
            out[p] = _SEFit(torch.ones(0), consumers[p], kept[p])
            continue
        scale = (num[p] / den[p].clamp_min(1e-12)).float()
        out[p] = _SEFit(scale, consumers[p], kept[p])
    return out


def _foldable(module: nn.Module, channels: int) -> bool:
    """Whether a per-input-channel scale can be folded into the module's weight."""
    if isinstance(module, nn.Linear):
        return module.in_features == channels
    return (isinstance(module, nn.modules.conv._ConvNd) and not module.transposed
            and module.in_channels == channels)


def _fold_into(conv: nn.Module, scale: torch.Tensor) -> None:
    """Multiply a convolution's (or Linear's) input channel c by scale[c] (see _foldable)."""
    if isinstance(conv, nn.Linear):
        conv.weight.mul_(scale.view(1, -1))
        return
    cpg = conv.in_channels // conv.groups
    opg = conv.out_channels // conv.groups
    group = torch.arange(conv.out_channels) // opg  # group of each output row
    index = group.view(-1, 1) * cpg + torch.arange(cpg).view(1, -1)  # input channel per (row, j)
    factor = scale[index].view(conv.out_channels, cpg, *([1] * (conv.weight.dim() - 2)))
    conv.weight.mul_(factor)


@torch.no_grad()
def remove_squeeze_excitation(model: nn.Module, paths: list[str], fits: Mapping[str, _SEFit],
                              check_batch: torch.Tensor, *, fold: bool = True) -> list[SERemoval]:
    """Replace each SE module by nn.Identity (in place), folding its fitted scale when possible.

    The folds are checked on `check_batch`: the model with every foldable gate replaced by a
    constant-scale module must equal the model with the scales folded (two forward passes for all
    gates together; only when they differ is each fold checked alone, and the folds that do not
    hold — the consumer also reads other tensors, or is shared — are undone and reported).
    """
    model.eval()
    notes: dict[str, str | None] = {}
    consumer: dict[str, str] = {}
    for path in paths:
        fit = fits[path]
        if not fit.shape_kept:
            raise ValueError(f"{path} changes the shape of its input: it is not a "
                             f"squeeze-excitation gate that can be removed")
        if not fold:
            notes[path] = "not folded (se_fold: false)"
        elif not fit.scale.numel():
            notes[path] = "not folded: the module never ran on the data"
        elif len(fit.consumers) != 1:
            notes[path] = (f"not folded: its output feeds {len(fit.consumers)} modules"
                           if fit.consumers else "not folded: no module consumes its output directly")
        elif not _foldable(model.get_submodule(next(iter(fit.consumers))), fit.scale.numel()):
            target = next(iter(fit.consumers))
            notes[path] = (f"not folded: {target} "
                           f"({type(model.get_submodule(target)).__name__}) cannot take a scale")
        else:
            consumer[path] = next(iter(fit.consumers))
            notes[path] = None

    def check(candidates: list[str]) -> bool:
        """Candidates frozen to their constant gate (the other gates removed) vs the candidates'
        scales folded; the weights are restored either way."""
        for p in paths:
            set_submodule(model, p, _ConstantScale(fits[p].scale) if p in candidates else nn.Identity())
        reference = model(check_batch)
        saved: dict[str, torch.Tensor] = {}
        for p in candidates:
            target = model.get_submodule(consumer[p])
            saved.setdefault(consumer[p], target.weight.detach().clone())
            _fold_into(target, fits[p].scale)
            set_submodule(model, p, nn.Identity())
        got = model(check_batch)
        for name, weight in saved.items():
            model.get_submodule(name).weight.copy_(weight)
        return float((got - reference).abs().max()) <= 1e-4 * float(reference.abs().max()) + 1e-6

    candidates = [p for p in paths if notes[p] is None]
    if candidates and not check(candidates):
        for path in candidates:  # find the folds that do not hold, one by one
            if not check([path]):
                notes[path] = f"not folded: {consumer[path]} does not consume its output alone"
        candidates = [p for p in candidates if notes[p] is None]
        if candidates and not check(candidates):
            raise RuntimeError("SE folds that hold alone do not hold together")  # a bug: exit 3
    for path in candidates:
        _fold_into(model.get_submodule(consumer[path]), fits[path].scale)
    for path in paths:
        set_submodule(model, path, nn.Identity())
    removed = []
    for path in paths:
        scale = fits[path].scale
        stats = (float(scale.mean()), float(scale.min()), float(scale.max())) if scale.numel() \
            else (None, None, None)
        removed.append(SERemoval(path, int(scale.numel()),
                                 consumer[path] if notes[path] is None else None, *stats,
                                 note=notes[path]))
    return removed
