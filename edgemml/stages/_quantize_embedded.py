"""The quantize stage's ExecuTorch (.pte) and LiteRT (.tflite) int8 path (see stages/quantize.py for
why quantize, not export, owns these files).

Both targets use PT2E (edgemml.quantization.pt2e): calibrated on the stage's calibration samples,
measured on its validation split against the same fp32 reference as ONNX Runtime and OpenVINO, and
kept within `max_accuracy_drop` by leaving the most sensitive modules in float. A conversion that
fails is a StageError naming the op and module and how to turn the target off; the libraries'
captured output is written beside it (`<target>-conversion.log`). Pydantic-only at import: the
config classes are read when a pipeline file is validated.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pydantic import Field

from edgemml.config import StrictModel
from edgemml.errors import StageError

if TYPE_CHECKING:
    from edgemml.stages.base import StageContext

#: the PT2E targets, by runtime backend name (= artifact format, = pip extra)
EMBEDDED = ("executorch", "litert")


class Pt2eOptions(StrictModel):
    """PT2E int8 (static, symmetric int8 activations and weights) for one embedded target."""

    per_channel: bool = Field(True, description="One weight scale per output channel.")
    float_modules: list[str] = Field(
        default_factory=list, description="Modules always kept in float (paths as "
        "model.named_modules() gives them, e.g. fc or layer4.1.conv2); the accuracy budget may "
        "keep more.")


def check_extras(targets: list[str], how_off: str) -> None:
    """ValueError (a config error at `edgemml check`) naming the pip command when a target's
    libraries are not installed."""
    from edgemml import runtimes

    for target in targets:
        hint = runtimes.missing(target, export=True)
        if hint:
            raise ValueError(f"{target} needs its libraries, which are not installed: run "
                             f"`{hint}` (or {how_off})")


def exporter(target: str) -> Any:
    """edgemml.exporters.<target> (export_pte / export_tflite behind one name)."""
    import importlib

    return importlib.import_module(f"edgemml.exporters.{target}")


def export_fn(target: str) -> Callable[..., Any]:
    module = exporter(target)
    return module.export_pte if target == "executorch" else module.export_tflite


def conversion_failed(ctx: StageContext, exc: Any, how_off: str, key: str) -> StageError:
    """The StageError of a ConversionError: its one line, how to turn the target off in this
    stage, and where the libraries' output went."""
    hint = how_off + (f", or {exc.fix}" if exc.fix else "")
    if exc.log.strip():
        log = ctx.path(f"{exc.target}-conversion.log")
        log.write_text(exc.log, encoding="utf-8")
        hint += f" (library output: {log})"
    return StageError(exc.message, key=key, hint=hint)


def quantize_embedded(ctx: StageContext, config: Any, target: str, model: Any, a: Any,
                      report: dict[str, Any], check_budget: Callable[..., None]) -> Path:
    """The int8 file of one target within the budget; its figures go into report[target]."""
    import numpy as np
    import torch

    from edgemml import runtimes
    from edgemml.evaluation import io_note
    from edgemml.exporters.embedded import ConversionError
    from edgemml.quantization.pt2e import BudgetArgs, capture, quantize_within_budget

    opts = getattr(config, target)
    module = exporter(target)
    export = export_fn(target)
    out = ctx.work_dir / f"model.int8{module.SUFFIX}"
    example = torch.from_numpy(np.ascontiguousarray(a.calib[:1]))
    t0 = time.perf_counter()
    budget = BudgetArgs(a.val_x, a.val_y, a.ref, a.fp32_pct, config.budget(),
                        config.max_float_layers, config.sensitivity_samples)

    def write(names: list[str]) -> Any:
        return export(model, example, out, int8=True, calibration=a.calib,
                      float_modules=[*opts.float_modules, *names], per_channel=opts.per_channel,
                      captured=captured)

    def file_logits(path: Path) -> Any:
        return runtimes.predict(runtimes.backend(target).open(path, threads=None), a.val_x)

    ctx.log(f"{target}: PT2E int8, symmetric, {'per-channel' if opts.per_channel else 'per-tensor'}"
            f" weights, {len(a.calib)} calibration samples")
    try:
        captured = capture(model, example, target)
        res, result = quantize_within_budget(
            target=target, captured=captured, calibration=a.calib,
            make_quantizer=_quantizer_factory(target, opts), fold_quantize=target == "executorch",
            write=write, file_logits=file_logits, args=budget, log=ctx.log,
            progress=ctx.progress)
    except ConversionError as exc:
        raise conversion_failed(ctx, exc, f"remove {target} from this quantize stage's backends",
                                "backends") from exc
    params = sum(int(p.numel()) for p in model.parameters())
    res.float_layers = [*opts.float_modules, *res.float_layers]
    entry = report[target] = {
        **res.as_dict(), "file": out.name, "seconds": round(time.perf_counter() - t0, 2),
        "per_channel": opts.per_channel, "calibration_samples": result.calibration_samples,
        "stored_precision": result.stored_precision, "input_shape": result.input_shape,
        "layers": result.layers, "io": result.io, "io_note": io_note(result.io) or "float32 input and output",
        "not_delegated": result.not_delegated,
        "size": {"fp32_bytes": 4 * params, "fp32_bytes_means": "4 bytes per parameter",
                 "int8_bytes": result.size_bytes,
                 "ratio": round(4 * params / max(1, result.size_bytes), 3)}}
    check_budget(ctx, config, report, target, res)
    ctx.log(f"{target}-int8: {out.name}, {entry['io_note']}"
            + (f"; outside XNNPACK: {', '.join(result.not_delegated)}"
               if result.not_delegated else ""))
    return out


def _quantizer_factory(target: str, opts: Pt2eOptions) -> Callable[[Any], Any]:
    """node filter -> the target's quantizer, with the always-float modules left out as well."""
    from edgemml.quantization.pt2e import in_modules

    module = exporter(target)
    make = module.xnnpack_quantizer if target == "executorch" else module.litert_quantizer
    always = tuple(opts.float_modules)

    def factory(node_filter: Any) -> Any:
        if not always:
            return make(node_filter, per_channel=opts.per_channel)
        return make(lambda n: (node_filter is None or node_filter(n))
                    and not in_modules(n, always), per_channel=opts.per_channel)

    return factory
