"""Per-layer int8 error (edgemml.quantization.perlayer) with the real quantizers and runtimes.

The model has a planted fault: one channel of conv2's output is 300x larger than the others, so
the per-tensor activation scale of that tensor rounds the other channels away; conv3 reads only
those other channels. The tool must name conv3 as the worst layer, by a wide margin, while the
layers before the fault keep a high SQNR.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgemml.quantization import perlayer


class Faulty(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 10)
        with torch.no_grad():
            self.conv2.weight[0] *= 300
            self.conv2.bias[0] = 50.0
            self.conv3.weight[:, 0] = 0  # conv3 reads only the channels the outlier crushes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | np.ndarray]:
    from edgemml.quantization.ort import OrtQuantizer, OrtSettings, preprocess_for_quantization

    root = tmp_path_factory.mktemp("perlayer")
    x = np.random.default_rng(0).standard_normal((48, 1, 16, 16)).astype(np.float32)
    fp32 = root / "fp32.onnx"
    torch.onnx.export(Faulty().eval(), (torch.from_numpy(x[:2]),), str(fp32), dynamo=False,
                      opset_version=17, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}})
    prepped = root / "prepped.onnx"
    preprocess_for_quantization(fp32, prepped)
    settings = OrtSettings(method="minmax", percentile=99.999, per_channel=True,
                           activation_type="uint8", weight_type="int8", reduce_range=False)
    int8 = OrtQuantizer(prepped, x, settings, root).quantize(root / "int8.onnx")
    return {"fp32": prepped, "int8": int8, "x": x, "root": root}


def test_sqnr_of_known_noise() -> None:
    rng = np.random.default_rng(1)
    ref = rng.standard_normal(100_000)
    assert perlayer.sqnr_db(ref, ref + 0.01 * rng.standard_normal(100_000)) == \
        pytest.approx(40.0, abs=0.2)
    assert perlayer.sqnr_db(ref, ref) == math.inf


def test_ort_per_layer_names_the_layer_that_int8_breaks(quantized) -> None:
    res = perlayer.ort_per_layer(quantized["fp32"], quantized["int8"], quantized["x"],
                                 quantized["root"] / "tmp")
    assert res.matched_by == "name"
    by_op = {}
    for r in res.layers:
        by_op.setdefault(r.op, []).append(r)
    assert len(by_op["Conv"]) == 3 and len(by_op["Gemm"]) == 1
    assert all(r.quantized for r in by_op["Conv"])
    worst = res.worst(1)[0]
    conv1 = next(r for r in by_op["Conv"] if r is by_op["Conv"][0])
    assert worst.op == "Conv" and worst.layer != conv1.layer
    assert worst.sqnr_db < 15 and conv1.sqnr_db > 30, [(r.layer, r.sqnr_db) for r in res.layers]
    assert conv1.sqnr_db - worst.sqnr_db > 15
    summary = res.summary(2)
    assert summary["layers"] == len(res.layers) and len(summary["worst"]) == 2
    assert summary["worst"][0]["sqnr_db"] == worst.sqnr_db and summary["min_sqnr_db"] == \
        worst.sqnr_db
    assert not list((quantized["root"] / "tmp").glob("perlayer.*"))  # augmented copies removed


def test_openvino_per_layer_agrees_on_the_worst_layer(quantized, tmp_path: Path) -> None:
    from edgemml.quantization.budget import Budget
    from edgemml.quantization.ov import OvSettings, quantize_ir

    x = quantized["x"]
    ir_fp32 = perlayer.ov_ir_from_onnx(quantized["fp32"], tmp_path / "fp32")
    res_q, _ = quantize_ir(quantized["fp32"], tmp_path / "int8", x,
                           OvSettings(preset="performance", fast_bias_correction=True,
                                      model_type=None, subset_size=len(x)),
                           val_x=x[:8], val_y=np.zeros(8, dtype=np.int64),
                           ref=np.zeros((8, 10), np.float32), fp32_pct=None, budget=Budget(),
                           max_float_layers=None, log=lambda s: None)
    ticks = []
    res = perlayer.ov_per_layer(ir_fp32, tmp_path / "int8" / "model.xml", x,
                                progress=lambda: ticks.append(1))
    assert res.matched_by == "name" and len(res.layers) == 4 and len(ticks) == 4
    convs = [r for r in res.layers if r.op == "Convolution"]
    assert len(convs) == 3 and all(r.quantized for r in convs)
    assert res.worst(1)[0].sqnr_db < convs[0].sqnr_db - 10


def test_tapping_the_op_that_already_is_the_model_output(tmp_path) -> None:
    """The logits op of an IR is a model output already: OpenVINO keeps that output's names, not the
    tap's, so the tap was 'not found' and quantize crashed (exit 3) on mobilenet_v3_small."""
    import numpy as np
    import openvino as ov
    import torch

    from edgemml.runtimes.openvino import tapped_outputs

    m = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                            torch.nn.Linear(4 * 6 * 6, 3)).eval()
    x = torch.randn(2, 1, 8, 8)
    torch.onnx.export(m, x, tmp_path / "m.onnx", input_names=["x"], output_names=["logits"],
                      dynamo=False)
    model = ov.Core().read_model(str(tmp_path / "m.onnx"))
    names = [op.get_friendly_name() for op in model.get_ordered_ops()
             if op.get_type_name() in ("Convolution", "MatMul", "Add")]
    assert "logits" in names
    out = tapped_outputs(model, names, x.numpy())
    np.testing.assert_allclose(out["logits"], m(x).detach().numpy(), atol=1e-5)


def test_a_name_shared_by_layers_of_different_shapes_is_not_compared(tmp_path: Path) -> None:
    """densenet121's int8 IR had two convolutions whose names belonged to fp32 layers of another
    output shape: the tool compared them and crashed ('shape mismatch', exit 3) in the zoo
    benchmark. A name now matches only with the same shape; the others are named in the note."""
    import openvino as ov
    import openvino.opset13 as ops

    def ir(stride: int, folder: str) -> Path:
        x = ops.parameter(ov.PartialShape([-1, 1, 8, 8]), np.float32, name="x")
        w1 = ops.constant(np.ones((4, 1, 3, 3), np.float32))
        a = ops.convolution(x, w1, [1, 1], [1, 1], [1, 1], [1, 1])
        a.set_friendly_name("same")
        w2 = ops.constant(np.ones((4, 4, 1, 1), np.float32) * 0.1)
        b = ops.convolution(a, w2, [stride, stride], [0, 0], [0, 0], [1, 1])
        b.set_friendly_name("shared_name")
        path = tmp_path / folder / "model.xml"
        ov.save_model(ov.Model([ops.reduce_mean(b, [2, 3], False)], [x]), str(path))
        return path

    x = np.random.default_rng(0).random((2, 1, 8, 8), dtype=np.float32)
    res = perlayer.ov_per_layer(ir(1, "a"), ir(2, "b"), x)
    assert [r.layer for r in res.layers] == ["same"]
    assert res.layers[0].sqnr_db > 100  # identical layers
