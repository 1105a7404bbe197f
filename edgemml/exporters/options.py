"""Options of the ONNX conversion, shared by the quantize and export stages (pydantic only: stage
modules import this at config-validation time, when torch must not be imported yet)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from edgemml.config import StrictModel


class OnnxOptions(StrictModel):
    """How the torch model becomes an ONNX graph."""

    exporter: Literal["auto", "dynamo", "torchscript"] = Field(
        "auto", description="auto: torch's dynamo exporter, falling back to the TorchScript one when "
        "it fails or cannot write the requested opset (the choice and reason are reported); dynamo or "
        "torchscript: only that one (failure is an error).")
    opset: int = Field(18, ge=11, le=23, description="ONNX opset to write; the opset actually "
                       "written is checked and reported (dynamo writes >= 18).")
    input_name: str = Field("input", min_length=1, description="Name of the graph input.")
    output_name: str = Field("logits", min_length=1, description="Name of the graph output.")
    dynamic_batch: bool = Field(True, description="Symbolic batch dimension (else batch 1).")
