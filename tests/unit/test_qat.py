"""Quantization-aware training (edgemml.quantization.qat) with the real torchao, ONNX Runtime and
OpenVINO: a small conv net trained to a real accuracy on scikit-learn's digits, fine-tuned with
fake quantization, exported to one QDQ ONNX file that both runtimes run in int8."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

pytest.importorskip("torchao")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, TensorDataset, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images[:, None].astype(np.float32) / 8.0 - 1.0)
    y = d.target.astype(np.int64)
    xt, yt = torch.from_numpy(x[:1200]), torch.from_numpy(y[:1200])
    model = _net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(0, len(xt), (64,), generator=g)
        loss = nn.functional.cross_entropy(model.train()(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), TensorDataset(xt, yt), x[1200:], y[1200:]


@pytest.fixture(scope="module")
def qat(trained, tmp_path_factory):
    """One QAT fine-tune (20 steps) shared by the tests below; the state dict from before it."""
    from edgemml.quantization.qat import qat_to_onnx

    model, train_set, _, _ = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path_factory.mktemp("qat") / "qat.onnx"
    res = qat_to_onnx(model, train_set, train_set.tensors[0][:128].numpy(), out,
                      target="x86-vnni", max_steps=20, lr=1e-4, batch_size=32, seed=0,
                      log=lambda s: None)
    return res, before


def test_qat_writes_int8_qdq_onnx_that_both_runtimes_run(trained, qat, tmp_path: Path) -> None:
    import onnx
    import openvino as ov

    from edgemml import runtimes

    model, train_set, vx, vy = trained
    res, before = qat
    ref = runtimes.backend("torch").logits(model, vx)
    fp32 = float((ref.argmax(1) == vy).mean())
    assert fp32 > 0.85  # a model that classifies, so the int8 comparison means something

    assert res.steps == 20 and res.loss_start is not None and np.isfinite(res.loss_end)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched

    graph = onnx.load(str(res.onnx)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") >= 3 and ops.count("DequantizeLinear") >= 5
    inits = {i.name: i.data_type for i in graph.initializer}
    assert onnx.TensorProto.INT8 in inits.values()  # weights stored in int8

    q_ort = runtimes.predict(runtimes.open_artifact(res.onnx, threads=None), vx)
    int8 = float((q_ort.argmax(1) == vy).mean())
    assert int8 >= fp32 - 0.03, (fp32, int8)

    ir = tmp_path / "ir" / "model.xml"
    ov.save_model(ov.convert_model(str(res.onnx)), str(ir), compress_to_fp16=False)
    ops_ov = {op.get_type_name() for op in ov.Core().read_model(str(ir)).get_ordered_ops()}
    assert "FakeQuantize" in ops_ov
    q_ov = runtimes.predict(runtimes.open_artifact(ir, threads=None, exact=True), vx)
    assert float((q_ov.argmax(1) == q_ort.argmax(1)).mean()) >= 0.95


def test_qat_failure_to_prepare_is_a_stage_error(trained, tmp_path: Path) -> None:
    """A graph torch.export cannot capture is reported with the fix, not a traceback."""
    from edgemml.errors import StageError
    from edgemml.quantization.qat import qat_to_onnx

    class DataDependent(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow: torch.export refuses it
                return x.flatten(1)[:, :10]
            return -x.flatten(1)[:, :10]

    _, train_set, _, _ = trained
    with pytest.raises(StageError) as exc:
        qat_to_onnx(DataDependent(), train_set, train_set.tensors[0][:8].numpy(),
                    tmp_path / "q.onnx", target="x86-vnni", max_steps=1, lr=1e-4, batch_size=8,
                    seed=0, log=lambda s: None)
    assert "torch.export" in str(exc.value) and exc.value.hint


@pytest.mark.parametrize("margin_pp, replaces", [(1.0, True), (-1.0, False)])
def test_qat_replaces_post_training_int8_only_when_it_meets_the_budget(
        trained, qat, tmp_path: Path, margin_pp: float, replaces: bool) -> None:
    """The quantize stage's adoption step on both runtimes, with the real QAT file: a budget the
    QAT model meets (its measured drop + 1 pp) ships it in place of the post-training artifact
    (no layer in float any more, `met_by: qat`); a budget it misses (drop - 1 pp) leaves the
    post-training artifact, its float layers and its search untouched."""
    from types import SimpleNamespace

    from edgemml import runtimes
    from edgemml.quantization.budget import Budget, Scored, Searched, score
    from edgemml.stages._quantize import qat_ort, qat_ov

    model, _, vx, vy = trained
    res, _ = qat
    ref = runtimes.backend("torch").logits(model, vx)
    fp32_pct = 100 * float((ref.argmax(1) == vy).mean())
    q_drop = score(runtimes.predict(runtimes.open_artifact(res.onnx, threads=None), vx), vy, ref,
                   fp32_pct).drop_pp
    config = SimpleNamespace(budget=lambda: Budget(q_drop + margin_pp))
    a = SimpleNamespace(qat=res, val_x=vx, val_y=vy, ref=ref, fp32_pct=fp32_pct)
    ctx = SimpleNamespace(work_dir=tmp_path, log=lambda s: None)
    ptq = Scored(fp32_pct - 5.0, 5.0, 0.9)

    def searched() -> Searched:
        return Searched(plain=ptq, final=ptq, quantized_layers=3, float_layers=["conv1"],
                        search={"met": False, "met_by": None})

    shipped = tmp_path / "model.int8.onnx"
    shipped.write_bytes(b"post-training")
    ort = searched()
    entry = qat_ort(ctx, config, a, ort, shipped, "x86-vnni")
    assert entry["met"] is entry["replaced_ptq"] is replaces and entry["steps"] == 20
    assert entry["accuracy_drop_pp"] == pytest.approx(q_drop)
    if replaces:
        assert shipped.read_bytes() == res.onnx.read_bytes()
        assert ort.final.drop_pp == pytest.approx(q_drop) and ort.float_layers == []
        assert ort.search == {"met": True, "met_by": "qat"} and ort.met
    else:
        assert shipped.read_bytes() == b"post-training"
        assert ort.final is ptq and ort.float_layers == ["conv1"] and not ort.met

    ir_dir = tmp_path / "openvino"
    ir_dir.mkdir()
    (ir_dir / "post-training.txt").write_text("kept unless QAT replaces it")
    ov_res = searched()
    entry = qat_ov(ctx, config, a, ov_res, ir_dir, "x86-vnni")
    assert entry["met"] is replaces
    if replaces:  # the QAT IR, converted from the same file, runs and scores as reported
        assert not (ir_dir / "post-training.txt").exists() and ov_res.quantized_layers > 0
        q = runtimes.predict(runtimes.open_artifact(ir_dir / "model.xml", threads=None,
                                                    exact=True), vx)
        assert ov_res.final.top1_pct == pytest.approx(100 * float((q.argmax(1) == vy).mean()))
    else:
        assert (ir_dir / "post-training.txt").exists() and ov_res.final is ptq
