"""Build a model from a ModelConfig: torchvision classification builders or the user's own factory.

torchvision models are built with weights=None (weights come from checkpoints, never from a
download). For in_chans != 3 the stem conv is rebuilt with the same hyper-parameters, so 1-channel
(grayscale) and 4-channel (RGB-D) inputs work with every architecture. `python:` factories import the
user's code, which is why they are an explicit, separate key.
"""

from __future__ import annotations

import difflib
import importlib
from collections import OrderedDict
from typing import Any, Callable, Mapping

import torch
from torch import nn

from edgemml.config import (  # noqa: F401 - re-exported: the config loader checks names too
    TORCHVISION_PREFIX,
    ModelConfig,
    canonical_arch,
    known_architectures,
)
from edgemml.errors import ConfigError


def _import_factory(ref: str) -> Callable[..., nn.Module]:
    if ":" not in ref:
        raise ConfigError(f"python: {ref!r} must look like package.module:factory", key="model.python")
    module_name, attr = ref.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r} for model.python: {exc}", key="model.python",
                          hint="install the package or add its folder to PYTHONPATH") from None
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ConfigError(f"{module_name} has no attribute {attr!r}", key="model.python")
    if not callable(factory):
        raise ConfigError(f"{ref} is not callable", key="model.python")
    return factory  # type: ignore[return-value]


def build_model(cfg: ModelConfig, *, num_classes: int, in_chans: int) -> nn.Module:
    """A freshly initialised model. cfg.num_classes / cfg.in_chans, when set, override the kwargs."""
    num_classes = cfg.num_classes or num_classes
    in_chans = cfg.in_chans or in_chans
    options = dict(cfg.options)
    momentum = _bn_momentum(options.pop("bn_momentum", None))
    logit_relu = _logit_relu(cfg, options.pop("logit_relu", None))
    model = _build(cfg, options, num_classes, in_chans)
    if logit_relu is False:
        model.classifier[2] = nn.Identity()  # type: ignore[index]
    if momentum is not None:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = momentum
    return model


def _bn_momentum(value: Any) -> float | None:
    """`options.bn_momentum`, edgemml's own option: the BatchNorm momentum of every layer.

    Why: torchvision builds mobilenet_v3 and efficientnet_v2 with momentum 0.01, tuned for
    hundreds of ImageNet epochs; in a few hundred steps their running statistics lag so far behind
    the weights that the model evaluates at chance (while training fine). 0.1 is PyTorch's default.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ConfigError(f"model.options.bn_momentum must be a number in (0, 1], got {value!r}",
                          key="model.options.bn_momentum")
    return float(value)


def _logit_relu(cfg: ModelConfig, value: Any) -> bool | None:
    """`options.logit_relu`, edgemml's own option for torchvision's squeezenets (default false):
    keep the ReLU torchvision puts on the logits.

    Why off: with a ReLU on the logits a class whose output channel goes negative everywhere gets
    no gradient again and can never be predicted. squeezenet1_1 trained on the 10 digits classes
    (benchmarks/zoo.py) ended at 79 % with classes 2 and 6 never predicted (their logits 0 on
    every sample), however long it trained. The ReLU holds no weights, so checkpoints load the
    same either way; true rebuilds torchvision's exact head. None for other architectures.
    """
    squeeze = cfg.arch is not None and canonical_arch(cfg.arch).startswith(
        TORCHVISION_PREFIX + "squeezenet")
    if value is not None and (not squeeze or not isinstance(value, bool)):
        raise ConfigError(f"model.options.logit_relu must be true or false and applies only to "
                          f"torchvision's squeezenets, got {value!r} for {cfg.arch or cfg.python}",
                          key="model.options.logit_relu")
    return bool(value) if squeeze else None


def _build(cfg: ModelConfig, options: dict[str, Any], num_classes: int, in_chans: int) -> nn.Module:
    if cfg.python is not None:
        factory = _import_factory(cfg.python)
        try:
            model = factory(num_classes=num_classes, in_chans=in_chans, **options)
        except TypeError as exc:
            raise ConfigError(f"{cfg.python}(num_classes=..., in_chans=..., **options) failed: {exc}",
                              key="model.python",
                              hint="the factory must accept num_classes and in_chans keywords") from None
        if not isinstance(model, nn.Module):
            raise ConfigError(f"{cfg.python} returned {type(model).__name__}, not a torch.nn.Module",
                              key="model.python")
        return model
    assert cfg.arch is not None
    arch = canonical_arch(cfg.arch)
    known = known_architectures()
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=1, cutoff=0.6)
        raise ConfigError(f"unknown architecture {cfg.arch!r}; known: {', '.join(known)}",
                          key="model.arch",
                          hint=(f"did you mean {close[0]!r}? " if close else "")
                          + "or use model.python: package.module:factory for your own architecture")
    import torchvision

    name = arch[len(TORCHVISION_PREFIX):]
    if "weights" in options:
        raise ConfigError("model.options.weights is not supported; give a checkpoint such as "
                          "torchvision:ResNet18_Weights.IMAGENET1K_V1 to the migrate stage instead",
                          key="model.options.weights")
    try:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"cannot build {arch} with options {options}: {exc}", key="model.options") from None
    if in_chans != 3:
        replace_stem(model, in_chans)
    return model


# ------------------------------------------------------------------------------------------------
# Finding the stem and the classifier by running the model once
# ------------------------------------------------------------------------------------------------


def _first_conv_in_order(model: nn.Module) -> tuple[str, nn.Conv2d] | None:
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            return name, mod
    return None


def _trace_calls(model: nn.Module, types: tuple[type, ...], in_chans: int | None = None) -> tuple[
        list[tuple[str, nn.Module, torch.Tensor]], Any]:
    """Run a dummy input (trying a few sizes) and return the modules of `types` in call order."""
    if in_chans is None:
        first = _first_conv_in_order(model)
        in_chans = first[1].in_channels if first else 3
    calls: list[tuple[str, nn.Module, torch.Tensor]] = []
    names = {id(m): n for n, m in model.named_modules()}
    hooks = [m.register_forward_hook(lambda mod, inp, out: calls.append((names[id(mod)], mod, out)))
             for m in model.modules() if isinstance(m, types)]
    was_training = model.training
    model.eval()
    last_error: Exception | None = None
    output = None
    # A ViT runs only at the image_size it was built for: try that first.
    own = getattr(model, "image_size", None)
    sizes = ((own,) if isinstance(own, int) else ()) + (64, 224, 32, 299)
    try:
        for size in sizes:
            calls.clear()
            try:
                with torch.no_grad():
                    output = model(torch.zeros(1, in_chans, size, size))
                break
            except Exception as exc:  # noqa: BLE001 - wrong input size for this arch: try the next
                last_error = exc
        else:
            raise RuntimeError(f"could not run {type(model).__name__} on a dummy input: {last_error}")
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return calls, output


def find_stem_conv(model: nn.Module, in_chans: int | None = None) -> str:
    """Qualified name of the first Conv2d the input reaches (forward-hook order on a dummy input)."""
    try:
        calls, _ = _trace_calls(model, (nn.Conv2d,), in_chans)
    except RuntimeError:
        calls = []
    if calls:
        return calls[0][0]
    first = _first_conv_in_order(model)
    if first is None:
        raise ValueError(f"{type(model).__name__} has no Conv2d")
    return first[0]


def find_classifier(model: nn.Module, in_chans: int | None = None) -> str:
    """Qualified name of the layer producing the logits: the last Linear called (or a 1x1 Conv2d
    head like squeezenet's when no Linear runs)."""
    calls, output = _trace_calls(model, (nn.Linear, nn.Conv2d), in_chans)
    logits = output[0] if isinstance(output, (tuple, list)) else getattr(output, "logits", output)
    n_out = logits.shape[-1] if isinstance(logits, torch.Tensor) else None
    linears = [c for c in calls if isinstance(c[1], nn.Linear)]
    for name, mod, _ in reversed(linears):
        if n_out is None or mod.out_features == n_out:
            return name
    convs = [c for c in calls if isinstance(c[1], nn.Conv2d) and c[1].out_channels == n_out]
    if convs:
        return convs[-1][0]
    if linears:
        return linears[-1][0]
    raise ValueError(f"cannot find the classifier layer of {type(model).__name__}")


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at a dotted name (works inside Sequential and ModuleList)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def replace_stem(model: nn.Module, in_chans: int) -> str:
    """Rebuild the stem Conv2d for `in_chans` inputs, keeping every other hyper-parameter."""
    name = find_stem_conv(model)
    old = model.get_submodule(name)
    assert isinstance(old, nn.Conv2d)
    if old.groups != 1:
        raise ConfigError(f"the stem conv {name} is grouped (groups={old.groups}); in_chans cannot be "
                          f"changed for this architecture", key="model.in_chans")
    new = nn.Conv2d(in_chans, old.out_channels, old.kernel_size, stride=old.stride, padding=old.padding,
                    dilation=old.dilation, groups=1, bias=old.bias is not None,
                    padding_mode=old.padding_mode)
    set_submodule(model, name, new)
    return name


def adapt_stem_weight(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Turn an RGB stem kernel (out, 3, k, k) into one for `in_chans` inputs, for pretrained weights.

    1 channel: sum over RGB (a gray image = equal R, G, B gives the same response). More channels:
    keep RGB and give the extra ones the mean RGB kernel, scaled so activations keep their size.
    """
    if weight.shape[1] == in_chans:
        return weight
    if weight.shape[1] != 3:
        raise ValueError(f"can only adapt 3-channel stem weights, got {tuple(weight.shape)}")
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    if in_chans == 2:
        return weight.sum(dim=1, keepdim=True).repeat(1, 2, 1, 1) / 2
    extra = weight.mean(dim=1, keepdim=True).repeat(1, in_chans - 3, 1, 1)
    return torch.cat([weight, extra], dim=1) * (3.0 / in_chans)


def versioned_state(state: Mapping[str, torch.Tensor], model: nn.Module) -> OrderedDict[str, Any]:
    """`state` carrying the module versions (`_metadata`) of `model`'s own state dict.

    `load_state_dict` passes each module its `_version` from the state dict's `_metadata`; a plain
    dict (safetensors' load_file, a dict comprehension, a merged mapping) has none, and modules that
    check it fail: torchvision's MNASNet raises "version should be set to 1 or 2 instead of None".
    Every state dict edgemml loads into a module of this torchvision was written by the same code
    (or mapped key by key onto it), so the versions of the module it is loaded into are the right
    ones.
    """
    out: OrderedDict[str, Any] = OrderedDict(state)
    meta = getattr(state, "_metadata", None)
    if meta is None:
        meta = getattr(model.state_dict(), "_metadata", None)
    if meta is not None:
        out._metadata = meta  # type: ignore[attr-defined]
    return out
