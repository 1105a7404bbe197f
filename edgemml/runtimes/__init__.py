"""The runtime layer: the one place that opens, runs and times an artifact.

Quantize (accuracy of int8 models), export (parity right after conversion), validate (every artifact
on held-out data), prune (its latency figure) and the benchmarks all open artifacts here, so each
runtime is configured one way: the same threads, batching and — for OpenVINO — an explicit inference
precision. Nothing else in edgemml creates an ONNX Runtime session or compiles an OpenVINO model
(tests/unit/test_layout.py checks this).

Adding a backend (e.g. ExecuTorch .pte, LiteRT .tflite) is one module plus one line in BACKENDS.
The module defines:

    NAME = "mybackend"        # backend name in reports
    FORMAT = "myformat"       # artifact format ("onnx", "openvino", ...): keys read <FORMAT>-<precision>
    EXTRA = "myextra" | None  # the pip extra that installs it (`pip install 'edgemml[myextra]'`)
    MODULES = ("mylib",)      # what must be importable (missing() turns their absence into a hint)
    EXPORT_MODULES = ()       # optional: what converting a model into this format needs besides
    HAS_EXACT_MODE = False    # True when deployment may compute in a lower precision than stored
                              # (OpenVINO's bf16): validate then also runs it with exact=True
    def claims(path) -> bool                       # is this file / folder one of mine
    def files(path) -> list[Path]                  # what a deployment copies (size, bundle)
    def stored_precision(path) -> str              # fp32 | fp16 | int8, read from the file
    def open(path, *, threads, exact=False, name=None) -> Runner   # see runtimes/base.py
    def macs_params(path) -> (macs | None, params)  # optional: counted from the graph

Backends are imported lazily: `edgemml check` and `--help` never import a runtime.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import ModuleType

from edgemml.errors import InputError
from edgemml.runtimes.base import Latency, Runner, Timing, measure_latency, predict, time_calls

#: backend name -> module; the order is the order formats are recognised in
BACKENDS: dict[str, str] = {
    "torch": "edgemml.runtimes.torch",
    "onnxruntime": "edgemml.runtimes.onnxruntime",
    "openvino": "edgemml.runtimes.openvino",
    "executorch": "edgemml.runtimes.executorch",
    "litert": "edgemml.runtimes.litert",
}


def backend(name: str) -> ModuleType:
    """The module of a backend (imported on first use)."""
    try:
        return importlib.import_module(BACKENDS[name])
    except KeyError:
        raise InputError(f"unknown runtime {name!r} (known: {', '.join(BACKENDS)})") from None


def by_format(fmt: str) -> ModuleType:
    """The backend that runs artifacts of a format ("onnx" -> onnxruntime)."""
    for name in BACKENDS:
        module = backend(name)
        if module.FORMAT == fmt:
            return module
    raise InputError(f"no runtime for the format {fmt!r}")


def formats() -> list[str]:
    return [backend(name).FORMAT for name in BACKENDS]


def detect(path: Path) -> ModuleType:
    """The backend that claims a file or folder."""
    path = Path(path)
    for name in BACKENDS:
        module = backend(name)
        if module.claims(path):
            return module
    raise InputError(f"cannot tell what {path} is", file=path,
                     hint="give an .onnx file, an OpenVINO folder (model.xml + model.bin), an "
                          "ExecuTorch .pte, a LiteRT .tflite or an edgemml model folder "
                          "(model.json + model.safetensors)")


def missing(name: str, *, export: bool = False) -> str | None:
    """None when a backend's libraries are importable (with `export`, also those that convert a
    model into its format), else the pip command that installs them."""
    module = backend(name)
    wanted = [*module.MODULES, *(getattr(module, "EXPORT_MODULES", ()) if export else ())]
    absent = [m for m in wanted if importlib.util.find_spec(m) is None]
    if not absent:
        return None
    extra = module.EXTRA
    return (f"pip install 'edgemml[{extra}]'" if extra
            else f"pip install {' '.join(absent)}")


def open_artifact(path: Path, *, threads: int | None, exact: bool = False,
                  name: str | None = None) -> Runner:
    """Open any artifact edgemml knows with its own runtime (an optional runtime that is not
    installed is an InputError naming the pip command, not an ImportError)."""
    module = detect(path)
    hint = missing(module.NAME)
    if hint:
        raise InputError(f"{Path(path).name} needs the {module.NAME} runtime, which is not "
                         f"installed", file=path, hint=hint)
    return module.open(Path(path), threads=threads, exact=exact, name=name)


def artifact_files(path: Path) -> list[Path]:
    return detect(path).files(Path(path))


def size_bytes(path: Path) -> int:
    return int(sum(p.stat().st_size for p in artifact_files(path) if p.is_file()))


__all__ = ["BACKENDS", "Latency", "Runner", "Timing", "artifact_files", "backend", "by_format",
           "detect", "formats", "measure_latency", "missing", "open_artifact", "predict",
           "size_bytes", "time_calls"]
