"""ExecuTorch on the CPU: the only place edgemml loads a .pte program.

What the runtime really computes in is read from the file: the XNNPACK delegate payload of a .pte
lists every value's XNNPACK datatype (fp32, fp16, qint8, qcint8, ...), so an int8 program is one
whose delegate holds quantized values. The reader below walks the two flatbuffers (the Program and
XNNPACK's graph) with `struct` only: no torch import, no flatc subprocess, and a truncated or foreign
file is an InputError, not a crash.

Runtime facts (executorch 1.5.1 wheel, x86-64):
- `executorch.runtime` imports torch (portable_lib does `import torch`) and Method.execute takes
  torch tensors only ("Unsupported python type numpy.ndarray"), so running a .pte needs torch: a
  bundle's predict.py runs a .pte with torch + executorch, a .tflite without torch.
- The input shape is static (the example's at export); any other batch fails with "Attempted to
  resize a static tensor" -> static_batch, and runtimes.predict pads.
- The XNNPACK threadpool is process-wide: `_unsafe_reset_threadpool(n)`; default = cores. The
  runner re-applies its own count before a call when another runner changed it.
- Loading prints cpuinfo lines ("[cpuinfo_utils.cpp:71] Reading file /sys/devices/soc0/...") to
  stderr on x86; harmless.
This module is named like the builtin `open` it defines; files are read with builtins.open.
"""

from __future__ import annotations

import builtins
import mmap
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgemml.errors import InputError
from edgemml.runtimes.base import Runner

NAME = "executorch"
FORMAT = "executorch"
EXTRA = "executorch"
#: what running a .pte needs (the Python runtime imports torch and takes torch tensors), and what
#: converting one needs besides
MODULES = ("executorch", "torch")
EXPORT_MODULES = ("torchao",)
#: XNNPACK runs a .pte in the precision it stores (no implicit bf16/fp16): no second, exact mode
HAS_EXACT_MODE = False

def claims(path: Path) -> bool:
    return Path(path).is_file() and Path(path).suffix == ".pte"


def files(path: Path) -> list[Path]:
    """A .pte carries its weights (we never export a separate .ptd)."""
    return [Path(path)]


# ---------------------------------------------------------------------------------------------
# Reading the file: Program flatbuffer -> XNNPACK delegate payloads -> value datatypes

_XNN_DATATYPES = {1: "fp32", 2: "fp16", 3: "qint8", 4: "quint8", 5: "qint32", 6: "qcint8",
                  7: "qcint32", 8: "qcint4", 9: "qdint8", 10: "qbint4", 11: "qpint8", 12: "int32",
                  13: "pfp32", 14: "bf16"}
_QUANT = {"qint8", "quint8", "qcint8", "qdint8", "qpint8", "qcint4", "qbint4"}


class _Table:
    """A flatbuffer table: field `slot` of the schema is at vtable entry 4 + 2 * slot."""

    def __init__(self, buf: Any, pos: int) -> None:
        self.buf, self.pos = buf, pos
        vt = pos - struct.unpack_from("<i", buf, pos)[0]
        self.vt, self.vt_len = vt, struct.unpack_from("<H", buf, vt)[0]

    def _off(self, slot: int) -> int:
        entry = 4 + 2 * slot
        return struct.unpack_from("<H", self.buf, self.vt + entry)[0] if entry < self.vt_len else 0

    def scalar(self, slot: int, fmt: str, default: int = 0) -> int:
        o = self._off(slot)
        return struct.unpack_from("<" + fmt, self.buf, self.pos + o)[0] if o else default

    def table(self, slot: int) -> _Table | None:
        o = self._off(slot)
        if not o:
            return None
        at = self.pos + o
        return _Table(self.buf, at + struct.unpack_from("<I", self.buf, at)[0])

    def vector(self, slot: int) -> tuple[int, int]:
        """(start, length) of a vector field, (0, 0) when absent."""
        o = self._off(slot)
        if not o:
            return 0, 0
        at = self.pos + o
        start = at + struct.unpack_from("<I", self.buf, at)[0]
        return start + 4, struct.unpack_from("<I", self.buf, start)[0]

    def tables(self, slot: int) -> list[_Table]:
        start, n = self.vector(slot)
        return [_Table(self.buf, start + 4 * i + struct.unpack_from("<I", self.buf, start + 4 * i)[0])
                for i in range(n)]

    def string(self, slot: int) -> str:
        start, n = self.vector(slot)
        return bytes(self.buf[start:start + n]).decode("utf-8", "replace") if n else ""


def _root(buf: Any, base: int = 0) -> _Table:
    return _Table(buf, base + struct.unpack_from("<I", buf, base)[0])


@dataclass
class PteInfo:
    """What a .pte holds, as far as precision and delegation go."""

    delegates: list[str]                  # backend ids, one per delegate call
    datatypes: Counter                    # XNNPACK value datatypes over all XNNPACK delegates
    operators: list[str]                  # ops the program runs outside any delegate

    @property
    def precision(self) -> str:
        if any(self.datatypes[d] for d in _QUANT):
            return "int8"
        return "fp16" if self.datatypes["fp16"] or self.datatypes["bf16"] else "fp32"


def read_pte(path: Path) -> PteInfo:
    """Delegates, XNNPACK datatypes and non-delegated ops of a .pte, read without torch."""
    path = Path(path)
    try:
        with builtins.open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _read(buf)
    except (ValueError, struct.error, IndexError, OverflowError, OSError) as exc:
        raise InputError(f"not a readable ExecuTorch program ({exc})", file=path,
                         hint="re-export the model; the file may be truncated or not a .pte") \
            from None


def _read(buf: Any) -> PteInfo:
    if len(buf) < 32 or bytes(buf[4:6]) != b"ET":
        raise ValueError("no ExecuTorch file identifier")
    program_size, segment_base, segment_size = len(buf), 0, 0
    if bytes(buf[8:12]) == b"eh00":  # extended header: program size and where segments start
        header_len = struct.unpack_from("<I", buf, 12)[0]
        program_size, segment_base = struct.unpack_from("<QQ", buf, 16)
        if header_len >= 32:
            segment_size = struct.unpack_from("<Q", buf, 32)[0]
    if max(program_size, segment_base + segment_size) > len(buf):
        raise ValueError("file shorter than its header says (truncated)")
    program = _root(buf)
    inline = program.tables(3)              # backend_delegate_data: [BackendDelegateInlineData]
    segments = program.tables(4)            # segments: [DataSegment{offset, size}]
    delegates, operators, dtypes = [], [], Counter()
    for plan in program.tables(1):          # execution_plan
        operators += [op.string(0) for op in plan.tables(6)]
        for d in plan.tables(7):            # delegates: [BackendDelegate{id, processed, ...}]
            backend = d.string(0)
            delegates.append(backend)
            ref = d.table(1)
            if ref is None or "xnnpack" not in backend.lower():
                continue
            location, index = ref.scalar(0, "b"), ref.scalar(1, "I")
            if location == 0:                # inline data
                start, n = inline[index].vector(0)
                payload = memoryview(buf)[start:start + n]
            else:                            # a segment after the program
                seg = segments[index]
                off = segment_base + seg.scalar(0, "Q")
                payload = memoryview(buf)[off:off + seg.scalar(1, "Q")]
            dtypes.update(_xnn_datatypes(payload))
    return PteInfo(delegates, dtypes, operators)


def _xnn_datatypes(payload: Any) -> Counter:
    """Counter of XNNPACK value datatypes in one delegate payload (XNNHeader "XH00" + XNNGraph)."""
    if bytes(payload[4:8]) == b"XH00":
        fb_off, fb_size = struct.unpack_from("<II", payload, 10)
        graph_buf = payload[fb_off:fb_off + fb_size]
    else:  # old payloads are the bare flatbuffer
        graph_buf = payload
    graph = _root(graph_buf)
    out: Counter = Counter()
    for xv in graph.tables(2):               # XNNGraph.xvalues: [XValue{xvalue_union}]
        kind, value = xv.scalar(0, "B"), xv.table(1)
        if value is None:
            continue
        if kind == 2:                        # XNNQuantizedTensorValue{tensor_value, quant_params}
            value = value.table(0)
            if value is None:
                continue
        out[_XNN_DATATYPES.get(value.scalar(0, "h"), "other")] += 1
    return out


def stored_precision(path: Path) -> str:
    """int8 when an XNNPACK delegate holds quantized values, fp16 for half values, else fp32."""
    return read_pte(path).precision


# ---------------------------------------------------------------------------------------------
# Running it


def _reset_threadpool(portable_lib: Any, threads: int) -> None:
    """Resize the process-wide XNNPACK pool without its C++ log line on stderr ("Resetting
    threadpool to N threads", once per switch between runners with different counts)."""
    import os
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with builtins.open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            portable_lib._unsafe_reset_threadpool(threads)
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def open(path: Path, *, threads: int | None, exact: bool = False,
         name: str | None = None) -> Runner:
    """Load the program's forward method. `exact` is ignored: XNNPACK runs an fp32 program in fp32
    (it has no implicit downcast on x86 or ARM unless the program was lowered for fp16)."""
    import torch
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime

    path = Path(path)
    info = read_pte(path)
    runtime = Runtime.get()
    try:
        method = runtime.load_program(str(path)).load_method("forward")
    except Exception as exc:  # noqa: BLE001 - pybind raises RuntimeError with an error code
        raise InputError(f"the ExecuTorch runtime cannot load {path.name}: "
                         f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc}",
                         file=path, hint="re-export the model with the installed executorch "
                                         "version; the file may be truncated") from None
    meta = method.metadata
    if meta.num_inputs() != 1 or meta.num_outputs() < 1:
        raise InputError(f"{path.name} takes {meta.num_inputs()} inputs; edgemml runs "
                         f"single-input classifiers", file=path)
    in_shape = [int(d) for d in meta.input_tensor_meta(0).sizes()]
    out_shape = [int(d) for d in meta.output_tensor_meta(0).sizes()]
    want = threads or portable_lib._threadpool_get_thread_count()
    missing = [d for d in info.delegates if not runtime.backend_registry.is_available(d)]
    if missing:
        raise InputError(f"{path.name} needs the {missing[0]} backend, which this executorch "
                         f"runtime lacks", file=path)

    def run(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if list(x.shape) != in_shape:
            raise ValueError(f"{path.name} takes input {in_shape} (static), got {list(x.shape)}")
        if portable_lib._threadpool_get_thread_count() != want:
            _reset_threadpool(portable_lib, want)
        out = method.execute([torch.from_numpy(x)])
        return out[0].detach().numpy().astype(np.float32, copy=True)

    precision = {"int8": "int8", "fp16": "f16"}.get(info.precision, "f32")
    io = {"input_shape": in_shape, "input_dtype": "float32", "output_shape": out_shape,
          "output_dtype": "float32", "delegates": sorted(set(info.delegates)),
          "not_delegated": sorted(set(info.operators)),
          "xnnpack_datatypes": dict(sorted(info.datatypes.items()))}
    return Runner(name=name or path.name, backend=NAME, threads=want, precision=precision,
                  fn=run, static_batch=in_shape[0], io=io, input_shape=tuple(in_shape))
