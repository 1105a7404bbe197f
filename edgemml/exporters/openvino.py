"""torch or ONNX -> OpenVINO IR (model.xml + model.bin) with the weight precision asked for.

`openvino.save_model` compresses weights to fp16 unless told `compress_to_fp16=False`, so the weight
precision is always passed explicitly here and recorded. Execution precision is a separate matter
(see edgemml.runtimes.openvino): an IR with fp32 weights still runs in bf16 on CPUs with
AVX-512 BF16 unless compiled with INFERENCE_PRECISION_HINT=f32.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from edgemml.errors import StageError
from edgemml.runtimes.openvino import IR_XML

IR_BIN = "model.bin"


@dataclass
class IrExport:
    folder: Path
    source: str  # "torch" | "onnx"
    weights: str  # "fp32" | "fp16"
    input_name: str
    output_name: str

    def as_dict(self) -> dict[str, Any]:
        return {"folder": self.folder.name, "source": self.source, "weights": self.weights,
                "input_name": self.input_name, "output_name": self.output_name}


def _name_io(model: Any, input_name: str, output_name: str) -> None:
    """Give the IR the same tensor names as the ONNX file, so one predict.py feeds both."""
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise StageError(f"expected a model with one input and one output, got "
                         f"{len(model.inputs)} inputs and {len(model.outputs)} outputs")
    model.inputs[0].get_tensor().set_names({input_name})
    model.outputs[0].get_tensor().set_names({output_name})


def convert_to_ir(source: nn.Module | Path, folder: Path, *, example: torch.Tensor,
                  weights: Literal["fp32", "fp16"] = "fp32", input_name: str = "input",
                  output_name: str = "logits", dynamic_batch: bool = True) -> IrExport:
    """Convert a torch module (traced with `example`) or an ONNX file to folder/model.xml + .bin."""
    import openvino as ov

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shape = [-1 if dynamic_batch else 1, *example.shape[1:]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace deprecation notices
        try:
            if isinstance(source, nn.Module):
                model = ov.convert_model(source.eval().cpu(), example_input=example, input=shape)
                kind = "torch"
            else:
                model = ov.convert_model(str(source))
                if not dynamic_batch:
                    model.reshape(shape)
                kind = "onnx"
        except Exception as exc:  # noqa: BLE001 - converter errors are reported with the source
            raise StageError(f"openvino.convert_model failed: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:300]}",
                             hint="try openvino.source: onnx (or torch)") from exc
    _name_io(model, input_name, output_name)
    save_ir(model, folder / IR_XML, compress_to_fp16=(weights == "fp16"))
    return IrExport(folder=folder, source=kind, weights=weights, input_name=input_name,
                    output_name=output_name)


_COUNTED_NAME = re.compile(r"^(.*)_(\d+)$")


def save_ir(model: Any, xml: Path, *, compress_to_fp16: bool) -> None:
    """openvino.save_model with names that do not depend on the process's history.

    OpenVINO names the nodes it creates `<Type>_<N>`, N a counter shared by every model the process
    built before, and the model `Model<N>`: the same network converted after another one (as in a
    run that resumes at export, having converted fewer models first) is written with other names,
    so other bytes, and every later stage re-runs. Here the model gets a fixed name and each such
    suffix becomes the node's position in the graph's topological order.
    """
    import openvino as ov

    model.set_friendly_name("edgemml")
    for i, op in enumerate(model.get_ordered_ops()):
        m = _COUNTED_NAME.match(op.get_friendly_name())
        if m is not None:
            op.set_friendly_name(f"{m.group(1)}_{i}")
    ov.save_model(model, str(xml), compress_to_fp16=compress_to_fp16)


def ir_signature(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """Names, shapes ('batch' for a dynamic first dim) and element types of the IR's inputs/outputs."""
    import openvino as ov

    model = ov.Core().read_model(str(Path(folder) / IR_XML))

    def describe(ports: Any) -> list[dict[str, Any]]:
        out = []
        for port in ports:
            dims: list[Any] = []
            for i, d in enumerate(port.get_partial_shape()):
                dims.append(d.get_length() if d.is_static else ("batch" if i == 0 else "?"))
            out.append({"name": port.get_any_name(), "shape": dims,
                        "dtype": port.get_element_type().to_dtype().name})
        return out

    return {"inputs": describe(model.inputs), "outputs": describe(model.outputs)}
