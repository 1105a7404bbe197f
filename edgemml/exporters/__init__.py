"""Conversion of a torch model into deployable files (ONNX, OpenVINO IR) and the device bundle.

Thin wrappers over torch.onnx, onnx, onnxruntime and openvino that add what those libraries leave to
the caller: checking that the file written is the file asked for (opset, self-contained), comparing
its outputs with torch right after conversion, and naming the precision a runtime actually used.
Shared by the quantize, export and validate stages. Submodules import their heavy libraries
themselves; importing this package costs nothing.
"""
