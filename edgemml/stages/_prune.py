"""The prune stage's work: one PruneJob per run.

Setup (what is never pruned, the size before), then per step: the search for the ratio that reaches
the step's target (edgemml.pruning on torch-pruning), BatchNorm re-estimation, recovery; then the
latency of the input and the pruned model (the runtime layer's timer, interleaved), the saved model
(checked to reload bit-identically) and prune.json. Accuracy is top-1 on the val split, in percent.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgemml.errors import StageError
from edgemml.stages import common

if TYPE_CHECKING:
    from torch import nn

    from edgemml.stages.base import StageContext

# stages/prune.py imports this module, so its config is not imported back, not even for
# type checking (no import cycle): annotations name it through this alias.
PruneConfig = Any


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}%"


def _inside(name: str, frozen: dict[str, str]) -> bool:
    return any(name == f or name.startswith(f + ".") for f in frozen)


class PruneJob:
    """The state of one prune stage run."""

    def __init__(self, ctx: StageContext, config: PruneConfig) -> None:
        import torch

        from edgemml import pruning
        from edgemml.models import find_classifier
        from edgemml.prune_rules import rules_for
        from edgemml.training import seed_everything

        self.ctx, self.config = ctx, config
        seed_everything(ctx.seed)
        self.model, self.spec = common.load_input_model(ctx)
        self.splits = common.load_stage_data(ctx, config)
        self.pre = common.preprocess_config(config, ctx.pipeline)
        h, w = self.pre.size
        self.example = torch.zeros(1, self.spec.in_chans, h, w)
        self.metric, self.keep = config.target()
        self.model.eval()
        self.original = copy.deepcopy(self.model)
        self.head = find_classifier(self.model, self.spec.in_chans)
        self.frozen = self._kept_whole()
        ctx.log(f"classifier head {self.head} keeps its {self.spec.num_classes} outputs (its "
                f"inputs follow the last features)")
        self.channel_layers = [n for n in pruning.prunable_layers(self.model)
                               if n != self.head and not _inside(n, self.frozen)]
        self.layers_before = pruning.layer_table(self.model, self.example)
        self.size0 = pruning.measure(self.model, self.example, self.channel_layers)
        self.rules = rules_for(self.spec.arch, self.model)
        if self.rules.why:
            ctx.log(f"{self.rules.family} rules for torch-pruning: {self.rules.why}")
        self.settings = pruning.PruneSettings(
            importance=config.importance, global_pruning=config.global_pruning,
            round_to=config.round_to, head=self.head, frozen=set(self.frozen),
            min_keep=pruning.min_keep_channels(self.layers_before, config.max_layer_sparsity,
                                               config.round_to), rules=self.rules)
        self.graph_probe = self._guard()
        self.compute_grads = (_taylor_grads(self.splits.train, config, ctx.seed)
                              if config.importance == "taylor" else None)
        if len(self.splits.val) == 0:
            ctx.warn("the val split is empty: accuracies are not reported")
        self.top1_before = self.top1(self.model)
        self.teacher = self.original if (config.distill and config.recover is not None) else None
        self.steps: list[dict[str, Any]] = []
        #: a latency target's chosen candidate: the one-step search result, already measured
        self.preset: Any = None
        #: the latency target's section of prune.json (set by _prune_latency.LatencySearch)
        self.latency_target: Any = None

    def _kept_whole(self) -> dict[str, str]:
        """What is never pruned: the user's patterns and what cannot be recorded safely."""
        from edgemml import pruning

        frozen: dict[str, str] = {}
        for pattern, names in pruning.match_patterns(self.model, self.config.ignore).items():
            for n in names:
                frozen.setdefault(n, f"ignore: {pattern}")
        for n, reason in pruning.unsafe_modules(self.model).items():
            if n not in frozen:
                frozen[n] = reason
                self.ctx.warn(f"{n} is kept unpruned automatically: {reason}")
        return frozen

    def _guard(self) -> dict[str, Any]:
        """Build the dependency graph once in a child process, its memory and time watched
        (edgemml.prune_guard); stop cleanly when it would not fit."""
        from edgemml import prune_guard

        config, ctx = self.config, self.ctx
        budget = config.max_memory_mb or prune_guard.default_budget_mb()
        with ctx.progress("dependency graph (memory-guarded child process)", None):
            probe = prune_guard.probe(
                ctx.input()["model"], size=tuple(self.pre.size), ratio=config.max_layer_sparsity / 2,
                settings={"importance": config.importance, "round_to": config.round_to,
                          "head": self.head, "frozen": sorted(self.frozen)},
                budget_mb=budget, timeout_s=config.graph_timeout_s)
        arch = self.spec.arch or self.spec.python
        h, w = self.pre.size
        if probe.stopped == "memory":
            raise StageError(
                f"torch-pruning's dependency graph of {arch} at {h}x{w} exceeded the memory budget "
                f"of {budget:.0f} MB (peak measured {probe.peak_rss_mb:.0f} MB in a child process, "
                f"stopped before the machine ran out)", stage=ctx.name, key="max_memory_mb",
                hint="prune at a smaller preprocess size, add the attention/reshape-heavy blocks "
                "to `ignore:`, or raise prune.max_memory_mb if the machine has the memory")
        if probe.stopped == "time":
            raise StageError(
                f"torch-pruning's dependency graph of {arch} at {h}x{w} did not finish in "
                f"{config.graph_timeout_s:g} s (peak {probe.peak_rss_mb:.0f} MB)",
                stage=ctx.name, key="graph_timeout_s",
                hint="raise prune.graph_timeout_s on a busy machine, or add the reshape-heavy "
                "blocks to `ignore:`")
        if probe.error:
            ctx.log(f"dependency graph probe: {probe.error} (the search below reports it)")
        ctx.log(f"dependency graph: peak {probe.peak_rss_mb:.0f} MB of {budget:.0f} MB budget, "
                f"{probe.seconds:.1f} s (child process)")
        return probe.as_dict()

    def top1(self, m: nn.Module) -> float | None:
        from edgemml.training import evaluate

        if len(self.splits.val) == 0:
            return None
        return evaluate(m, self.splits.val, batch_size=256)["top1_pct"]

    # ---- one step ----------------------------------------------------------------------------

    def _search(self, k: int, step_target: float) -> Any:
        from edgemml import pruning

        config = self.config
        if self.preset is not None and config.steps == 1:
            return self.preset
        with self.ctx.progress(f"prune step {k}/{config.steps}: search",
                               config.max_iterations * 2) as bar:
            try:
                found = pruning.prune_to_target(
                    self.model, self.example, target=step_target, tolerance=config.tolerance,
                    metric=self.metric, reference=self.size0, channel_layers=self.channel_layers,
                    settings=self.settings, max_ratio=config.max_layer_sparsity,
                    iterations=config.max_iterations, compute_grads=self.compute_grads,
                    tick=lambda: bar.advance(1))
            except RuntimeError as exc:  # a pruned trial copy no longer runs
                raise StageError(
                    f"torch-pruning broke the model: {str(exc).splitlines()[0]}",
                    stage=self.ctx.name, key="ignore", hint="add the modules involved to "
                    "`ignore:` (their shapes are then kept whole)") from None
        if not found.within_tolerance:
            nothing = all(t.fraction >= 1.0 - 1e-9 for t in found.trials)
            raise StageError(
                f"step {k}: could not reach {self.metric} {step_target:.3f} +- "
                f"{config.tolerance} of the input model; closest was {found.fraction:.3f} after "
                f"{len(found.trials)} trials", stage=self.ctx.name, key="tolerance",
                hint=("no trial removed any channel: every channel ranks the same (e.g. "
                      "bn_scale on an untrained model) or `ignore:` freezes everything; try "
                      "importance: l2" if nothing else
                      "raise tolerance or max_iterations, use a smaller round_to or a larger "
                      "max_layer_sparsity, or ignore fewer modules"))
        return found

    def step(self, k: int) -> None:
        """Prune to this step's share of the target, re-estimate BatchNorm, recover."""
        from edgemml.training import recalibrate_bn, train

        ctx, config = self.ctx, self.config
        step_target = 1.0 - (1.0 - self.keep) * k / config.steps
        found = self._search(k, step_target)
        self.model = found.model
        self.model.zero_grad(set_to_none=True)
        _check_forward(self.model, self.example, self.spec.num_classes, ctx.name)
        raw = self.top1(self.model)
        bn_samples = recalibrate_bn(self.model, self.splits.train, batches=config.bn_batches,
                                    batch_size=config.bn_batch_size, seed=ctx.seed)
        row: dict[str, Any] = {
            "step": k, "target": step_target, "achieved": found.fraction,
            "ratio": found.ratio, "refine_global_ratio": found.refine_ratio,
            "macs": found.size.macs, "params": found.size.params,
            "channels": found.size.channels, "trials": [t.as_dict() for t in found.trials],
            "top1_pct_before_bn_reestimation": raw, "bn_reestimation_samples": bn_samples,
            "top1_pct_after_pruning": self.top1(self.model)}
        ctx.log(f"step {k}: {self.metric} {found.fraction:.3f} of the input (target "
                f"{step_target:.3f}), val accuracy {_pct(raw)} -> "
                f"{_pct(row['top1_pct_after_pruning'])} after BatchNorm re-estimation")
        if config.recover is not None and (config.recover_after == "each_step"
                                           or k == config.steps):
            result = train(self.model, self.splits.train, self.splits.val, config.recover,
                           seed=ctx.seed + k, teacher=self.teacher,
                           checkpoint_dir=ctx.work_dir / f"recover-{k}", progress=ctx.progress,
                           log=ctx.log, classes=self.splits.classes)
            self.model = result.model.cpu()
            self.original.cpu()
            row["recovery"] = {"epochs": len(result.history), "steps": result.steps,
                               "best_epoch": result.best_epoch, "seconds": result.seconds,
                               "history": result.history}
            row["top1_pct_after_recovery"] = self.top1(self.model)
        self.steps.append(row)

    # ---- the end -----------------------------------------------------------------------------

    def latency(self) -> dict[str, Any] | None:
        """Torch CPU latency of the input and the pruned model, interleaved in one run."""
        import torch

        from edgemml import runtimes

        lat = self.config.latency
        if lat is None:
            return None
        x = torch.zeros(lat.batch_size, *self.example.shape[1:]).numpy()
        torch_rt = runtimes.backend("torch")
        before = torch_rt.open_module(self.original, threads=lat.threads, name="before")
        after = torch_rt.open_module(self.model, threads=lat.threads, name="after")
        saved = torch.get_num_threads()
        try:
            with self.ctx.progress("latency", None):
                timed = runtimes.time_calls({"before": lambda: before(x),
                                             "after": lambda: after(x)},
                                            warmup=lat.warmup, runs=lat.repeats, rounds=5)
        finally:
            torch.set_num_threads(saved)  # the stages after this one train and convert at full speed
        out: dict[str, Any] = {k: t.as_dict() for k, t in timed.items()}
        out.update(speedup=timed["before"].median_ms / timed["after"].median_ms,
                   threads=lat.threads, batch_size=lat.batch_size)
        return out

    def finish(self) -> dict[str, Path]:
        from edgemml import pruning

        ctx, config = self.ctx, self.config
        self.model.eval()
        size0, size1 = self.size0, pruning.measure(self.model, self.example, self.channel_layers)
        latency = self.latency()
        search = self.latency_target.report() if self.latency_target is not None else None
        last = self.steps[-1]
        pruned = last["top1_pct_after_pruning"]
        final = last.get("top1_pct_after_recovery", pruned)
        achieved = size1.fraction_of(size0, self.metric)
        spec = self.spec.model_copy(deep=True)
        spec.extra["preprocess"] = self.pre.model_dump(mode="json")
        spec.extra["prune"] = {"metric": self.metric, "target": self.keep, "achieved": achieved,
                               "macs": size1.macs, "params": size1.params}
        if not spec.class_names:
            spec.class_names = list(self.splits.classes)
        out = common.save_model_output(ctx, self.model, spec)
        _check_reload(self.model, out, self.example, ctx.name)
        report = self._report(size1, latency, pruned, final)
        report["latency_target"] = search
        report_path = common.write_json(ctx, "prune.json", report)
        for k in range(1, config.steps + 1):
            shutil.rmtree(ctx.work_dir / f"recover-{k}", ignore_errors=True)
        ctx.highlight(f"{self.metric}: {achieved:.3f} of the input (target {self.keep:g} +- "
                      f"{config.tolerance:g}); MACs {size0.macs / 1e6:.1f}M -> "
                      f"{size1.macs / 1e6:.1f}M, params {size0.params / 1e6:.2f}M -> "
                      f"{size1.params / 1e6:.2f}M")
        ctx.highlight(f"val accuracy {_pct(self.top1_before)} -> {_pct(pruned)} pruned -> "
                      f"{_pct(final)} recovered")
        if search is not None and search["final"] is not None:
            f = search["final"]
            ctx.highlight(f"latency target {search['goal']['text']}: the recovered model takes "
                          f"{f['latency_ms']:.3f} ms as {search['artifact']} "
                          f"({f['speedup_over_torch']:.1f}x torch fp32; "
                          f"{'met' if f['meets_goal'] else 'MISSED'}) after "
                          f"{len(search['search']['probes'])} candidates")
        if latency is not None:
            ctx.highlight(f"torch CPU latency (batch {latency['batch_size']}, "
                          f"{latency['threads']} thread(s)): {latency['before']['median_ms']:.2f}"
                          f" -> {latency['after']['median_ms']:.2f} ms "
                          f"({latency['speedup']:.2f}x)")
        ctx.record(macs_before=size0.macs, macs_after=size1.macs, params_before=size0.params,
                   params_after=size1.params, metric=self.metric, target=self.keep,
                   achieved=achieved, top1_pct_before=self.top1_before,
                   top1_pct_after_pruning=pruned,
                   top1_pct_after_recovery=report["top1_pct"]["after_recovery"],
                   latency_before_ms=latency["before"]["median_ms"] if latency else None,
                   latency_after_ms=latency["after"]["median_ms"] if latency else None,
                   latency_speedup=latency["speedup"] if latency else None,
                   **_latency_metrics(search))
        return {"model": out, "report": report_path}

    def _report(self, size1: Any, latency: dict[str, Any] | None, pruned: float | None,
                final: float | None) -> dict[str, Any]:
        from edgemml import pruning

        config, size0 = self.config, self.size0
        layers_after = pruning.layer_table(self.model, self.example)
        return {
            "target": {"metric": self.metric, "keep": self.keep, "tolerance": config.tolerance},
            "achieved": {"macs": size1.macs / size0.macs, "params": size1.params / size0.params,
                         "channels": size1.channels / max(1, size0.channels)},
            "within_tolerance": abs(size1.fraction_of(size0, self.metric) - self.keep)
            <= config.tolerance,
            "macs": {"before": size0.macs, "after": size1.macs},
            "params": {"before": size0.params, "after": size1.params},
            "channels": {"before": size0.channels, "after": size1.channels},
            "top1_pct": {"split": "val", "n": len(self.splits.val), "before": self.top1_before,
                         "after_pruning": pruned,
                         "after_recovery": final if config.recover is not None else None},
            "latency_torch_cpu": latency,
            "settings": {"importance": config.importance, "global_pruning": config.global_pruning,
                         "round_to": config.round_to, "steps": config.steps,
                         "max_layer_sparsity": config.max_layer_sparsity,
                         "recover": config.recover is not None,
                         "distill": self.teacher is not None,
                         "architecture_rules": {"family": self.rules.family,
                                                "why": self.rules.why or None}},
            "head": self.head, "kept_whole": self.frozen,
            "dependency_graph": self.graph_probe,
            "layers": {n: {"type": b["type"], "in": [b["in"], layers_after[n]["in"]],
                           "out": [b["out"], layers_after[n]["out"]],
                           "macs": [b["macs"], layers_after[n]["macs"]],
                           "params": [b["params"], layers_after[n]["params"]],
                           "kept_whole": _inside(n, self.frozen) or None}
                       for n, b in self.layers_before.items()},
            "steps": self.steps,
        }


def _latency_metrics(search: dict[str, Any] | None) -> dict[str, Any]:
    if search is None or search["final"] is None:
        return {}
    f = search["final"]
    return {"latency_goal_ms": search["goal"]["ms"], "latency_target_ms": f["latency_ms"],
            "latency_target_met": f["meets_goal"],
            "latency_target_speedup_over_torch": f["speedup_over_torch"],
            "latency_target_probes": len(search["search"]["probes"])}


def _taylor_grads(train_set: Any, config: PruneConfig, seed: int) -> Any:
    """A function that fills `.grad` of a model with the loss gradient over a few train batches."""
    import torch
    import torch.nn.functional as F

    from edgemml.training import make_loader

    batch = config.recover.batch_size if config.recover is not None else 64

    def compute(model: nn.Module) -> None:
        model.eval()  # BatchNorm statistics stay as they are
        model.zero_grad(set_to_none=True)
        for i, (x, y) in enumerate(make_loader(train_set, batch, shuffle=True, seed=seed)):
            if i >= config.importance_batches:
                break
            F.cross_entropy(model(x), torch.as_tensor(y)).backward()
    return compute


def _check_forward(model: nn.Module, example: Any, num_classes: int, stage: str) -> None:
    import torch

    from edgemml.prune_rules import aux_forward, has_aux_heads

    try:
        with torch.no_grad():
            out = model.eval()(example)
            if has_aux_heads(model):  # recovery trains in training mode, aux heads included
                aux_forward(model, torch.cat([example, example]))
    except RuntimeError as exc:
        raise StageError(f"the pruned model no longer runs: {str(exc).splitlines()[0]}",
                         stage=stage, key="ignore", hint="torch-pruning could not follow a "
                         "dependency in this architecture; add the modules named above to "
                         "`ignore:`") from None
    if tuple(out.shape) != (example.shape[0], num_classes):
        raise StageError(f"the pruned model outputs shape {tuple(out.shape)}, expected "
                         f"{(example.shape[0], num_classes)}", stage=stage, key="ignore",
                         hint="add the output layer to `ignore:`")


def _check_reload(model: nn.Module, folder: Path, example: Any, stage: str) -> None:
    """The saved model must rebuild into the same module: same outputs bit for bit."""
    import torch

    from edgemml.models.serialize import reloads_identically

    x = torch.randn(2, *example.shape[1:], generator=torch.Generator().manual_seed(0))
    if not reloads_identically(model, folder, x):
        raise StageError("the saved pruned model does not reload to identical outputs",
                         stage=stage, hint="this is a bug in edgemml; please report it")
