"""validate's opt-in `robustness:` block: its options and the orchestration of the pass.

    robustness:
      fgsm: {eps: [1/255, 2/255, 4/255]}     # YAML reads 1/255 as a string: parsed here
      pgd: {eps: 4/255, steps: 10}           # step_size default 2.5 * eps / steps, random start
      corruptions: [gaussian_noise, gaussian_blur, brightness, contrast, jpeg]
      severity: [1, 3, 5]
    gates:
      int8: {max_robust_drop: 5}             # points below its reference under the same attack
      all: {min_robust_top1: 50}             # worst top-1 over every perturbed set, percent

Who is compared with whom. Every torch model validate measures is attacked white-box; every other
artifact replays the adversarial sets of the torch model it was made from (a transfer attack) and
its drop is measured against that model on the same inputs. When the primary reference is the
output of a prune stage, the model that stage pruned is added to the pass (not to the artifact
table) and attacked white-box too, so the report gives pruned vs unpruned and `torch:
{max_robust_drop}` gates it; the gap of each int8 artifact to its fp32 twin of the same runtime
and mode is reported beside.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from edgemml.config import StrictModel
from edgemml.robustness.corruptions import CORRUPTIONS, DEFAULT_TABLE

if TYPE_CHECKING:
    from edgemml.evaluation import Subject
    from edgemml.stages._validate_plan import Plan
    from edgemml.stages.base import StageContext

# stages/validate.py imports this module, so its config is not imported back, not even for
# type checking (no import cycle): annotations name it through this alias.
ValidateConfig = Any

_FRACTION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)\s*$")
#: GateLimits fields that read the robustness figures (they need the block)
GATE_METRICS = ("min_robust_top1", "max_robust_drop")


def parse_eps(value: Any) -> float:
    """4/255 (a string, as YAML reads it) or a number: pixel units in (0, 1]."""
    if isinstance(value, str):
        m = _FRACTION.match(value)
        if not m or float(m.group(2)) == 0:
            raise ValueError(f"eps {value!r}: write a number in (0, 1] or a fraction like 4/255")
        value = float(m.group(1)) / float(m.group(2))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"eps {value!r}: write a number in (0, 1] or a fraction like 4/255")
    if not 0 < float(value) <= 1:
        raise ValueError(f"eps {value} is outside (0, 1]: budgets are in pixel units "
                         "(1/255 = one grey level)")
    return float(value)


class FgsmConfig(StrictModel):
    """FGSM: one signed-gradient step per eps (one backward pass serves every eps)."""

    eps: list[float] = Field(default_factory=lambda: [1 / 255, 2 / 255, 4 / 255], min_length=1,
                             description="Budgets in pixel units (1/255 = one grey level); "
                             "fractions like 4/255 are accepted.")

    @field_validator("eps", mode="before")
    @classmethod
    def _eps(cls, value: Any) -> list[float]:
        return sorted({parse_eps(v) for v in (value if isinstance(value, list) else [value])})


class PgdConfig(StrictModel):
    """L-inf PGD (Madry et al.): projected signed-gradient steps from a seeded random start."""

    eps: float = Field(4 / 255, description="Budget in pixel units; 4/255 accepted.")
    steps: int = Field(10, ge=1, le=200, description="Projected steps.")
    step_size: float | None = Field(None, description="Default 2.5 * eps / steps.")
    random_start: bool = Field(True, description="Start uniformly inside the eps ball (seeded).")

    @field_validator("eps", mode="before")
    @classmethod
    def _eps(cls, value: Any) -> float:
        return parse_eps(value)

    @field_validator("step_size", mode="before")
    @classmethod
    def _step(cls, value: Any) -> float | None:
        return None if value is None else parse_eps(value)


class RobustnessConfig(StrictModel):
    """Adversarial and corrupted versions of the evaluation samples, replayed on every artifact."""

    fgsm: FgsmConfig | None = Field(default_factory=FgsmConfig, description="null disables FGSM.")
    pgd: PgdConfig | None = Field(default_factory=PgdConfig, description="null disables PGD.")
    corruptions: list[Literal["gaussian_noise", "gaussian_blur", "brightness", "contrast",
                              "jpeg"]] = Field(default_factory=lambda: list(CORRUPTIONS),
                                               description="ImageNet-C-style corruptions.")
    severity: list[int] = Field(default_factory=lambda: [1, 3, 5], min_length=1,
                                description="Severities 1..5 of every corruption.")
    table: Literal["imagenet-c", "cifar-10-c", "auto"] = Field(
        DEFAULT_TABLE, description="Severity constants: ImageNet-C's, CIFAR-10-C's, or auto "
        "(CIFAR-10-C's below 96 px).")
    samples: int | None = Field(1000, ge=10, description="Evaluate on at most this many of "
                                "validate's samples (stratified, seeded; null: all). Cost is "
                                "linear in it: PGD runs steps forward+backward passes per sample.")
    batch_size: int = Field(64, ge=1, description="Batch of the gradient passes and replays.")
    threads: int | None = Field(
        1, ge=1, description="Threads of the attack and the replays (null: validate's `threads`). "
        "Nothing here is timed, so this changes no figure, only the cost: on a shared 2-core "
        "machine, 2 torch threads made the default pass ~10x slower (325 s vs 34 s of CPU: OpenMP "
        "threads of the backward passes spin waiting for each other).")
    unpruned: bool = Field(True, description="When the reference comes from a prune stage, also "
                           "attack the model it pruned (pruned vs unpruned).")

    @field_validator("severity")
    @classmethod
    def _severity(cls, value: list[int]) -> list[int]:
        if any(not 1 <= v <= 5 for v in value):
            raise ValueError("severities are 1..5")
        return sorted(set(value))


def unpruned_subject(ctx: StageContext, plan: Plan) -> Subject | None:
    """The model the primary reference was pruned from, when its stage is a prune stage: that
    stage's `input:`, or the nearest earlier stage with a model (how the runner chooses it)."""
    from edgemml.stages._validate_plan import _torch_subject

    primary = next((s for s in plan.subjects if s.name == plan.primary), None)
    if primary is None or primary.model is None or primary.stage not in ctx.inputs:
        return None
    if ctx.inputs[primary.stage].type != "prune":
        return None
    names = ctx.pipeline.stage_names()
    index = names.index(primary.stage)
    source = getattr(ctx.pipeline.stages[index], "input", None)
    if source is None:
        source = next((n for n in reversed(names[:index])
                       if n in ctx.inputs and ctx.inputs[n].get("model") is not None), None)
    if source is None or source not in ctx.inputs or ctx.inputs[source].get("model") is None:
        return None
    existing = next((s for s in plan.subjects if s.model is not None and s.stage == source), None)
    return existing or _torch_subject(f"torch@{source}", ctx.inputs[source]["model"], source)[0]


def _int8_twins(subjects: list[Subject]) -> list[tuple[str, str]]:
    """(int8 artifact, its fp32 twin): same format, mode and reference."""
    pairs = []
    for s in subjects:
        if s.precision != "int8":
            continue
        twin = next((t for t in subjects if t.precision == "fp32" and t.format == s.format
                     and t.mode == s.mode and t.reference == s.reference), None)
        if twin is not None:
            pairs.append((s.name, twin.name))
    return pairs


def run_robustness(ctx: StageContext, config: ValidateConfig, plan: Plan, dataset: Any,
                   preprocess: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Every subject on every set: ({artifact name: its robustness entry}, the report section)."""
    from edgemml import robustness as rb
    from edgemml.data.datasets import stratified_sample
    from edgemml.evaluation import Samples, open_subject

    cfg = config.robustness
    assert cfg is not None
    if cfg.samples is not None and cfg.samples < len(dataset):
        dataset = dataset.subset(stratified_sample(dataset.labels, cfg.samples, ctx.seed),
                                 config.split)
    subjects = list(plan.subjects)
    unpruned = unpruned_subject(ctx, plan) if cfg.unpruned else None
    extra = unpruned is not None and all(s.name != unpruned.name for s in subjects)
    if unpruned is not None and extra:
        subjects.append(unpruned)
    torch_names = {s.name for s in subjects if s.model is not None}
    threads = cfg.threads or config.threads
    members = []
    for s in subjects:
        if s.model is not None:
            ref = unpruned.name if unpruned is not None and s.name == plan.primary else None
        else:
            ref = s.reference
        members.append(rb.Member(s.name, open_subject(s, threads), model=s.model,
                                 source=s.reference if s.reference in torch_names else None,
                                 reference=ref))
    settings = rb.Settings(
        fgsm_eps=tuple(cfg.fgsm.eps) if cfg.fgsm else (),
        pgd_eps=cfg.pgd.eps if cfg.pgd else None, pgd_steps=cfg.pgd.steps if cfg.pgd else 0,
        pgd_step_size=cfg.pgd.step_size if cfg.pgd else None,
        pgd_random_start=cfg.pgd.random_start if cfg.pgd else True,
        corruptions=tuple(cfg.corruptions), severities=tuple(cfg.severity), table=cfg.table,
        seed=ctx.seed, batch_size=cfg.batch_size, threads=threads)
    samples = Samples(dataset, rb.CHUNK)
    labels = samples.labels
    chunks = ((x, labels[i * rb.CHUNK:i * rb.CHUNK + len(x)])
              for i, x in enumerate(samples.batches()))
    wall, cpu = time.perf_counter(), time.process_time()
    with ctx.progress("robustness", total=len(samples)) as bar:
        run = rb.measure(members, chunks, rb.PixelSpace.from_spec(preprocess), settings,
                         advance=bar.advance)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    results = run.results
    gaps = [rb.gap(results[a], results[b], "int8 vs fp32") for a, b in _int8_twins(subjects)]
    if unpruned is not None and plan.primary in results:
        gaps.insert(0, rb.gap(results[plan.primary], results[unpruned.name], "pruned vs unpruned"))
    ctx.log(f"robustness: {len(run.sets)} sets x {len(members)} models on {run.n} samples in "
            f"{wall:.1f} s wall, {cpu:.1f} s CPU")
    drops = [(r.worst()["worst_drop_pp"], name, r.worst()["worst_drop_set"])
             for name, r in results.items() if r.reference is not None]
    drops = [d for d in drops if d[0] is not None]
    if drops:
        drop, name, key = max(drops)
        ctx.highlight(f"robustness: largest drop below the reference {drop:.1f} points "
                      f"({name} on {key}; non-torch artifacts replay the torch model's "
                      f"adversarial inputs: a transfer attack)")
    section = {
        "attack": "white-box on each torch model; every other artifact replays the inputs crafted "
                  "on the torch model it was made from (a transfer attack)",
        "settings": {**cfg.model_dump(mode="json"), "seed": ctx.seed, "threads": threads},
        "n": run.n, "table": run.table, "sets": run.sets,
        "timing": {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
                   "phases": {k: {kk: round(vv, 3) for kk, vv in v.items()}
                              for k, v in run.timing.items()}},
        "references": {unpruned.name: results[unpruned.name].as_dict()}
        if unpruned is not None and extra else {},
        "gaps": gaps}
    return {name: r.as_dict() for name, r in results.items()}, section
