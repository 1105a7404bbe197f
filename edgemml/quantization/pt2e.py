"""PT2E int8 (torch.export -> torchao prepare_pt2e -> calibrate -> convert_pt2e), shared by the
ExecuTorch and LiteRT exporters, and its accuracy budget: the fewest named modules kept in float.

Why one module for both targets: they quantize the same way and differ only in the quantizer
(XNNPACKQuantizer vs LiteRT's PT2EQuantizer), so calibration, the float-module filter and the
budget search are written once. The exporters pass a quantizer factory
`make_quantizer(node_filter)`: nodes for which `node_filter(node)` is False are not annotated, so
they stay fp32.

The budget search mirrors the ONNX Runtime path (edgemml.quantization.ort): quantize everything,
measure the written file on the validation split; if the top-1 drop exceeds the budget, rank the
quantized conv / linear modules by the output error when ONLY that module is quantized, and keep the
k most sensitive in float for the smallest k that meets it. Ranking and trials run the converted
PT2E graph in torch (the reference arithmetic both runtimes implement; one conversion to a file costs
far more than a calibration pass); a k whose simulated drop meets the budget is then written and the
FILE is measured with its own runtime, and only the file's figure decides.

Pitfalls handled here (torch 2.14.1, torchao 0.18.0):
- `torch.ao.quantization.quantize_pt2e` is gone in torch 2.14: torchao.quantization.pt2e is the API.
- A module exported at batch 1 asserts on any other batch ("Guard failed: x.size()[0] == 1"), so the
  calibration graph is exported with a dynamic batch (falling back to the example's static batch).
- Module names are read from the VALUES of a node's nn_module_stack (module paths): torch 2.14's
  keys ("L__self__layer1.0.conv1") no longer match what litert's set_module_name expects.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edgemml.exporters.embedded import ConversionError, innermost_module, module_paths
from edgemml.quantization.budget import Budget, Searched, noop_progress, score

#: ops whose weights decide whether a layer is int8 (conv and linear in aten / edge form)
WEIGHTED_OPS = ("conv1d", "conv2d", "conv3d", "convolution", "linear", "conv_transpose2d")

NodeFilter = Callable[[Any], bool]


def in_modules(node: Any, names: Sequence[str]) -> bool:
    """Is the node inside one of the named modules (the module itself or anything below it)?"""
    return any(p == n or p.startswith(n + ".") for p in module_paths(node) for n in names)


def is_weighted(node: Any) -> bool:
    return node.op == "call_function" and any(k in str(node.target) for k in WEIGHTED_OPS)


def float_nodes(graph: Any, names: Sequence[str]) -> set[Any]:
    """The nodes of the named modules, plus every unweighted node (BatchNorm, activation, pooling,
    reshape...) fed only by float nodes or feeding only float nodes, to a fixpoint.

    Why both directions: keeping a layer in float must keep the activations around it in float.
    Forward, a float conv's output must not be re-quantized by the pooling after it; backward, the
    pooled features a float classifier reads must not be quantized by the ops before it — with a
    per-tensor range stretched by one outlier channel, that rounding alone loses the accuracy the
    float layer was meant to save. Float-ness stops at quantized convs / linears, whose own input
    and output are quantized as usual."""
    calls = [n for n in graph.nodes if n.op == "call_function"]
    out = {n for n in calls if in_modules(n, names)}
    changed = bool(out)
    while changed:
        changed = False
        for n in calls:
            if n in out or is_weighted(n):
                continue
            feeds = [a for a in n.all_input_nodes if a.op == "call_function"]
            users = [u for u in n.users if u.op == "call_function"]
            if (feeds and all(a in out for a in feeds)) or (users and all(u in out for u in users)):
                out.add(n)
                changed = True
    return out


def float_filter(names: Sequence[str]) -> NodeFilter | None:
    """A node filter that leaves the named modules, and what only they feed, unannotated (fp32);
    None when none is named. The float set is computed once per graph, on first use."""
    names = tuple(names)
    if not names:
        return None
    cache: dict[int, set[Any]] = {}

    def keep_quantized(n: Any) -> bool:
        graph = n.graph
        if id(graph) not in cache:
            cache[id(graph)] = float_nodes(graph, names)
        return n not in cache[id(graph)]

    return keep_quantized


def check_module_names(model: Any, names: Sequence[str], target: str) -> list[str]:
    """The float-module names, checked against the model: a typo must not silently quantize."""
    known = {n for n, _ in model.named_modules() if n}
    names = [str(n) for n in names]
    unknown = [n for n in names if n not in known]
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
        raise ConversionError(target, "quantize", f"no module named '{unknown[0]}' in the model"
                              + (f" (did you mean '{close[0]}'?)" if close else ""),
                              fix="name modules as model.named_modules() does, e.g. "
                                  "'layer4.1.conv2' or 'fc'")
    return names


def weighted_layers(gm: Any) -> dict[str, str]:
    """{module path: "int8" | "float"} for every conv / linear call of a converted PT2E graph: int8
    when its weight comes through a dequantize node."""
    out: dict[str, str] = {}
    for n in gm.graph.nodes:
        if not is_weighted(n):
            continue
        if len(n.args) < 2 or not hasattr(n.args[1], "op"):
            continue
        w = n.args[1]
        quant = w.op == "call_function" and "dequantize" in str(w.target)
        out[innermost_module(n) or n.name] = "int8" if quant else "float"
    return out


def check_calibration(calibration: np.ndarray | None, example: Any, target: str) -> np.ndarray:
    if calibration is None or len(calibration) == 0:
        raise ConversionError(target, "quantize", "int8 needs calibration samples (none given)",
                              fix="give the calibration samples the other int8 backends use")
    cal = np.asarray(calibration, dtype=np.float32)
    if cal.shape[1:] != tuple(example.shape[1:]):
        raise ConversionError(target, "quantize", f"calibration samples have shape "
                              f"{list(cal.shape[1:])}, the model takes {list(example.shape[1:])}")
    if not np.isfinite(cal).all():
        raise ConversionError(target, "quantize", "calibration samples contain NaN or inf")
    return cal


@dataclass
class Captured:
    """The model as a torch.export GraphModule for calibration; `static_batch` is None when the
    graph takes any batch."""

    graph: Any
    static_batch: int | None


def capture(model: Any, example: Any, target: str) -> Captured:
    """torch.export of the model with a dynamic batch (calibration in batches), as a GraphModule;
    with the example's static batch when the model does not export with a dynamic one. A model
    torch.export cannot capture at all is a ConversionError naming the module and the line."""
    import torch

    from edgemml.exporters.embedded import conversion_error, quiet

    two = torch.cat([example[:1], example[:1]])
    was = model.training
    model.eval()
    try:
        with quiet() as log:
            try:
                batch = torch.export.Dim("batch", min=1, max=4096)
                return Captured(torch.export.export(model, (two,),
                                                    dynamic_shapes=({0: batch},)).module(), None)
            except Exception:  # noqa: BLE001 - a model that needs a static batch is fine
                pass
            try:
                return Captured(torch.export.export(model, (example,)).module(),
                                int(example.shape[0]))
            except Exception as exc:  # noqa: BLE001 - every export failure becomes one line
                failure = exc
        raise conversion_error(target, "export", failure, None, model, log.getvalue()) \
            from failure
    finally:
        model.train(was)


def calibrate(prepared: Any, calibration: np.ndarray, static_batch: int | None,
              batch_size: int = 16) -> int:
    """Feed the calibration samples through the observed graph; returns how many were used. With a
    static batch the last partial chunk is filled by repeating its samples (observers see real
    values only)."""
    import torch

    step = static_batch or batch_size
    cal = np.ascontiguousarray(calibration, dtype=np.float32)
    with torch.no_grad():
        for i in range(0, len(cal), step):
            chunk = cal[i:i + step]
            if static_batch and len(chunk) < step:
                chunk = np.resize(chunk, (step, *chunk.shape[1:])).astype(np.float32)
            prepared(torch.from_numpy(chunk))
    return int(len(cal))


def quantize_captured(captured: Captured, quantizer: Any, calibration: np.ndarray, *,
                      fold_quantize: bool) -> tuple[Any, int]:
    """prepare -> calibrate -> convert of a copy of a captured graph (the captured graph stays
    usable for the next trial); the converted GraphModule in eval mode and the samples used."""
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    prepared = prepare_pt2e(copy.deepcopy(captured.graph), quantizer)
    move_exported_model_to_eval(prepared)
    used = calibrate(prepared, calibration, captured.static_batch)
    converted = convert_pt2e(prepared, fold_quantize=fold_quantize)
    move_exported_model_to_eval(converted)
    return converted, used


def graph_logits(gm: Any, x: np.ndarray, static_batch: int | None,
                 batch_size: int = 64) -> np.ndarray:
    """Outputs of a (converted) GraphModule on x, in torch: the budget search's simulation."""
    import torch

    step = static_batch or batch_size
    outs = []
    with torch.no_grad():
        for i in range(0, len(x), step):
            chunk = np.ascontiguousarray(x[i:i + step], dtype=np.float32)
            n = len(chunk)
            if static_batch and n < step:
                chunk = np.resize(chunk, (step, *chunk.shape[1:])).astype(np.float32)
            outs.append(gm(torch.from_numpy(chunk)).float().numpy()[:n])
    return np.concatenate(outs)


@dataclass
class BudgetArgs:
    """What a budget search measures against: the validation split, the fp32 reference outputs and
    accuracy, and the limits."""

    val_x: np.ndarray
    val_y: np.ndarray
    ref: np.ndarray
    fp32_pct: float | None
    budget: Budget
    max_float_layers: int | None
    sensitivity_samples: int


def quantize_within_budget(
        *, target: str, captured: Captured, calibration: np.ndarray,
        make_quantizer: Callable[[NodeFilter | None], Any], fold_quantize: bool,
        write: Callable[[list[str]], Any], file_logits: Callable[[Path], np.ndarray],
        args: BudgetArgs, log: Callable[[str], None] = print,
        progress: Any = noop_progress) -> tuple[Searched, Any]:
    """Write the int8 file with everything quantized (`write([])` -> an ExportResult); when its
    top-1 drop on the validation split exceeds the budget, keep the fewest most sensitive modules
    in float that meet it (see the module docstring). Returns the search and the last ExportResult
    written; `searched.met` is False when no allowed number of float modules meets the budget."""
    from edgemml.data.datasets import evenly_spaced

    res = write([])
    plain = score(file_logits(res.path), args.val_y, args.ref, args.fp32_pct)
    candidates = [m for m, kind in res.layers.items() if kind == "int8"]
    searched = Searched(plain, plain, quantized_layers=len(candidates))
    if not args.budget.active or args.budget.meets(plain):
        return searched, res
    log(f"{target} int8 misses the budget ({args.budget.miss(plain)}): ranking "
        f"{len(candidates)} layers by sensitivity")
    sel = evenly_spaced(len(args.val_x), args.sensitivity_samples)
    x, ref = args.val_x[sel], args.ref[sel].astype(np.float64)
    denom = float(np.mean(ref ** 2)) or 1e-12
    scores: dict[str, float] = {}
    with progress(f"layer sensitivity ({target})", len(candidates)) as bar:
        for name in candidates:
            only = (lambda n, name=name: in_modules(n, (name,)))
            gm, _ = quantize_captured(captured, make_quantizer(only), calibration,
                                      fold_quantize=fold_quantize)
            out = graph_logits(gm, x, captured.static_batch).astype(np.float64)
            scores[name] = float(np.mean((out - ref) ** 2)) / denom
            bar.advance()
    ranked = sorted(candidates, key=lambda n: -scores[n])
    cap = min(args.max_float_layers or len(ranked), len(ranked))
    trials: list[dict[str, Any]] = []
    final, met, kept = plain, False, []
    with progress(f"keeping layers in float ({target})", cap) as bar:
        for k in range(1, cap + 1):
            kept = ranked[:k]
            gm, _ = quantize_captured(captured, make_quantizer(float_filter(kept)), calibration,
                                      fold_quantize=fold_quantize)
            sim = score(graph_logits(gm, args.val_x, captured.static_batch), args.val_y,
                        args.ref, args.fp32_pct)
            trial: dict[str, Any] = {"float_layers": k, "simulated_top1_pct": sim.top1_pct,
                                     "simulated_accuracy_drop_pp": sim.drop_pp,
                                     "simulated_agreement": sim.agreement}
            if args.budget.meets(sim):
                res = write(kept)  # only the written file's figure decides
                final = score(file_logits(res.path), args.val_y, args.ref, args.fp32_pct)
                trial.update(top1_pct=final.top1_pct, accuracy_drop_pp=final.drop_pp,
                             agreement=final.agreement)
                met = args.budget.meets(final)
            trials.append(trial)
            bar.advance()
            if met:
                break
    if not met and trials and "top1_pct" not in trials[-1]:
        res = write(kept)  # the file on disk is the one with the most float layers tried
        final = score(file_logits(res.path), args.val_y, args.ref, args.fp32_pct)
        trials[-1].update(top1_pct=final.top1_pct, accuracy_drop_pp=final.drop_pp,
                          agreement=final.agreement)
    searched.final, searched.float_layers = final, list(kept)
    searched.search = {**args.budget.as_dict(), "max_float_layers": cap, "met": met,
                       "method": "sensitivity ranking on the converted PT2E graph; each candidate "
                                 "file measured with its runtime",
                       "sensitivity": {n: round(scores[n], 8) for n in ranked},
                       "sensitivity_samples": int(len(sel)), "trials": trials}
    return searched, res
