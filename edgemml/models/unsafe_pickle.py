"""Why a checkpoint was refused: the pickled globals torch's weights_only loader will not allow.

torch.load(weights_only=True) is *the* refusal (its allowlist decides, before anything runs). This
module only names the culprit for the error message, with maintained scanners that parse and never
execute:

- `torch.serialization.get_unsafe_globals_in_checkpoint` for zip checkpoints: exactly the globals
  the allowlist rejects, no extra dependency. It cannot read everything: it raises on pickle
  protocol >= 4 opcodes (STACK_GLOBAL, FRAME, MEMOIZE), on legacy non-zip `torch.save` files and on
  raw pickles, and it returns a set (its order varies with PYTHONHASHSEED: we sort).
- picklescan (MIT, no dependencies, the scanner behind Hugging Face's pickle checks) for every
  format torch's scanner cannot read, and for the verdict "code" vs "objects" (its deny list:
  posix.system, builtins.eval, ...). It also resolves STACK_GLOBAL fed from the memo, which the
  opcode walk this module replaces got wrong (it named decoy strings pushed last).

Why not fickling: a decompiler and analysis toolkit (LGPL-3.0, 0.5 MB) for a job that needs a list
of globals. Known gap, checked: picklescan's deny list lacks importlib, marshal and codecs; such a
global is still refused by weights_only and named here, as "objects" rather than "code".
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

from edgemml.errors import InputError

__all__ = ["PickleFindings", "refuse_pickle", "scan_pickle"]


@dataclass
class PickleFindings:
    """Globals of a refused checkpoint that torch's weights_only allowlist does not allow.

    code: those picklescan's deny list calls dangerous (os.system, builtins.eval, ...).
    scanner: which tool named them (torch, picklescan, or torch+picklescan).
    """

    unsafe: list[str]
    code: list[str]
    scanner: str


def _picklescan(path: Path) -> dict[str, str]:
    """module.name -> picklescan's verdict (dangerous | suspicious | innocuous), every format."""
    import logging

    from picklescan.scanner import scan_pickle_bytes, scan_pytorch
    from picklescan.torch import InvalidMagicError

    logging.getLogger("picklescan").setLevel(logging.CRITICAL)  # it logs every find at WARNING
    try:
        with open(path, "rb") as fh:
            try:
                result = scan_pytorch(fh, path.name)
            except InvalidMagicError:  # not a torch file: a plain pickle
                fh.seek(0)
                result = scan_pickle_bytes(fh, path.name)
    except Exception:  # noqa: BLE001 - a file it cannot parse has no names to add
        return {}
    order = {"dangerous": 0, "suspicious": 1, "innocuous": 2}
    found: dict[str, str] = {}
    for g in result.globals:
        name, verdict = f"{g.module}.{g.name}", g.safety.value
        if name not in found or order[verdict] < order[found[name]]:
            found[name] = verdict
    return found


def _torch_allowed() -> set[str] | None:
    """The globals torch.load(weights_only=True) accepts by default (and those the user added).
    torch exposes this set only through get_unsafe_globals_in_checkpoint, for zip files; for the
    other formats we read it from the module that defines it, and do without when it moves."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals, _get_user_allowed_globals

        return set(_get_allowed_globals()) | set(_get_user_allowed_globals())
    except (ImportError, AttributeError):  # pragma: no cover - another torch
        return None


def scan_pickle(path: Path) -> PickleFindings:
    """The globals that make weights_only refuse `path`, most telling first."""
    import torch

    verdicts = _picklescan(path)
    unsafe: list[str] | None = None
    scanner = "picklescan"
    if zipfile.is_zipfile(path):
        try:
            unsafe = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
            scanner = "torch"
        except Exception:  # noqa: BLE001 - opcodes it does not know (protocol >= 4), torchscript
            unsafe = None
    if unsafe is None:
        allowed = _torch_allowed()
        unsafe = sorted(n for n, v in verdicts.items()
                        if (n not in allowed if allowed is not None else v != "innocuous"))
    # a dangerous global torch did not list (it cannot see STACK_GLOBAL) is still named
    extra = sorted(n for n, v in verdicts.items() if v == "dangerous" and n not in unsafe)
    if extra:
        unsafe += extra
        scanner = "torch+picklescan" if scanner == "torch" else scanner
    code = [n for n in unsafe if verdicts.get(n) == "dangerous"]
    # most telling first: code, then the model's own classes, builtins last
    unsafe.sort(key=lambda g: (g not in code, g.startswith(("__builtin__.", "builtins."))))
    return PickleFindings(unsafe, code, scanner)


def refuse_pickle(path: Path, exc: Exception) -> InputError:
    """The error for a checkpoint torch.load(weights_only=True) refused: the culprit named, and
    the fix (safetensors, or a state_dict of tensors only)."""
    findings = scan_pickle(path)
    if findings.code:
        return InputError(f"holds pickled code (global {', '.join(findings.code[:3])}); refusing "
                          "to execute it", file=path, hint="only load checkpoints from sources you "
                          "trust; re-save the weights with torch.save(model.state_dict()) or as "
                          ".safetensors")
    if findings.unsafe:
        what = ", ".join(findings.unsafe[:3])
        module_like = any(re.search(r"\.[A-Z]\w*$", g) for g in findings.unsafe)
        return InputError(f"holds pickled Python objects ({what}), not only tensors; refusing to "
                          f"unpickle them (unpickling can run code)", file=path,
                          hint="save model.state_dict() rather than the whole model" if module_like
                          else "re-save the checkpoint with only tensors, or as .safetensors")
    detail = str(exc).strip().splitlines()
    reason = next((line for line in reversed(detail) if line.strip() and "documentation" not in line),
                  type(exc).__name__)
    return InputError(f"cannot be loaded safely (weights_only): {reason.strip()}", file=path,
                      hint="re-save it with torch.save(model.state_dict()) or as .safetensors")
