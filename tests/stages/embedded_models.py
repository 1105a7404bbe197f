"""Small models for the ExecuTorch / LiteRT tests (importable as `python:` factories by the CLI
subprocesses: tests/stages is on their PYTHONPATH).

Why a custom CNN and not resnet18: every .pte / .tflite conversion lowers the whole graph, and a
tiny CNN converts in seconds where resnet18 takes tens of seconds on a 2-core machine; its accuracy
on the digits is still real (trained, ~90 %+), so int8-vs-fp32 agreement means something.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class TinyCNN(nn.Module):
    def __init__(self, num_classes: int = 10, in_chans: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.fc = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class OddOp(nn.Module):
    """torch.linalg.det: traceable, but not in Core ATen, so no embedded target can lower it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.linalg.det(x[..., :3, :3]).unsqueeze(-1).unsqueeze(-1)


class DetCNN(TinyCNN):
    def __init__(self, num_classes: int = 10, in_chans: int = 1) -> None:
        super().__init__(num_classes, in_chans)
        self.odd = OddOp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(self.odd(x)))


def tiny_cnn(num_classes: int, in_chans: int) -> nn.Module:
    return TinyCNN(num_classes, in_chans)


def det_cnn(num_classes: int, in_chans: int) -> nn.Module:
    return DetCNN(num_classes, in_chans)


def make_tiny(folder: Path, *, factory: str = "tiny_cnn", steps: int = 150,
              outlier: bool = False) -> Path:
    """Train the tiny CNN on the digits for `steps` steps and save it as an edgemml model folder.

    outlier: one channel of the last feature map becomes a constant 600 (its BatchNorm: weight 0,
    bias 600) that the classifier ignores: harmless in float, but it stretches the per-tensor int8
    range of the activations after it so far that every other feature rounds to zero, so plain
    int8 loses most of its accuracy and the budget search must keep modules in float."""
    from quantize_export_helpers import PRE, digits

    from edgemml.config import ModelConfig
    from edgemml.models import ModelSpec, build_model, save_model
    from edgemml.training import TrainConfig, train

    data = digits()
    cfg = ModelConfig(python=f"embedded_models:{factory}")
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=10, in_chans=1)
    train(model, data.train, None, TrainConfig(max_steps=steps, batch_size=32, lr=3e-3,
                                               device="cpu"), seed=0)
    model.eval()
    if outlier:
        bn = model.features[4]
        with torch.no_grad():
            bn.weight[0], bn.bias[0] = 0.0, 600.0
            model.fc.weight[:, 0:16] = 0.0  # channel 0 of the 4x4 pooled map: 16 features
    spec = ModelSpec.from_config(cfg, num_classes=10, in_chans=1,
                                 class_names=list(data.classes), preprocess=PRE)
    save_model(model, spec, folder)
    return folder
