"""OpenVINO on the CPU: the only place edgemml compiles an OpenVINO model.

Every compiled model states its inference precision: on CPUs with AVX-512 BF16 / AMX, OpenVINO runs
an fp32 graph in bf16 unless INFERENCE_PRECISION_HINT=f32 is set. `exact=True` pins f32 (parity
checks, accuracy budgets); `exact=False` compiles it as a user's plain `compile_model` would run it
(deployment). The precision reported is read back from the compiled model, never assumed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgemml.errors import InputError
from edgemml.runtimes.base import Runner

NAME = "openvino"
FORMAT = "openvino"
EXTRA = None
#: whether the deployed precision may differ from fp32 (validate then also runs it pinned to f32)
HAS_EXACT_MODE = True
MODULES = ("openvino",)
IR_XML = "model.xml"


def claims(path: Path) -> bool:
    """model.xml (+ .bin), or a folder holding exactly one IR."""
    if path.is_file():
        return path.suffix == ".xml"
    return path.is_dir() and not (path / "model.json").is_file() and (
        (path / IR_XML).is_file() or len(list(path.glob("*.xml"))) == 1)


def xml_path(path: Path) -> Path:
    """model.xml of an OpenVINO artifact given as its folder or its .xml file (with its .bin)."""
    xml = path if path.suffix == ".xml" else path / IR_XML
    if not xml.is_file():
        found = sorted(path.glob("*.xml")) if path.is_dir() else []
        if len(found) != 1:
            raise InputError(f"no OpenVINO model.xml in {path}", file=path,
                             hint="an OpenVINO artifact is a folder with model.xml + model.bin")
        xml = found[0]
    if not xml.with_suffix(".bin").is_file():
        raise InputError(f"{xml.name} has no {xml.with_suffix('.bin').name} next to it", file=xml)
    return xml


def files(path: Path) -> list[Path]:
    xml = xml_path(path)
    return [xml, xml.with_suffix(".bin")]


def stored_precision(path: Path) -> str:
    """int8 (FakeQuantize or 8-bit constants), fp16 (f16 constants) or fp32, read from the IR."""
    text = xml_path(path).read_text(encoding="utf-8", errors="replace")
    if "FakeQuantize" in text or re.search(r'element_type="[ui]8"', text):
        return "int8"
    return "fp16" if 'element_type="f16"' in text else "fp32"


def precision_name(value: Any) -> str:
    """OpenVINO's element type as f32 / bf16 / f16 (the property reads "<Type: 'float32'>")."""
    text = value.to_string() if hasattr(value, "to_string") else str(value)
    match = re.search(r"'([a-z0-9]+)'", text)
    name = match.group(1) if match else text.strip().lower()
    return {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}.get(name, name)


def compile(model_or_path: Any, *, threads: int | None, exact: bool) -> tuple[Any, str]:
    """(compiled model, the precision it runs in) for an ov.Model or a path to its .xml."""
    import openvino as ov

    config: dict[str, Any] = {"NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    if exact:
        config["INFERENCE_PRECISION_HINT"] = "f32"
    core = ov.Core()
    source = model_or_path
    if isinstance(model_or_path, (str, Path)):
        xml = xml_path(Path(model_or_path))
        try:
            source = core.read_model(str(xml))
        except RuntimeError as exc:
            first = (str(exc).strip().splitlines() or ["unreadable"])[0]
            raise InputError(f"OpenVINO cannot read {xml.name}: {first}", file=xml) from None
    compiled = core.compile_model(source, "CPU", config)
    return compiled, precision_name(compiled.get_property("INFERENCE_PRECISION_HINT"))


def _infer(compiled: Any) -> Callable[[np.ndarray], np.ndarray]:
    request = compiled.create_infer_request()
    out_port = compiled.output(0)

    def run(x: np.ndarray) -> np.ndarray:
        res = request.infer([np.ascontiguousarray(x, dtype=np.float32)])
        return np.asarray(res[out_port], dtype=np.float32).copy()

    return run


def _batch_of_one(source: Any, *, threads: int | None, exact: bool
                  ) -> Callable[[np.ndarray], np.ndarray]:
    """Inference at batch 1 through a copy of the model whose batch is static 1, compiled on
    first use. Measured trap (OpenVINO 2026.4.1, CPU): an int8 IR with depthwise convolutions
    compiled with a *dynamic* batch returns wrong outputs at batch 1 — mobilenet_v2 9 % top-1,
    efficientnet_b0 25 %, mnasnet0_5 9 %, while batch 2..32 of the same compiled model and a
    static batch-1 compile are right (fp32 IRs are unaffected). Batch 1 is what latency is timed
    at and what the bundle's predict.py runs, so it must be the right computation."""
    compiled_run: list[Callable[[np.ndarray], np.ndarray]] = []

    def run(x: np.ndarray) -> np.ndarray:
        if not compiled_run:
            import openvino as ov

            model = (ov.Core().read_model(str(xml_path(Path(source))))
                     if isinstance(source, (str, Path)) else source.clone())
            shape = model.input(0).get_partial_shape()
            shape[0] = 1
            model.reshape({model.input(0): shape})
            compiled_run.append(_infer(compile(model, threads=threads, exact=exact)[0]))
        return compiled_run[0](x)

    return run


def _dynamic_batch(pshape: Any) -> bool:
    return bool(pshape.rank.is_static and len(pshape) > 0 and pshape[0].is_dynamic)


def runner_for(compiled: Any, precision: str, *, threads: int | None, name: str,
               batch_of_one: Callable[[np.ndarray], np.ndarray] | None = None) -> Runner:
    """A Runner over an already compiled model (e.g. one NNCF's accuracy control hands over).

    With a dynamic batch, batch 1 goes through `batch_of_one` (a static batch-1 compile, see
    _batch_of_one); without one (a compiled model alone cannot be reshaped) a single sample is
    run as a batch of two copies, which is right, and only used to compute accuracy."""
    dynamic_run = _infer(compiled)
    out_port = compiled.output(0)
    pshape = compiled.input(0).get_partial_shape()
    static = None
    if pshape.rank.is_static and len(pshape) > 0 and pshape[0].is_static:
        static = pshape[0].get_length()

    dynamic = _dynamic_batch(pshape)

    def run(x: np.ndarray) -> np.ndarray:
        if len(x) != 1 or not dynamic:
            return dynamic_run(x)
        if batch_of_one is not None:
            return batch_of_one(x)
        return dynamic_run(np.concatenate([x, x]))[:1]

    io = {"input": sorted(compiled.input(0).get_names()), "input_shape": str(pshape),
          "output": sorted(out_port.get_names())}
    shape = tuple(d.get_length() if d.is_static else None for d in pshape) \
        if pshape.rank.is_static else None
    return Runner(name, NAME, threads or 0, precision, run, static, io, shape)


def open(path: Path, *, threads: int | None, exact: bool = False,
         name: str | None = None) -> Runner:
    compiled, precision = compile(path, threads=threads, exact=exact)
    return runner_for(compiled, precision, threads=threads, name=name or Path(path).name,
                      batch_of_one=_batch_of_one(path, threads=threads, exact=exact))


def tapped_outputs(model: Any, names: list[str], x: np.ndarray, *,
                   batch_size: int = 32) -> dict[str, np.ndarray]:
    """The outputs of the named ops (friendly names) of an ov.Model on `x`, compiled pinned to f32.

    For per-layer error. The model is changed in place (the taps are added as outputs). Measured
    trap: with many taps on an int8 IR at once, the CPU plugin's low-precision transformations
    return values before their dequantization scales (cosine 0.2 while the logits agreed 99 %);
    one tap per compiled model reads the true value. Callers tap an int8 model one op at a time.
    """
    ops = {op.get_friendly_name(): op for op in model.get_ordered_ops()}
    missing = [n for n in names if n not in ops]
    if missing:
        raise InputError(f"no op named {missing[0]!r} in the OpenVINO model")
    tags, known = {}, {}
    for n in names:
        tag = "edgemml-tap:" + n
        tensor = ops[n].output(0).get_tensor()
        tensor.add_names({tag})
        tags[n], known[n] = tag, set(tensor.get_names())
    model.add_outputs(list(tags.values()))
    compiled, _ = compile(model, threads=None, exact=True)
    request = compiled.create_infer_request()
    # An op that already is a model output (the logits) keeps that output's names only: the tag
    # is not found there (measured on mobilenet_v3_small), so the output is matched by any name.
    ports = {}
    for n in names:
        port = next((o for o in compiled.outputs if set(o.get_names()) & known[n]), None)
        if port is None:
            raise InputError(f"OpenVINO did not keep the op {n!r} as an output")
        ports[n] = port
    acc: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for i in range(0, len(x), batch_size):
        chunk = x[i:i + batch_size]
        # a lone sample runs as two copies: dynamic-batch int8 IRs are wrong at batch 1
        # (_batch_of_one)
        res = request.infer([np.ascontiguousarray(chunk if len(chunk) > 1 else
                                                  np.concatenate([chunk, chunk]), np.float32)])
        for n, port in ports.items():
            acc[n].append(np.asarray(res[port], dtype=np.float32)[:len(chunk)].copy())
    return {n: np.concatenate(v) for n, v in acc.items()}
