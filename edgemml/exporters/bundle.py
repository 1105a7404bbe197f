"""The deployable bundle: one folder (and its .tar.gz) a device needs to classify images.

Layout (format "edgemml-bundle", version 1):

    bundle/
      manifest.json        what is here (see below)
      predict.py           standalone classifier: numpy + Pillow + onnxruntime or openvino
      preprocess.py        verbatim copy of edgemml/data/preprocess.py (the training preprocessing)
      preprocess.json      the preprocessing spec the model was trained with
      labels.txt           class names, one per line, in output order
      model.fp32.onnx, model.int8.onnx, openvino-fp32/model.{xml,bin}, openvino-int8/...
      samples/NNN_<label>.png   held-out images with the predictions the pipeline made on them

manifest.json:
    format, format_version, pipeline, stage, created (UTC), versions {edgemml, torch, onnx, ...}
    preprocess, labels (file names), classes [..], default_model (a models[].file)
    models: [{key (onnx-fp32 ...), file, files [every file of the model], format (onnx|openvino),
              precision (fp32|fp16|int8), runtime (onnxruntime|openvino), inference_precision
              (openvino: what it runs in when compiled with INFERENCE_PRECISION_HINT=f32), inputs /
              outputs [{name, shape ('batch' = dynamic), dtype}], source_stage, checks {...},
              metrics {} (filled by validate)}]
    samples: [{file, label, predictions {model file: label}}]
    validation: null (the validate stage writes a marked copy of the manifest in its own folder)
    files: {relative path: {sha256, bytes}} for every file except manifest.json
"""

from __future__ import annotations

import json
import shutil
import tarfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgemml.artifacts import atomic_path, sha256_file, write_json_atomic

BUNDLE_FORMAT = "edgemml-bundle"
BUNDLE_VERSION = 1
MANIFEST = "manifest.json"
PREDICT_TEMPLATE = Path(__file__).with_name("predict_template.py")


def copy_support_files(bundle: Path, preprocess_spec: dict[str, Any], classes: list[str]) -> None:
    """predict.py, the preprocessing code (byte-identical copy) and spec, and labels.txt."""
    import edgemml.data.preprocess as pre_module

    bundle.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(PREDICT_TEMPLATE, bundle / "predict.py")
    shutil.copyfile(pre_module.__file__, bundle / "preprocess.py")
    (bundle / "preprocess.json").write_text(json.dumps(preprocess_spec, indent=2) + "\n",
                                            encoding="utf-8")
    if any("\n" in c or "\r" in c for c in classes):
        raise ValueError("class names may not contain line breaks (labels.txt has one per line)")
    (bundle / "labels.txt").write_text("".join(f"{c}\n" for c in classes), encoding="utf-8")


def file_table(bundle: Path) -> dict[str, dict[str, Any]]:
    return {p.relative_to(bundle).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(bundle.rglob("*")) if p.is_file() and p.name != MANIFEST}


def write_manifest(bundle: Path, manifest: dict[str, Any]) -> Path:
    """Fill format, time and the file table, and write manifest.json."""
    full = {"format": BUNDLE_FORMAT, "format_version": BUNDLE_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **manifest,
            "files": file_table(bundle)}
    path = bundle / MANIFEST
    write_json_atomic(path, full)
    return path


def write_archive(bundle: Path, archive: Path) -> Path:
    """bundle/ as a .tar.gz whose single top folder is the bundle's name; stable member order,
    no owner names, so the same bundle gives the same member list."""
    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    with atomic_path(archive) as tmp, tarfile.open(tmp, "w:gz") as tar:
        tar.add(bundle, arcname=bundle.name, recursive=False, filter=clean)
        for p in sorted(bundle.rglob("*")):
            tar.add(p, arcname=f"{bundle.name}/{p.relative_to(bundle).as_posix()}",
                    recursive=False, filter=clean)
    return archive
