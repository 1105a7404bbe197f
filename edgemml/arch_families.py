"""Architecture families of torchvision's classifiers, importable without torch.

Growth (migrate's `grow:`) maps every source tensor onto the target by name, so it only works
between members of one family built from the same blocks: resnet18 -> resnet34 (BasicBlock),
resnet50 -> wide_resnet50_2 (Bottleneck), efficientnet_b0 -> b1, mobilenet_v3_small with a larger
width_mult. Knowing the family from the name lets `edgemml check` refuse resnet -> mobilenet
before anything is built; architectures not listed here (a user's `python:` factory) are checked
by the stage, which needs every source tensor to have a counterpart in the target.
"""

from __future__ import annotations

import re

_FAMILIES: tuple[tuple[str, str], ...] = (
    (r"resnet(18|34)", "resnet (BasicBlock)"),
    (r"resnet(50|101|152)|wide_resnet(50|101)_2|resnext\d+_\d+x\d+d", "resnet (Bottleneck)"),
    (r"efficientnet_b[0-7]", "efficientnet"),
    (r"efficientnet_v2_[sml]", "efficientnet_v2"),
    (r"mobilenet_v2", "mobilenet_v2"),
    (r"mobilenet_v3_(small|large)", "mobilenet_v3"),
    (r"vgg\d+", "vgg"),
    (r"vgg\d+_bn", "vgg_bn"),
    (r"densenet\d+", "densenet"),
    (r"regnet_x_\w+", "regnet_x"),
    (r"regnet_y_\w+", "regnet_y"),
    (r"shufflenet_v2_x\d_\d", "shufflenet_v2"),
    (r"mnasnet\d_\d+", "mnasnet"),
    (r"convnext_(tiny|small|base|large)", "convnext"),
    (r"squeezenet1_[01]", "squeezenet"),
    (r"swin_[tsb]", "swin"),
    (r"swin_v2_[tsb]", "swin_v2"),
    (r"vit_[bhl]_\d+", "vit"),
    (r"maxvit_t", "maxvit"),
    (r"alexnet", "alexnet"),
    (r"googlenet", "googlenet"),
    (r"inception_v3", "inception_v3"),
)


def short_name(arch: str) -> str:
    return arch.split("/", 1)[1] if arch.startswith("torchvision/") else arch


def family(arch: str | None) -> str | None:
    """The family of a torchvision architecture name (with or without `torchvision/`), else None."""
    if not arch:
        return None
    name = short_name(arch)
    for pattern, fam in _FAMILIES:
        if re.fullmatch(pattern, name):
            return fam
    return None


def weights_arch(ref: str) -> str | None:
    """The architecture of torchvision weights: `ResNet18_Weights.IMAGENET1K_V1` -> `resnet18`."""
    head = ref.split(":", 1)[-1].split(".", 1)[0]
    if not head.endswith("_Weights"):
        return None
    return head[: -len("_Weights")].lower()
