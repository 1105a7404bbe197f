"""The built-in load stage: a saved model folder starts a pipeline; anything else is refused."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from conftest import run_cli, write
from edgemml.config import ModelConfig
from edgemml.models import ModelSpec, build_model, load_model, save_model

PIPELINE = """
name: loadtest
stages:
  - type: load
    path: {path}
"""


def test_load_copies_a_saved_model_and_refuses_other_folders(tmp_path: Path):
    cfg = ModelConfig(arch="torchvision/mobilenet_v3_small")
    model = build_model(cfg, num_classes=3, in_chans=1).eval()
    save_model(model, ModelSpec.from_config(cfg, num_classes=3, in_chans=1,
                                            class_names=["a", "b", "c"]), tmp_path / "saved")
    write(tmp_path / "p.yaml", PIPELINE.format(path="saved"))
    proc = run_cli("run", "p.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "runs/loadtest/01-load/model"
    loaded, spec = load_model(out)
    x = torch.randn(2, 1, 64, 64)
    assert torch.equal(loaded(x), model(x)) and spec.class_names == ["a", "b", "c"]
    metrics = json.loads((out.parent / "stage.json").read_text())["metrics"]
    assert metrics["num_classes"] == 3 and metrics["in_chans"] == 1

    (tmp_path / "empty").mkdir()
    write(tmp_path / "q.yaml", PIPELINE.format(path="empty"))
    proc = run_cli("run", "q.yaml", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "is not an edgemml model folder" in proc.stderr and "Traceback" not in proc.stderr
