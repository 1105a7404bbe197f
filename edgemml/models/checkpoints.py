"""Read model weights from any common checkpoint form, safely.

Forms: plain state dicts (.pt/.pth/.bin/.ckpt), .safetensors, checkpoints nesting the weights
(state_dict, model, model_state_dict, ema, module, ...), keys with wrapper prefixes (module. from DDP,
_orig_mod. from torch.compile, model. from Lightning) and torchvision weight names
(torchvision:ResNet18_Weights.IMAGENET1K_V1) read from the local torch hub cache — never downloaded.

Safety: everything goes through torch.load(weights_only=True). A file that pickles code or objects is
refused before anything runs; edgemml.models.unsafe_pickle names the offending globals with
maintained scanners that only parse, never execute. Every failure is an InputError naming the file.
"""

from __future__ import annotations

import difflib
import os
import pickle
import re
import struct
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping
from urllib.parse import urlparse

import torch
from torch import nn

from edgemml.errors import InputError
from edgemml.models.unsafe_pickle import refuse_pickle
from edgemml.paths import check_input_file

TORCHVISION_REF = "torchvision:"
# Keys under which checkpoints nest the weights, in order of preference.
NESTING_KEYS = ("state_dict", "model_state_dict", "model", "module", "ema", "model_ema",
                "state_dict_ema", "net", "network", "weights", "params")
# Prefixes that training wrappers add to every key.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
CLASS_NAME_KEYS = ("class_names", "classes", "idx_to_class", "categories")

@dataclass
class Checkpoint:
    """A loaded checkpoint: tensors by key plus what was found around them."""

    state_dict: dict[str, torch.Tensor]
    path: Path | None
    nested_under: tuple[str, ...] = ()
    class_names: list[str] | None = None
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# Reading files
# ------------------------------------------------------------------------------------------------


def _sniff(path: Path) -> str:
    """'zip', 'safetensors', 'pickle', 'empty' or 'unknown' from the first bytes."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    size = path.stat().st_size
    if not head:
        return "empty"
    if head.startswith(b"PK"):
        return "zip"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 0 < n <= size - 8 and head[8:9] == b"{":
            return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    return "unknown"


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise InputError(f"not a readable safetensors file (truncated or corrupt?): {exc}",
                         file=path) from None


def _load_torch(path: Path) -> Any:
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4" noise from torch
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise refuse_pickle(path, exc) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, KeyError, ValueError, OSError,
            struct.error, IndexError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        text = text.split(". ")[0]  # torch appends paragraphs of advice
        if isinstance(exc, EOFError) or "EOF" in text or "central directory" in text:
            msg = f"is truncated or corrupt ({text})"
        else:
            msg = f"is not a readable PyTorch checkpoint ({type(exc).__name__}: {text[:200]})"
        raise InputError(msg, file=path, hint="re-copy or re-save the file") from None


def read_file(path: str | Path) -> Any:
    """Load a checkpoint file's top-level object (dict of tensors, nested dict, ...)."""
    path = Path(os.path.expanduser(str(path)))
    if not path.exists():
        raise InputError(f"checkpoint not found: {path}", file=path)
    if path.is_dir():
        raise InputError(f"{path} is a folder, not a checkpoint file", file=path,
                         hint="give a .pt/.pth/.bin/.safetensors file (for a saved edgemml model use "
                         "its folder with load_model)")
    check_input_file(path, what="checkpoint")  # a device or a huge file: refused before reading
    kind = _sniff(path)
    if kind == "empty":
        raise InputError("checkpoint file is empty", file=path)
    if kind == "safetensors" or (kind == "unknown" and path.suffix == ".safetensors"):
        return _load_safetensors(path)
    if kind == "unknown":
        with open(path, "rb") as fh:
            head = fh.read(12)
        raise InputError(f"is not a checkpoint (unrecognised format, starts with {head!r})", file=path,
                         hint="expected a PyTorch .pt/.pth/.bin file or a .safetensors file")
    return _load_torch(path)


def _is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(k, str) for k in obj)
            and all(isinstance(v, torch.Tensor) for v in obj.values()))


def _find_state_dict(obj: Any, path: tuple[str, ...] = (), depth: int = 0) -> tuple[
        dict[str, torch.Tensor], tuple[str, ...]] | None:
    if _is_state_dict(obj):
        return dict(obj), path
    if isinstance(obj, Mapping) and depth < 4:
        for key in NESTING_KEYS:
            if key in obj:
                found = _find_state_dict(obj[key], path + (key,), depth + 1)
                if found is not None:
                    return found
    return None


def _class_names(obj: Any) -> list[str] | None:
    if not isinstance(obj, Mapping):
        return None
    for holder in (obj, obj.get("hyper_parameters"), obj.get("meta"), obj.get("metadata")):
        if not isinstance(holder, Mapping):
            continue
        for key in CLASS_NAME_KEYS:
            value = holder.get(key)
            if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
                return list(value)
            if isinstance(value, Mapping) and value and all(isinstance(k, int) for k in value):
                return [str(value[i]) for i in sorted(value)]
    return None


# ------------------------------------------------------------------------------------------------
# Prefixes
# ------------------------------------------------------------------------------------------------


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor],
                           expected_keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Remove DDP/compile/Lightning prefixes (module., _orig_mod., model.), also when stacked.

    `_orig_mod` path segments are removed anywhere (compiled submodules). Without expected_keys a
    prefix is stripped only when every key has it; with the target model's keys a prefix is stripped
    when that makes more keys match (Lightning modules also hold loss/metric tensors).
    """
    out = {".".join(p for p in k.split(".") if p != "_orig_mod"): v for k, v in state_dict.items()}
    expected = set(expected_keys) if expected_keys is not None else None
    for _ in range(8):
        if expected is not None and set(out) == expected:
            break
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if expected is None:
                if out and all(k.startswith(prefix) for k in out):
                    out = {k[len(prefix):]: v for k, v in out.items()}
                    changed = True
            else:
                candidate = {k: v for k, v in out.items() if not k.startswith(prefix)}
                candidate.update({k[len(prefix):]: v for k, v in out.items() if k.startswith(prefix)})
                if len(set(candidate) & expected) > len(set(out) & expected):
                    out = candidate
                    changed = True
        if not changed:
            break
    return out


# ------------------------------------------------------------------------------------------------
# torchvision weight names
# ------------------------------------------------------------------------------------------------


def _all_weight_names() -> list[str]:
    import torchvision

    names = []
    for model in torchvision.models.list_models(module=torchvision.models):
        enum = torchvision.models.get_model_weights(model)
        names += [f"{enum.__name__}.{m}" for m in enum.__members__]
    return names


def torchvision_weights_path(name: str) -> tuple[Path, str, Any]:
    """(local hub cache path, download url, weights enum) for e.g. ResNet18_Weights.IMAGENET1K_V1."""
    import torchvision

    try:
        weights = torchvision.models.get_weight(name)
    except (ValueError, KeyError, AttributeError):
        close = difflib.get_close_matches(name, _all_weight_names(), n=3, cutoff=0.5)
        raise InputError(f"unknown torchvision weights {name!r}",
                         hint=(f"did you mean {', '.join(close)}? " if close else "")
                         + "use torchvision:<Model>_Weights.<NAME>, e.g. "
                         "torchvision:ResNet18_Weights.IMAGENET1K_V1") from None
    filename = os.path.basename(urlparse(weights.url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename, weights.url, weights


_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _read_torchvision(name: str) -> Checkpoint:
    path, url, weights = torchvision_weights_path(name)
    if not path.is_file():
        raise InputError(
            f"torchvision weights {name} are not in the local torch hub cache (edgemml never "
            f"downloads): missing {path}",
            hint=f"on a machine with internet, download {url} and put the file at {path} "
            f"(or set TORCH_HOME so that <TORCH_HOME>/hub/checkpoints/{path.name} exists)")
    ckpt = _to_checkpoint(read_file(path), path)
    if type(weights).__name__.startswith("DenseNet"):  # torchvision renames old densenet keys
        ckpt.state_dict = {(_DENSENET_KEY.sub(r"\1\2", k)): v for k, v in ckpt.state_dict.items()}
    categories = weights.meta.get("categories") if hasattr(weights, "meta") else None
    if ckpt.class_names is None and categories:
        ckpt.class_names = list(categories)
    return ckpt


# ------------------------------------------------------------------------------------------------
# Public entry points
# ------------------------------------------------------------------------------------------------


def _to_checkpoint(obj: Any, path: Path) -> Checkpoint:
    found = _find_state_dict(obj)
    notes: list[str] = []
    if found is None and isinstance(obj, Mapping):
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if tensors and len(tensors) * 2 >= len(obj):
            skipped = [k for k in obj if k not in tensors]
            notes.append(f"ignored non-tensor entries: {', '.join(map(str, skipped[:5]))}")
            found = (tensors, ())
    if found is None:
        if isinstance(obj, Mapping):
            keys = ", ".join(map(str, list(obj)[:10])) or "none"
            raise InputError(f"no weights found (top-level keys: {keys}; looked under "
                             f"{', '.join(NESTING_KEYS)})", file=path,
                             hint="save a state dict: torch.save(model.state_dict(), path)")
        raise InputError(f"holds a {type(obj).__name__}, not a state dict", file=path,
                         hint="save a state dict: torch.save(model.state_dict(), path)")
    state, nested = found
    return Checkpoint(state, path, nested, _class_names(obj), notes)


def read_checkpoint(ref: str | Path, *, strip_prefixes: bool = True,
                    expected_keys: Iterable[str] | None = None) -> Checkpoint:
    """Load weights and context (nesting key, class names) from a file or a torchvision ref."""
    if isinstance(ref, str) and ref.startswith(TORCHVISION_REF):
        ckpt = _read_torchvision(ref[len(TORCHVISION_REF):])
    else:
        path = Path(os.path.expanduser(str(ref)))
        ckpt = _to_checkpoint(read_file(path), path)
    if strip_prefixes:
        ckpt.state_dict = strip_wrapper_prefixes(ckpt.state_dict, expected_keys)
    return ckpt


def load_checkpoint(ref: str | Path, *, expected_keys: Iterable[str] | None = None) -> dict[
        str, torch.Tensor]:
    """The state dict of a checkpoint file or torchvision weights name, wrapper prefixes removed."""
    return read_checkpoint(ref, expected_keys=expected_keys).state_dict


@dataclass
class LoadReport:
    """What `load_into` did, for the migrate stage's report."""

    loaded: list[str]
    adapted: list[str]
    skipped: list[str]
    missing: list[str]
    unexpected: list[str]


def load_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, stem: str | None = None,
              skip_mismatched: bool = True) -> LoadReport:
    """Load weights into a model whose head or stem may differ from the checkpoint's.

    An RGB stem kernel is adapted to the model's in_chans (see adapt_stem_weight); other tensors whose
    shapes differ (typically the classifier for a new class count) are skipped when skip_mismatched.
    """
    from edgemml.models.registry import adapt_stem_weight, versioned_state

    state = strip_wrapper_prefixes(state_dict, model.state_dict().keys())
    target = model.state_dict()
    fitted: dict[str, torch.Tensor] = {}
    adapted: list[str] = []
    skipped: list[str] = []
    for key, value in state.items():
        if key not in target:
            continue
        want = target[key].shape
        if value.shape == want:
            fitted[key] = value
        elif (stem is not None and key == f"{stem}.weight" and value.ndim == 4 and value.shape[1] == 3
              and value.shape[0] == want[0] and value.shape[2:] == want[2:]):
            fitted[key] = adapt_stem_weight(value, want[1])
            adapted.append(key)
        elif skip_mismatched:
            skipped.append(key)
        else:
            raise InputError(f"checkpoint tensor {key} has shape {tuple(value.shape)}, the model "
                             f"needs {tuple(want)}")
    result = model.load_state_dict(versioned_state(fitted, model), strict=False)
    return LoadReport(sorted(fitted), adapted, skipped, sorted(result.missing_keys),
                      sorted(k for k in state if k not in target))
