"""A torch model as an ExecuTorch program (.pte) lowered to XNNPACK, fp32 or int8.

fp32:  torch.export -> to_edge_transform_and_lower(partitioner=[XnnpackPartitioner()]) -> .pte
int8:  torch.export (dynamic batch) -> XNNPACKQuantizer (symmetric, per-channel weights by default)
       -> torchao prepare_pt2e -> calibrate -> convert_pt2e -> torch.export (static batch) -> lower.

The written program keeps float inputs and outputs (quantize/dequantize run inside the XNNPACK
delegate) and a static input shape: the example's. Named modules can stay in float (the accuracy
budget): XNNPACKQuantizer.set_module_name(name, None) asserts in executorch 1.5.1 ("quantization_config
== None is not supported yet"), so they are left out with set_filter_function. Before the file gets
its real name it is loaded and run once with the ExecuTorch runtime (edgemml.runtimes.executorch),
so a program that needs a kernel the runtime lacks fails here, not in validate.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgemml.exporters.embedded import (ConversionError, ExportResult, check_example,
                                        conversion_error, first_line, quiet, restore_mode,
                                        write_checked)
from edgemml.quantization.pt2e import (Captured, NodeFilter, capture, check_calibration,
                                       check_module_names, float_filter, quantize_captured,
                                       weighted_layers)

TARGET = "executorch"
SUFFIX = ".pte"


def xnnpack_quantizer(node_filter: NodeFilter | None = None, *, per_channel: bool = True) -> Any:
    """XNNPACK's static int8 quantizer; nodes for which node_filter is False stay fp32."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer, get_symmetric_quantization_config)

    q = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=per_channel))
    if node_filter is not None:
        q.set_filter_function(node_filter)
    return q


def export_pte(model: Any, example: Any, path: str | Path, *, int8: bool,
               calibration: np.ndarray | None = None, float_modules: Sequence[str] = (),
               per_channel: bool = True, captured: Captured | None = None,
               quiet_logs: bool = True) -> ExportResult:
    """Write `model` as an XNNPACK-lowered .pte at `path` (atomically) and describe it.

    `example`: a float32 tensor in the layout the model takes; its shape (batch included) is the
    program's static input shape. `calibration`: float32 samples [N, *example.shape[1:]] (int8 only).
    `float_modules`: module paths (as model.named_modules() names them) kept in fp32. `captured`:
    a graph from edgemml.quantization.pt2e.capture, reused across calls of a budget search.
    Raises ConversionError naming the phase, op and module on any failure; `path` is then untouched.
    """
    path = Path(path)
    t0 = time.perf_counter()
    check_example(example, TARGET)
    cal = check_calibration(calibration, example, TARGET) if int8 else None
    names = check_module_names(model, float_modules, TARGET) if int8 else []
    undo = restore_mode(model)
    phase, graph, used, layers, failure, log_text = "export", None, 0, {}, None, ""
    try:
        with quiet(quiet_logs) as log:
            try:
                module = model
                if int8:
                    captured = captured or capture(model, example, TARGET)
                    graph, phase = captured.graph, "quantize"
                    module, used = quantize_captured(
                        captured, xnnpack_quantizer(float_filter(names), per_channel=per_channel),
                        cal, fold_quantize=True)  # type: ignore[arg-type]
                    layers = weighted_layers(module)
                phase = "export"
                ep = _export(module, example)
                graph, phase = ep.graph_module, "lower"
                program = _lower(ep)
                not_delegated = sorted({op.name for plan in
                                        program.executorch_program.execution_plan
                                        for op in plan.operators})
                phase = "serialize"
                io = write_checked(path, TARGET, lambda tmp: _write_and_check(program, tmp,
                                                                              example))
            except ConversionError:
                raise
            except Exception as exc:  # noqa: BLE001 - every converter failure becomes one line
                failure = exc
        log_text = log.getvalue()
        if failure is not None:
            raise conversion_error(TARGET, phase, failure, graph, model, log_text) from failure
    finally:
        undo()
    return ExportResult.written(path, TARGET, int8=int8, example=example, started=t0,
                                calibration_samples=used, float_modules=list(names),
                                layers=layers, io=io,
                                not_delegated=not_delegated)


def _export(module: Any, example: Any) -> Any:
    import torch

    return torch.export.export(module, (example,))


def _lower(ep: Any) -> Any:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    return to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch()


def _write_and_check(program: Any, tmp: Path, example: Any) -> dict[str, Any]:
    """Write the program, run it once from the written file with the ExecuTorch runtime, and return
    its I/O description."""
    from edgemml import runtimes
    from edgemml.errors import InputError

    with open(tmp, "wb") as f:
        program.write_to_file(f)
    try:
        runner = runtimes.backend(TARGET).open(tmp, threads=None)
        out = runner(example.numpy())
    except (InputError, RuntimeError, ValueError) as exc:
        raise ConversionError(TARGET, "load", f"the ExecuTorch runtime cannot run the program: "
                              f"{first_line(exc)}") from exc
    if not np.isfinite(out).all():
        raise ConversionError(TARGET, "load", "the program gives a non-finite output")
    return runner.io
