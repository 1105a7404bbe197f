"""Test helpers for signed bundles: a small bundle written by the real bundle writer, keys, and the
tampering cases every verifier (`edgemml verify`, predict.py --verify-key) must refuse.

Each case edits a signed bundle in place and returns a text the refusal must contain (the name of
the file it is about), so a test can check both that it was refused and that the line says where.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Callable

PRE = {"size": [16, 16], "resize": "stretch", "interpolation": "bilinear", "channels": "gray",
       "mean": [0.5], "std": [0.5], "layout": "NCHW", "dtype": "float32"}
LABELS = [str(i) for i in range(10)]


def make_keys(folder: Path) -> dict[str, Path]:
    """Two key pairs: the signer's and someone else's."""
    from edgemml.exporters.signing import generate_keypair

    folder.mkdir(parents=True, exist_ok=True)
    generate_keypair(folder / "signer.pem")
    generate_keypair(folder / "other.pem")
    return {"priv": folder / "signer.pem", "pub": folder / "signer.pub.pem",
            "other_priv": folder / "other.pem", "other_pub": folder / "other.pub.pem"}


def synthetic_bundle(dst: Path, *, model_bytes: bytes = b"\x08\x01fake-onnx" * 100) -> Path:
    """The bundle layout (support files copied by the exporter, manifest by its writer) with fake
    model bytes: enough for signing and verifying, not for running."""
    from edgemml.exporters.bundle import copy_support_files, write_manifest

    copy_support_files(dst, PRE, LABELS)
    (dst / "model.int8.onnx").write_bytes(model_bytes)
    (dst / "openvino-int8").mkdir()
    (dst / "openvino-int8" / "model.xml").write_text("<net/>")
    (dst / "openvino-int8" / "model.bin").write_bytes(model_bytes[::-1])
    (dst / "samples").mkdir()
    (dst / "samples" / "000_0.png").write_bytes(b"\x89PNG fake")
    write_manifest(dst, {"pipeline": "test", "stage": "export", "preprocess": "preprocess.json",
                         "labels": "labels.txt", "classes": LABELS,
                         "default_model": "model.int8.onnx",
                         "models": [{"key": "onnx-int8", "file": "model.int8.onnx",
                                     "files": ["model.int8.onnx"], "runtime": "onnxruntime"}],
                         "samples": [], "validation": None})
    return dst


def refresh_manifest(bundle: Path) -> None:
    """Recompute the file table after an edit, as an attacker with the writer would."""
    from edgemml.exporters.bundle import file_table

    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest["files"] = file_table(bundle)
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def model_file(b: Path) -> str:
    return str(json.loads((b / "manifest.json").read_text())["default_model"])


# ---- the cases: (bundle, keys, scratch folder) -> text the refusal names ----------------------


def edited_model(b: Path, keys: dict, tmp: Path) -> str:
    flip_byte(b / model_file(b))
    return Path(model_file(b)).name


def edited_model_and_its_hash(b: Path, keys: dict, tmp: Path) -> str:
    """The attacker also updates the model's hash in the manifest (the old signature stays)."""
    from edgemml.artifacts import sha256_file

    rel = model_file(b)
    flip_byte(b / rel)
    m = json.loads((b / "manifest.json").read_text())
    m["files"][rel]["sha256"] = sha256_file(b / rel)
    (b / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")
    return "manifest.json"


def edited_manifest(b: Path, keys: dict, tmp: Path) -> str:
    text = (b / "manifest.json").read_text()
    (b / "manifest.json").write_text(text.replace('"default_model"', '"default_model" ', 1))
    return "manifest.json"


def edited_labels(b: Path, keys: dict, tmp: Path) -> str:
    path = b / "labels.txt"
    path.write_text(path.read_text().replace("1\n", "7\n", 1))
    return "labels.txt"


def edited_preprocess(b: Path, keys: dict, tmp: Path) -> str:
    with open(b / "preprocess.py", "a") as fh:
        fh.write("\nimport os  # planted\n")
    return "preprocess.py"


def stripped_signature(b: Path, keys: dict, tmp: Path) -> str:
    (b / "manifest.sig").unlink()
    return "manifest.sig"


def garbage_signature(b: Path, keys: dict, tmp: Path) -> str:
    (b / "manifest.sig").write_text("not json")
    return "manifest.sig"


def wrong_signature(b: Path, keys: dict, tmp: Path) -> str:
    """One bit of the signature flipped: well-formed, and wrong."""
    doc = json.loads((b / "manifest.sig").read_text())
    sig = bytearray(base64.b64decode(doc["signature"]))
    sig[0] ^= 0x80
    doc["signature"] = base64.b64encode(bytes(sig)).decode()
    (b / "manifest.sig").write_text(json.dumps(doc))
    return "manifest.json"


def resigned_by_other_key(b: Path, keys: dict, tmp: Path) -> str:
    """The attacker edits the model, rewrites the file table and signs with their own key."""
    from edgemml.exporters.signing import sign_bundle

    flip_byte(b / model_file(b))
    refresh_manifest(b)
    sign_bundle(b, keys["other_priv"])
    return "manifest.sig"


def extra_file(b: Path, keys: dict, tmp: Path) -> str:
    (b / "samples" / "999_extra.png").write_bytes(b"\x89PNG extra")
    return "999_extra.png"


def planted_pycache(b: Path, keys: dict, tmp: Path) -> str:
    (b / "__pycache__").mkdir()
    (b / "__pycache__" / "preprocess.cpython-311.pyc").write_bytes(b"\x00" * 16)
    return "__pycache__"


def swapped_with_other_bundle(b: Path, keys: dict, tmp: Path) -> str:
    """The model replaced by another bundle's (signed with the same key, so valid there)."""
    from edgemml.exporters.signing import sign_bundle

    other = synthetic_bundle(tmp / "other", model_bytes=b"\x08\x01other-model" * 90)
    sign_bundle(other, keys["priv"])
    shutil.copyfile(other / "model.int8.onnx", b / model_file(b))
    return Path(model_file(b)).name


def swapped_same_size(b: Path, keys: dict, tmp: Path) -> str:
    """A replacement of exactly the same size: only the hash can tell."""
    path = b / model_file(b)
    size = path.stat().st_size
    path.write_bytes((b"\x08\x02" * size)[:size])
    return path.name


def removed_file(b: Path, keys: dict, tmp: Path) -> str:
    (b / "labels.txt").unlink()
    return "labels.txt"


def symlink_to_outside(b: Path, keys: dict, tmp: Path) -> str:
    outside = tmp / "outside.txt"
    outside.write_text((b / "labels.txt").read_text())  # same bytes: only the link gives it away
    (b / "labels.txt").unlink()
    (b / "labels.txt").symlink_to(outside)
    return "labels.txt"


def symlinked_folder(b: Path, keys: dict, tmp: Path) -> str:
    shutil.move(str(b / "samples"), str(tmp / "samples-elsewhere"))
    (b / "samples").symlink_to(tmp / "samples-elsewhere", target_is_directory=True)
    return "samples"


def signature_is_symlink(b: Path, keys: dict, tmp: Path) -> str:
    shutil.move(str(b / "manifest.sig"), str(tmp / "manifest.sig"))
    (b / "manifest.sig").symlink_to(tmp / "manifest.sig")
    return "manifest.sig"


CASES: list[Callable[[Path, dict, Path], str]] = [
    edited_model, edited_model_and_its_hash, edited_manifest, edited_labels, edited_preprocess,
    stripped_signature, garbage_signature, wrong_signature, resigned_by_other_key, extra_file,
    planted_pycache, swapped_with_other_bundle, swapped_same_size, removed_file,
    symlink_to_outside, symlinked_folder, signature_is_symlink,
]
