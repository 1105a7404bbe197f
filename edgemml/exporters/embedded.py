"""What the ExecuTorch (.pte) and LiteRT (.tflite) exporters share: the result they return, one-line
conversion errors that name the failing op and module, quiet conversion, and the checked atomic
write of the converted file.

Why here and not in each exporter: both targets go through torch.export and fail in the same ways
(untraceable Python, an op the target cannot lower, a complex dtype), and both must fail the same
way: one line naming the op, the module and how to turn the target off — never a traceback, never a
half-written file. ConversionError is a StageError, so the CLI exits 2 with that line.

What the libraries do when they fail (torch 2.14.1, executorch 1.5.1, litert-torch 0.10.0):
- untraceable Python (`if x.mean() > 0`) -> torch.export's GuardOnDataDependentSymNode, with the
  user line in the message;
- an op outside Core ATen (torch.linalg.det) -> ExecuTorch's SpecViolationError "Operator
  ...aten._linalg_det.default is not in Core ATen opset" (no stack); LiteRT's "Lowering not found:
  aten._linalg_det.default" + "While executing %_linalg_det";
- complex dtypes (torch.fft) -> SpecViolationError / an MLIRError whose locations name the module
  ("pkg.Class_attr;").
torch also logs graph dumps, litert prints progress and its quantizer `print()`s, and absl / cpuinfo
write to file descriptor 2 from C++: `quiet()` captures all of it; the text goes into `.log`.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import re
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from edgemml.artifacts import atomic_path
from edgemml.errors import StageError

_TITLE = {"executorch": "ExecuTorch", "litert": "LiteRT"}


class ConversionError(StageError):
    """A conversion that failed, as one line: target, phase, op, module, first line of the cause.

    `target` is "executorch" or "litert"; `phase` one of export / quantize / lower / serialize /
    load; `op` an aten op name such as "aten._linalg_det.default" and `module` the dotted path of the
    module that called it, when they can be told; `fix` what to change in the model."""

    def __init__(self, target: str, phase: str, cause: str, *, op: str | None = None,
                 module: str | None = None, source: str | None = None, fix: str | None = None,
                 log: str = "") -> None:
        self.target, self.phase, self.cause = target, phase, cause
        self.op, self.module, self.source, self.log = op, module, source, log
        self.fix = fix or ((f"keep module '{module}' in float" if module and phase == "quantize"
                            else f"change module '{module}' so it does not use {op}"
                            if module and op else None))
        where = "".join([f" at {op}" if op else "", f" in module '{module}'" if module else "",
                         f" ({source})" if source else ""])
        hint = f"turn the {target} target off" + (f", or {self.fix}" if self.fix else "")
        super().__init__(f"{_TITLE.get(target, target)} conversion failed ({phase}){where}: "
                         f"{cause}", hint=hint)


@dataclass
class ExportResult:
    """One converted file and what was measured while making it."""

    path: Path
    target: str                      # "executorch" | "litert"
    precision: str                   # what was asked: "fp32" | "int8"
    stored_precision: str            # read back from the written file
    size_bytes: int
    input_shape: list[int]           # the static input shape (batch included)
    seconds: float
    calibration_samples: int = 0
    float_modules: list[str] = field(default_factory=list)
    #: conv / linear layers by module path: "int8" or "float" (int8 exports only)
    layers: dict[str, str] = field(default_factory=dict)
    #: input / output dtypes and shapes and, for int8 I/O, scale and zero point (the runner's io)
    io: dict[str, Any] = field(default_factory=dict)
    #: ops the target runs outside its accelerated path (ExecuTorch: outside XNNPACK)
    not_delegated: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = self.path.name
        return d

    @classmethod
    def written(cls, path: Path, target: str, *, int8: bool, example: Any, started: float,
                **measured: Any) -> "ExportResult":
        """The result of a file just written: stored precision read back by the target's runtime
        backend, size from disk, input shape from the example it was traced with."""
        import time

        from edgemml import runtimes

        return cls(path=path, target=target, precision="int8" if int8 else "fp32",
                   stored_precision=runtimes.backend(target).stored_precision(path),
                   size_bytes=path.stat().st_size, input_shape=[int(d) for d in example.shape],
                   seconds=round(time.perf_counter() - started, 3), **measured)


def restore_mode(model: Any) -> Callable[[], None]:
    """Put the model in eval mode for export and return how to undo it."""
    was = model.training
    model.eval()
    return lambda: model.train(was)


def check_example(example: Any, target: str) -> None:
    import torch

    if not isinstance(example, torch.Tensor) or example.dtype != torch.float32 or example.ndim < 2:
        raise ConversionError(target, "export", "the example input must be a float32 tensor "
                              "[batch, ...] in the layout the model takes")


# ---------------------------------------------------------------------------------------------
# Naming what failed

_OP_RE = re.compile(r"(?:torch\.ops\.)?(aten|quantized_decomposed|torchao)(?:::|\.)([A-Za-z0-9_]+)"
                    r"(?:\.([A-Za-z0-9_]+))?")
_WHILE_RE = re.compile(r"While executing %([A-Za-z0-9_]+)")
_CALL_RE = re.compile(r'File "([^"]+)", line (\d+), in (\w+)\n\s*(.+)')


def first_line(exc: BaseException) -> str:
    """The first informative line of an exception's message (MLIR/torch messages start with
    boilerplate such as "Verification failed:" or an empty line)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    skip = ("verification failed", "the following call raised", "there are a few things to try")
    for ln in lines:
        if not ln.lower().startswith(skip):
            ln = re.sub(r"^error:\s*", "", ln)
            return (ln[:300] + "...") if len(ln) > 300 else ln
    return type(exc).__name__


def module_paths(node: Any) -> list[str]:
    """Dotted paths of the modules a graph node was traced in, outermost first ("" is the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for value in stack.values():
        path = value[0] if isinstance(value, (tuple, list)) else str(value)
        out.append(path[len("L['self']."):] if path.startswith("L['self'].") else path)
    return out


def innermost_module(node: Any) -> str | None:
    paths = [p for p in module_paths(node) if p]
    return paths[-1] if paths else None


def failing_op(exc: BaseException, graph_module: Any = None,
               model: Any = None) -> tuple[str | None, str | None, str | None]:
    """(op, module, source) a conversion error names, when they can be told.

    op: from the message ("Lowering not found: aten._linalg_det.default", "Operator
    torch._ops.aten._linalg_det.default is not in Core ATen opset", "While executing %name").
    module: the node of that op in the exported graph (its nn_module_stack); else the module whose
    forward() holds the user-code line the message quotes (torch.export failures such as
    data-dependent control flow); else the module an MLIR location names ("pkg.Class_attr;").
    source: "file.py:LINE: code" of that user-code line."""
    text = str(exc)
    node_name = (_WHILE_RE.search(text) or [None, None])[1]
    op = None
    for m in _OP_RE.finditer(text):
        if m.group(2) in ("default", "Tensor"):
            continue
        op = f"{m.group(1)}.{m.group(2)}" + (f".{m.group(3)}" if m.group(3) else "")
        break
    module = None
    if graph_module is not None:
        for n in graph_module.graph.nodes:
            if n.op != "call_function":
                continue
            if (node_name and n.name == node_name) or (op and _op_matches(n.target, op)):
                module = innermost_module(n)
                op = op or _op_text(n.target)
                if module:
                    break
    calls = [c for c in _CALL_RE.findall(text) if "site-packages" not in c[0]]
    source = None
    if calls:
        file, line, _, code = calls[-1]
        source = f"{Path(file).name}:{line}: {code.strip()}"
        if module is None and model is not None:
            module = module_at_source(model, file, int(line))
    if module is None:
        # MLIR locations name the module as "pkg.Class_attr" in quotes: "__main__.Odd_odd;"
        m = re.search(r'"[\w.]+\.\w+?_([\w.]+);"', text)
        if m:
            module = m.group(1)
    return op, module, source


def module_at_source(model: Any, file: str, line: int) -> str | None:
    """The innermost submodule whose forward() spans file:line (None if none does)."""
    best = None
    for name, mod in model.named_modules():
        fwd = getattr(type(mod), "forward", None)
        try:
            src = inspect.getsourcefile(fwd)  # type: ignore[arg-type]
            lines, start = inspect.getsourcelines(fwd)  # type: ignore[arg-type]
        except (TypeError, OSError):
            continue
        if not (src and os.path.exists(file) and os.path.samefile(src, file)):
            continue
        if start <= line < start + len(lines) and (best is None or name.count(".") > best.count(".")):
            best = name
    return best or None


def is_export_error(exc: BaseException) -> bool:
    """Did torch.export itself fail (untraceable Python: data-dependent control flow, ...)?"""
    return type(exc).__module__.startswith((
        "torch._dynamo", "torch.export", "torch._export", "torch.fx.experimental.symbolic_shapes"))


def _op_text(target: Any) -> str:
    return str(target).replace("torch.ops.", "").replace("::", ".")


def _op_name(text: str) -> str:
    """"aten._linalg_det.default" -> "linalg_det": decompositions rename ops by a leading
    underscore (the exported graph has aten.linalg_det, the edge dialect aten._linalg_det)."""
    parts = text.split(".")
    return (parts[1] if len(parts) > 1 else parts[0]).lstrip("_")


def _op_matches(target: Any, op: str) -> bool:
    return _op_name(_op_text(target)) == _op_name(op)


def conversion_error(target: str, phase: str, exc: BaseException, graph_module: Any, model: Any,
                     log: str) -> ConversionError:
    op, module, source = failing_op(exc, graph_module, model)
    return ConversionError(target, phase, first_line(exc), op=op, module=module, source=source,
                           log=log)


# ---------------------------------------------------------------------------------------------
# Output hygiene and the checked atomic write


@contextlib.contextmanager
def quiet(enabled: bool = True) -> Iterator[io.StringIO]:
    """Capture what conversion libraries print: Python's stdout, the torch / absl loggers, and file
    descriptors 1 and 2 (C++ logs). Yields a buffer that holds the captured text afterwards."""
    buf = io.StringIO()
    if not enabled:
        yield buf
        return
    loggers = [logging.getLogger(n) for n in ("torch", "torchao", "executorch", "absl", "")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    saved, tmp = [], tempfile.TemporaryFile(mode="w+b")
    try:
        for fd in (1, 2):
            with contextlib.suppress(OSError, ValueError):
                (sys.stdout if fd == 1 else sys.stderr).flush()
                saved.append((fd, os.dup(fd)))
                os.dup2(tmp.fileno(), fd)
        with contextlib.redirect_stdout(buf):
            yield buf
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        for fd, old in saved:
            os.dup2(old, fd)
            os.close(old)
        tmp.seek(0)
        buf.write(tmp.read().decode("utf-8", "replace"))
        tmp.close()
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def write_checked(path: Path, target: str, produce: Callable[[Path], Any]) -> Any:
    """`produce(tmp)` writes (and checks) a temporary file next to `path`; only then is it renamed
    into place (edgemml.artifacts.atomic_path), so a failure or a crash never leaves a half-written
    file under the real name. Returns what `produce` returned."""
    with atomic_path(path) as tmp:
        result = produce(tmp)
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise ConversionError(target, "serialize", f"the converter wrote nothing to "
                                  f"{Path(path).name}")
    return result
