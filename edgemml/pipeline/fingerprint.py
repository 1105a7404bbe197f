"""A stage's fingerprint: everything that defines its result (type, version, the source of the code
it reaches, resolved config, shared sections, the sha256 of every input artifact and data file,
library versions), hashed; and, when it changed, why in words. Apart from the runner (pipeline.py),
which decides with it whether a stage runs.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgemml import __version__
from edgemml.artifacts import canonical_json, sha256_file
from edgemml.machine import versions
from edgemml.paths import list_files, os_error

if TYPE_CHECKING:
    from edgemml.config import LoadedPipeline
    from edgemml.pipeline.runrecords import PlannedStage
    from edgemml.stages.base import Stage, StageOutputs


_code_hashes: dict[type, str] = {}


def code_hash(cls: type[Stage]) -> str:
    """sha256 of the source of the stage's module and of every edgemml module it reaches through
    its imports (edgemml.codegraph): editing the code that makes an artifact invalidates that
    artifact's cache, and nothing needs to list that code by hand."""
    if cls not in _code_hashes:
        from edgemml.codegraph import closure, module_file

        digests = {}
        for name in closure(cls.__module__):
            path = module_file(name)
            if path is not None:
                digests[name] = sha256_file(path)
        _code_hashes[cls] = hashlib.sha256(canonical_json(digests).encode()).hexdigest()
    return _code_hashes[cls]


class DataHashCache:
    """sha256 of data files, computed once per (path, size, mtime) within a run.

    Every path is checked before it is read (paths.list_files): a device file, a socket or a folder
    over the size limits is refused with exit 2 instead of being hashed forever.
    """

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int, int], str] = {}

    def digest(self, path: Path) -> str:
        if not path.exists():
            return "missing"
        files = list_files(path, what="input")
        if path.is_dir():
            parts = {p.relative_to(path).as_posix(): self._file(p) for p in files}
            return hashlib.sha256(canonical_json(parts).encode()).hexdigest()
        return self._file(path)

    def _file(self, path: Path) -> str:
        try:
            st = path.stat()
            key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
            if key not in self._cache:
                self._cache[key] = sha256_file(path)
        except OSError as exc:
            raise os_error(exc, path, doing="read") from None
        return self._cache[key]


def fingerprint_inputs(item: PlannedStage, pipeline: LoadedPipeline,
                       results: dict[str, StageOutputs], record_hashes: dict[str, dict[str, str]],
                       data_hashes: DataHashCache) -> dict[str, Any]:
    """Everything that defines a stage's result; its canonical JSON hash is the fingerprint."""
    top = pipeline.config
    base = pipeline.base_dir
    data_files: dict[str, str] = {}
    for p in item.stage_cls.data_files(item.config, pipeline):
        # relative to the pipeline file, '..' included: a project moved or cloned elsewhere keeps
        # its cache, and the bytes, not the place, decide
        key = Path(os.path.relpath(os.path.abspath(p), os.path.abspath(base))).as_posix()
        data_files[key] = data_hashes.digest(p)
    out: dict[str, Any] = {
        "type": item.config.type,
        "stage_version": item.stage_cls.version,
        "code": code_hash(item.stage_cls),
        "edgemml": __version__,
        "versions": versions(tuple(item.stage_cls.requires)),
        "config": item.config.model_dump(mode="json", exclude={"name"}),
        "shared": {
            "seed": top.seed,
            "preprocess": top.preprocess.model_dump(mode="json"),
            "data": top.data.model_dump(mode="json") if top.data else None,
            "model": top.model.model_dump(mode="json") if top.model else None,
        },
        "inputs": {dep: record_hashes[dep] for dep in item.deps},
        "data_files": data_files,
    }
    extra = item.stage_cls.fingerprint_extra(item.config, pipeline)
    if extra:  # absent when empty, so adding the hook left every existing cache valid
        out["extra"] = extra
    return out


def fingerprint_of(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(inputs).encode()).hexdigest()


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    return {prefix: obj}


def explain_change(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """Why a fingerprint changed, in words ("config changed: target_macs 0.5 -> 0.4")."""
    if not old:
        return "no earlier record to compare"
    a, b = _flatten(old), _flatten(new)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "∅") != b.get(key, "∅"):
            diffs.append(key)
    if not diffs:
        return "fingerprint changed"
    labels = {"config": "config changed", "shared": "shared section changed",
              "inputs": "input changed", "data_files": "data changed", "code": "stage code changed",
              "versions": "library version changed", "stage_version": "stage version changed",
              "edgemml": "edgemml version changed", "type": "stage type changed",
              "extra": "changed"}
    first = diffs[0]
    head = first.split(".")[0]
    detail = first.split(".", 1)[1] if "." in first else first
    if head in ("config", "shared", "extra"):
        detail = f"{detail} {_short(a.get(first, '∅'))} -> {_short(b.get(first, '∅'))}"
    elif head == "inputs":
        detail = detail.split(".")[0] + " re-ran with different output"
    more = f" (+{len(diffs) - 1} more)" if len(diffs) > 1 else ""
    return f"{labels.get(head, 'changed')}: {detail}{more}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
