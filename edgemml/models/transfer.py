"""Move weights from source checkpoints into a target model that differs, and say exactly what moved.

The migrate stage is a thin shell around this module. Three steps, each recorded per tensor:

1. `match_keys` (in `edgemml.models.keymatch`) pairs target and source keys, each tensor at most
   once, by the first rule that applies: exact name, name after wrapper prefixes (module.,
   _orig_mod., model.) are stripped or added, the user's regex rename rules, then alignment of what
   is left by module order and shapes within one layer type (for re-implementations whose names
   differ entirely).
2. `map_source` turns pairs into target-shaped tensors: equal shapes are copied, the stem kernel is
   adapted to another number of input channels, classifier rows are copied by class name; any other
   shape difference is a `ShapeMismatch`, never loaded.
3. `fuse` combines several sources (weighted average or per-tensor precedence) and refuses
   incompatible ones, naming the tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Literal, Mapping, Sequence

import torch

from edgemml.errors import ConfigError, StageError
from edgemml.models.keymatch import (KeyMatch, RenameRule, Shape, match_keys, natural_order,
                                     normalize_key, split_key)

#: the key-matching names stay importable from here, where migrate and the docs look for them
__all__ = ["KeyMatch", "RenameRule", "match_keys", "natural_order", "normalize_key", "split_key",
           "adapt_in_chans", "head_rows", "Mapped", "ShapeMismatch", "SourceMap", "map_source",
           "Provenance", "Fused", "fuse", "coverage"]

InChansRule = Literal["auto", "sum", "repeat", "zeros"]


# ------------------------------------------------------------------------------------------------
# 2. Adaptation: stem channels, classifier rows
# ------------------------------------------------------------------------------------------------


def adapt_in_chans(weight: torch.Tensor, in_chans: int, rule: InChansRule = "auto") -> tuple[
        torch.Tensor, str]:
    """A conv kernel (out, C_src, kh, kw) for `in_chans` inputs, and the rule applied.

    sum: target channel j gets the sum of source channels i with i % C_dst == j (3 -> 1: a gray image
      gives the activations the source gives that image replicated to RGB);
    repeat: source filters repeated cyclically over the new channels and scaled by C_src / C_dst
      (an input with equal channels keeps its activation size);
    zeros: source filters kept, new channels zero (equals the source on the first C_src channels).
    auto: sum when channels decrease, repeat when they increase.
    """
    c_src = weight.shape[1]
    if rule == "auto":
        rule = "sum" if in_chans < c_src else "repeat"
    if rule == "sum":
        if in_chans > c_src:
            raise ConfigError(f"in_chans_rule sum reduces channels; the stem goes from {c_src} to "
                              f"{in_chans}", key="in_chans_rule", hint="use repeat or zeros")
        out = weight.new_zeros((weight.shape[0], in_chans, *weight.shape[2:]))
        for i in range(c_src):
            out[:, i % in_chans] += weight[:, i]
        return out, f"sum {c_src}->{in_chans}"
    if rule == "zeros":
        if in_chans < c_src:
            raise ConfigError(f"in_chans_rule zeros adds channels; the stem goes from {c_src} to "
                              f"{in_chans}", key="in_chans_rule", hint="use sum")
        extra = weight.new_zeros((weight.shape[0], in_chans - c_src, *weight.shape[2:]))
        return torch.cat([weight, extra], dim=1), f"zeros {c_src}->{in_chans}"
    index = torch.arange(in_chans) % c_src
    return weight[:, index] * (c_src / in_chans), f"repeat {c_src}->{in_chans} x{c_src}/{in_chans}"


def head_rows(target_classes: Sequence[str] | None, source_classes: Sequence[str] | None,
              label_map: Mapping[str, str | int] | None, n_target: int,
              n_source: int) -> tuple[list[int | None], str]:
    """For each target row, the source row it takes (None: initialised), and how it was decided.

    Rows pair by class name; `label_map` {target class: source class name or row index} adds or
    overrides pairs. Without names on both sides (and no label map) no row can be placed: all None.
    """
    label_map = dict(label_map or {})
    tnames = list(target_classes) if target_classes else None
    snames = list(source_classes) if source_classes else None
    if tnames is not None and len(tnames) != n_target:
        tnames = None
    if snames is not None and len(snames) != n_source:
        snames = None
    if label_map and tnames is None:
        raise ConfigError("label_map needs the target class names (from the data)", key="label_map")
    rows: list[int | None] = [None] * n_target
    if tnames is not None and snames is not None:
        index = {c: i for i, c in enumerate(snames)}
        rows = [index.get(c) for c in tnames]
    for tclass, sclass in label_map.items():
        if tnames is None or tclass not in tnames:
            raise ConfigError(f"label_map: {tclass!r} is not a target class "
                              f"({', '.join(tnames or [])})", key="label_map")
        if isinstance(sclass, int) or (snames is None and str(sclass).isdigit()):
            src = int(sclass)
            if not 0 <= src < n_source:
                raise ConfigError(f"label_map: source row {src} is outside 0..{n_source - 1}",
                                  key="label_map")
        else:
            if snames is None or sclass not in snames:
                raise ConfigError(f"label_map: {sclass!r} is not a source class "
                                  f"({', '.join(snames) if snames else 'source class names unknown'})",
                                  key="label_map",
                                  hint="give source rows as integers when the source has no names")
            src = snames.index(sclass)
        rows[tnames.index(tclass)] = src
    how = "label_map + class names" if label_map and snames else (
        "label_map" if label_map else "class names")
    return rows, how


# ------------------------------------------------------------------------------------------------
# Mapping one source
# ------------------------------------------------------------------------------------------------


@dataclass
class Mapped:
    """A target tensor's value taken from one source."""

    target: str
    source_key: str
    rule: str
    value: torch.Tensor
    rows: torch.Tensor | None = None  # bool per row (dim 0) taken from the source; None = all
    adaptation: str | None = None


@dataclass
class ShapeMismatch:
    target: str
    source_key: str
    rule: str
    source_shape: Shape
    target_shape: Shape
    reason: str = "shape differs"
    fatal: bool = True  # False: initialised on purpose (a head for another label set)

    def describe(self) -> str:
        return (f"{self.target} {list(self.target_shape)} <- {self.source_key} "
                f"{list(self.source_shape)} ({self.rule}): {self.reason}")


@dataclass
class SourceMap:
    """What one source provides for the target."""

    label: str
    weight: float
    mapped: dict[str, Mapped]
    mismatched: list[ShapeMismatch]
    unused: list[str]
    notes: list[str] = field(default_factory=list)


def map_source(label: str, target: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor],
               matches: Mapping[str, KeyMatch], *, weight: float = 1.0, stem: str | None = None,
               head: str | None = None, in_chans_rule: InChansRule = "auto",
               target_classes: Sequence[str] | None = None,
               source_classes: Sequence[str] | None = None,
               label_map: Mapping[str, str | int] | None = None) -> SourceMap:
    """Target-shaped tensors for every matched key; shape differences other than the stem's input
    channels and the head's rows are returned as mismatches (never loaded)."""
    mapped: dict[str, Mapped] = {}
    mismatched: list[ShapeMismatch] = []
    notes: list[str] = []
    head_keys = {f"{head}.weight", f"{head}.bias"} if head else set()
    rows_cache: tuple[list[int | None], str] | None = None
    for t, m in matches.items():
        tv, sv = target[t], source[m.source]
        tshape, sshape = tuple(tv.shape), tuple(sv.shape)
        value = sv.detach()
        if value.dtype != tv.dtype:
            value = value.to(tv.dtype)
        if t in head_keys and len(sshape) == len(tshape) and sshape[1:] == tshape[1:] and (
                (target_classes and source_classes) or label_map or sshape != tshape):
            if rows_cache is None:
                rows_cache = head_rows(target_classes, source_classes, label_map, tshape[0],
                                       sshape[0])
            rows, how = rows_cache
            if rows == list(range(tshape[0])) and sshape == tshape:
                mapped[t] = Mapped(t, m.source, m.rule, value.clone())
                continue
            taken = [i for i, r in enumerate(rows) if r is not None]
            if not taken:
                mismatched.append(ShapeMismatch(
                    t, m.source, m.rule, sshape, tshape,
                    "head re-initialised: " + ("no target class is a source class" if
                                               source_classes and target_classes else
                                               "class names unknown (give classes or label_map)"),
                    fatal=False))
                continue
            out = tv.detach().clone()
            mask = torch.zeros(tshape[0], dtype=torch.bool)
            for i in taken:
                out[i] = value[rows[i]]  # type: ignore[index]
                mask[i] = True
            mapped[t] = Mapped(t, m.source, m.rule, out, mask,
                               f"rows by {how}: {len(taken)}/{tshape[0]}")
        elif t in head_keys and sshape != tshape:
            mismatched.append(ShapeMismatch(t, m.source, m.rule, sshape, tshape,
                                            "head re-initialised: shape differs", fatal=False))
        elif t in head_keys and t.endswith(".weight"):
            mapped[t] = Mapped(t, m.source, m.rule, value.clone())
            notes.append(f"{t}: copied as is; class names are not known on both sides, so the "
                         f"source's label order is assumed")
        elif sshape == tshape:
            mapped[t] = Mapped(t, m.source, m.rule, value.clone())
        elif (stem is not None and t == f"{stem}.weight" and len(sshape) == 4 and len(tshape) == 4
              and sshape[0] == tshape[0] and sshape[2:] == tshape[2:]):
            adapted, how = adapt_in_chans(value, tshape[1], in_chans_rule)
            mapped[t] = Mapped(t, m.source, m.rule, adapted.contiguous(), None, f"stem {how}")
        else:
            mismatched.append(ShapeMismatch(t, m.source, m.rule, sshape, tshape))
    used = {m.source for m in matches.values()}
    unused = [k for k in source if k not in used]
    return SourceMap(label, weight, mapped, mismatched, unused, notes)


# ------------------------------------------------------------------------------------------------
# 3. Fusion
# ------------------------------------------------------------------------------------------------


@dataclass
class Provenance:
    source: str
    key: str
    rule: str
    adaptation: str | None
    weight: float | None  # share in an average (None: taken as is)


@dataclass
class Fused:
    value: torch.Tensor
    rows: torch.Tensor | None
    provenance: list[Provenance]


def fuse(sources: Sequence[SourceMap], mode: Literal["average", "first"] = "first") -> dict[str, Fused]:
    """Combine the sources' tensors per target key.

    first: each tensor (each head row) from the first source that has it.
    average: the weighted mean over sources ("model soup"); every source must provide each
      averaged tensor, otherwise the result would silently mix averaged and unaveraged layers —
      refused with the tensor named. Head rows average over the sources that have the row;
      integer tensors (num_batches_tracked) are taken from the first source.
    """
    keys: list[str] = []
    for s in sources:
        keys += [k for k in s.mapped if k not in keys]
    out: dict[str, Fused] = {}
    for key in keys:
        have = [s for s in sources if key in s.mapped]
        entries = [s.mapped[key] for s in have]
        prov = [Provenance(s.label, e.source_key, e.rule, e.adaptation, None)
                for s, e in zip(have, entries)]
        if mode == "first" or len(sources) == 1:
            first = entries[0]
            value, rows = first.value.clone(), first.rows
            used = [prov[0]]
            if rows is not None:
                rows = rows.clone()
                for s, e, p in zip(have[1:], entries[1:], prov[1:]):
                    fill = (~rows) & (e.rows if e.rows is not None else torch.ones_like(rows))
                    if fill.any():
                        value[fill] = e.value[fill]
                        rows |= fill
                        used.append(p)
                if bool(rows.all()):
                    rows = None
            out[key] = Fused(value, rows, used)
            continue
        partial = any(e.rows is not None for e in entries)
        if len(have) < len(sources) and not partial:
            missing = [s.label for s in sources if key not in s.mapped]
            raise StageError(
                f"fuse: average: tensor {key} comes from {', '.join(s.label for s in have)} but "
                f"not from {', '.join(missing)}; the sources are incompatible for averaging",
                key="fuse", hint="average sources of the same architecture, or use `fuse: first` "
                "to take each tensor from the first source that has it")
        if not entries[0].value.is_floating_point():
            out[key] = Fused(entries[0].value.clone(), None, [prov[0]])
            continue
        rows_n = entries[0].value.shape[0] if entries[0].value.ndim else 1
        num = torch.zeros(entries[0].value.shape, dtype=torch.float64)
        den = torch.zeros(rows_n, dtype=torch.float64)
        for s, e in zip(have, entries):
            w = torch.full((rows_n,), float(s.weight), dtype=torch.float64)
            if e.rows is not None:
                w = w * e.rows.to(torch.float64)
            num += e.value.to(torch.float64) * _rowwise(w, e.value.ndim)
            den += w
        mean = num / _rowwise(torch.where(den > 0, den, torch.ones_like(den)), num.ndim)
        rows = (den > 0) if partial else None
        value = entries[0].value.clone()
        if rows is not None:
            value[rows] = mean[rows].to(value.dtype)
            if bool(rows.all()):
                rows = None
        else:
            value = mean.to(value.dtype)
        total = sum(s.weight for s in have)
        for s, p in zip(have, prov):
            p.weight = s.weight / total
        out[key] = Fused(value, rows, prov)
    return out


def _rowwise(w: torch.Tensor, ndim: int) -> torch.Tensor:
    """Per-row weights shaped to broadcast over a tensor of rank `ndim` (scalars: one weight)."""
    return w.reshape(()) if ndim == 0 else w.view((-1,) + (1,) * (ndim - 1))


# ------------------------------------------------------------------------------------------------
# Coverage
# ------------------------------------------------------------------------------------------------


def coverage(params: Mapping[str, torch.Tensor], fused: Mapping[str, Fused],
             excluded: Iterable[str] = ()) -> tuple[float, int, int]:
    """(share, elements taken from a source, elements counted) over the given parameters.

    A head with some rows copied counts those rows. `excluded` parameters (initialised on purpose)
    are left out of both counts unless a source provided them.
    """
    excluded = set(excluded)
    taken = total = 0
    for key, p in params.items():
        n = p.numel()
        got = 0
        if key in fused:
            f = fused[key]
            got = n if f.rows is None else int(n * int(f.rows.sum()) / max(1, f.rows.numel()))
        if key in excluded and got == 0:
            continue
        taken += got
        total += n
    return (taken / total if total else 1.0), taken, total
