"""What each torchvision architecture supports, so a pipeline that cannot work is refused before
anything runs (`edgemml check` and `edgemml run` exit 2 naming the architecture, the stage and why)
instead of failing after minutes of training.

Every row was measured with torch 2.14.1 / torchvision 0.29.1 / torch-pruning 1.6 on this project's
CPU machine (the investigation behind issue 15):

* `min_size`: the smallest square input at which the family's smallest member runs in eval and in
  training mode (batch 2). Members of a family share the stem and the downsampling, hence the limit.
* fixed sizes: ViT builds its position embedding for `image_size` (default 224; a multiple of the
  patch size) and MaxViT its attention grids for `input_size` (default 224): they run only there.
* inception_v3 with its aux head (the default) needs 299x299 in training mode; 75 without it.
* `prune`: why pruning is refused, when it is. Swin / Swin-V2 / MaxViT: torch-pruning's graph build
  infers channels recursively through every window-partition reshape (torch 2.14's views no longer
  save their input sizes): swin_t took 39 s of CPU at 32x32, passed 6 GB at 64x64 and grew to
  21.7 GB at 224x224 before the kernel killed it; swin_v2_t and maxvit_t did not finish in 400 s.
  No torch-pruning option avoids the trace. Training, int8 and export of these models work.
* quantize: edgemml's int8 path writes the fp32 graph it quantizes as one ONNX file
  (quant_pre_process -> quantize_static, and OpenVINO's conversion of that file); a protobuf is
  limited to 2 GB, so models above 2 GB of fp32 weights (vit_h_14, regnet_y_128gf) are refused for
  int8. (The export stage stores such weights in an external .onnx.data file.)
* training memory: parameters x 16 bytes (fp32 weights, gradients and AdamW's two moments), before
  any activation, compared with the memory available when the pipeline is checked.

This module imports no torch: checking a pipeline stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

#: parameters (millions) of every torchvision classification architecture at 1000 classes
#: (torchvision's weights metadata; tests/unit/test_capabilities.py keeps it in sync)
PARAMS_M: dict[str, float] = {
    "alexnet": 61.1, "convnext_base": 88.6, "convnext_large": 197.8, "convnext_small": 50.2,
    "convnext_tiny": 28.6, "densenet121": 8.0, "densenet161": 28.7, "densenet169": 14.1,
    "densenet201": 20.0, "efficientnet_b0": 5.3, "efficientnet_b1": 7.8, "efficientnet_b2": 9.1,
    "efficientnet_b3": 12.2, "efficientnet_b4": 19.3, "efficientnet_b5": 30.4,
    "efficientnet_b6": 43.0, "efficientnet_b7": 66.3, "efficientnet_v2_l": 118.5,
    "efficientnet_v2_m": 54.1, "efficientnet_v2_s": 21.5, "googlenet": 6.6, "inception_v3": 27.2,
    "maxvit_t": 30.9, "mnasnet0_5": 2.2, "mnasnet0_75": 3.2, "mnasnet1_0": 4.4, "mnasnet1_3": 6.3,
    "mobilenet_v2": 3.5, "mobilenet_v3_large": 5.5, "mobilenet_v3_small": 2.5,
    "regnet_x_16gf": 54.3, "regnet_x_1_6gf": 9.2, "regnet_x_32gf": 107.8, "regnet_x_3_2gf": 15.3,
    "regnet_x_400mf": 5.5, "regnet_x_800mf": 7.3, "regnet_x_8gf": 39.6, "regnet_y_128gf": 644.8,
    "regnet_y_16gf": 83.6, "regnet_y_1_6gf": 11.2, "regnet_y_32gf": 145.0, "regnet_y_3_2gf": 19.4,
    "regnet_y_400mf": 4.3, "regnet_y_800mf": 6.4, "regnet_y_8gf": 39.4, "resnet101": 44.5,
    "resnet152": 60.2, "resnet18": 11.7, "resnet34": 21.8, "resnet50": 25.6,
    "resnext101_32x8d": 88.8, "resnext101_64x4d": 83.5, "resnext50_32x4d": 25.0,
    "shufflenet_v2_x0_5": 1.4, "shufflenet_v2_x1_0": 2.3, "shufflenet_v2_x1_5": 3.5,
    "shufflenet_v2_x2_0": 7.4, "squeezenet1_0": 1.2, "squeezenet1_1": 1.2, "swin_b": 87.8,
    "swin_s": 49.6, "swin_t": 28.3, "swin_v2_b": 87.9, "swin_v2_s": 49.7, "swin_v2_t": 28.4,
    "vgg11": 132.9, "vgg11_bn": 132.9, "vgg13": 133.0, "vgg13_bn": 133.1, "vgg16": 138.4,
    "vgg16_bn": 138.4, "vgg19": 143.7, "vgg19_bn": 143.7, "vit_b_16": 86.6, "vit_b_32": 88.2,
    "vit_h_14": 633.5, "vit_l_16": 304.3, "vit_l_32": 306.5, "wide_resnet101_2": 126.9,
    "wide_resnet50_2": 68.9,
}

_WINDOW_RESHAPES = ("torch-pruning's dependency graph infers channels recursively through every "
                    "window-partition reshape: swin_t took 39 s of CPU at 32x32, passed 6 GB at "
                    "64x64 and 21.7 GB at 224x224 (killed by the kernel); swin_v2_t and maxvit_t "
                    "did not finish in 400 s")
ONNX_LIMIT_BYTES = 2 * 2**30
TRAIN_BYTES_PER_PARAM = 16  # fp32 weights + gradients + AdamW's two moments


@dataclass(frozen=True)
class Family:
    """What one architecture family supports."""

    name: str
    prefixes: tuple[str, ...]
    min_size: int
    prune: str | None = None            # why pruning is refused; None: supported
    fixed_size_option: str | None = None  # model option the input size must equal
    measured_on: str = ""


FAMILIES: tuple[Family, ...] = (
    Family("alexnet", ("alexnet",), 63, measured_on="alexnet"),
    Family("vgg", ("vgg",), 32, measured_on="vgg11, vgg11_bn"),
    Family("squeezenet1_0", ("squeezenet1_0",), 21, measured_on="squeezenet1_0"),
    Family("squeezenet1_1", ("squeezenet1_1",), 17, measured_on="squeezenet1_1"),
    Family("resnet", ("resnet", "resnext", "wide_resnet"), 2,
           measured_on="resnet18, resnext50_32x4d, wide_resnet50_2"),
    Family("densenet", ("densenet",), 29, measured_on="densenet121"),
    Family("googlenet", ("googlenet",), 15, measured_on="googlenet (aux heads on)"),
    Family("inception_v3", ("inception_v3",), 75, measured_on="inception_v3 (aux_logits false)"),
    Family("mobilenet", ("mobilenet",), 2, measured_on="mobilenet_v2, mobilenet_v3_small"),
    Family("mnasnet", ("mnasnet",), 2, measured_on="mnasnet0_5"),
    Family("shufflenet_v2", ("shufflenet_v2",), 2, measured_on="shufflenet_v2_x0_5"),
    Family("efficientnet", ("efficientnet",), 2, measured_on="efficientnet_b0, efficientnet_v2_s"),
    Family("regnet", ("regnet",), 2, measured_on="regnet_x_400mf, regnet_y_400mf"),
    Family("convnext", ("convnext",), 32, measured_on="convnext_tiny"),
    Family("swin", ("swin_",), 4, prune=_WINDOW_RESHAPES, measured_on="swin_t, swin_v2_t"),
    Family("maxvit", ("maxvit",), 224, prune=_WINDOW_RESHAPES, fixed_size_option="input_size",
           measured_on="maxvit_t"),
    Family("vit", ("vit_",), 14, fixed_size_option="image_size", measured_on="vit_b_16"),
)

#: default sizes of the fixed-size options (torchvision's builders)
_FIXED_DEFAULT = {"image_size": 224, "input_size": 224}


def family_of(name: str) -> Family | None:
    """The family of a torchvision architecture name (without the torchvision/ prefix)."""
    for fam in FAMILIES:
        if name.startswith(fam.prefixes):
            return fam
    return None


@dataclass(frozen=True)
class Refusal:
    """Why a stage cannot work on an architecture, and what to do instead."""

    arch: str
    need: str    # build | train | prune | quantize | export
    reason: str
    hint: str | None = None


def _square(value: Any) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        return int(value[0])
    return None


def _patch(name: str) -> int | None:
    tail = name.rpartition("_")[2]
    return int(tail) if tail.isdigit() else None


def _build(name: str, fam: Family, options: dict[str, Any], size: tuple[int, int],
           arch: str) -> list[Refusal]:
    h, w = size
    if fam.fixed_size_option is not None:
        opt = fam.fixed_size_option
        fixed = _square(options.get(opt, _FIXED_DEFAULT[opt]))
        if fixed is None or (h, w) != (fixed, fixed):
            return [Refusal(arch, "build", f"{arch} runs only at the size it is built for "
                            f"(model.options.{opt} = {options.get(opt, _FIXED_DEFAULT[opt])}), "
                            f"and the input is {h}x{w}",
                            f"set model.options.{opt}: {h} (or preprocess.size to "
                            f"[{fixed}, {fixed}])")]
        patch = _patch(name) if fam.name == "vit" else None
        if patch and fixed % patch:
            return [Refusal(arch, "build", f"{arch}'s image_size {fixed} is not a multiple of its "
                            f"patch size {patch}", f"use a multiple of {patch}, e.g. "
                            f"{(fixed // patch + 1) * patch}")]
        return []
    if fam.name == "inception_v3" and options.get("aux_logits", True) and min(h, w) < 299:
        return [Refusal(arch, "build", f"{arch} with its aux head (the default) needs 299x299 in "
                        f"training mode, and the input is {h}x{w}",
                        "set model.options: {aux_logits: false} (then 75x75 is the minimum)")]
    if min(h, w) < fam.min_size:
        return [Refusal(arch, "build", f"{arch} needs an input of at least "
                        f"{fam.min_size}x{fam.min_size} (measured on {fam.measured_on}); the input "
                        f"is {h}x{w}", f"use preprocess.size >= [{fam.min_size}, {fam.min_size}]")]
    return []


def refusals(arch: str | None, options: dict[str, Any], size: tuple[int, int],
             needs: Iterable[str], *, available_mb: float | None = None) -> list[Refusal]:
    """What a stage that `needs` build / train / prune / export cannot do with this architecture
    at this input size. Unknown architectures (a user's `python:` factory) are never refused here:
    the prune stage's measured memory guard and its checks cover them."""
    if not arch or not arch.startswith("torchvision/"):
        return []
    name = arch[len("torchvision/"):]
    fam = family_of(name)
    needs = set(needs)
    out: list[Refusal] = []
    if fam is not None and needs & {"build", "train", "prune", "quantize", "export"}:
        out += _build(name, fam, options, size, arch)
    params = PARAMS_M.get(name)
    if "train" in needs and params is not None and available_mb is not None:
        need_mb = params * 1e6 * TRAIN_BYTES_PER_PARAM / 2**20
        if need_mb > 0.8 * available_mb:
            out.append(Refusal(arch, "train", f"training {arch} ({params:g} M parameters) needs "
                               f"at least {need_mb / 1024:.1f} GB (weights, gradients and AdamW "
                               f"state, before activations); this machine has "
                               f"{available_mb / 1024:.1f} GB available",
                               "use a smaller member of the family, or a machine with more "
                               "memory"))
    if "prune" in needs and fam is not None and fam.prune is not None:
        out.append(Refusal(arch, "prune", f"{arch} cannot be pruned: {fam.prune}",
                           "remove the prune stage for this architecture (train, int8 and export "
                           "work), or prune a CNN"))
    if "quantize" in needs and params is not None and params * 1e6 * 4 > ONNX_LIMIT_BYTES:
        out.append(Refusal(arch, "quantize", f"{arch} has {params * 4 / 1e3:.1f} GB of fp32 "
                           f"weights; edgemml quantizes a single-file fp32 ONNX graph, and a "
                           f"protobuf is limited to 2 GB", "export it in fp32 (the export stage "
                           "stores the weights in an .onnx.data file), or use a smaller "
                           "architecture for int8"))
    return out


def table() -> list[dict[str, Any]]:
    """One row per family: what the README's capability table shows."""
    return [{"family": f.name, "architectures": ", ".join(p + "*" for p in f.prefixes),
             "min_size": f.min_size, "fixed_size_option": f.fixed_size_option,
             "prune": "refused" if f.prune else "yes", "why": f.prune,
             "measured_on": f.measured_on} for f in FAMILIES]
