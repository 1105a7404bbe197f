"""Edge-friendly rewrites of a trained model: swap activations, remove squeeze-excitation gates.

Why: SiLU/Swish, GELU, Hardswish and squeeze-excitation (SE) gates are what int8 targets handle
worst (their outputs span ranges one int8 scale cannot cover well, and an SE gate multiplies two
quantized tensors); ReLU/ReLU6 and no gate is what efficientnet-lite did to keep int8 accuracy.
This module does the surgery and says exactly what it did; recovery (distillation from the
unrewritten model) is the stage's job, through the shared trainer.

* `replace_activations` swaps modules by exact type (a subclass is not its parent: ReLU6 is not
  replaced by a `Hardtanh` rule), skipping `exclude` patterns, and keeps `inplace` where both
  sides have it. Activations called functionally in `forward` (F.silu) cannot be swapped by
  module surgery: `functional_activations` finds them with torch.fx so the report can say so.
* squeeze-excitation blocks are removed by edgemml.models.squeeze_excitation (the fitted constant
  scale of each gate folded into the convolution that reads it, checked on real data).
* `describe_module` / `build_module` let model.json record replaced modules, so a rewritten model
  reloads without pickle (edgemml.models.serialize).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from edgemml.activation_names import ALIASES, ELEMENTWISE, canonical
from edgemml.models.registry import set_submodule
from edgemml.models.squeeze_excitation import (
    SERemoval,
    find_squeeze_excitation,
    fit_se_scales,
    remove_squeeze_excitation,
)

# --------------------------------------------------------------------------------------------------
# Activation modules by name
# --------------------------------------------------------------------------------------------------


def make_activation(name: str, inplace: bool | None = None) -> nn.Module:
    """A module for a name of edgemml's scheme (edgemml.activation_names)."""
    cls_name, kwargs = canonical(name)
    cls = getattr(nn, cls_name)
    args: dict[str, Any] = dict(kwargs)
    if inplace is not None and "inplace" in _init_params(cls):
        args["inplace"] = inplace
    return cls(**args)


def _init_params(cls: type) -> set[str]:
    import inspect

    return set(inspect.signature(cls.__init__).parameters)


def activation_name(module: nn.Module) -> str | None:
    """The scheme name of an activation module (an alias when its arguments match one), else None."""
    cls_name = type(module).__name__
    if getattr(nn, cls_name, None) is not type(module) or cls_name not in ELEMENTWISE:
        return None
    for alias, (target, kwargs) in ALIASES.items():
        if target == cls_name and kwargs and all(
                getattr(module, k, None) == v for k, v in kwargs.items()):
            return alias
    return cls_name


def matches_name(module: nn.Module, name: str) -> bool:
    """Whether a module is what a mapping key names (exact type; an alias also checks arguments)."""
    cls_name, kwargs = canonical(name)
    if type(module) is not getattr(nn, cls_name, None):
        return False
    return all(getattr(module, k, None) == v for k, v in kwargs.items())


# Arguments that define each recordable activation (beyond inplace).
_ACT_ARGS: dict[str, tuple[str, ...]] = {
    "Hardtanh": ("min_val", "max_val"), "LeakyReLU": ("negative_slope",), "RReLU": ("lower", "upper"),
    "ELU": ("alpha",), "CELU": ("alpha",), "GELU": ("approximate",), "Softplus": ("beta", "threshold"),
    "Hardshrink": ("lambd",), "Softshrink": ("lambd",),
}


def describe_module(module: nn.Module) -> dict[str, Any] | None:
    """{type, args} of a parameter-free module model.json can record (activations, Identity)."""
    cls_name = type(module).__name__
    if cls_name not in ELEMENTWISE or getattr(nn, cls_name, None) is not type(module):
        return None
    args = {k: getattr(module, k) for k in _ACT_ARGS.get(cls_name, ())}
    if hasattr(module, "inplace"):
        args["inplace"] = bool(module.inplace)
    return {"type": cls_name, "args": args}


def build_module(desc: Mapping[str, Any]) -> nn.Module:
    """The module a `describe_module` entry describes; ValueError for anything else."""
    cls_name = desc.get("type")
    if cls_name not in ELEMENTWISE:
        raise ValueError(f"unsupported module type {cls_name!r} (recordable: {', '.join(ELEMENTWISE)})")
    args = dict(desc.get("args") or {})
    allowed = set(_ACT_ARGS.get(cls_name, ())) | {"inplace"}
    if set(args) - allowed:
        raise ValueError(f"unexpected arguments for {cls_name}: {sorted(set(args) - allowed)}")
    return getattr(nn, cls_name)(**args)


def same_function(a: nn.Module, b: nn.Module) -> bool:
    """Equal recordable descriptions, ignoring `inplace` (it does not change the function)."""
    da, db = describe_module(a), describe_module(b)
    if da is None or db is None:
        return type(a) is type(b)
    da["args"].pop("inplace", None)
    db["args"].pop("inplace", None)
    return da == db


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


@dataclass
class Replacement:
    path: str
    old: str  # scheme name (or class name) of the replaced module
    new: str


@dataclass
class RewriteResult:
    replaced: list[Replacement] = field(default_factory=list)
    se_removed: list[SERemoval] = field(default_factory=list)
    se_kept: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)  # modules a mapping matched but exclude kept
    functional: dict[str, int] = field(default_factory=dict)  # functional calls left, by name
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """'SiLU -> ReLU6': how many modules, in order of first appearance."""
        out: dict[str, int] = {}
        for r in self.replaced:
            key = f"{r.old} -> {r.new}"
            out[key] = out.get(key, 0) + 1
        return out


# --------------------------------------------------------------------------------------------------
# Activation replacement
# --------------------------------------------------------------------------------------------------


def _excluded(path: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(path, p + ".*")
               for p in patterns)


def replace_activations(model: nn.Module, mapping: Mapping[str, str],
                        exclude: Iterable[str] = ()) -> tuple[list[Replacement], list[str]]:
    """Swap every activation module a mapping key names (in place); (replacements, excluded)."""
    exclude = list(exclude)
    done: list[Replacement] = []
    skipped: list[str] = []
    for path, module in list(model.named_modules()):
        if not path:
            continue
        key = next((k for k in mapping if matches_name(module, k)), None)
        if key is None:
            continue
        if _excluded(path, exclude):
            skipped.append(path)
            continue
        new = make_activation(mapping[key], getattr(module, "inplace", None))
        set_submodule(model, path, new)
        done.append(Replacement(path, activation_name(module) or type(module).__name__,
                                activation_name(new) or type(new).__name__))
    return done, skipped


def check_shapes(before: nn.Module, after: nn.Module, example: torch.Tensor,
                 paths: Iterable[str]) -> str | None:
    """The first module path (or 'the model output') whose output shape changed, else None."""
    paths = list(paths)
    shapes: dict[str, dict[str, tuple[int, ...]]] = {"before": {}, "after": {}}
    outs = {}
    def record(label: str, path: str) -> Any:
        def hook(_m: nn.Module, _i: Any, out: Any) -> None:  # returns None: output unchanged
            shapes[label].setdefault(path, tuple(out.shape) if isinstance(out, torch.Tensor)
                                     else ())
        return hook

    for label, model in (("before", before), ("after", after)):
        mods = dict(model.named_modules())
        hooks = [mods[p].register_forward_hook(record(label, p)) for p in paths if p in mods]
        try:
            with torch.no_grad():
                outs[label] = tuple(model.eval()(example).shape)
        finally:
            for h in hooks:
                h.remove()
    for p in paths:
        if shapes["before"].get(p) != shapes["after"].get(p):
            return f"{p} ({shapes['before'].get(p)} -> {shapes['after'].get(p)})"
    if outs["before"] != outs["after"]:
        return f"the model output ({outs['before']} -> {outs['after']})"
    return None


# Functional activations torch.fx may find in forward(), by the scheme name they correspond to.
def _functional_table() -> dict[Any, str]:
    import torch.nn.functional as F

    table: dict[Any, str] = {F.relu: "ReLU", torch.relu: "ReLU", F.relu6: "ReLU6",
                             F.silu: "SiLU", F.gelu: "GELU", F.hardswish: "Hardswish",
                             F.hardsigmoid: "Hardsigmoid", torch.sigmoid: "Sigmoid",
                             F.sigmoid: "Sigmoid", torch.tanh: "Tanh", F.tanh: "Tanh",
                             F.mish: "Mish", F.elu: "ELU", F.leaky_relu: "LeakyReLU",
                             F.hardtanh: "Hardtanh", F.softplus: "Softplus"}
    return table


_METHODS = {"relu": "ReLU", "sigmoid": "Sigmoid", "tanh": "Tanh"}


def functional_activations(model: nn.Module, names: Iterable[str]) -> dict[str, int] | None:
    """Calls of the named activations written as functions in forward() (which module surgery
    cannot replace), counted per name; None when torch.fx cannot trace the model."""
    import torch.fx

    wanted = {canonical(n)[0] for n in names}
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - any model fx cannot trace: the caller reports "not checked"
        return None
    table = _functional_table()
    found: dict[str, int] = {}
    for node in graph.nodes:
        name = None
        if node.op == "call_function":
            name = table.get(node.target)
        elif node.op == "call_method":
            name = _METHODS.get(str(node.target))
        if name in wanted:
            found[name] = found.get(name, 0) + 1
    return found


# --------------------------------------------------------------------------------------------------
# Everything together
# --------------------------------------------------------------------------------------------------


def rewrite_model(model: nn.Module, activations: Mapping[str, str], *,
                  squeeze_excitation: str = "keep", exclude: Iterable[str] = (),
                  se_fold: bool = True, batches: Iterable[torch.Tensor] = (),
                  example: torch.Tensor) -> RewriteResult:
    """Rewrite `model` in place: remove SE gates (when asked), then swap activations.

    `batches` (real inputs) fit the SE scales; `example` is the batch for the fold and shape checks.
    Raises ValueError naming the module path when a replacement would change an output shape.
    """
    import copy

    exclude = list(exclude)
    original = copy.deepcopy(model).eval()
    result = RewriteResult()
    se_paths = find_squeeze_excitation(model)
    if squeeze_excitation == "remove":
        targets = [p for p in se_paths if not _excluded(p, exclude)]
        result.se_kept = [p for p in se_paths if p not in targets]
        fits = fit_se_scales(model, targets, batches)
        result.se_removed = remove_squeeze_excitation(model, targets, fits, example, fold=se_fold)
    else:
        result.se_kept = list(se_paths)
    result.replaced, result.excluded = replace_activations(model, activations, exclude)
    changed = check_shapes(original, model, example,
                           [r.path for r in result.replaced] + [s.path for s in result.se_removed])
    if changed is not None:
        raise ValueError(f"the rewrite changes the output shape of {changed}")
    if activations:
        left = functional_activations(model, activations)
        if left is None:
            result.notes.append("torch.fx could not trace the model: activations called as "
                                "functions in forward() were not looked for")
        else:
            result.functional = left
    model.eval()
    return result
