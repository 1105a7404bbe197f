"""The robustness pass: perturbed versions of the samples, replayed on every artifact.

Shape of the pass. Gradients exist only for torch models, so adversarial inputs are crafted
white-box on each torch model (`Member.model`) and replayed on every artifact made from it
(`Member.source`): for those artifacts it is a transfer attack, a lower bound on what a white-box
attacker holding the int8 graph could do, and the results say so (`transfer`). Corruptions depend on
no model and are replayed on everything.

Streaming. Samples come in chunks; for each chunk every set is made once, replayed on every member
through its runtime Runner (edgemml.runtimes.predict: static batch shapes handled there) and
dropped, so memory holds one chunk's sets whatever the number of samples, sets and artifacts.
Random draws (PGD's start, the noise corruption) are seeded by (seed, chunk index): results depend
on the samples, the seed and CHUNK only, not on batch sizes.

Accuracy is edgemml.metrics.accuracy, per chunk, summed as counts. Timing: wall and process CPU
seconds per phase (corruptions, attacks per torch model, replay per artifact), because on a shared
machine wall time says more about the neighbours than about the pass.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from edgemml import metrics, runtimes
from edgemml.robustness.attacks import WhiteBox
from edgemml.robustness.corruptions import CORRUPTIONS, SEVERITY_TABLES, corrupt, resolve_table
from edgemml.robustness.pixels import PixelSpace, eps_label

#: samples per chunk: fixed, so seeded draws do not depend on any batch size
CHUNK = 256


@dataclass(frozen=True)
class Settings:
    """What to perturb, and how. eps in pixel units ([0, 1]; 1/255 = one grey level)."""

    fgsm_eps: tuple[float, ...] = (1 / 255, 2 / 255, 4 / 255)
    pgd_eps: float | None = 4 / 255
    pgd_steps: int = 10
    pgd_step_size: float | None = None
    pgd_random_start: bool = True
    corruptions: tuple[str, ...] = CORRUPTIONS
    severities: tuple[int, ...] = (1, 3, 5)
    table: str = "imagenet-c"
    seed: int = 0
    #: batch of the attack's gradient passes and of the replays
    batch_size: int = 64
    #: snap adversarial pixels to whole grey levels (None: when the inputs came from 8-bit images)
    quantize: bool | None = None
    #: torch threads of the attacks (None: leave torch's setting as it is)
    threads: int | None = None


@dataclass
class Member:
    """One artifact in the pass. A torch model (`model` given) is attacked white-box; any other
    artifact replays the adversarial sets of `source`, the torch model it was made from (None: no
    gradients anywhere, so no adversarial sets). `reference` is what its drop is measured against,
    and `own_inputs` says the reference was attacked with its own inputs (two torch models)."""

    name: str
    runner: runtimes.Runner
    model: Any = None
    source: str | None = None
    reference: str | None = None


@dataclass
class SetResult:
    """One artifact on one set. Accuracies in percent, drops in points (positive = lower)."""

    key: str
    family: str
    kind: str  # clean | adversarial | corruption
    param: float | int | None
    n: int
    top1_pct: float | None
    drop_from_clean_pp: float | None = None
    reference_top1_pct: float | None = None
    drop_vs_reference_pp: float | None = None


@dataclass
class ArtifactRobustness:
    """An artifact's top-1 on every set, and its drop vs its reference set by set."""

    artifact: str
    crafted_on: str | None
    transfer: bool
    reference: str | None
    reference_inputs: str | None
    sets: list[SetResult]
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def worst(self) -> dict[str, Any]:
        """The figures the gates read: the lowest top-1 over the perturbed sets, and the largest
        drop below the reference under the same attack or corruption."""
        perturbed = [s for s in self.sets if s.kind != "clean" and s.top1_pct is not None]
        low = min(perturbed, key=lambda s: s.top1_pct or 0.0, default=None)
        drops = [s for s in perturbed if s.drop_vs_reference_pp is not None]
        high = max(drops, key=lambda s: s.drop_vs_reference_pp or 0.0, default=None)
        return {"worst_top1_pct": low.top1_pct if low else None,
                "worst_top1_set": low.key if low else None,
                "worst_drop_pp": high.drop_vs_reference_pp if high else None,
                "worst_drop_set": high.key if high else None}

    def as_dict(self) -> dict[str, Any]:
        clean = next((s.top1_pct for s in self.sets if s.kind == "clean"), None)
        return {"artifact": self.artifact, "reference": self.reference,
                "reference_inputs": self.reference_inputs, "crafted_on": self.crafted_on,
                "transfer": self.transfer, "clean_top1_pct": clean, **self.worst(),
                "seconds": round(self.seconds, 3), "cpu_seconds": round(self.cpu_seconds, 3),
                "notes": list(self.notes), "sets": [asdict(s) for s in self.sets]}


@dataclass
class Run:
    """Every member's results, the sets as made, and where the time went."""

    results: dict[str, ArtifactRobustness]
    sets: list[dict[str, Any]]
    n: int
    table: str | None
    timing: dict[str, dict[str, float]]


@dataclass(frozen=True)
class _Spec:
    key: str
    family: str
    kind: str
    param: float | int | None


def set_specs(settings: Settings) -> list[_Spec]:
    """The sets, in report order: clean, FGSM per eps, PGD, corruption x severity."""
    specs = [_Spec("clean", "clean", "clean", None)]
    specs += [_Spec(f"fgsm@{eps_label(e)}", "fgsm", "adversarial", float(e))
              for e in sorted(settings.fgsm_eps)]
    if settings.pgd_eps is not None:
        specs.append(_Spec(f"pgd@{eps_label(settings.pgd_eps)}", "pgd", "adversarial",
                           float(settings.pgd_eps)))
    specs += [_Spec(f"{c}@{s}", c, "corruption", int(s)) for c in settings.corruptions
              for s in sorted(settings.severities)]
    return specs


class _Clock:
    """Wall and process-CPU seconds per phase."""

    def __init__(self) -> None:
        self.phases: dict[str, dict[str, float]] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        w, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            entry = self.phases.setdefault(phase, {"wall_s": 0.0, "cpu_s": 0.0})
            entry["wall_s"] += time.perf_counter() - w
            entry["cpu_s"] += time.process_time() - c


def measure(members: Sequence[Member], chunks: Iterable[tuple[np.ndarray, np.ndarray]],
            space: PixelSpace, settings: Settings, *,
            advance: Callable[[int], None] | None = None) -> Run:
    """Top-1 of every member on every set. `chunks` yields (inputs, labels) of at most CHUNK
    samples each (preprocessed float32 in the model's layout, labels as class indices)."""
    clock = _Clock()
    specs = set_specs(settings)
    crafters = {m.name: WhiteBox(m.model, space, batch_size=settings.batch_size,
                                 threads=settings.threads)
                for m in members if m.model is not None}
    source = {m.name: (m.name if m.model is not None else
                       m.source if m.source in crafters else None) for m in members}
    counts = {m.name: {s.key: [0, 0] for s in specs} for m in members}
    table, n = None, 0

    def replay(keys: dict[str, np.ndarray] | np.ndarray, who: list[Member], key: str,
               labels: np.ndarray) -> None:
        for m in who:
            inputs = keys if isinstance(keys, np.ndarray) else keys[source[m.name] or ""]
            with clock(f"replay {m.name}"):
                logits = runtimes.predict(m.runner, inputs, batch_size=settings.batch_size)
            acc = metrics.accuracy(logits, labels)
            if acc.top1_pct is not None:
                counts[m.name][key][0] += int(round(acc.top1_pct * acc.n / 100.0))
                counts[m.name][key][1] += acc.n

    for index, (x, y) in enumerate(chunks):
        x, y = np.ascontiguousarray(x, np.float32), np.asarray(y, np.int64)
        n += len(y)
        quantize = space.on_8bit_grid(x) if settings.quantize is None else settings.quantize
        replay(x, list(members), "clean", y)
        attacked = [m for m in members if source[m.name] is not None]
        adv: dict[str, dict[str, np.ndarray]] = {}
        for name, box in crafters.items():
            with clock(f"attack on {name}"):
                fgsm = box.fgsm(x, y, settings.fgsm_eps, quantize=quantize)
                adv[name] = {f"fgsm@{eps_label(e)}": v for e, v in fgsm.items()}
                if settings.pgd_eps is not None:
                    adv[name][f"pgd@{eps_label(settings.pgd_eps)}"] = box.pgd(
                        x, y, eps=settings.pgd_eps, steps=settings.pgd_steps,
                        step_size=settings.pgd_step_size, random_start=settings.pgd_random_start,
                        seed=int(np.random.SeedSequence([settings.seed, index]).generate_state(1)[0]),
                        quantize=quantize)
        for spec in specs:
            if spec.kind == "adversarial":
                replay({c: sets[spec.key] for c, sets in adv.items()}, attacked, spec.key, y)
        del adv
        if settings.corruptions:
            with clock("corruptions"):
                images = space.to_uint8_nhwc(x)
                table = resolve_table(settings.table, images.shape)
        for spec in specs:
            if spec.kind == "corruption":
                with clock("corruptions"):
                    inputs = space.from_uint8_nhwc(corrupt(images, spec.family, int(spec.param or 1),
                                                           table=table,
                                                           seed=(settings.seed, index)))
                replay(inputs, list(members), spec.key, y)
        if advance:
            advance(len(y))
    results = {m.name: _result(m, specs, counts[m.name], source[m.name], clock) for m in members}
    for m in members:
        _compare(results[m.name], results.get(m.reference or ""), source)
    sets = [{"key": s.key, "family": s.family, "kind": s.kind, "param": s.param,
             **({"constant": SEVERITY_TABLES[table][s.family][int(s.param or 1) - 1]}
                if s.kind == "corruption" and table else {})} for s in specs]
    return Run(results, sets, n, table, clock.phases)


def _result(m: Member, specs: list[_Spec], counts: dict[str, list[int]], crafted_on: str | None,
            clock: _Clock) -> ArtifactRobustness:
    sets = []
    for s in specs:
        correct, n = counts[s.key]
        if s.kind == "adversarial" and crafted_on is None:
            continue
        sets.append(SetResult(s.key, s.family, s.kind, s.param, n,
                              100.0 * correct / n if n else None))
    clean = sets[0].top1_pct
    for s in sets[1:]:
        s.drop_from_clean_pp = metrics.drop_pp(clean, s.top1_pct)
    notes = [] if crafted_on is not None or not any(s.kind == "adversarial" for s in specs) else [
        "no adversarial sets: no torch model to differentiate (the attack needs gradients)"]
    phase = clock.phases.get(f"replay {m.name}", {})
    return ArtifactRobustness(m.name, crafted_on, crafted_on is not None and crafted_on != m.name,
                              None, None, sets, phase.get("wall_s", 0.0), phase.get("cpu_s", 0.0),
                              notes)


def _compare(result: ArtifactRobustness, reference: ArtifactRobustness | None,
             source: dict[str, str | None]) -> None:
    """Drops vs the reference set by set. An artifact replaying its reference's sets saw the same
    inputs; two torch models (pruned vs unpruned) are each attacked white-box with the same
    settings: the fair comparison of two models that both have gradients."""
    if reference is None or reference.artifact == result.artifact:
        for s in result.sets:  # a reference is its own baseline: drop 0, so gates can read it
            s.reference_top1_pct, s.drop_vs_reference_pp = s.top1_pct, 0.0
        return
    result.reference = reference.artifact
    same = source.get(result.artifact) == source.get(reference.artifact)
    result.reference_inputs = "same inputs" if same else "own white-box inputs"
    by_key = {s.key: s for s in reference.sets}
    for s in result.sets:
        ref = by_key.get(s.key)
        if ref is not None:
            s.reference_top1_pct = ref.top1_pct
            s.drop_vs_reference_pp = metrics.drop_pp(ref.top1_pct, s.top1_pct)


def gap(result: ArtifactRobustness, baseline: ArtifactRobustness, kind: str) -> dict[str, Any]:
    """Points `result` lost against `baseline` on each set both have (e.g. int8 vs its fp32 twin,
    pruned vs unpruned); positive = lower than the baseline."""
    by_key = {s.key: s for s in baseline.sets}
    per_set = {s.key: metrics.drop_pp(by_key[s.key].top1_pct, s.top1_pct)
               for s in result.sets if s.key in by_key}
    perturbed = {k: v for k, v in per_set.items() if k != "clean" and v is not None}
    worst = max(perturbed, key=lambda k: perturbed[k], default=None)
    same = result.crafted_on == baseline.crafted_on
    return {"kind": kind, "artifact": result.artifact, "baseline": baseline.artifact,
            "inputs": "same inputs" if same else "own white-box inputs",
            "clean_pp": per_set.get("clean"), "worst_pp": perturbed.get(worst) if worst else None,
            "worst_set": worst, "sets_pp": per_set}
