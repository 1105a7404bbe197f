"""A torch model as a LiteRT (TFLite) flatbuffer (.tflite), fp32 or int8, with litert-torch.

fp32:  litert_torch.convert(model, (example,)).export(path)
int8:  torch.export (dynamic batch) -> litert's PT2EQuantizer (symmetric int8, per-channel weights,
       HistogramObserver activations) -> torchao prepare_pt2e -> calibrate ->
       convert_pt2e(fold_quantize=False) -> litert_torch.convert(gm, (example,),
       quant_config=QuantConfig(pt2e_quantizer=q)).

What comes out: inputs stay NCHW (litert-torch inserts the transposes itself), the input shape is
static (the example's; resize_tensor_input fails in the XNNPACK delegate), and a fully quantized
model has int8 input and int8 output tensors whose scale / zero point the interpreter reports (the
runtime layer feeds and reads them through those). ai-edge-quantizer's static_wi8_ai8 recipe was much
less accurate on mobilenet_v3_small (max |delta| 48 % of the largest logit), so it is not used.

Keeping named modules in float (the accuracy budget) needs two workarounds on litert-torch 0.10.0:
- PT2EQuantizer.set_module_name(name, None) silently matches nothing on torch 2.14 graphs (its filter
  strips "L__self___" from nn_module_stack keys that now read "L__self__layer1.0.conv1"): a subclass
  annotates with our own filter on the stack's values (edgemml.quantization.pt2e.in_modules);
- the converter then still quantizes any conv / linear that sits between a dequantize and a quantize
  node, float weights included, unless its `strict_qdq_mode` is on, which litert-torch never sets:
  `strict_qdq` switches it on for the call. Strict mode also keeps float32 model I/O, so it is used
  only when modules are kept in float, and the written file is checked to hold as many float conv /
  linear ops as the quantized graph has float layers.
The file is run once with the LiteRT interpreter (edgemml.runtimes.litert) before it gets its name.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from edgemml.exporters.embedded import (ConversionError, ExportResult, check_example,
                                        conversion_error, first_line, is_export_error, quiet,
                                        restore_mode, write_checked)
from edgemml.quantization.pt2e import (Captured, NodeFilter, capture, check_calibration,
                                       check_module_names, float_filter, quantize_captured,
                                       weighted_layers)

TARGET = "litert"
SUFFIX = ".tflite"


def litert_quantizer(node_filter: NodeFilter | None = None, *, per_channel: bool = True) -> Any:
    """LiteRT's static int8 PT2E quantizer; nodes for which node_filter is False stay fp32."""
    from litert_torch.quantize.pt2e_quantizer import (PT2EQuantizer,
                                                      get_symmetric_quantization_config)

    keep = node_filter or (lambda n: True)

    class _Quantizer(PT2EQuantizer):  # type: ignore[misc]
        """PT2EQuantizer whose only change is a node filter that works on torch 2.14 graphs."""

        def _annotate_for_static_quantization_config(self, model: Any) -> Any:
            self._annotate_all_static_patterns(model, self.global_config, keep)
            return model

    return _Quantizer().set_global(get_symmetric_quantization_config(is_per_channel=per_channel))


@contextlib.contextmanager
def _no_progress() -> Iterator[None]:
    """litert-torch prints a progress tree unless LITERT_TORCH_SHOW_PROGRESS=n."""
    before = os.environ.get("LITERT_TORCH_SHOW_PROGRESS")
    os.environ["LITERT_TORCH_SHOW_PROGRESS"] = "n"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("LITERT_TORCH_SHOW_PROGRESS", None)
        else:
            os.environ["LITERT_TORCH_SHOW_PROGRESS"] = before


def export_tflite(model: Any, example: Any, path: str | Path, *, int8: bool,
                  calibration: np.ndarray | None = None, float_modules: Sequence[str] = (),
                  per_channel: bool = True, captured: Captured | None = None,
                  quiet_logs: bool = True) -> ExportResult:
    """Write `model` as a .tflite at `path` (atomically) and describe it.

    Arguments as edgemml.exporters.executorch.export_pte. Raises ConversionError naming the phase,
    op and module on any failure; `path` is then untouched."""
    path = Path(path)
    t0 = time.perf_counter()
    check_example(example, TARGET)
    cal = check_calibration(calibration, example, TARGET) if int8 else None
    names = check_module_names(model, float_modules, TARGET) if int8 else []
    undo = restore_mode(model)
    phase, used, layers, module, failure = "export", 0, {}, model, None
    try:
        with quiet(quiet_logs) as log, _no_progress():
            try:
                import litert_torch
                from litert_torch.quantize.quant_config import QuantConfig

                kwargs: dict[str, Any] = {}
                if int8:
                    captured = captured or capture(model, example, TARGET)
                    phase = "quantize"
                    q = litert_quantizer(float_filter(names), per_channel=per_channel)
                    module, used = quantize_captured(captured, q, cal,  # type: ignore[arg-type]
                                                     fold_quantize=False)
                    layers = weighted_layers(module)
                    kwargs["quant_config"] = QuantConfig(pt2e_quantizer=q)
                phase = "lower"
                with strict_qdq(enabled=bool(names)):
                    edge = litert_torch.convert(module, (example,), **kwargs)
                phase = "serialize"
                io = write_checked(path, TARGET,
                                   lambda tmp: _write_and_check(edge, tmp, example, layers))
            except ConversionError:
                raise
            except Exception as exc:  # noqa: BLE001 - every converter failure becomes one line
                # litert_torch.convert runs torch.export itself: name that phase as such
                phase = "export" if phase == "lower" and is_export_error(exc) else phase
                failure = exc
        if failure is not None:
            raise conversion_error(TARGET, phase, failure, _graph_for_errors(module, example),
                                   model, log.getvalue()) from failure
    finally:
        undo()
    return ExportResult.written(path, TARGET, int8=int8, example=example, started=t0,
                                calibration_samples=used, float_modules=list(names),
                                layers=layers, io=io)


@contextlib.contextmanager
def strict_qdq(enabled: bool) -> Iterator[None]:
    """Convert with the LiteRT converter's strict_qdq_mode, which litert-torch 0.10.0 leaves off
    (see the module docstring). litert-torch builds the config inside the call, so the switch is a
    scoped replacement of its ConvertToTFLConfig factory."""
    if not enabled:
        yield
        return
    from litert_torch._convert import litert_converter

    api = litert_converter.converter_api_ext
    original = api.ConvertToTFLConfig
    if not hasattr(original(), "strict_qdq_mode"):
        raise ConversionError(TARGET, "lower", "this litert-torch version has no strict_qdq_mode, "
                              "so it cannot keep modules in float",
                              fix="install litert-torch 0.10 (pip install 'edgemml[litert]')")

    def strict_config() -> Any:
        config = original()
        config.strict_qdq_mode = True
        return config

    api.ConvertToTFLConfig = strict_config
    try:
        yield
    finally:
        api.ConvertToTFLConfig = original


def _check_float_layers(path: Path, layers: dict[str, str]) -> None:
    """The file has as many float conv / linear ops as the quantized graph has float layers
    (catches a converter that quantizes what the quantizer left in float)."""
    from edgemml import runtimes

    want = sum(1 for v in layers.values() if v == "float")
    if not want:
        return
    info = runtimes.backend(TARGET).read_tflite(path)
    got = sum(1 for _, w, _ in info.weighted if w in ("FLOAT32", "FLOAT16"))
    if got < want:
        raise ConversionError(TARGET, "lower", f"the converter quantized {want - got} of the "
                              f"{want} layer(s) kept in float",
                              fix="keep fewer modules in float")


def _graph_for_errors(module: Any, example: Any) -> Any:
    """The exported graph (for naming the module of a failing op), or None if it does not export."""
    try:
        import torch

        return torch.export.export(module, (example,)).graph_module
    except Exception:  # noqa: BLE001 - the error message then names what it can on its own
        return None


def _write_and_check(edge: Any, tmp: Path, example: Any, layers: dict[str, str]) -> dict[str, Any]:
    """Write the flatbuffer, check its float layers, run it once with the LiteRT interpreter, and
    return its I/O description."""
    from edgemml import runtimes
    from edgemml.errors import InputError

    edge.export(str(tmp))
    _check_float_layers(tmp, layers)
    try:
        runner = runtimes.backend(TARGET).open(tmp, threads=1)
        out = runner(example.numpy())
    except (InputError, RuntimeError, ValueError) as exc:
        raise ConversionError(TARGET, "load", f"the LiteRT interpreter cannot run the model: "
                              f"{first_line(exc)}") from exc
    if not np.isfinite(out).all():
        raise ConversionError(TARGET, "load", "the model gives a non-finite output")
    return runner.io
