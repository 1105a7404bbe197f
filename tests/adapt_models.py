"""Small user architectures (model: {python: "adapt_models:NAME"}) for the rewrite and growth tests:
standard torch modules only, cheap enough to train a few steps at 16x16 in a test."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import SqueezeExcitation


class Block(nn.Module):
    """A residual block x + f(x) with f = conv-bn-relu-conv-bn, then ReLU (resnet's BasicBlock)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    def __init__(self, num_classes: int, in_chans: int, width: int = 8, blocks: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        self.layers = nn.Sequential(*[Block(width) for _ in range(blocks)])
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


def tiny_resnet(num_classes: int, in_chans: int, width: int = 8, blocks: int = 1) -> nn.Module:
    return TinyResNet(num_classes, in_chans, width, blocks)


class TinyEdge(nn.Module):
    """What int8 targets dislike, in miniature: SiLU, GELU, Hardswish, a squeeze-excitation gate
    (ReLU + Hardsigmoid inside, as in mobilenet_v3), and optionally a functional SiLU."""

    def __init__(self, num_classes: int, in_chans: int, width: int = 8,
                 functional: bool = False) -> None:
        super().__init__()
        self.functional = functional
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width), nn.Hardswish(),
            SqueezeExcitation(2 * width, width // 2, scale_activation=nn.Hardsigmoid),
            nn.Conv2d(2 * width, 2 * width, 1, bias=False), nn.BatchNorm2d(2 * width), nn.GELU())
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        if self.functional:
            x = F.silu(x)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def tiny_edge(num_classes: int, in_chans: int, width: int = 8, functional: bool = False) -> nn.Module:
    return TinyEdge(num_classes, in_chans, width, functional)


def tiny_other(num_classes: int, in_chans: int, width: int = 8) -> nn.Module:
    """Another family: nothing is named like TinyResNet's modules."""
    return nn.Sequential(nn.Conv2d(in_chans, width, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


class SharedSE(nn.Module):
    """An SE gate whose output feeds a conv *and* a residual add: folding into the conv is wrong."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.se = SqueezeExcitation(width, width // 2)
        self.conv = nn.Conv2d(width, width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.se(x)
        return self.conv(y) + y


def random_bn(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, in eval mode: random init has identity
    BatchNorm, under which copied, zeroed or folded channels could look exact by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model.eval()
