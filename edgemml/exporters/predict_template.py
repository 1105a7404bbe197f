#!/usr/bin/env python3
"""Classify image files with the model in this folder, exactly as the edgemml pipeline did.

Needs only numpy, Pillow and the runtime of the model it runs: onnxruntime (.onnx), openvino (.xml),
ai-edge-litert (.tflite; no torch) or executorch + torch (.pte). The preprocessing is preprocess.py
next to this file, a verbatim copy of the code used for training and validation, driven by
preprocess.json. `--verify-key` also needs the `cryptography` package.

    python predict.py IMAGE_OR_FOLDER [...]           # top-1 label per image (default model)
    python predict.py img.png --model model.fp32.onnx --top 3 --json
    python predict.py --self-check                     # re-classify samples/, compare with manifest
    python predict.py --list                           # the models in this bundle
    python predict.py --verify-key signer.pub.pem IMAGES   # refuse unless the bundle is as signed
    python /trusted/predict.py --bundle BUNDLE ...     # run a bundle with a predict.py you trust

Every file predict.py uses (preprocess.py, preprocess.json, labels.txt, the model's files) must
match its sha256 in manifest.json, and is used from the very bytes that were checked. With
--verify-key, manifest.sig must also verify and every file of the bundle must match, with nothing
extra, before anything from the bundle runs.

Inputs: one `error: FILE: reason` line on stderr per file that cannot be classified (truncated,
not an image, a decompression bomb, a fifo, a symlink loop...), the others still classified; never a
traceback, never a hang on a special file, never a silent skip (files without an image extension in
folders are counted in a note).

Exit status: 0 every image classified; 1 some inputs could not be read (one line each on stderr,
the rest classified); 2 nothing classified: bad arguments, or the bundle failed its checks; 3 a bug
in predict.py (one line); 130 interrupted.

Why one long file (over the project's ~400-line guide): it must run with no edgemml installed, and
the signature and file checks must run *before* anything else from the bundle is imported, so
they cannot live in a helper module shipped beside it (that module would verify itself).
"""

from __future__ import annotations

import sys

# Before importing anything from the bundle: a __pycache__ written here would be an unlisted file in
# a signed bundle, and a planted .pyc with the right header could stand in for preprocess.py.
sys.dont_write_bytecode = True

import argparse  # noqa: E402
import base64  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import stat  # noqa: E402
import types  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Iterator  # noqa: E402

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
EXIT_OK, EXIT_SOME_FAILED, EXIT_REFUSED = 0, 1, 2
MANIFEST, SIGNATURE = "manifest.json", "manifest.sig"
CONTEXT = b"edgemml-bundle-manifest-v1\n"  # what the signer signed: CONTEXT + manifest bytes
MAX_MANIFEST_BYTES = 64 << 20


class Refused(Exception):
    """Running is impossible (bad arguments, bundle fails its checks): one line, exit 2."""


def shown(path: Any) -> str:
    """A file name printable on one line whatever it contains (newlines, invalid UTF-8)."""
    text = os.fsdecode(path) if isinstance(path, (bytes, os.PathLike)) else str(path)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


#: runtime (manifest models[].runtime) -> Python modules it needs
RUNTIME_MODULES = {"onnxruntime": ("onnxruntime",), "openvino": ("openvino",),
                   "litert": ("ai_edge_litert",), "executorch": ("executorch", "torch")}


def static_batches(fn, batch: int):
    """Run a model whose graph has a static batch size on any number of samples: chunks of that
    size, the last one zero-padded and its padding's outputs dropped."""
    def run(x: np.ndarray) -> np.ndarray:
        outs = []
        for i in range(0, len(x), batch):
            chunk = np.ascontiguousarray(x[i:i + batch], dtype=np.float32)
            n = len(chunk)
            if n < batch:
                chunk = np.concatenate([chunk, np.zeros((batch - n, *chunk.shape[1:]), np.float32)])
            outs.append(np.asarray(fn(chunk), dtype=np.float32)[:n])
        return np.concatenate(outs)
    return run


def litert_model(data: bytes, threads: int | None):
    """A .tflite (its checked bytes) in the LiteRT interpreter. A fully int8 model takes int8 input
    and gives int8 output: the batch is quantized with the input's own scale / zero point and the
    output dequantized with the output's (manifest.json records them too)."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=data, num_threads=threads)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    in_dt, out_dt = np.dtype(inp["dtype"]), np.dtype(out["dtype"])
    (s_in, z_in), (s_out, z_out) = inp["quantization"], out["quantization"]

    def one(x: np.ndarray) -> np.ndarray:
        if in_dt.kind in "iu":
            lim = np.iinfo(in_dt)
            x = np.clip(np.round(x / s_in) + z_in, lim.min, lim.max)
        it.set_tensor(inp["index"], x.astype(in_dt))
        it.invoke()
        y = it.get_tensor(out["index"])
        return (y.astype(np.float32) - z_out) * s_out if out_dt.kind in "iu" else np.array(y)

    return static_batches(one, int(inp["shape"][0]))


def executorch_model(data: bytes, threads: int | None):
    """A .pte (its checked bytes) in the ExecuTorch runtime (needs torch: it takes and returns
    torch tensors). Float input and output; XNNPACK's thread pool is process-wide."""
    import torch
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime

    if threads:
        portable_lib._unsafe_reset_threadpool(threads)
    method = Runtime.get().load_program(data).load_method("forward")
    batch = int(method.metadata.input_tensor_meta(0).sizes()[0])
    return static_batches(lambda x: method.execute([torch.from_numpy(x)])[0].numpy(), batch)


class MissingRuntime(Exception):
    """The runtime a model needs cannot be imported here (exit 2 like any refusal; --self-check
    skips the model instead)."""


# --------------------------------------------------------------------------------------------------
# The bundle: manifest, optional signature, files read once and checked against their hashes
# --------------------------------------------------------------------------------------------------


def _regular_bytes(path: Path, limit: int) -> bytes:
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise Refused(f"{shown(path)}: {describe(exc)}") from None
    if not stat.S_ISREG(st.st_mode):
        raise Refused(f"{shown(path)}: not a regular file (symlink or special file)")
    if st.st_size > limit:
        raise Refused(f"{shown(path)}: {st.st_size} bytes, more than a bundle file may have")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(st.st_size + 1)  # read(limit) would allocate `limit` bytes up front
    if len(data) != st.st_size:
        raise Refused(f"{shown(path)}: changed while being read")
    return data


def _verify_signature(root: Path, data: bytes, key_path: Path) -> str:
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization as ser
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    except ImportError:
        raise Refused("--verify-key needs the Python package 'cryptography' (pip install "
                      "cryptography); refusing to run a bundle it cannot verify") from None
    try:
        if not key_path.is_file():  # not a device or fifo: reading /dev/zero would never end
            raise ValueError("not a regular file" if key_path.exists() else "no such file")
        raw = key_path.open("rb").read(64 << 10)
        key = (ser.load_ssh_public_key(raw.strip()) if raw.lstrip().startswith(b"ssh-")
               else ser.load_pem_public_key(raw))
    except (OSError, ValueError, TypeError) as exc:
        raise Refused(f"{shown(key_path)}: not a readable public key ({describe(exc)})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise Refused(f"{shown(key_path)}: not an ed25519 public key")
    sig_path = root / SIGNATURE
    if not (sig_path.exists() or sig_path.is_symlink()):
        raise Refused(f"{shown(sig_path)}: missing: the bundle is not signed (or its signature "
                      "was stripped)")
    try:
        doc = json.loads(_regular_bytes(sig_path, 64 << 10).decode("utf-8"))
        signature = base64.b64decode(doc["signature"], validate=True)
        ok_doc = doc.get("algorithm") == "ed25519" and len(signature) == 64
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        ok_doc = False
    if not ok_doc:
        raise Refused(f"{shown(sig_path)}: not an edgemml ed25519 signature file")
    raw_pub = key.public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
    kid = "ed25519:" + hashlib.sha256(raw_pub).hexdigest()[:16]
    try:
        key.verify(signature, CONTEXT + data)
    except InvalidSignature:
        if doc.get("key_id") not in (None, kid):
            raise Refused(f"{shown(sig_path)}: signed by another key ({shown(doc['key_id'])}), "
                          f"not by {shown(key_path)} ({kid})") from None
        raise Refused(f"{shown(root / MANIFEST)}: does not match its signature (edited after "
                      "signing, or the signature is forged)") from None
    return kid


def _check_all_files(root: Path, table: dict[str, Any]) -> None:
    """Every listed file present, regular, of its size and hash; nothing unlisted; no symlink."""
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                raise Refused(f"{shown(path)}: is a symlink; a signed bundle holds regular files "
                              "only")
            if stat.S_ISDIR(st.st_mode):
                continue
            if not stat.S_ISREG(st.st_mode):
                raise Refused(f"{shown(path)}: not a regular file")
            if rel not in table and rel not in (MANIFEST, SIGNATURE):
                raise Refused(f"{shown(path)}: not listed in manifest.json (extra file)")
            seen.add(rel)
    for rel, entry in sorted(table.items()):
        if (not isinstance(rel, str) or rel.startswith("/") or "\\" in rel
                or any(p in ("", ".", "..") for p in rel.split("/"))):
            raise Refused(f"{shown(root / MANIFEST)}: file table entry {shown(rel)} points "
                          "outside the bundle")
        if rel not in seen:
            raise Refused(f"{shown(root / rel)}: listed in manifest.json but missing")
        if os.lstat(root / rel).st_size != entry.get("bytes") or \
                sha256_file(root / rel) != entry.get("sha256"):
            raise Refused(f"{shown(root / rel)}: does not match its sha256 in manifest.json "
                          "(edited or replaced)")


class Bundle:
    """manifest.json read once; with a key, the signature and every file checked before anything
    from the bundle is imported or loaded."""

    def __init__(self, root: Path, verify_key: Path | None = None) -> None:
        self.root = root
        data = _regular_bytes(root / MANIFEST, MAX_MANIFEST_BYTES)
        self.key_id = _verify_signature(root, data, verify_key) if verify_key else None
        try:
            self.manifest = json.loads(data.decode("utf-8"))
            self.table = self.manifest["files"]
            assert isinstance(self.table, dict) and isinstance(self.manifest["models"], list)
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AssertionError):
            raise Refused(f"{shown(root / MANIFEST)}: not an edgemml bundle manifest") from None
        if verify_key:
            _check_all_files(root, self.table)

    def read(self, rel: str, *, check: bool) -> bytes:
        """A bundle file's bytes; with check, refused unless they match the manifest's sha256 (the
        bytes checked are the bytes used: nothing can change between the check and the load)."""
        data = _regular_bytes(self.root / rel, 1 << 40)
        want = self.table.get(rel, {}).get("sha256") if isinstance(self.table.get(rel), dict) \
            else None
        if check and (want is None or hashlib.sha256(data).hexdigest() != want):
            raise Refused(f"{shown(self.root / rel)}: does not match its sha256 in manifest.json "
                          "(corrupted or edited)")
        return data

    def import_preprocess(self) -> types.ModuleType:
        """preprocess.py executed from the bytes just read (and checked when verifying)."""
        source = self.read("preprocess.py", check=True)
        module = types.ModuleType("preprocess")
        module.__file__ = str(self.root / "preprocess.py")
        sys.modules["preprocess"] = module
        exec(compile(source, module.__file__, "exec"), module.__dict__)  # noqa: S102
        return module


class Model:
    """One model file of the bundle, run by the runtime its format needs, loaded from the bytes
    whose sha256 was checked."""

    def __init__(self, bundle: Bundle, file: str, threads: int | None = None) -> None:
        manifest = bundle.manifest
        entry = next((m for m in manifest["models"] if m.get("file") == file), None)
        if entry is None:
            names = ", ".join(str(m.get("file")) for m in manifest["models"])
            raise Refused(f"{shown(file)} is not a model of this bundle (models: {names})")
        self.entry = entry
        blobs = {rel: bundle.read(rel, check=True) for rel in entry.get("files", [file])}
        # LiteRT's interpreter and ExecuTorch's program run from these bytes without copying them:
        # they must live as long as the model (freed, the interpreter reads freed memory: SIGSEGV)
        self._blobs = blobs
        self.input_name = entry["inputs"][0]["name"]
        try:
            self._open(entry["runtime"], bundle, file, blobs, threads)
        except ImportError as exc:
            need = " + ".join(RUNTIME_MODULES.get(entry["runtime"], (entry["runtime"],)))
            raise MissingRuntime(f"{file} needs {need}, which cannot be imported here "
                                 f"({exc})") from None

    def _open(self, runtime: str, bundle: Bundle, file: str, blobs: dict[str, bytes],
              threads: int | None) -> None:
        if runtime == "onnxruntime":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            if threads:
                opts.intra_op_num_threads = threads
            source = blobs[file] if len(blobs) == 1 else str(bundle.root / file)  # external data
            self.session = ort.InferenceSession(source, sess_options=opts,
                                                providers=["CPUExecutionProvider"])
            self.run = lambda x: self.session.run(None, {self.input_name: x})[0]
        elif runtime == "litert":
            self.run = litert_model(blobs[file], threads)
        elif runtime == "executorch":
            self.run = executorch_model(blobs[file], threads)
        else:
            import openvino as ov

            # f32 pins fp32 execution of everything that is not int8; without it OpenVINO may run
            # in bf16 on CPUs that support it, and results would differ from the pipeline's.
            config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
            if threads:
                config["INFERENCE_NUM_THREADS"] = threads
            weights = blobs.get(str(Path(file).with_suffix(".bin").as_posix()), b"")
            self.run = openvino_model(ov, blobs[file], weights, config)


def openvino_model(ov: Any, xml: Any, weights: bytes, config: dict[str, Any]):
    """Run an IR compiled with a static batch of each size it is given (one compile per size).
    Measured with OpenVINO 2026.4.1: an int8 IR with depthwise convolutions compiled with a
    dynamic batch gives wrong outputs at batch 1 (mobilenet_v2: 9 % top-1), a static compile
    does not."""
    core, compiled = ov.Core(), {}

    def run(x: np.ndarray) -> np.ndarray:
        n = len(x)
        if n not in compiled:
            model = core.read_model(xml, weights)
            shape = model.input(0).get_partial_shape()
            if shape.rank.is_static and shape[0].is_dynamic:
                shape[0] = n
                model.reshape({model.input(0): shape})
            c = core.compile_model(model, "CPU", config)
            compiled[n] = (c, c.create_infer_request())
        c, request = compiled[n]
        return np.array(request.infer({0: x})[c.outputs[0]], copy=True)

    return run


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


# --------------------------------------------------------------------------------------------------
# Inputs: streamed, one line per file that cannot be used, never a silent skip
# --------------------------------------------------------------------------------------------------


class Inputs:
    """Walks the arguments lazily (a folder of a million files starts printing at once), follows
    symlinks but never loops, and records every path it cannot use."""

    def __init__(self, args: list[str], extensions: tuple[str, ...]) -> None:
        self.args, self.extensions = args, extensions
        self.failed: list[tuple[str, str]] = []
        self.skipped: dict[str, int] = {}

    def fail(self, path: Any, reason: str) -> None:
        self.failed.append((shown(path), reason))
        print(f"error: {shown(path)}: {reason}", file=sys.stderr, flush=True)

    def __iter__(self) -> Iterator[Path]:
        for arg in self.args:
            path = Path(arg)
            try:
                st = os.stat(path)  # follows symlinks: ELOOP, ENOENT, EACCES end up below
            except OSError as exc:
                self.fail(path, describe(exc))
                continue
            if stat.S_ISDIR(st.st_mode):
                yield from self._walk(path, {(st.st_dev, st.st_ino): path})
            elif stat.S_ISREG(st.st_mode):
                yield path  # named explicitly: tried whatever its extension
            else:
                self.fail(path, "not a regular file (device, fifo or socket)")

    def _walk(self, folder: Path, visited: dict[tuple[int, int], Path]) -> Iterator[Path]:
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            self.fail(folder, f"cannot list folder: {describe(exc)}")
            return
        for entry in entries:
            path = Path(entry.path)
            try:
                st = entry.stat(follow_symlinks=True)
            except OSError as exc:
                self.fail(path, describe(exc) + (" (symlink)" if entry.is_symlink() else ""))
                continue
            if stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key in visited:
                    self.fail(path, f"symlink loop: this folder is {shown(visited[key])} again; "
                              "not descended")
                    continue
                yield from self._walk(path, {**visited, key: path})
            elif path.suffix.lower() not in self.extensions:
                ext = path.suffix.lower() or "(none)"
                self.skipped[ext] = self.skipped.get(ext, 0) + 1
            elif stat.S_ISREG(st.st_mode):
                yield path
            else:
                self.fail(path, "not a regular file (device, fifo or socket)")


def load_input(pre: types.ModuleType, path: Path, spec: dict) -> np.ndarray:
    """Decode one file and preprocess it at once: at most one full-size image is ever in memory.
    Opened non-blocking and checked with fstat, so a file swapped for a fifo cannot hang us."""
    from PIL import Image

    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        with warnings.catch_warnings():
            # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that: refuse at the warning
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = pre.load_image(fh)
    return pre.preprocess_image(image, spec)


def _reason(exc: BaseException) -> str:
    from PIL import Image

    inner = exc.__context__ if isinstance(exc, ValueError) and exc.__context__ else exc
    if isinstance(inner, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return (f"too many pixels, refused as a possible decompression bomb ({describe(inner)}); "
                "raise --max-pixels if you trust the file")
    if isinstance(inner, MemoryError):
        return "too large to decode in memory"
    if type(inner).__name__ == "UnidentifiedImageError":
        return "not an image (unrecognised format)"
    text = describe(inner)
    if "truncated" in text.lower() or isinstance(inner, EOFError):
        return f"truncated or corrupt image ({text})"
    return f"not a readable image ({text})"


def classify(model: Model, pre: types.ModuleType, files: Any, spec: dict, labels: list[str],
             top: int, *, fail: Any, batch_size: int = 32, on_result: Any = None) -> list[dict]:
    """Top-`top` labels per readable file; `fail(path, reason)` is told about each other one."""
    results: list[dict] = []
    batch: list[tuple[Path, np.ndarray]] = []

    def flush() -> None:
        probs = softmax(model.run(np.stack([x for _, x in batch])).astype(np.float64))
        for (f, _), p in zip(batch, probs):
            order = np.argsort(-p, kind="stable")[:top]
            r = {"file": shown(f), "label": labels[int(order[0])],
                 "top": [{"label": labels[int(k)], "score": round(float(p[k]), 6)} for k in order]}
            results.append(r)
            if on_result:
                on_result(r)
        batch.clear()

    for f in files:
        try:
            batch.append((f, load_input(pre, f, spec)))
        except Exception as exc:  # noqa: BLE001 - any failure to decode a user's file is that file's
            fail(f, _reason(exc))
            continue
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return results


def self_check(bundle: Bundle, pre: types.ModuleType, spec: dict, labels: list[str],
               files: list[str], threads: int | None) -> int:
    """Classify samples/ with each model whose runtime is installed; compare with the pipeline."""
    import importlib.util

    manifest = bundle.manifest
    failures = 0
    checked = 0
    for file in files:
        entry = next(m for m in manifest["models"] if m["file"] == file)
        absent = [m for m in RUNTIME_MODULES.get(entry["runtime"], (entry["runtime"],))
                  if importlib.util.find_spec(m) is None]
        if absent:
            print(f"skip  {file}: {', '.join(absent)} is not installed")
            continue
        try:
            model = Model(bundle, file, threads)
        except MissingRuntime as exc:
            print(f"skip  {file}: {exc}")
            continue
        samples = [s for s in manifest["samples"] if file in s["predictions"]]
        unreadable: dict[str, str] = {}
        # batched and one at a time: a runtime can be right at one batch size only (OpenVINO
        # int8 with a dynamic batch was wrong at batch 1 alone)
        got = {size: {g["file"]: g["label"] for g in classify(
            model, pre, [bundle.root / s["file"] for s in samples], spec, labels, 1,
            fail=lambda path, reason: unreadable.__setitem__(shown(path), reason),
            batch_size=size)} for size in (32, 1)}
        bad = []
        for s in samples:
            name = shown(bundle.root / s["file"])
            for size, labels_got in got.items():
                have = labels_got.get(name, f"unreadable: {unreadable.get(name, 'missing')}")
                if have != s["predictions"][file]:
                    bad.append((s["file"], s["predictions"][file], f"{have} (batch {size})"))
                    break
        checked += 1
        failures += len(bad)
        status = "ok  " if not bad else "FAIL"
        print(f"{status}  {file}: {len(samples) - len(bad)}/{len(samples)} samples as in the pipeline")
        for name, want, have in bad:
            print(f"      {name}: pipeline {want}, here {have}")
    if checked == 0:
        print("no model could be checked: install onnxruntime, openvino, ai-edge-litert or "
              "executorch")
        return 1
    return 1 if failures else 0


def read_labels(bundle: Bundle, manifest: dict) -> list[str]:
    """labels.txt, one name per "\n"-terminated line (str.splitlines() would also split on U+2028
    and other separators a name might hold, shifting every label), checked against the class list
    in manifest.json."""
    labels = bundle.read(manifest["labels"], check=True).decode("utf-8").split("\n")
    if labels and labels[-1] == "":
        labels.pop()
    classes = manifest.get("classes")
    if classes is not None and labels != classes:
        raise Refused(f"{manifest['labels']} ({len(labels)} lines) does not match the "
                      f"{len(classes)} classes in manifest.json (corrupted or edited)")
    return labels


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def run(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description="Classify images with this bundle's model.")
    parser.add_argument("images", nargs="*", help="image files or folders")
    parser.add_argument("--model", default=None, help="model file (default: the bundle's)")
    parser.add_argument("--top", type=_positive_int, default=1, help="labels to print per image")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="CPU threads (default: runtime's)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--self-check", action="store_true",
                        help="classify samples/ with every bundled model and compare with the "
                        "predictions the pipeline recorded (exit 1 on any difference)")
    parser.add_argument("--list", action="store_true", help="list the bundled models")
    parser.add_argument("--verify-key", type=Path, default=None, metavar="PUB",
                        help="ed25519 public key (PEM): refuse to run unless the bundle's "
                        "manifest.sig verifies and every file matches manifest.json")
    parser.add_argument("--bundle", type=Path, default=HERE,
                        help="bundle folder (default: this file's folder)")
    parser.add_argument("--max-pixels", type=_positive_int, default=None,
                        help="refuse images with more pixels (default: Pillow's limit, ~89 M)")
    args = parser.parse_args(argv)

    bundle = Bundle(args.bundle.resolve(), args.verify_key)
    manifest = bundle.manifest
    pre = bundle.import_preprocess()
    if args.max_pixels:
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = args.max_pixels
    spec = json.loads(bundle.read(manifest["preprocess"], check=True))
    labels = read_labels(bundle, manifest)
    model_file = args.model or manifest["default_model"]
    if args.list:
        for m in manifest["models"]:
            print(f"{m['file']}\t{m['format']}\t{m['precision']}\t{m['runtime']}")
        return EXIT_OK
    if args.self_check:
        files = [model_file] if args.model else [m["file"] for m in manifest["models"]]
        return self_check(bundle, pre, spec, labels, files, args.threads)
    if not args.images:
        parser.error("give image files or folders (or --self-check / --list)")
    model = Model(bundle, model_file, args.threads)
    inputs = Inputs(args.images, tuple(pre.IMAGE_EXTENSIONS))

    def show(r: dict) -> None:
        tops = "  ".join(f"{t['label']} {t['score']:.4f}" for t in r["top"])
        print(f"{r['file']}\t{tops}", flush=False)

    results = classify(model, pre, inputs, spec, labels, max(1, min(args.top, len(labels))),
                       fail=inputs.fail, on_result=None if args.json else show)
    if args.json:
        print(json.dumps({"model": model_file, "results": results,
                          "errors": [{"file": f, "error": e} for f, e in inputs.failed]}, indent=2))
    if inputs.skipped:
        what = ", ".join(f"{n} {ext}" for ext, n in sorted(inputs.skipped.items()))
        print(f"note: skipped files in folders without an image extension: {what}",
              file=sys.stderr)
    if not results and not inputs.failed:
        raise Refused("no image files found")
    if inputs.failed:
        print(f"error: {len(inputs.failed)} of {len(inputs.failed) + len(results)} inputs could "
              "not be classified (listed above)", file=sys.stderr)
        return EXIT_SOME_FAILED
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Never a traceback: every failure is one line on stderr and an exit status."""
    try:
        return run(argv)
    except (Refused, MissingRuntime) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `predict.py folder | head`
        sys.stderr.close()
        return EXIT_OK
    except Exception as exc:  # noqa: BLE001 - a bug here must still be one readable line
        print(f"error: predict.py failed unexpectedly: {type(exc).__name__}: {exc} "
              "(please report it with the command line)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    raise SystemExit(main())
