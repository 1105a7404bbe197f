"""Search a pruning ratio by *measured* latency: the smallest ratio whose deployed artifact meets a
latency goal (NetAdapt's idea, with the deployed int8 artifact in the loop).

Why measure instead of counting MACs: at batch 1 a model's latency is MACs plus per-layer overhead,
and int8 kernels speed layers up by different factors, so "half the MACs" can be 1.4x or 2.5x
faster depending on the model, the runtime and the CPU. The only way to meet a budget in
milliseconds is to time the artifact that will ship, on the machine it will run on.

How noise is handled, on a machine whose load moves a single timing by tens of percent:

- each candidate is timed *interleaved* with an anchor (the unpruned model as the same artifact)
  by the one timer, in rounds, so load hits both alike; its latency is its ratio to the anchor in
  that run times the anchor's latency from the calibration run at the start (`anchor_ms`), which
  removes drift between candidates;
- a candidate meets the goal when that latency is at most goal x (1 - margin);
- the bisection keeps the smallest ratio known to meet the goal, so one slow (noisy) reading can
  only make the result a little more pruned, never over budget;
- candidates with the same channel counts (round_to makes many ratios collapse onto one
  architecture) are measured once (the cache is keyed by architecture, and reported).

The library takes a `probe(ratio) -> Probe` function; it knows nothing of torch or runtimes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable


@dataclass
class Probe:
    """One measured candidate."""

    ratio: float
    macs: int
    params: int
    fraction: float          # MACs as a fraction of the input model's
    signature: str           # the architecture (channel counts): equal signatures, equal latency
    latency_ms: float        # anchor-normalised: ratio to the anchor x anchor_ms
    measured_ms: float       # this candidate's median in its own timing run
    anchor_run_ms: float     # the anchor's median in the same run
    runs: int
    reused: bool = False     # same architecture as an earlier probe: its timing was reused
    top1_pct: float | None = None   # val top-1 after BatchNorm re-estimation, before recovery
    meets: bool = False
    seconds: float = 0.0     # conversion + timing (+ accuracy) wall time
    foreign_load: float | None = None  # CPU share other processes used while it was timed

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("ratio", "fraction", "latency_ms", "measured_ms", "anchor_run_ms", "seconds"):
            d[k] = round(d[k], 5)
        return d


@dataclass
class Outcome:
    """The search's result: the chosen probe (None when the goal cannot be met) and every probe."""

    goal_ms: float
    threshold_ms: float      # goal x (1 - margin): what a candidate had to reach
    chosen: Probe | None
    probes: list[Probe] = field(default_factory=list)
    reason: str = ""

    @property
    def met(self) -> bool:
        return self.chosen is not None

    @property
    def closest(self) -> Probe:
        """The fastest candidate measured."""
        return min(self.probes, key=lambda p: p.latency_ms)

    def as_dict(self) -> dict[str, Any]:
        return {"goal_ms": round(self.goal_ms, 5), "threshold_ms": round(self.threshold_ms, 5),
                "met": self.met, "chosen_ratio": round(self.chosen.ratio, 5) if self.chosen else None,  # as probes
                "reason": self.reason,
                "probes": [p.as_dict() for p in sorted(self.probes, key=lambda p: p.ratio)]}


def search_ratio(probe: Callable[[float], Probe], *, goal_ms: float, anchor_ms: float,
                 max_ratio: float, margin: float = 0.05, resolution: float = 0.02,
                 max_probes: int = 10, tick: Callable[[Probe], None] | None = None) -> Outcome:
    """The smallest ratio in [0, max_ratio] whose probe meets goal_ms x (1 - margin).

    Ratio 0 is the input model itself (its latency is `anchor_ms`): when it already meets the goal
    nothing is pruned. Otherwise the largest allowed ratio is measured first — if even that misses,
    the goal cannot be met and the outcome says how close it came — then the interval is bisected
    until it is narrower than `resolution` or `max_probes` candidates were measured.
    """
    threshold = goal_ms * (1.0 - margin)
    out = Outcome(goal_ms, threshold, None)

    def run(ratio: float) -> Probe:
        p = probe(ratio)
        p.meets = p.latency_ms <= threshold
        out.probes.append(p)
        if tick is not None:
            tick(p)
        return p

    if anchor_ms <= threshold:
        out.chosen = run(0.0)
        if out.chosen.meets:
            out.reason = "the input model already meets the goal: nothing is pruned"
            return out
        out.chosen = None
    hi_probe = run(max_ratio)
    if not hi_probe.meets:
        out.reason = (f"even the most pruned candidate allowed (ratio {max_ratio:g}, "
                      f"max_layer_sparsity) takes {hi_probe.latency_ms:.3f} ms")
        return out
    lo, hi, best = 0.0, max_ratio, hi_probe
    while hi - lo > resolution and len(out.probes) < max_probes:
        mid = (lo + hi) / 2
        p = run(mid)
        if p.meets:
            hi, best = mid, p
        else:
            lo = mid
    out.chosen = best
    out.reason = (f"smallest ratio meeting {threshold:.3f} ms within {hi - lo:.3f} "
                  f"({len(out.probes)} candidates measured)")
    return out
