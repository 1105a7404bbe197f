"""The training loop (edgemml.training) and the `finetune` stage through the real CLI.

Models are a tiny CNN with BatchNorm (`tiny_cnn`, also used by the pipelines below through
`model: {python: test_finetune:tiny_cnn}`) on builtin:digits at 16x16, one thread per process: the
loop, not the model, is under test. Numbers asserted are measured in the test, never copied in.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import cli_env, interruptible, run_cli, write
from edgemml.config import DataConfig, PreprocessConfig
from edgemml.data import DataSplits, load_data
from edgemml.training import (
    EarlyStopConfig,
    FreezeConfig,
    LrGroup,
    TrainConfig,
    TrainingInterrupted,
    distillation_loss,
    evaluate,
    train,
)

HERE = Path(__file__).resolve().parent


def tiny_cnn(num_classes: int, in_chans: int, width: int = 16) -> nn.Module:
    """conv-bn-relu, pool, conv-bn-relu, global pool, linear: ~5k parameters at width 16."""
    return nn.Sequential(
        nn.Conv2d(in_chans, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))


@pytest.fixture(autouse=True)
def _one_thread():
    # Bit-identity holds for a fixed thread count; one thread is also much faster on a shared box.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> DataSplits:
    return load_data(DataConfig(source="builtin:digits"),
                     PreprocessConfig(size=(16, 16), channels="gray"), seed=0,
                     base_dir=tmp_path_factory.mktemp("data"))


def _model(seed: int = 0, width: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return tiny_cnn(10, 1, width)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys=None) -> bool:
    return all(torch.equal(a[k], b[k]) for k in (keys or a))


# --------------------------------------------------------------------------------------------------
# The loop, in process
# --------------------------------------------------------------------------------------------------


def test_distillation_loss_equals_hand_computed_value():
    s = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    t = torch.tensor([[1.0, 1.0, 0.0], [0.0, 3.0, -2.0]])
    y = torch.tensor([0, 2])
    T, alpha = 2.0, 0.3

    def softmax(row):
        e = [math.exp(v) for v in row]
        return [v / sum(e) for v in e]

    kl = ce = 0.0
    for i in range(2):
        ps = softmax([v / T for v in s[i].tolist()])
        pt = softmax([v / T for v in t[i].tolist()])
        kl += sum(q * math.log(q / p) for p, q in zip(ps, pt))
        ce += -math.log(softmax(s[i].tolist())[y[i]])
    expected = alpha * T * T * kl / 2 + (1 - alpha) * ce / 2
    got = distillation_loss(s, t, y, temperature=T, alpha=alpha)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # KL summed over the batch = 0.30716, CE summed = 2.13421: 0.3*4*0.30716/2 + 0.7*2.13421/2
    assert expected == pytest.approx(0.931269, abs=1e-6)
    # alpha=1 and identical logits: nothing to learn from the teacher
    assert distillation_loss(s, s, y, temperature=T, alpha=1.0).item() == pytest.approx(0, abs=1e-7)


def test_tiny_model_overfits_a_tiny_dataset(digits):
    tiny = digits.train.subset(np.concatenate(
        [np.flatnonzero(digits.train.labels == c)[:3] for c in range(10)]))
    model = _model()
    cfg = TrainConfig(epochs=60, batch_size=10, lr=0.01, schedule="constant", weight_decay=0)
    res = train(model, tiny, None, cfg, seed=0)
    losses = [r["train_loss"] for r in res.history]
    assert losses[-1] < losses[0] / 10, losses
    assert evaluate(res.model, tiny)["top1_pct"] == 100.0
    assert res.best_epoch == 60  # no validation split: the last epoch is the result


def test_frozen_modules_are_bit_identical_then_trained(digits):
    cfg = TrainConfig(epochs=2, lr=0.02, batch_size=32, freeze=FreezeConfig(modules=["backbone"],
                                                                           epochs=2))
    model = _model()
    before = _state(model)
    res = train(model, digits.train, digits.val, cfg, seed=0)
    after = _state(res.model)
    backbone = [k for k in before if not k.startswith("9.")]  # 9 = the Linear head
    assert any("running_mean" in k for k in backbone)  # BatchNorm statistics are checked too
    assert _same(before, after, backbone), "a frozen module changed"
    assert not torch.equal(before["9.weight"], after["9.weight"]), "the head did not train"
    assert [r["frozen"] for r in res.history] == [True, True]
    assert res.frozen_params == len([k for k, _ in model.named_parameters() if not k.startswith("9.")])

    # One more epoch after the frozen ones: everything trains.
    model = _model()
    res = train(model, digits.train, digits.val, cfg.model_copy(update={"epochs": 3}), seed=0)
    assert [r["frozen"] for r in res.history] == [True, True, False]
    after3 = _state(res.model)
    assert not torch.equal(before["0.weight"], after3["0.weight"])
    assert not torch.equal(before["1.running_mean"], after3["1.running_mean"])


def test_discriminative_learning_rates_scale_the_updates(digits):
    base = TrainConfig(epochs=1, lr=0.01, batch_size=32, optimizer="sgd", weight_decay=0)
    deltas = {}
    for mult in (1.0, 0.01):
        model = _model()
        before = _state(model)
        cfg = base.model_copy(update={"lr_groups": [LrGroup(modules=["0"], lr_mult=mult)]})
        after = _state(train(model, digits.train, None, cfg, seed=0).model)
        deltas[mult] = float((after["0.weight"] - before["0.weight"]).norm())
    assert deltas[0.01] < deltas[1.0] / 20, deltas


def test_early_stopping_returns_the_best_epoch_not_the_last(digits):
    # Validation labels shifted by one: the better the model learns the train labels, the worse
    # its validation loss, so the best epoch is early and later epochs only get worse.
    val = digits.val.subset(np.arange(len(digits.val)))
    val.labels = (val.labels + 1) % 10
    cfg = TrainConfig(epochs=12, lr=0.02, batch_size=32,
                      early_stopping=EarlyStopConfig(metric="val_loss", patience=2))
    res = train(_model(), digits.train, val, cfg, seed=0)
    losses = [r["val_loss"] for r in res.history]
    assert res.stopped_early and len(res.history) == res.best_epoch + 2 < 12
    assert res.best_epoch == int(np.argmin(losses)) + 1
    assert losses[-1] > losses[res.best_epoch - 1]
    assert [r["best"] for r in res.history].count(True) >= 1
    assert res.history[res.best_epoch - 1]["best"] and not res.history[-1]["best"]
    # The returned weights are the best epoch's: re-measuring gives the recorded value.
    assert evaluate(res.model, val)["loss"] == pytest.approx(losses[res.best_epoch - 1], rel=1e-5)


def test_same_seed_gives_bit_identical_weights(digits):
    cfg = TrainConfig(epochs=2, lr=0.02, batch_size=32,
                      augment={"rotation": 10, "translate": 0.1, "brightness": 0.2})
    runs = [_state(train(_model(), digits.train, digits.val, cfg, seed=s).model) for s in (0, 0, 1)]
    assert _same(runs[0], runs[1])
    assert not _same(runs[0], runs[2]), "a different seed must give different weights"


class _InterruptAfter:
    """A progress factory that raises KeyboardInterrupt (as Ctrl-C would) at the n-th step."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __call__(self, description, total):
        import contextlib
        outer = self

        class Handle:
            done = 0

            def advance(self, n=1):
                self.done += n
                if self.done >= outer.steps:
                    raise KeyboardInterrupt

            def update(self, **kw):
                pass
        return contextlib.nullcontext(Handle())


def test_resume_after_interrupt_matches_an_uninterrupted_run(digits, tmp_path):
    cfg = TrainConfig(epochs=4, lr=0.02, batch_size=64, augment={"rotation": 10})
    steps_per_epoch = math.ceil(len(digits.train) / 64)
    full = train(_model(), digits.train, digits.val, cfg, seed=3, checkpoint_dir=tmp_path / "a")

    ckpt = tmp_path / "b"
    ckpt.mkdir()
    with pytest.raises(TrainingInterrupted) as info:  # Ctrl-C in the middle of epoch 3
        train(_model(), digits.train, digits.val, cfg, seed=3, checkpoint_dir=ckpt,
              progress=_InterruptAfter(2 * steps_per_epoch + 3))
    stopped = info.value.result
    assert len(stopped.history) == 2 and stopped.best_epoch in (1, 2)
    assert stopped.history == full.history[:2]
    logs: list[str] = []
    resumed = train(_model(), digits.train, digits.val, cfg, seed=3, checkpoint_dir=ckpt,
                    log=logs.append)
    assert resumed.resumed_from == 3
    assert any("resuming training at epoch 3" in m for m in logs), logs
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4]
    assert resumed.history == full.history
    assert _same(_state(resumed.model), _state(full.model)), "resume must not change the result"


# --------------------------------------------------------------------------------------------------
# The stage, through the CLI
# --------------------------------------------------------------------------------------------------

PIPELINE = """
name: ft
seed: 0
preprocess: {size: [16, 16], channels: gray, mean: [0.5], std: [0.5]}
data: {source: "builtin:digits"}
stages:
  - type: finetune
    name: pretrain
    model: {python: "test_finetune:tiny_cnn", options: {width: 16}}
    epochs: 8
    lr: 0.02
    batch_size: 32
    augment: {rotation: 8}
    freeze: {modules: [backbone], epochs: 1}
    early_stopping: {patience: 3}
  - type: finetune
    name: student
    model: {python: "test_finetune:tiny_cnn", options: {width: 8}}
    teacher: {stage: pretrain, temperature: 3, alpha: 0.7}
    epochs: 4
    lr: 0.03
    batch_size: 32
  - type: finetune
    name: reload
    model: {python: "test_finetune:tiny_cnn", options: {width: 16}}
    init_checkpoint: runs/ft/01-pretrain/model/model.safetensors
    teacher:
      checkpoint: runs/ft/01-pretrain/model/model.safetensors
      model: {python: "test_finetune:tiny_cnn", options: {width: 16}}
    epochs: 0
"""


def _env() -> dict[str, str]:
    return cli_env({"PYTHONPATH": os.pathsep.join([str(HERE), cli_env()["PYTHONPATH"]]),
                    "OMP_NUM_THREADS": "1"})


def _explain(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


def test_finetune_stage_end_to_end(tmp_path, digits):
    from edgemml.models import load_model

    write(tmp_path / "pipeline.yaml", PIPELINE)
    proc = run_cli("run", "pipeline.yaml", cwd=tmp_path, env=_env())
    assert proc.returncode == 0, _explain(proc)
    run = tmp_path / "runs/ft"
    pre, stu = run / "01-pretrain", run / "02-student"
    for d in (pre, stu):
        assert sorted(p.name for p in d.iterdir()) == [
            "curves.png", "finetune.json", "history.json", "model", "samples.png", "stage.json"]
    hist = json.loads((pre / "history.json").read_text())
    rows = hist["epochs"]
    val_acc = [r["val_top1_pct"] for r in rows]
    assert hist["best_epoch"] == int(np.argmax(val_acc)) + 1  # the first best epoch
    assert rows[0]["frozen"] and not rows[1]["frozen"]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]

    report = json.loads((pre / "finetune.json").read_text())
    record = json.loads((pre / "stage.json").read_text())
    assert report["data"]["sizes"] == {"train": 1257, "val": 270, "test": 270}
    assert report["best_epoch"] == hist["best_epoch"]
    assert report["val"]["top1_pct"] == pytest.approx(val_acc[hist["best_epoch"] - 1], abs=1e-7)
    assert report["test"]["top1_pct"] > 85, report["test"]  # 10 classes: chance is 10 %
    assert record["metrics"]["test_top1_pct"] == report["test"]["top1_pct"]
    assert set(record["outputs"]) == {"model", "history", "curves", "report", "samples"}

    # The saved model is the best epoch's: measuring it again gives the reported numbers.
    model, spec = load_model(pre / "model")
    assert spec.class_names == digits.classes and spec.in_chans == 1
    assert spec.extra["preprocess"]["size"] == [16, 16]
    assert spec.extra["best_epoch"] == hist["best_epoch"]
    torch.manual_seed(0)
    assert evaluate(model, digits.test)["top1_pct"] == pytest.approx(report["test"]["top1_pct"])
    with Image.open(pre / "curves.png") as img:
        assert img.format == "PNG" and img.size == (900, 360)
    with Image.open(pre / "samples.png") as img:  # a grid of 10 classes x 8 training images
        assert img.format == "PNG" and img.width > 8 * 16 and img.height > 10 * 16

    s_report = json.loads((stu / "finetune.json").read_text())
    s_record = json.loads((stu / "stage.json").read_text())
    assert set(s_record["inputs"]) == {"pretrain"}  # the teacher entered the fingerprint
    assert s_report["teacher"]["source"] == "pretrain"
    assert s_report["teacher"]["val_top1_pct"] == pytest.approx(report["val"]["top1_pct"])
    assert s_report["model"]["params"] < report["model"]["params"] / 3
    assert s_report["test"]["top1_pct"] > 50

    # epochs: 0 = evaluate only: weights loaded by init_checkpoint measure exactly as the source
    # stage's, and so does the checkpoint teacher (a teacher must load completely).
    r_report = json.loads((run / "03-reload/finetune.json").read_text())
    assert r_report["init"]["loaded"] == len(model.state_dict()) and not r_report["init"]["skipped"]
    assert r_report["test"]["top1_pct"] == report["test"]["top1_pct"]
    assert r_report["teacher"]["val_top1_pct"] == report["val"]["top1_pct"]
    assert r_report["epochs_run"] == 0
    fp_files = json.loads((run / "03-reload/stage.json").read_text())["fingerprint_inputs"]
    assert "runs/ft/01-pretrain/model/model.safetensors" in fp_files["data_files"]

    again = run_cli("run", "pipeline.yaml", cwd=tmp_path, env=_env())
    assert again.returncode == 0 and "0 stage(s) ran, 3 cached" in again.stdout, _explain(again)


def test_finetune_config_errors_name_the_key(tmp_path):
    write(tmp_path / "pipeline.yaml", PIPELINE.replace("teacher: {stage: pretrain,",
                                                       "teacher: {stage: pretrian,"))
    proc = run_cli("check", "pipeline.yaml", cwd=tmp_path, env=_env())
    assert proc.returncode == 2 and "unknown stage 'pretrian'" in proc.stderr, _explain(proc)
    assert "did you mean 'pretrain'" in proc.stderr
    write(tmp_path / "pipeline.yaml", PIPELINE.replace("epochs: 8", "epochs: 8\n    epoch: 3"))
    proc = run_cli("check", "pipeline.yaml", cwd=tmp_path, env=_env())
    assert proc.returncode == 2 and "did you mean 'epochs'" in proc.stderr, _explain(proc)


RESUME = """
name: resume
seed: 0
preprocess: {size: [16, 16], channels: gray}
data: {source: "builtin:digits"}
stages:
  - type: finetune
    model: {python: "test_finetune:tiny_cnn", options: {width: 16}}
    epochs: 10
    lr: 0.02
    batch_size: 32
"""


def test_ctrl_c_keeps_the_best_weights_and_a_rerun_resumes(tmp_path):
    write(tmp_path / "pipeline.yaml", RESUME)
    partial = tmp_path / "runs/resume/.01-finetune.partial"
    last = partial / "checkpoint/last.pt"
    proc = subprocess.Popen([sys.executable, "-m", "edgemml.cli", "run", "pipeline.yaml"],
                            cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)
    deadline = time.time() + 120
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)  # Ctrl-C, after epoch 1's checkpoint exists
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, f"{proc.returncode}\n{out}\n{err}"
    assert not (tmp_path / "runs/resume/01-finetune").exists(), "an interrupted stage looks finished"
    saved = torch.load(last, weights_only=True)
    done = int(saved["state"]["epoch"]) + 1
    assert 1 <= done < 10
    kept = json.loads((partial / "history.json").read_text())  # written on Ctrl-C
    assert (partial / "model/model.safetensors").exists() and kept["best_epoch"] is not None
    assert json.loads((tmp_path / "runs/resume/run.json").read_text())["status"] == "interrupted"

    again = run_cli("run", "pipeline.yaml", cwd=tmp_path, env=_env())
    assert again.returncode == 0, _explain(again)
    assert f"resuming training at epoch {done + 1} of 10" in again.stderr, again.stderr
    final = tmp_path / "runs/resume/01-finetune"
    hist = json.loads((final / "history.json").read_text())
    assert hist["resumed_from_epoch"] == done + 1
    assert [r["epoch"] for r in hist["epochs"]] == list(range(1, 11))
    assert hist["epochs"][:done] == saved["state"]["history"], \
        "epochs before the interrupt were redone"
    assert not (final / "checkpoint").exists() and not partial.exists()
