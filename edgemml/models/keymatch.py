"""Pair the keys of a target model with a source checkpoint's: step 1 of moving weights (see
`edgemml.models.transfer`).

Each tensor is matched at most once, by the first rule that applies: exact name, name after wrapper
prefixes (module., _orig_mod., model.) are stripped or added, the user's regex rename rules, then
alignment of what is left by module order and shapes within one layer type (for re-implementations
whose names differ entirely). Kept apart from the tensor surgery because it reads only names and
shapes, never tensors.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from edgemml.errors import ConfigError
from edgemml.models.checkpoints import WRAPPER_PREFIXES

Shape = tuple[int, ...]

# Attribute names of PyTorch layers, recognised at the end of a key even after `_` (flattened names).
_ATTR = re.compile(r"^(?:(?P<mod>.+?)[./:_-])?(?P<attr>num_batches_tracked|running_mean|running_var|"
                   r"weight|bias)$")
_LAST_SEP = re.compile(r"^(?P<mod>.*)[./:](?P<attr>[^./:]+)$")
_OPTIONAL_ATTRS = {"num_batches_tracked"}  # older checkpoints lack it; it does not define the layer


# ------------------------------------------------------------------------------------------------
# Key names
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RenameRule:
    """A regex substitution applied to source keys (re.sub semantics, `\\1` back-references)."""

    pattern: re.Pattern[str]
    repl: str

    @classmethod
    def parse(cls, pattern: str, repl: str, *, key: str = "rename") -> RenameRule:
        try:
            return cls(re.compile(pattern), repl)
        except re.error as exc:
            raise ConfigError(f"invalid regular expression {pattern!r}: {exc}", key=key) from None


def apply_rules(key: str, rules: Sequence[RenameRule]) -> str:
    """Apply every rule in order (each to the result of the previous one)."""
    for rule in rules:
        key = rule.pattern.sub(rule.repl, key)
    return key


def normalize_key(key: str) -> str:
    """The key without `_orig_mod` segments and without leading wrapper prefixes (also stacked)."""
    out = ".".join(p for p in key.split(".") if p != "_orig_mod")
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if out.startswith(prefix) and len(out) > len(prefix):
                out = out[len(prefix):]
                stripped = True
    return out


def split_key(key: str) -> tuple[str, str]:
    """(module, attribute): `layer1.0.bn1.running_mean` -> (`layer1.0.bn1`, `running_mean`); also
    for `/`, `:` and `_` separators of flattened names (`layer1_0_conv1_weight`)."""
    m = _ATTR.match(key) or _LAST_SEP.match(key)
    if m is None:
        return key, ""
    return m.group("mod") or "", m.group("attr")


def natural_order(keys: Iterable[str]) -> list[str]:
    """Keys sorted with digit runs compared as numbers (features.2 before features.10)."""
    def parts(k: str) -> list[tuple[int, int | str]]:
        return [(0, int(t)) if t.isdigit() else (1, t) for t in re.split(r"(\d+)", k) if t]
    return sorted(keys, key=parts)


# ------------------------------------------------------------------------------------------------
# 1. Key matching
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyMatch:
    target: str
    source: str
    rule: str  # exact | prefix | rename | align


@dataclass
class _Module:
    name: str
    attrs: dict[str, str]  # attribute -> full key

    def kind(self, shapes: Mapping[str, Shape]) -> tuple[tuple[str, int], ...]:
        """Layer type: attribute names and tensor ranks (conv: weight 4-D, BN: 4 x 1-D, ...)."""
        return tuple(sorted((a, len(shapes[k])) for a, k in self.attrs.items()
                            if a not in _OPTIONAL_ATTRS))

    def shapes(self, shapes: Mapping[str, Shape]) -> tuple[tuple[str, Shape], ...]:
        return tuple(sorted((a, tuple(shapes[k])) for a, k in self.attrs.items()
                            if a not in _OPTIONAL_ATTRS))


def _modules(keys: Iterable[str]) -> list[_Module]:
    """Keys grouped by module, in order of first appearance."""
    by_name: dict[str, _Module] = {}
    for key in keys:
        mod, attr = split_key(key)
        entry = by_name.setdefault(mod, _Module(mod, {}))
        if attr in entry.attrs:  # two keys give the same (module, attr): keep them apart
            by_name[key] = _Module(key, {"": key})
        else:
            entry.attrs[attr] = key
    return list(by_name.values())


def _compatible(t: _Module, s: _Module, tshapes: Mapping[str, Shape], sshapes: Mapping[str, Shape],
                free_dim: int | None) -> bool:
    """Same attributes and shapes, except along `free_dim` (stem: input channels; head: rows)."""
    if set(t.attrs) - _OPTIONAL_ATTRS != set(s.attrs) - _OPTIONAL_ATTRS:
        return False
    for attr, tkey in t.attrs.items():
        if attr in _OPTIONAL_ATTRS:
            continue
        a, b = tuple(tshapes[tkey]), tuple(sshapes[s.attrs[attr]])
        if len(a) != len(b):
            return False
        if any(x != y for i, (x, y) in enumerate(zip(a, b)) if i != free_dim):
            return False
    return True


def match_keys(target: Mapping[str, Shape], source: Mapping[str, Shape], *,
               rules: Sequence[RenameRule] = (), align: bool = True, stem: str | None = None,
               head: str | None = None) -> tuple[dict[str, KeyMatch], list[str]]:
    """Pair target keys with source keys (each at most once); returns ({target: match}, notes).

    `target`/`source` map keys to shapes, in module order (the order alignment relies on). `stem` and
    `head` are target module names whose tensors may pair with source tensors of another input-channel
    count (stem) or row count (head) during alignment; every other aligned pair has equal shapes.
    """
    matches: dict[str, KeyMatch] = {}
    used: set[str] = set()
    notes: list[str] = []

    def pair(t: str, s: str, rule: str) -> None:
        matches[t] = KeyMatch(t, s, rule)
        used.add(s)

    for t in target:
        if t in source:
            pair(t, t, "exact")

    def unique_by(fn: object, keys: Iterable[str]) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for k in keys:
            v = fn(k)  # type: ignore[operator]
            out[v] = None if v in out else k  # None marks an ambiguous name
        return out

    free_t = [t for t in target if t not in matches]
    norm_src = unique_by(normalize_key, [s for s in source if s not in used])
    norm_tgt = unique_by(normalize_key, free_t)
    for t in free_t:
        n = normalize_key(t)
        s = norm_src.get(n)
        if s is not None and norm_tgt.get(n) == t and s not in used:
            pair(t, s, "prefix")

    if rules:
        free_tgt = {t for t in target if t not in matches}
        norm_free = unique_by(normalize_key, free_tgt)
        for s in source:
            if s in used:
                continue
            candidates = [apply_rules(s, rules)]
            if candidates[0] == s:
                candidates.append(apply_rules(normalize_key(s), rules))
            for new in candidates:
                t = new if new in free_tgt else norm_free.get(normalize_key(new))
                if t is None or new == s:
                    continue
                if t in matches:
                    notes.append(f"rename: {s} and {matches[t].source} both become {t}; "
                                 f"kept {matches[t].source}")
                    break
                pair(t, s, "rename")
                break

    if align:
        _align(target, source, matches, used, stem, head, pair)
    return matches, notes


def _align(target: Mapping[str, Shape], source: Mapping[str, Shape], matches: dict[str, KeyMatch],
           used: set[str], stem: str | None, head: str | None, pair: object) -> None:
    """Pair modules left unmatched, per layer type, by order and shapes (difflib on shape lists)."""
    t_mods = [m for m in _modules(target) if not any(k in matches for k in m.attrs.values())]
    s_mods = [m for m in _modules(source) if not any(k in used for k in m.attrs.values())]
    done_t: set[str] = set()
    done_s: set[str] = set()

    def take(t: _Module, s: _Module) -> None:
        for attr, tkey in t.attrs.items():
            if attr in s.attrs:
                pair(tkey, s.attrs[attr], "align")  # type: ignore[operator]
        done_t.add(t.name)
        done_s.add(s.name)

    # The stem pairs with the first source module of its type, the head with the last, even when
    # input channels / class counts differ (they are adapted later, or refused).
    for special, free_dim, pick in ((stem, 1, 0), (head, 0, -1)):
        t = next((m for m in t_mods if m.name == special), None)
        if t is None:
            continue
        same_kind = [m for m in s_mods if m.name not in done_s
                     and m.kind(source) == t.kind(target)]
        if same_kind and _compatible(t, same_kind[pick], target, source, free_dim):
            take(t, same_kind[pick])

    kinds: dict[tuple[tuple[str, int], ...], tuple[list[_Module], list[_Module]]] = {}
    for m in t_mods:
        if m.name not in done_t:
            kinds.setdefault(m.kind(target), ([], []))[0].append(m)
    for m in s_mods:
        if m.name not in done_s and m.kind(source) in kinds:
            kinds[m.kind(source)][1].append(m)
    for tl, sl in kinds.values():
        if not sl:
            continue
        a = [m.shapes(target) for m in tl]
        b = [m.shapes(source) for m in sl]
        sm = difflib.SequenceMatcher(None, a, b, autojunk=False)
        for block in sm.get_matching_blocks():
            for i in range(block.size):
                take(tl[block.a + i], sl[block.b + i])
