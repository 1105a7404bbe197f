"""Save and reload models without pickle: model.safetensors + model.json (a ModelSpec).

Why not torch.save(model): unpickling runs code and ties the file to class paths. Instead the JSON
spec names the architecture and options, and records the shapes of layers that differ from a freshly
built model (structured pruning removes channels). Loading rebuilds the architecture, swaps in
modules of the recorded shapes, and loads the weights with strict=True, so nothing is silently lost.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from edgemml.artifacts import atomic_path, write_text_atomic
from edgemml.config import ModelConfig
from edgemml.errors import InputError
from edgemml.models.registry import build_model, set_submodule, versioned_state

MODEL_WEIGHTS = "model.safetensors"
MODEL_SPEC = "model.json"
SPEC_VERSION = 1


class ModelSpec(BaseModel):
    """Everything needed to rebuild a saved model's module before loading its weights."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = Field(SPEC_VERSION, description="model.json format version.")
    arch: str | None = Field(None, description="torchvision/<name>, when built from torchvision.")
    python: str | None = Field(None, description="package.module:factory of a user architecture.")
    num_classes: int = Field(..., ge=1, description="Number of outputs.")
    in_chans: int = Field(3, ge=1, description="Input channels.")
    options: dict[str, Any] = Field(default_factory=dict, description="Builder keyword arguments.")
    class_names: list[str] = Field(default_factory=list, description="Class names in label order.")
    layer_shapes: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Module name -> {type, constructor args} for layers whose shape differs from the "
        "freshly built architecture (e.g. after structured pruning).")
    param_shapes: dict[str, list[int]] = Field(
        default_factory=dict,
        description="Bare parameters/buffers (not inside a recorded layer) whose shape differs.")
    module_types: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Module name -> {type, args} for parameter-free modules replaced by another "
        "(a rewrite: SiLU -> ReLU6, a squeeze-excitation block -> Identity); applied first.")
    attributes: dict[str, dict[str, int]] = Field(
        default_factory=dict,
        description="Module name -> plain integer attributes that differ from the freshly built "
        "architecture and that its forward reads (e.g. VisionTransformer.hidden_dim after pruning).")
    extra: dict[str, Any] = Field(default_factory=dict, description="Free metadata (stage, metrics...).")

    def model_cfg(self) -> ModelConfig:
        return ModelConfig(arch=self.arch, python=self.python, num_classes=self.num_classes,
                           in_chans=self.in_chans, options=dict(self.options))

    @classmethod
    def from_config(cls, cfg: ModelConfig, *, num_classes: int, in_chans: int,
                    class_names: list[str] | None = None, **extra: Any) -> ModelSpec:
        return cls(arch=cfg.arch, python=cfg.python, num_classes=cfg.num_classes or num_classes,
                   in_chans=cfg.in_chans or in_chans, options=dict(cfg.options),
                   class_names=list(class_names or []), extra=dict(extra))


# Layer types whose shape-defining constructor arguments are recorded, and how to read them.
def _conv_args(m: nn.modules.conv._ConvNd) -> dict[str, Any]:
    return {"in_channels": m.in_channels, "out_channels": m.out_channels,
            "kernel_size": list(m.kernel_size), "stride": list(m.stride),
            "padding": m.padding if isinstance(m.padding, str) else list(m.padding),
            "dilation": list(m.dilation), "groups": m.groups, "bias": m.bias is not None,
            "padding_mode": m.padding_mode}


def _bn_args(m: nn.modules.batchnorm._BatchNorm) -> dict[str, Any]:
    return {"num_features": m.num_features, "eps": m.eps, "momentum": m.momentum, "affine": m.affine,
            "track_running_stats": m.track_running_stats}


def _mha_args(m: nn.MultiheadAttention) -> dict[str, Any]:
    return {"embed_dim": m.embed_dim, "num_heads": m.num_heads, "dropout": m.dropout,
            "bias": m.in_proj_bias is not None, "add_bias_kv": m.bias_k is not None,
            "add_zero_attn": m.add_zero_attn, "kdim": m.kdim, "vdim": m.vdim,
            "batch_first": m.batch_first}


def _ln_args(m: nn.LayerNorm) -> dict[str, Any]:
    return {"normalized_shape": list(m.normalized_shape), "eps": m.eps,
            "elementwise_affine": m.elementwise_affine, "bias": getattr(m, "bias", None) is not None}


_LAYERS: dict[type, Any] = {
    nn.Conv1d: _conv_args, nn.Conv2d: _conv_args, nn.Conv3d: _conv_args,
    nn.BatchNorm1d: _bn_args, nn.BatchNorm2d: _bn_args, nn.BatchNorm3d: _bn_args,
    nn.Linear: lambda m: {"in_features": m.in_features, "out_features": m.out_features,
                          "bias": m.bias is not None},
    nn.LayerNorm: _ln_args,
    nn.GroupNorm: lambda m: {"num_groups": m.num_groups, "num_channels": m.num_channels,
                             "eps": m.eps, "affine": m.affine},
    nn.PReLU: lambda m: {"num_parameters": m.num_parameters},
    nn.MultiheadAttention: _mha_args,  # rebuilds its out_proj too
}


def _register_torchvision_layers() -> None:
    """torchvision layer subclasses that take their base's constructor arguments."""
    try:
        from torchvision.models.convnext import LayerNorm2d
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return
    _LAYERS[LayerNorm2d] = _ln_args


_register_torchvision_layers()

#: plain int attributes a module's forward reads that structured pruning changes
_INT_ATTRIBUTES = ("hidden_dim",)


def layer_args(module: nn.Module) -> dict[str, Any] | None:
    """{type, args} for a recordable layer, else None."""
    reader = _LAYERS.get(type(module))
    return None if reader is None else {"type": type(module).__name__, "args": reader(module)}


def _make_layer(entry: dict[str, Any]) -> nn.Module:
    by_name = {t.__name__: t for t in _LAYERS}
    cls = by_name.get(entry.get("type", ""))
    if cls is None:
        raise ValueError(f"unsupported layer type {entry.get('type')!r}")
    args = dict(entry["args"])
    for key in ("kernel_size", "stride", "dilation", "normalized_shape"):
        if isinstance(args.get(key), list):
            args[key] = tuple(args[key])
    if isinstance(args.get("padding"), list):
        args["padding"] = tuple(args["padding"])
    return cls(**args)


def diff_module_types(model: nn.Module, fresh: nn.Module) -> dict[str, dict[str, Any]]:
    """Modules of `model` that replace the freshly built `fresh`'s module at the same path by one
    of another type or function (recorded with edgemml.models.rewrite.describe_module); a replaced
    module's children are not visited. ValueError for a replacement model.json cannot record."""
    from edgemml.models.rewrite import describe_module, same_function

    fresh_modules = dict(fresh.named_modules())
    out: dict[str, dict[str, Any]] = {}
    for name, mod in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in out):
            continue
        ref = fresh_modules.get(name)
        if ref is None or same_function(mod, ref):
            continue  # new paths are refused by diff_layer_shapes when they hold tensors
        desc = describe_module(mod)
        if desc is None:
            raise ValueError(f"module {name} ({type(ref).__name__} in the architecture) was "
                             f"replaced by {type(mod).__name__}, which model.json cannot record")
        out[name] = desc
    return out


def apply_module_types(model: nn.Module, types: dict[str, dict[str, Any]]) -> nn.Module:
    """Swap in the recorded replacement modules (outer paths first)."""
    from edgemml.models.rewrite import build_module

    for name in sorted(types, key=lambda n: n.count(".")):
        set_submodule(model, name, build_module(types[name]))
    return model


def diff_layer_shapes(model: nn.Module, fresh: nn.Module) -> tuple[dict[str, dict[str, Any]],
                                                                  dict[str, list[int]]]:
    """Layers (and bare tensors) of `model` whose shapes differ from the freshly built `fresh`
    (with its recorded module replacements applied)."""
    fresh_modules = dict(fresh.named_modules())
    layers: dict[str, dict[str, Any]] = {}
    for name, mod in model.named_modules():
        args = layer_args(mod)
        if args is None:
            continue
        ref = fresh_modules.get(name)
        if ref is None or type(ref) is not type(mod):
            raise ValueError(f"module {name} ({type(mod).__name__}) does not exist in the freshly built "
                             f"architecture; only layer shapes may change, not the structure")
        if layer_args(ref) != args:
            layers[name] = args
    fresh_state = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    params: dict[str, list[int]] = {}
    for key, tensor in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner in layers or any(owner.startswith(f"{n}.") for n in layers):
            continue
        if key not in fresh_state:
            raise ValueError(f"tensor {key} does not exist in the freshly built architecture")
        if tuple(tensor.shape) != fresh_state[key]:
            params[key] = list(tensor.shape)
    return layers, params


def diff_attributes(model: nn.Module, fresh: nn.Module) -> dict[str, dict[str, int]]:
    """Plain int attributes (_INT_ATTRIBUTES) of `model`'s modules that differ from `fresh`."""
    fresh_modules = dict(fresh.named_modules())
    out: dict[str, dict[str, int]] = {}
    for name, mod in model.named_modules():
        ref = fresh_modules.get(name)
        for attr in _INT_ATTRIBUTES:
            value = getattr(mod, attr, None)
            if (isinstance(value, int) and not isinstance(value, bool) and ref is not None
                    and getattr(ref, attr, None) != value):
                out.setdefault(name, {})[attr] = value
    return out


def save_model(model: nn.Module, spec: ModelSpec, folder: Path) -> None:
    """Write folder/model.safetensors and folder/model.json (each atomically).

    layer_shapes/param_shapes are recomputed here against a freshly built architecture, so a model
    pruned in place by torch-pruning round-trips without the caller tracking what changed.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fresh = build_model(spec.model_cfg(), num_classes=spec.num_classes, in_chans=spec.in_chans)
    types = diff_module_types(model, fresh)
    layers, params = diff_layer_shapes(model, apply_module_types(fresh, types))
    spec = spec.model_copy(update={"module_types": types, "layer_shapes": layers,
                                   "param_shapes": params,
                                   "attributes": diff_attributes(model, fresh)})
    # Clone: safetensors refuses shared or non-contiguous storage (tied weights, views).
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(folder / MODEL_WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "edgemml": "model"})
        _sort_metadata(str(tmp))
    write_text_atomic(folder / MODEL_SPEC, spec_to_json(spec))


def _sort_metadata(path: str) -> None:
    """Sort the `__metadata__` keys of a safetensors file in place.

    safetensors writes them from a Rust HashMap, whose order changes from one process to the next:
    the same weights saved twice gave different bytes, so every stage after them re-ran. The
    header is JSON padded with spaces to its recorded length; the sorted one has the same length.
    """
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        meta = header.pop("__metadata__", None)
        if not isinstance(meta, dict):
            return
        header = {"__metadata__": dict(sorted(meta.items())), **header}
        data = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(data) > n:  # cannot happen for the same content; never corrupt the file
            return
        f.seek(8)
        f.write(data + b" " * (n - len(data)))


def spec_to_json(spec: ModelSpec) -> str:
    """Indented JSON with one line per recorded layer, so model.json stays small and diffable."""
    data = spec.model_dump(mode="json")
    layers = data.pop("layer_shapes")
    text = json.dumps(data, indent=2, sort_keys=True)
    if layers:
        rows = ",\n".join(f"    {json.dumps(k)}: {json.dumps(v, sort_keys=True)}"
                          for k, v in sorted(layers.items()))
        body = "{\n" + rows + "\n  }"
    else:
        body = "{}"
    return text[:-2] + f',\n  "layer_shapes": {body}\n}}\n'


def read_spec(folder: Path) -> ModelSpec:
    """model.json of a saved model, with errors that name the file."""
    path = Path(folder) / MODEL_SPEC
    if not path.is_file():
        raise InputError(f"no saved model here: {path} is missing", file=path,
                         hint="point at a folder written by save_model (model.json + model.safetensors)")
    try:
        return ModelSpec.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError and ValidationError are ValueErrors
        raise InputError(f"invalid model spec: {exc}", file=path) from None


def apply_layer_shapes(model: nn.Module, spec: ModelSpec) -> nn.Module:
    """Swap in replaced modules, then modules / tensors of the recorded shapes (weights are
    loaded afterwards)."""
    apply_module_types(model, spec.module_types)
    for name, entry in spec.layer_shapes.items():
        set_submodule(model, name, _make_layer(entry))
    for key, shape in spec.param_shapes.items():
        owner_name, _, attr = key.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        old = getattr(owner, attr)
        new = torch.zeros(shape, dtype=old.dtype)
        if isinstance(old, nn.Parameter):
            setattr(owner, attr, nn.Parameter(new, requires_grad=old.requires_grad))
        else:
            owner.register_buffer(attr, new)
    for name, attrs in spec.attributes.items():
        module = model.get_submodule(name) if name else model
        for attr, value in attrs.items():
            if attr not in _INT_ATTRIBUTES:
                raise ValueError(f"attribute {attr!r} of {name or 'the model'} is not one edgemml "
                                 f"records")
            setattr(module, attr, int(value))
    return model


def load_model(folder: Path) -> tuple[nn.Module, ModelSpec]:
    """Rebuild the module from model.json and load model.safetensors with strict=True."""
    folder = Path(folder)
    spec = read_spec(folder)
    weights = folder / MODEL_WEIGHTS
    if not weights.is_file():
        raise InputError(f"missing weights file {weights}", file=weights)
    model = build_model(spec.model_cfg(), num_classes=spec.num_classes, in_chans=spec.in_chans)
    try:
        apply_layer_shapes(model, spec)
    except (ValueError, TypeError, AttributeError) as exc:
        raise InputError(f"module_types/layer_shapes do not fit {spec.arch or spec.python}: {exc}",
                         file=folder / MODEL_SPEC) from None
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"not a readable safetensors file: {exc}", file=weights) from None
    try:
        model.load_state_dict(versioned_state(state, model), strict=True)
    except RuntimeError as exc:
        raise InputError(f"weights do not match the architecture in {MODEL_SPEC}: "
                         f"{str(exc).splitlines()[0]} ...", file=weights,
                         hint="the two files must come from the same save_model call") from None
    model.eval()
    return model, spec


def reloads_identically(model: nn.Module, folder: Path, example: torch.Tensor) -> bool:
    """Whether the model saved in `folder` rebuilds (architecture, recorded layer shapes and module
    replacements) into a module with bit-identical outputs on `example`."""
    reloaded, _ = load_model(folder)
    with torch.no_grad():
        return torch.equal(model.eval()(example), reloaded(example))
