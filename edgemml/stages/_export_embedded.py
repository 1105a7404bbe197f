"""The export stage's ExecuTorch (.pte) and LiteRT (.tflite) part: the fp32 files, each checked
against torch on real samples right after conversion, and the bundle entries of every .pte /
.tflite (fp32 from here, int8 from the quantize stage).

A bundle entry records what a device needs to feed the file: input / output names, shapes and
dtypes and, for a .tflite with int8 I/O, the scale and zero point of each (predict.py reads them
from the interpreter; the manifest states them for people and other tools). Pydantic-only at import.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pydantic import Field

from edgemml.config import StrictModel
from edgemml.stages._quantize_embedded import EMBEDDED, conversion_failed, export_fn

if TYPE_CHECKING:
    import numpy as np

    from edgemml.stages.base import StageContext

#: file name of each embedded artifact key
FILES = {f"{t}-{p}": f"model.{p}.{'pte' if t == 'executorch' else 'tflite'}"
         for t in EMBEDDED for p in ("fp32", "int8")}


class EmbeddedExportOptions(StrictModel):
    """An fp32 file for an embedded runtime (its int8 file comes from the quantize stage)."""

    enabled: bool = Field(False, description="Write the fp32 file (needs the pip extra of the same "
                          "name); listing the target in quantize.backends writes the int8 one.")


def signature(io: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """A runner's io as the manifest's inputs / outputs: name, shape, dtype, quantization."""
    out: dict[str, list[dict[str, Any]]] = {}
    for side, key in (("input", "inputs"), ("output", "outputs")):
        entry: dict[str, Any] = {"name": io.get(side) or side,
                                 "shape": io.get(f"{side}_shape"),
                                 "dtype": io.get(f"{side}_dtype"), "quantization": None}
        if f"{side}_scale" in io:
            entry["quantization"] = {"scale": io[f"{side}_scale"],
                                     "zero_point": io[f"{side}_zero_point"],
                                     "float_value": "(q - zero_point) * scale"}
        out[key] = [entry]
    return out


def entry(key: str, path: Path) -> dict[str, Any]:
    """format, runtime, file names and signature of a .pte / .tflite (for the report and bundle)."""
    from edgemml import runtimes

    target = key.split("-")[0]
    runner = runtimes.open_artifact(path, threads=1)
    extra = {k: runner.io[k] for k in ("delegates", "not_delegated") if k in runner.io}
    return {"file": FILES[key], "files": [FILES[key]], "format": target, "runtime": target,
            "runtime_precision": runner.precision, "static_batch": runner.static_batch,
            **signature(runner.io), **extra}


def convert_fp32(ctx: StageContext, config: Any, model: Any, x: np.ndarray, ref: np.ndarray,
                 check: Callable[[str, np.ndarray, np.ndarray, float], dict[str, Any]],
                 ) -> dict[str, dict[str, Any]]:
    """The fp32 .pte / .tflite of every enabled target, each compared with torch on x."""
    import numpy as np
    import torch

    from edgemml import runtimes
    from edgemml.exporters.embedded import ConversionError

    arts: dict[str, dict[str, Any]] = {}
    example = torch.from_numpy(np.ascontiguousarray(x[:1]))
    for target in EMBEDDED:
        if not getattr(config, target).enabled:
            continue
        key = f"{target}-fp32"
        path = ctx.work_dir / FILES[key]
        try:
            res = export_fn(target)(model, example, path, int8=False)
        except ConversionError as exc:
            raise conversion_failed(ctx, exc, f"set {target}: {{enabled: false}} in this export "
                                    f"stage", target) from exc
        runner = runtimes.open_artifact(path, threads=None)
        parity = check(FILES[key], ref, runtimes.predict(runner, x), config.tolerance)
        ctx.log(f"{key}: {res.seconds:.1f} s, {res.size_bytes / 1e6:.2f} MB, max abs diff vs torch "
                f"{parity['max_abs_diff']:.3g} on {parity['samples']} samples"
                + (f"; outside XNNPACK: {', '.join(res.not_delegated)}" if res.not_delegated
                   else ""))
        arts[key] = {**entry(key, path), "precision": "fp32", "export": res.as_dict(),
                     "checks": {"parity_vs_torch": parity}, "_path": path}
    return arts
