"""Grow a trained model into a larger one of the same family without changing what it computes.

Two moves, both from Net2Net (Chen, Goodfellow & Shlens, 2016) and both exact before training:

* **Deeper** (`init_identity_blocks`): blocks of the target that have no source counterpart (resnet34's
  layer1.2, efficientnet_b1's extra MBConv repeats) are residual blocks `x + f(x)`; zeroing the
  weight and bias of the last BatchNorm that `f` runs makes `f(x) = 0`, so the block passes its
  input through unchanged, while its other layers keep their random init and start learning as
  soon as that BatchNorm's weight moves (the "zero-init residual" of Goyal et al.). Whether each
  new block really is an identity is *measured* on real inputs (`block_identity`), not assumed: a
  new block with a stride or a channel change is not, and the report says so.
* **Wider** (`widen_source`, Net2WiderNet): a layer with more output channels gets copies of source
  channels (channel j < n keeps j, each extra channel copies a seeded random source channel); every
  tensor along that channel dimension follows the same map, BatchNorm statistics included (a copy
  of a channel has the same mean and variance), and the layers that *read* the widened channels
  split the copied columns so their sum is the original column. The split is unequal by default
  (random shares that sum to one): still exact, but the copies then receive different gradients,
  so they do not stay identical forever (with equal shares they would, under SGD and AdamW alike).
  One map per (n_source, n_target) pair keeps producers, consumers and residual adds consistent.

`function_match` measures what matters: the largest |logit difference| between source and grown
model on real samples in eval mode, relative to the largest source logit; `first_divergence`
names the first module whose output departs from the source's when the growth is not exact (a
concatenation, a flatten into a Linear or a channel normalisation over widened channels).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from edgemml.metrics import agreement

Shape = tuple[int, ...]


@dataclass
class Widened:
    """One target tensor filled from a source tensor of a smaller shape."""

    tensor: str
    source_key: str
    source_shape: list[int]
    target_shape: list[int]
    how: str


@dataclass
class NewBlock:
    """A module of the target with no tensor from the source, and how it was initialised."""

    module: str
    tensors: list[str]
    init: str
    zeroed: list[str] = field(default_factory=list)
    identity_max_abs: float | None = None  # measured max |out - in| on real inputs
    identity_relative: float | None = None  # ... relative to max |in|

    @property
    def is_identity(self) -> bool | None:
        return None if self.identity_relative is None else self.identity_relative <= 1e-6


@dataclass
class FunctionMatch:
    """Source vs grown model on the same real inputs, eval mode, before any training."""

    measured: bool
    reason: str | None = None
    n: int = 0
    rows: int = 0  # logits compared per sample (the classes both models have)
    max_abs_delta: float | None = None
    max_abs_logit: float | None = None
    relative: float | None = None
    match: float | None = None  # 1 - relative: 1.0 is exact
    agreement: float | None = None  # top-1 agreement over the compared rows
    first_divergence: str | None = None


# --------------------------------------------------------------------------------------------------
# Wider
# --------------------------------------------------------------------------------------------------


def _rng(seed: int, *parts: object) -> torch.Generator:
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def channel_map(n_src: int, n_tgt: int, seed: int = 0) -> torch.Tensor:
    """Target channel j -> source channel: j for j < n_src, a seeded random source channel after."""
    extra = torch.randint(0, n_src, (n_tgt - n_src,), generator=_rng(seed, "map", n_src, n_tgt))
    return torch.cat([torch.arange(n_src), extra])


def split_shares(index: torch.Tensor, n_src: int, mode: str, seed: int, key: str) -> torch.Tensor:
    """Per target channel, its share of the source column it copies; shares of the copies of one
    source channel sum to 1 (equal: 1/copies; random: positive random weights normalised)."""
    if mode == "equal":
        raw = torch.ones(index.numel(), dtype=torch.float64)
    else:
        raw = 0.5 + torch.rand(index.numel(), generator=_rng(seed, "split", key),
                               dtype=torch.float64)
    total = torch.zeros(n_src, dtype=torch.float64).index_add_(0, index, raw)
    return raw / total[index]


def _dim_roles(module: nn.Module, attr: str, value_dim: int) -> dict[int, str] | str:
    """For a tensor of a module: {dim: 'out' | 'in'} of the dimensions that follow channels, or a
    reason string when the module type cannot be widened exactly."""
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.transposed:
            return "transposed convolutions are not widened"
        if attr == "bias":
            return {0: "out"}
        if module.groups == 1:
            return {0: "out", 1: "in"}
        if module.groups == module.in_channels == module.out_channels:
            return {0: "out"}  # depthwise: one input channel per output channel, copied with it
        return f"grouped convolution (groups={module.groups}) is not widened"
    if isinstance(module, nn.Linear):
        return {0: "out", 1: "in"} if attr == "weight" else {0: "out"}
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return {0: "out"} if value_dim == 1 else {}
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        return {0: "out"}  # copied, but the normalisation statistics over channels change
    return f"{type(module).__name__} tensors are not widened"


def widen_source(target: nn.Module, source: Mapping[str, torch.Tensor],
                 matches: Mapping[str, str], *, stem: str | None, head: str | None,
                 split: str = "random", seed: int = 0) -> tuple[dict[str, torch.Tensor],
                                                               list[Widened], list[str]]:
    """Source tensors widened to the target's shapes, for every matched pair (target key ->
    source key) whose target is larger along channel dimensions.

    Returns ({source key: widened tensor}, what was widened, problems). The stem's input channels
    and the head's class rows are left to the migration's own rules; a dimension that shrinks or a
    module that cannot be widened is a problem (and its tensor keeps the source shape, which the
    migration then reports as a shape mismatch).
    """
    modules = dict(target.named_modules())
    tstate = target.state_dict()
    out: dict[str, torch.Tensor] = {}
    done: list[Widened] = []
    problems: list[str] = []
    for tkey, skey in matches.items():
        tshape, value = tuple(tstate[tkey].shape), source[skey]
        sshape = tuple(value.shape)
        if tshape == sshape or len(tshape) != len(sshape):
            continue
        owner, _, attr = tkey.rpartition(".")
        module = modules.get(owner)
        roles = _dim_roles(module, attr, len(tshape)) if module is not None else "no module"
        if isinstance(roles, str):
            problems.append(f"{tkey}: {roles}")
            continue
        if owner == head:
            roles.pop(0, None)  # class rows: the head's row mapping decides
        if owner == stem:
            roles.pop(1, None)  # input channels: the stem's channel rule decides
        grown = value.detach().clone()
        steps = []
        bad = None
        for d, (a, b) in enumerate(zip(sshape, tshape)):
            if a == b:
                continue
            if d not in roles or b < a:
                bad = (f"{tkey}: dimension {d} goes {a} -> {b}" + (
                    "" if b > a else " (smaller)") + " and cannot be grown")
                break
            index = channel_map(a, b, seed)
            grown = grown.index_select(d, index)
            if roles[d] == "in" and grown.is_floating_point():
                shares = split_shares(index, a, split, seed, tkey).to(grown.dtype)
                grown = grown * shares.view([-1 if i == d else 1 for i in range(grown.dim())])
                steps.append(f"in {a}->{b} split ({split})")
            else:
                steps.append(f"out {a}->{b} copied")
        if bad is not None:
            problems.append(bad)
            continue
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            problems.append(f"{tkey}: {type(module).__name__} normalises over the widened channels, "
                            f"so copies change its statistics: not function-preserving")
        out[skey] = grown.contiguous()
        done.append(Widened(tkey, skey, list(sshape), list(tshape),
                            "net2wider: " + ", ".join(steps)))
    return out, done, problems


# --------------------------------------------------------------------------------------------------
# Deeper
# --------------------------------------------------------------------------------------------------


def new_blocks(model: nn.Module, new_keys: Iterable[str]) -> tuple[list[tuple[str, list[str]]],
                                                                   list[str]]:
    """Group tensors with no source into the largest modules made only of such tensors.

    Returns ([(module path, its tensors)], tensors that are new but sit in a module that also
    holds source tensors).
    """
    new = set(new_keys)
    keys = list(model.state_dict())
    owned: dict[str, list[str]] = {}
    for name, _ in model.named_modules():
        prefix = f"{name}." if name else ""
        owned[name] = [k for k in keys if k.startswith(prefix)]
    all_new = {n for n, ks in owned.items() if ks and all(k in new for k in ks)}
    blocks = [(n, owned[n]) for n in owned if n in all_new and n
              and n.rpartition(".")[0] not in all_new]
    covered = {k for _, ks in blocks for k in ks}
    return blocks, [k for k in keys if k in new and k not in covered]


def _call_order(model: nn.Module, example: torch.Tensor, types: tuple[type, ...]) -> list[str]:
    names = {id(m): n for n, m in model.named_modules()}
    order: list[str] = []

    def hook(m: nn.Module, _i: Any, _o: Any) -> None:
        order.append(names[id(m)])

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, types)]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in handles:
            h.remove()
    return order


@torch.no_grad()
def init_identity_blocks(model: nn.Module, blocks: Sequence[tuple[str, list[str]]],
                         example: torch.Tensor) -> list[NewBlock]:
    """Zero the weight and bias of the last BatchNorm (else the last Conv/Linear) each new block
    runs, so that a residual block `x + f(x)` starts as the identity."""
    bn_order = _call_order(model, example, (nn.modules.batchnorm._BatchNorm,))
    lin_order = _call_order(model, example, (nn.modules.conv._ConvNd, nn.Linear))
    out: list[NewBlock] = []
    for path, tensors in blocks:
        inside = [n for n in bn_order if n.startswith(path + ".")] or \
                 [n for n in lin_order if n.startswith(path + ".")]
        if not inside:
            out.append(NewBlock(path, tensors, "random: no BatchNorm, Conv or Linear runs in it"))
            continue
        last = model.get_submodule(inside[-1])
        zeroed = []
        for attr in ("weight", "bias"):
            p = getattr(last, attr, None)
            if isinstance(p, torch.Tensor):
                p.zero_()
                zeroed.append(f"{inside[-1]}.{attr}")
        kind = "BatchNorm" if isinstance(last, nn.modules.batchnorm._BatchNorm) else type(last).__name__
        out.append(NewBlock(path, tensors, f"identity: last {kind} ({inside[-1]}) weight and bias "
                            f"zeroed; other tensors random", zeroed))
    return out


@torch.no_grad()
def block_identity(model: nn.Module, blocks: Sequence[NewBlock], batch: torch.Tensor) -> None:
    """Measure, per new block, max |output - input| on a real batch (eval mode), in place."""
    mods = dict(model.named_modules())
    seen: dict[str, tuple[float, float]] = {}

    def hook(path: str) -> Any:
        def fn(_m: nn.Module, inputs: tuple[Any, ...], out: Any) -> None:
            x = inputs[0] if inputs else None
            if not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor):
                return
            if x.shape != out.shape:
                seen[path] = (float("inf"), float("inf"))
                return
            diff = float((out - x).abs().max())
            seen[path] = (diff, diff / max(float(x.abs().max()), 1e-12))
        return fn

    handles = [mods[b.module].register_forward_hook(hook(b.module)) for b in blocks
               if b.module in mods]
    try:
        model.eval()(batch)
    finally:
        for h in handles:
            h.remove()
    for b in blocks:
        if b.module in seen:
            b.identity_max_abs, b.identity_relative = seen[b.module]


# --------------------------------------------------------------------------------------------------
# Measuring the function
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def function_match(source: nn.Module, grown: nn.Module, batches: Iterable[torch.Tensor],
                   rows: Sequence[tuple[int, int]] | None = None) -> FunctionMatch:
    """Compare logits on the same inputs; `rows` pairs (target row, source row), default all."""
    source.eval()
    grown.eval()
    deltas, logits_max, agree, n = 0.0, 0.0, 0.0, 0
    used = 0
    for x in batches:
        s, g = source(x), grown(x)
        if rows is None:
            if s.shape != g.shape:
                return FunctionMatch(False, f"output shapes differ ({list(s.shape)} vs "
                                     f"{list(g.shape)}) and no class rows pair them")
            s_rows, g_rows = s, g
        else:
            g_rows = g[:, [t for t, _ in rows]]
            s_rows = s[:, [r for _, r in rows]]
        used = s_rows.shape[1]
        deltas = max(deltas, float((g_rows - s_rows).abs().max()))
        logits_max = max(logits_max, float(s_rows.abs().max()))
        agree += agreement(g_rows.numpy(), s_rows.numpy()) * x.shape[0]
        n += x.shape[0]
    if n == 0:
        return FunctionMatch(False, "no samples to compare on")
    rel = deltas / max(logits_max, 1e-12)
    return FunctionMatch(True, None, n, used, deltas, logits_max, rel, 1.0 - rel, agree / n)


@torch.no_grad()
def first_divergence(source: nn.Module, grown: nn.Module, batch: torch.Tensor,
                     tolerance: float = 1e-4) -> str | None:
    """The first module (in the grown model's call order) present in both models whose output's
    leading channels differ from the source's by more than `tolerance` of their size.

    Net2WiderNet keeps target channel j = source channel j for j < n_source, so the first n
    channels of a widened output are comparable with the source output directly.
    """
    outputs: dict[str, dict[str, torch.Tensor]] = {"s": {}, "g": {}}
    order: list[str] = []
    for label, model in (("s", source), ("g", grown)):
        names = {id(m): n for n, m in model.named_modules() if n}
        store = outputs[label]

        def hook(m: nn.Module, _i: Any, out: Any, store: dict = store, names: dict = names,
                 label: str = label) -> None:
            if isinstance(out, torch.Tensor) and id(m) in names and names[id(m)] not in store:
                store[names[id(m)]] = out.detach()
                if label == "g":
                    order.append(names[id(m)])

        handles = [m.register_forward_hook(hook) for m in model.modules()]
        try:
            model.eval()(batch)
        finally:
            for h in handles:
                h.remove()
    for name in order:
        s, g = outputs["s"].get(name), outputs["g"][name]
        if s is None or s.dim() != g.dim() or s.shape[0] != g.shape[0]:
            continue
        if s.dim() >= 2 and (s.shape[2:] != g.shape[2:] or g.shape[1] < s.shape[1]):
            continue
        g_part = g[:, : s.shape[1]] if s.dim() >= 2 else g
        if float((g_part - s).abs().max()) > tolerance * max(float(s.abs().max()), 1e-6):
            return name
    return None
