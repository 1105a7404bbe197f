"""Names of activations a `rewrite` stage may replace and put in their place, importable without torch.

The naming scheme, checked when the pipeline file is loaded (so `edgemml check` catches a typo):

* a **torch.nn class name** of an elementwise, parameter-free activation, spelled as torch spells
  it: `ReLU`, `ReLU6`, `SiLU`, `Hardswish`, `Hardsigmoid`, `GELU`, `Sigmoid`, `Tanh`, ...
  constructed with its defaults (`inplace` is kept from the module it replaces where both have it);
* an **alias** of edgemml for a torch class with fixed arguments, the arguments written into the
  name: `Hardtanh01` = `Hardtanh(min_val=0, max_val=1)` (ONNX `Clip(0, 1)`: the int8-friendly
  stand-in for a hard-sigmoid gate), `Swish` = `SiLU`.

Elementwise is the point: a replacement must keep every output shape, so torch.nn activations that
change shapes (GLU halves a dimension), normalise across a dimension (Softmax) or carry parameters
(PReLU) or arguments without defaults (Threshold) are refused, by name, with the reason. A test
checks that every class in torch.nn's activation module is classified here, so the lists cannot
fall behind torch.
"""

from __future__ import annotations

import difflib

# Elementwise, parameter-free torch.nn activations constructible with their defaults.
ELEMENTWISE: tuple[str, ...] = (
    "ReLU", "ReLU6", "LeakyReLU", "RReLU", "Hardtanh", "Hardsigmoid", "Hardswish", "SiLU", "Mish",
    "GELU", "Sigmoid", "Tanh", "ELU", "CELU", "SELU", "Softplus", "Softsign", "Hardshrink",
    "Softshrink", "Tanhshrink", "LogSigmoid", "Identity",
)

# edgemml's aliases: name -> (torch.nn class, constructor arguments).
ALIASES: dict[str, tuple[str, dict[str, float]]] = {
    "Hardtanh01": ("Hardtanh", {"min_val": 0.0, "max_val": 1.0}),
    "Swish": ("SiLU", {}),
}

# torch.nn activation classes that are not elementwise replacements, and why.
REFUSED: dict[str, str] = {
    "GLU": "GLU halves its input along a dimension: it changes output shapes",
    "Softmax": "Softmax normalises across a dimension: not an elementwise activation",
    "Softmin": "Softmin normalises across a dimension: not an elementwise activation",
    "LogSoftmax": "LogSoftmax normalises across a dimension: not an elementwise activation",
    "Softmax2d": "Softmax2d normalises across channels: not an elementwise activation",
    "MultiheadAttention": "MultiheadAttention is a layer with weights, not an activation",
    "PReLU": "PReLU has learnable parameters (its slope), which a rewrite would have to invent",
    "Threshold": "Threshold has no default arguments; write the function you want, e.g. ReLU",
}


def canonical(name: str) -> tuple[str, dict[str, float]]:
    """(torch.nn class name, constructor arguments) of a valid name (check_name first)."""
    return ALIASES.get(name, (name, {}))


def all_names() -> list[str]:
    return [*ELEMENTWISE, *ALIASES]


def check_name(name: str) -> str:
    """The name itself when it is a valid activation name; ValueError naming the fix otherwise."""
    if name in ELEMENTWISE or name in ALIASES:
        return name
    if name in REFUSED:
        raise ValueError(f"{name!r} cannot be used: {REFUSED[name]}")
    close = difflib.get_close_matches(name, all_names(), n=1, cutoff=0.6)
    by_case = [n for n in all_names() if n.lower() == name.lower()]
    guess = by_case[0] if by_case else (close[0] if close else None)
    raise ValueError(f"unknown activation {name!r}" + (f"; did you mean {guess!r}?" if guess else "")
                     + f" (torch.nn class names, spelled as torch does: {', '.join(ELEMENTWISE)}; "
                     f"aliases: {', '.join(f'{a} = {c}({_args(k)})' for a, (c, k) in ALIASES.items())})")


def _args(kwargs: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in kwargs.items())
