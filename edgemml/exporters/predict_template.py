#!/usr/bin/env python3
"""Classify image files with the model in this folder, exactly as the edgemml pipeline did.

Needs only numpy, Pillow and the runtime of the model it runs: onnxruntime (.onnx), openvino (.xml),
ai-edge-litert (.tflite; no torch) or executorch + torch (.pte). The preprocessing is preprocess.py
next to this file, a verbatim copy of the code used for training and validation, driven by
preprocess.json.

    python predict.py IMAGE_OR_FOLDER [...]           # top-1 label per image (default model)
    python predict.py img.png --model model.fp32.onnx --top 3 --json
    python predict.py --self-check                     # re-classify samples/, compare with manifest
    python predict.py --list                           # the models in this bundle
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

from preprocess import IMAGE_EXTENSIONS, load_image, preprocess_batch  # noqa: E402


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
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


def litert_model(path: Path, threads: int | None):
    """A .tflite in the LiteRT interpreter. A fully int8 model takes int8 input and gives int8
    output: the batch is quantized with the input's own scale / zero point and the output
    dequantized with the output's (manifest.json records them too)."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path), num_threads=threads)
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


def executorch_model(path: Path, threads: int | None):
    """A .pte in the ExecuTorch runtime (needs torch: it takes and returns torch tensors). Float
    input and output; XNNPACK's thread pool is process-wide."""
    import torch
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime

    if threads:
        portable_lib._unsafe_reset_threadpool(threads)
    method = Runtime.get().load_program(str(path)).load_method("forward")
    batch = int(method.metadata.input_tensor_meta(0).sizes()[0])
    return static_batches(lambda x: method.execute([torch.from_numpy(x)])[0].numpy(), batch)


class MissingRuntime(SystemExit):
    """The runtime a model needs cannot be imported here."""


class Model:
    """One model file of the bundle, run by the runtime its format needs."""

    def __init__(self, manifest: dict, file: str, threads: int | None = None) -> None:
        entry = next((m for m in manifest["models"] if m["file"] == file), None)
        if entry is None:
            names = ", ".join(m["file"] for m in manifest["models"])
            raise SystemExit(f"error: {file} is not a model of this bundle (models: {names})")
        self.entry = entry
        path = HERE / file
        for rel in entry.get("files", [file]):
            want = manifest["files"].get(rel, {}).get("sha256")
            if want and sha256(HERE / rel) != want:
                raise SystemExit(f"error: {rel} does not match its sha256 in manifest.json "
                                 f"(corrupted or edited)")
        self.input_name = entry["inputs"][0]["name"]
        try:
            self._open(entry["runtime"], path, threads)
        except ImportError as exc:
            need = " + ".join(RUNTIME_MODULES.get(entry["runtime"], (entry["runtime"],)))
            raise MissingRuntime(f"error: {file} needs {need}, which cannot be imported here "
                                 f"({exc})") from None

    def _open(self, runtime: str, path: Path, threads: int | None) -> None:
        if runtime == "onnxruntime":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            if threads:
                opts.intra_op_num_threads = threads
            self.session = ort.InferenceSession(str(path), sess_options=opts,
                                                providers=["CPUExecutionProvider"])
            self.run = lambda x: self.session.run(None, {self.input_name: x})[0]
        elif runtime == "litert":
            self.run = litert_model(path, threads)
        elif runtime == "executorch":
            self.run = executorch_model(path, threads)
        else:
            import openvino as ov

            # f32 pins fp32 execution of everything that is not int8; without it OpenVINO may run
            # in bf16 on CPUs that support it, and results would differ from the pipeline's.
            config = {"INFERENCE_PRECISION_HINT": "f32"}
            if threads:
                config["INFERENCE_NUM_THREADS"] = threads
            compiled = ov.Core().compile_model(str(path), "CPU", config)
            request = compiled.create_infer_request()
            self.run = lambda x: np.array(request.infer({0: x})[compiled.outputs[0]], copy=True)


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def image_files(args: list[str]) -> list[Path]:
    files: list[Path] = []
    for a in args:
        p = Path(a)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.is_file():
            files.append(p)
        else:
            raise SystemExit(f"error: {a}: no such file or folder")
    return files


def classify(model: Model, files: list[Path], spec: dict, labels: list[str], top: int,
             batch_size: int = 32) -> list[dict]:
    results = []
    for i in range(0, len(files), batch_size):
        chunk = files[i:i + batch_size]
        try:
            images = [load_image(f) for f in chunk]
        except ValueError as exc:
            raise SystemExit(f"error: {exc}") from None
        probs = softmax(model.run(preprocess_batch(images, spec)).astype(np.float64))
        for f, p in zip(chunk, probs):
            order = np.argsort(-p, kind="stable")[:top]
            results.append({"file": str(f), "label": labels[int(order[0])],
                            "top": [{"label": labels[int(k)], "score": round(float(p[k]), 6)}
                                    for k in order]})
    return results


def self_check(manifest: dict, spec: dict, labels: list[str], files: list[str],
               threads: int | None) -> int:
    """Classify samples/ with each model whose runtime is installed; compare with the pipeline."""
    import importlib.util

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
            model = Model(manifest, file, threads)
        except MissingRuntime as exc:
            print(f"skip  {file}: {str(exc).removeprefix('error: ')}")
            continue
        samples = [s for s in manifest["samples"] if file in s["predictions"]]
        got = classify(model, [HERE / s["file"] for s in samples], spec, labels, 1)
        bad = [(s["file"], s["predictions"][file], g["label"])
               for s, g in zip(samples, got) if g["label"] != s["predictions"][file]]
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


def main(argv: list[str] | None = None) -> int:
    manifest = json.loads((HERE / "manifest.json").read_text(encoding="utf-8"))
    spec = json.loads((HERE / manifest["preprocess"]).read_text(encoding="utf-8"))
    labels = (HERE / manifest["labels"]).read_text(encoding="utf-8").splitlines()
    parser = argparse.ArgumentParser(description="Classify images with this bundle's model.")
    parser.add_argument("images", nargs="*", help="image files or folders")
    parser.add_argument("--model", default=manifest["default_model"],
                        help=f"model file (default: {manifest['default_model']})")
    parser.add_argument("--top", type=int, default=1, help="labels to print per image")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: runtime's)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--self-check", action="store_true",
                        help="classify samples/ with every bundled model and compare with the "
                        "predictions the pipeline recorded (exit 1 on any difference)")
    parser.add_argument("--list", action="store_true", help="list the bundled models")
    args = parser.parse_args(argv)
    if args.list:
        for m in manifest["models"]:
            print(f"{m['file']}\t{m['format']}\t{m['precision']}\t{m['runtime']}")
        return 0
    if args.self_check:
        files = [args.model] if "--model" in (argv or sys.argv) else [
            m["file"] for m in manifest["models"]]
        return self_check(manifest, spec, labels, files, args.threads)
    if not args.images:
        parser.error("give image files or folders (or --self-check / --list)")
    files = image_files(args.images)
    if not files:
        raise SystemExit("error: no image files found")
    results = classify(Model(manifest, args.model, args.threads), files, spec, labels,
                       max(1, min(args.top, len(labels))))
    if args.json:
        print(json.dumps({"model": args.model, "results": results}, indent=2))
    else:
        for r in results:
            tops = "  ".join(f"{t['label']} {t['score']:.4f}" for t in r["top"])
            print(f"{r['file']}\t{tops}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
