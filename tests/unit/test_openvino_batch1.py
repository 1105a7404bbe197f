"""OpenVINO int8 at batch 1 (regression: shipped bundles classified every digit as "8").

Measured with OpenVINO 2026.4.1 on the CPU plugin: an int8 IR with depthwise convolutions, compiled
with a dynamic batch, returns wrong outputs at batch 1 while batches of 2..32 of the same compiled
model, and a compile with a static batch of 1, are right (the zoo's trained mobilenet_v2: 9 % top-1
at batch 1, 100 % batched). Validate's accuracy ran batched, so nothing failed; latency (batch 1)
timed a wrong computation and predict.py, one image at a time, answered "8" to every digit.

Both places that run IRs at batch 1 — the runtime layer and the bundle's predict.py — now compile a
static batch. The test model is an untrained mobilenet_v2 with BatchNorm statistics estimated: its
int8 IR shows the same batch-1 discrepancy at a smaller scale (2 % of the logits' range), enough to
tell right from wrong.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ov = pytest.importorskip("openvino")
nncf = pytest.importorskip("nncf")


@pytest.fixture(scope="module")
def int8_ir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """An NNCF int8 IR of a gray 32x32 mobilenet_v2 with a dynamic batch, and 8 inputs."""
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=10)
    model.features[0][0] = torch.nn.Conv2d(1, 32, 3, 2, 1, bias=False)
    x = torch.randn(64, 1, 32, 32)
    with torch.no_grad():  # BatchNorm statistics, else every output is near-constant
        model.train()
        for _ in range(3):
            model(x)
    model.eval()
    folder = tmp_path_factory.mktemp("ov-int8")
    onnx_path = folder / "model.onnx"
    torch.onnx.export(model, (x[:2],), str(onnx_path), input_names=["x"],
                      dynamic_axes={"x": {0: "n"}}, dynamo=False)
    calibration = nncf.Dataset([x[i:i + 1].numpy() for i in range(len(x))])
    quantized = nncf.quantize(ov.convert_model(str(onnx_path)), calibration, subset_size=64)
    xml = folder / "model.xml"
    ov.save_model(quantized, str(xml), compress_to_fp16=False)
    return xml, x[:8].numpy()


def _one_by_one(run, x: np.ndarray) -> np.ndarray:
    return np.concatenate([run(x[i:i + 1]) for i in range(len(x))])


def _plain(xml: Path):
    """What a plain compile_model of the dynamic-batch IR gives (the defect's source)."""
    compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return lambda x: compiled.create_infer_request().infer([x])[compiled.output(0)].copy()


def test_this_openvino_is_wrong_at_batch_1_with_a_dynamic_batch(int8_ir) -> None:
    """The precondition of the tests below: without the static compile, batch 1 differs from
    the same samples batched. If this fails, OpenVINO is fixed and the workaround can go."""
    xml, x = int8_ir
    run = _plain(xml)
    batched = run(x)
    gap = np.abs(_one_by_one(run, x) - batched).max()
    assert gap > 1e-3 * np.abs(batched).max(), gap


def test_runtime_layer_gives_batched_results_at_batch_1(int8_ir) -> None:
    from edgemml import runtimes

    xml, x = int8_ir
    for exact in (True, False):
        runner = runtimes.backend("openvino").open(xml, threads=1, exact=exact)
        batched = runner(x)
        np.testing.assert_allclose(_one_by_one(runner, x), batched, rtol=0,
                                   atol=1e-5 * np.abs(batched).max())


def test_runner_over_a_compiled_model_gives_batched_results_at_batch_1(int8_ir) -> None:
    """NNCF's accuracy control hands over a compiled model, which cannot be reshaped."""
    from edgemml import runtimes

    xml, x = int8_ir
    ov_rt = runtimes.backend("openvino")
    compiled, precision = ov_rt.compile(xml, threads=1, exact=True)
    runner = ov_rt.runner_for(compiled, precision, threads=1, name="nncf")
    batched = runner(x)
    np.testing.assert_allclose(_one_by_one(runner, x), batched, rtol=0,
                               atol=1e-5 * np.abs(batched).max())


def test_bundle_predict_gives_batched_results_at_batch_1(int8_ir) -> None:
    from edgemml.exporters import predict_template

    xml, x = int8_ir
    run = predict_template.openvino_model(ov, xml.read_bytes(), xml.with_suffix(".bin").read_bytes(),
                                          {"INFERENCE_PRECISION_HINT": "f32"})
    batched = run(x)
    np.testing.assert_allclose(_one_by_one(run, x), batched, rtol=0,
                               atol=1e-5 * np.abs(batched).max())


class _Split:
    """The two things batch_of_one reads from an evaluation split."""

    def __init__(self, x: np.ndarray) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def first(self, n: int) -> np.ndarray:
        return self.x[:n]


def test_validate_fails_an_artifact_that_answers_otherwise_at_batch_1() -> None:
    """Any runtime, not only OpenVINO: validate compares one-at-a-time with batched outputs and
    a built-in gate fails the artifact when a prediction changes."""
    from edgemml.evaluation import batch_of_one
    from edgemml.report.gates import builtin_gates
    from edgemml.runtimes.base import Runner

    w = np.random.default_rng(0).normal(size=(12, 10)).astype(np.float32)

    def logits(x: np.ndarray) -> np.ndarray:  # wrong only for a lone sample, like the defect
        out = x.reshape(len(x), -1) @ w
        return out if len(x) > 1 else out[:, ::-1].copy()

    x = np.random.default_rng(1).normal(size=(40, 1, 3, 4)).astype(np.float32)
    bad = batch_of_one(Runner("bad", "test", 1, "f32", logits), _Split(x), logits(x))
    good = batch_of_one(Runner("good", "test", 1, "f32", lambda v: v.reshape(len(v), -1) @ w),
                        _Split(x), logits(x))
    assert bad["batch1_samples"] == 32 and bad["batch1_agreement"] < 0.5, bad
    assert good["batch1_agreement"] == 1.0 and good["batch1_max_rel_diff"] < 1e-6, good

    def tied(v: np.ndarray) -> np.ndarray:  # classes 0 and 1 tie; rounding decides at batch 1
        out = np.zeros((len(v), 10), np.float32)
        out[:, :2] = 5.0
        out[:, 1] += 1e-6 if len(v) == 1 else 0.0
        return out

    near_tie = batch_of_one(Runner("tie", "test", 1, "f32", tied), _Split(x), tied(x))
    assert near_tie["batch1_agreement"] == 1.0, near_tie  # a tie flipping is not a defect
    static = Runner("static", "test", 1, "f32", logits, static_batch=1)
    assert batch_of_one(static, _Split(x), logits(x)) == {}  # every call runs batch 1 anyway

    def entry(name: str, parity: dict) -> dict:
        return {"name": name, "reference": "torch", "parity": parity,
                "diversity": {"distinct_fraction": 1.0}}

    borderline = {**good, "batch1_agreement": 31 / 32}  # one flip: batch-dependent rounding
    entries = [entry("torch", good), entry("openvino-int8", bad), entry("onnx-int8", borderline)]
    rows = builtin_gates(entries, "torch", min_reference_diversity=None, min_correlation=None,
                         min_batch1_agreement=0.9)
    assert [(r["gate"], r["artifact"], r["status"]) for r in rows] == [
        ("parity.batch1", "openvino-int8", "fail")]
    assert "one sample at a time" in rows[0]["message"]
    assert builtin_gates(entries, "torch", min_reference_diversity=None, min_correlation=None,
                         min_batch1_agreement=None) == []  # null disables
