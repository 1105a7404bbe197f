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
    format, format_version, pipeline, stage, versions {edgemml, torch, onnx, ...}
    preprocess, labels (file names), classes [..], default_model (a models[].file)
    models: [{key (onnx-fp32 ...), file, files [every file of the model], format (onnx|openvino),
              precision (fp32|fp16|int8), runtime (onnxruntime|openvino), inference_precision
              (openvino: what it runs in when compiled with INFERENCE_PRECISION_HINT=f32), inputs /
              outputs [{name, shape ('batch' = dynamic), dtype}], source_stage, checks {...},
              metrics {} (filled by validate)}]
    samples: [{file, label, predictions {model file: label}}]
    validation: null (the validate stage writes a marked copy of the manifest in its own folder)
    files: {relative path: {sha256, bytes}} for every file except manifest.json (and manifest.sig)

manifest.sig (signed bundles only, exporters/signing.py): an ed25519 signature over manifest.json,
whose file table pins every other file.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import stat
import tarfile
from pathlib import Path
from typing import Any

from edgemml.artifacts import atomic_path, sha256_file, write_json_atomic
from edgemml.config import class_name_problem
from edgemml.errors import InputError, VerificationError

BUNDLE_FORMAT = "edgemml-bundle"
BUNDLE_VERSION = 1
MANIFEST = "manifest.json"
#: time stamp of every member of bundle.tar.gz (2000-01-01 UTC): a fixed time keeps the archive
#: byte-identical for the same bundle; the stage's stage.json says when it was made
ARCHIVE_MTIME = 946684800
#: the ed25519 signature of manifest.json (exporters/signing.py), when the bundle is signed
SIGNATURE = "manifest.sig"
#: files the table cannot list: the manifest cannot hold its own hash; the signature signs it
UNLISTED = (MANIFEST, SIGNATURE)
PREDICT_TEMPLATE = Path(__file__).with_name("predict_template.py")


def copy_support_files(bundle: Path, preprocess_spec: dict[str, Any], classes: list[str]) -> None:
    """predict.py, the preprocessing code (byte-identical copy) and spec, and labels.txt."""
    import edgemml.data.preprocess as pre_module

    bundle.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(PREDICT_TEMPLATE, bundle / "predict.py")
    shutil.copyfile(pre_module.__file__, bundle / "preprocess.py")
    (bundle / "preprocess.json").write_text(json.dumps(preprocess_spec, indent=2) + "\n",
                                            encoding="utf-8")
    for c in classes:
        problem = class_name_problem(c)
        if problem:  # the data layer refuses these first; labels.txt must stay one name per line
            raise InputError(f"class name {c!r} {problem}; labels.txt holds one name per line")
    (bundle / "labels.txt").write_text("".join(f"{c}\n" for c in classes), encoding="utf-8")


def read_labels(path: Path) -> list[str]:
    """labels.txt as predict.py reads it: one name per "\n"-terminated line (not splitlines(),
    which also splits on U+2028 and other separators a name might hold)."""
    text = path.read_text(encoding="utf-8")
    labels = text.split("\n")
    if labels and labels[-1] == "":
        labels.pop()
    return labels


def scan_files(bundle: Path) -> dict[str, Path]:
    """Every file under the bundle by posix relative path, without following any link.

    A symlink (to a file, a folder, or looping) or a device/fifo/socket is refused: a bundle holds
    regular files only, so nothing its manifest names can resolve outside it.
    """
    found: dict[str, Path] = {}

    def unreadable(exc: OSError) -> None:
        raise InputError(f"cannot read the bundle: {exc.strerror}", file=exc.filename or bundle)

    for dirpath, dirnames, filenames in os.walk(bundle, followlinks=False, onerror=unreadable):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                raise VerificationError(f"is a symlink (to {os.readlink(path)}); a bundle holds "
                                        "regular files only", file=path)
            if stat.S_ISDIR(st.st_mode):
                continue
            if not stat.S_ISREG(st.st_mode):
                raise VerificationError("is not a regular file (device, fifo or socket)",
                                        file=path)
            found[path.relative_to(bundle).as_posix()] = path
    return found


def file_table(bundle: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {sha256, bytes}} of every file but the top-level manifest.json and
    manifest.sig (a nested file of the same name is listed like any other)."""
    return {rel: {"sha256": sha256_file(p, follow_symlinks=False), "bytes": p.lstat().st_size}
            for rel, p in sorted(scan_files(bundle).items()) if rel not in UNLISTED}


def write_manifest(bundle: Path, manifest: dict[str, Any]) -> Path:
    """Fill format and the file table, and write manifest.json.

    No time stamp: the same models must give the same bytes, or re-running the export stage
    (after a crash, with --from) would make every later stage re-run (the stage's stage.json
    records when it ran)."""
    full = {"format": BUNDLE_FORMAT, "format_version": BUNDLE_VERSION, **manifest,
            "files": file_table(bundle)}
    path = bundle / MANIFEST
    write_json_atomic(path, full)
    return path


def write_archive(bundle: Path, archive: Path) -> Path:
    """bundle/ as a .tar.gz whose single top folder is the bundle's name: stable member order, no
    owner names, and fixed times (members and gzip header at ARCHIVE_MTIME), so the same bundle
    gives the same bytes."""
    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = ARCHIVE_MTIME
        return info

    with atomic_path(archive) as tmp, open(tmp, "wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=ARCHIVE_MTIME) as gz, \
            tarfile.open(fileobj=gz, mode="w") as tar:
        tar.add(bundle, arcname=bundle.name, recursive=False, filter=clean)
        for p in sorted(bundle.rglob("*")):
            tar.add(p, arcname=f"{bundle.name}/{p.relative_to(bundle).as_posix()}",
                    recursive=False, filter=clean)
    return archive
