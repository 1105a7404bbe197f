"""torch -> ONNX with the checks torch's exporter leaves out.

Measured with torch 2.14: `torch.onnx.export(dynamo=True, opset_version=17)` writes opset 18 (its
down-conversion fails and only logs), and puts the weights in a side `.onnx.data` file unless
`external_data=False`. So after every export this module reads the file back and compares the opset
written with the opset asked for: `exporter: auto` then falls back to the TorchScript exporter (which
honours the opset) and says why; `exporter: dynamo` fails. A result that silently differs from the
request is never returned.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch import nn

from edgemml.errors import ConfigError, StageError

Exporter = Literal["auto", "dynamo", "torchscript"]
#: protobuf's hard limit; above it weights must live in an external data file
PROTOBUF_LIMIT = 2**31 - 1
_LARGE_MARGIN = 64 * 2**20  # graph structure, names and shapes also count towards the limit


@dataclass
class OnnxExport:
    """What was written, by which exporter, and why."""

    path: Path
    exporter: str
    opset: int
    requested_opset: int
    input_name: str
    output_name: str
    dynamic_batch: bool
    external_data: bool
    fallback_reason: str | None = None
    slimmed_with: str | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = self.path.name
        return d


def written_opset(model_or_path: Any) -> int:
    """The default-domain opset version recorded in an ONNX model."""
    import onnx

    model = model_or_path
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model_or_path), load_external_data=False)
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise StageError("the exported ONNX file declares no default-domain opset")


def _param_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _quiet() -> contextlib.ExitStack:
    """Silence the exporters' prints, progress lines and deprecation warnings (kept in `log`)."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    for name in ("torch.onnx", "torch.export", "onnxscript", "torch._dynamo"):
        logger = logging.getLogger(name)
        old = logger.level
        logger.setLevel(logging.CRITICAL)
        stack.callback(logger.setLevel, old)
    return stack


def _export_dynamo(model: nn.Module, example: torch.Tensor, path: Path, *, opset: int,
                   input_name: str, output_name: str, dynamic_batch: bool, external: bool) -> None:
    dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    with _quiet():
        torch.onnx.export(model, (example,), str(path), dynamo=True, opset_version=opset,
                          external_data=external, input_names=[input_name],
                          output_names=[output_name], dynamic_shapes=dynamic_shapes, verify=False)


def _export_torchscript(model: nn.Module, example: torch.Tensor, path: Path, *, opset: int,
                        input_name: str, output_name: str, dynamic_batch: bool) -> None:
    axes = {input_name: {0: "batch"}, output_name: {0: "batch"}} if dynamic_batch else None
    with _quiet():
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=[input_name], output_names=[output_name],
                          dynamic_axes=axes, do_constant_folding=True)


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)
    Path(str(path) + ".data").unlink(missing_ok=True)


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, *, opset: int = 18,
                exporter: Exporter = "auto", input_name: str = "input", output_name: str = "logits",
                dynamic_batch: bool = True, log: Callable[[str], None] | None = None) -> OnnxExport:
    """Export `model` (eval mode, CPU) to `path` and verify the opset and layout that were written.

    `example` is one preprocessed batch; its batch size is raised to 2 when the batch axis is dynamic
    (torch.export specialises a dimension of size 1). The file is self-contained unless the weights
    exceed protobuf's 2 GB limit.
    """
    log = log or (lambda _m: None)
    model = model.eval().cpu()
    if dynamic_batch and example.shape[0] < 2:
        example = example[:1].repeat(2, *([1] * (example.dim() - 1)))
    elif not dynamic_batch:
        example = example[:1]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    external = _param_bytes(model) > PROTOBUF_LIMIT - _LARGE_MARGIN
    notes: list[str] = []
    if external:
        notes.append("weights exceed protobuf's 2 GB limit: stored in an external .onnx.data file")
    fallback: str | None = None
    used = exporter
    if exporter in ("auto", "dynamo"):
        try:
            _export_dynamo(model, example, path, opset=opset, input_name=input_name,
                           output_name=output_name, dynamic_batch=dynamic_batch, external=external)
            got = written_opset(path)
            if got != opset:
                _remove(path)
                msg = (f"the dynamo exporter wrote opset {got} when asked for opset {opset} (it cannot "
                       f"convert this graph down)")
                if exporter == "dynamo":
                    raise StageError(msg, key="opset",
                                     hint=f"use opset: {got}, or exporter: torchscript (or auto) to "
                                     f"get opset {opset}")
                fallback = msg
            else:
                used = "dynamo"
        except StageError:
            raise
        except Exception as exc:  # noqa: BLE001 - torch.export fails on many graphs; reported below
            _remove(path)
            msg = f"the dynamo exporter failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            if exporter == "dynamo":
                raise StageError(msg, key="exporter",
                                 hint="use exporter: torchscript (or auto)") from exc
            fallback = msg
        if fallback is not None:
            log(f"{fallback}; falling back to the TorchScript exporter")
    if exporter == "torchscript" or fallback is not None:
        try:
            _export_torchscript(model, example, path, opset=opset, input_name=input_name,
                                output_name=output_name, dynamic_batch=dynamic_batch)
        except Exception as exc:  # noqa: BLE001 - surfaced to the user with both exporters' reasons
            _remove(path)
            raise StageError(f"the TorchScript ONNX exporter failed: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:300]}" + (f" (after: {fallback})"
                                                                    if fallback else ""),
                             key="exporter") from exc
        used = "torchscript"
        got = written_opset(path)
        if got != opset:
            raise StageError(f"the TorchScript exporter wrote opset {got} when asked for {opset}",
                             key="opset")
    if Path(str(path) + ".data").exists() and not external:
        raise StageError(f"the exporter wrote weights outside {path.name} although the model is "
                         f"under 2 GB", hint="report this as an edgemml bug")
    return OnnxExport(path=path, exporter=used, opset=written_opset(path), requested_opset=opset,
                      input_name=input_name, output_name=output_name, dynamic_batch=dynamic_batch,
                      external_data=external, fallback_reason=fallback, notes=notes)


def check_onnx(path: Path) -> None:
    """onnx.checker with full_check (includes strict shape inference) on the file as written."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
        if path.stat().st_size < PROTOBUF_LIMIT:
            onnx.shape_inference.infer_shapes(onnx.load(str(path)), check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise StageError(f"{path.name} fails onnx.checker: {str(exc).splitlines()[0][:400]}",
                         hint="try exporter: torchscript or another opset") from None


def slim_onnx(path: Path, tool: Literal["auto", "onnxslim", "onnxsim", "none"] = "auto") -> str | None:
    """Simplify the graph in place with onnxslim or onnxsim when installed; returns the tool used.

    Optional because neither is a dependency; asking for one explicitly that is missing is an error.
    """
    import importlib.util

    import onnx

    if tool == "none":
        return None
    candidates = ["onnxslim", "onnxsim"] if tool == "auto" else [tool]
    for name in candidates:
        if importlib.util.find_spec(name) is None:
            continue
        model = onnx.load(str(path))
        if name == "onnxslim":
            import onnxslim

            slim = onnxslim.slim(model)
        else:
            import onnxsim

            slim, ok = onnxsim.simplify(model)
            if not ok:
                raise StageError(f"onnxsim could not validate the simplified {path.name}",
                                 key="slim", hint="set slim: none")
        onnx.save(slim, str(path))
        return name
    if tool != "auto":
        raise ConfigError(f"slim: {tool} is not installed", key="slim",
                          hint=f"pip install {tool}, or set slim: auto / none")
    return None


def convert_fp16(src: Path, dst: Path) -> None:
    """fp16 weights and compute with fp32 inputs/outputs (so callers feed the same tensors)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    # the converter appends the input casts at the end of the node list; the checker (rightly)
    # requires topological order
    _toposort(half.graph)
    onnx.save(half, str(dst))


def _toposort(graph: Any) -> None:
    """Reorder graph.node topologically (stable: original order among ready nodes)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        rest = []
        for node in pending:
            if all(i in available for i in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise StageError("the fp16 graph has a cycle or an undefined input")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def io_signature(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Names, shapes ('batch' for symbolic dims) and element types of the graph inputs/outputs."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def describe(values: Any) -> list[dict[str, Any]]:
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "shape": dims,
                        "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name})
        return out

    inits = {i.name for i in model.graph.initializer}
    return {"inputs": describe([i for i in model.graph.input if i.name not in inits]),
            "outputs": describe(model.graph.output)}
