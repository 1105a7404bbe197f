"""The export stage's work: convert, check against torch, assemble the bundle.

Every converted model is run right after conversion on real validation samples and compared with
torch; OpenVINO models are compiled with INFERENCE_PRECISION_HINT=f32, and the precision the runtime
reports is stored with the figures (the default, bf16 on this kind of CPU, is measured too, for the
record, because that is what a plain `compile_model` would give a user).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgemml.errors import ArtifactError, InputError, StageError
from edgemml.exporters.runtime import (compare_outputs, dataset_arrays, evenly_spaced, onnx_session,
                                       openvino_compiled, run_onnx, run_openvino)
from edgemml.exporters.stage_io import check_channels, resolve_preprocess, torch_logits
from edgemml.stages.common import load_input_model, load_stage_data, write_json

if TYPE_CHECKING:
    from edgemml.stages.base import StageContext, StageOutputs
    from edgemml.stages.export import ExportConfig

FP32_ONNX = "model.fp32.onnx"
FP16_ONNX = "model.fp16.onnx"
BUNDLE = "bundle"
ARCHIVE = "bundle.tar.gz"


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for dist in ("edgemml", "torch", "onnx", "onnxruntime", "openvino", "nncf", "numpy", "pillow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _quantize_stage(ctx: StageContext, config: ExportConfig) -> StageOutputs | None:
    if config.quantized == "none":
        return None
    if config.quantized != "auto":
        found = ctx.input(config.quantized)
        if found.type != "quantize":
            raise ArtifactError(f"quantized: {config.quantized} is a {found.type} stage, not a "
                                f"quantize stage", key="quantized")
        return found
    earlier = [o for o in ctx.inputs.values() if o.type == "quantize"]
    # ctx.inputs holds every earlier stage (reads_all_earlier) in pipeline order
    return earlier[-1] if earlier else None


def _check(name: str, ref: np.ndarray, out: np.ndarray, tolerance: float) -> dict[str, Any]:
    result = compare_outputs(ref, out, tolerance=tolerance)
    if not result.ok:
        raise StageError(
            f"{name} differs from torch: max abs diff {result.max_abs_diff:.3g} = "
            f"{result.rel_diff:.3g} of the output scale {result.output_scale:.3g} (tolerance "
            f"{tolerance:g}); top-1 agreement {result.top1_agreement:.1%} on {result.samples} samples",
            hint="try onnx.exporter: torchscript (or dynamo), another opset, or slim: none")
    return result.as_dict()


def _ov_parity(name: str, xml: Path, x: np.ndarray, ref: np.ndarray,
               tolerance: float) -> dict[str, Any]:
    compiled, precision = openvino_compiled(xml, precision="f32")
    checks = _check(f"{name} (OpenVINO, {precision})", ref, run_openvino(compiled, x), tolerance)
    checks["inference_precision"] = precision
    default, default_precision = openvino_compiled(xml, precision="default")
    info = compare_outputs(ref, run_openvino(default, x), tolerance=tolerance).as_dict()
    checks["default_hint"] = {"inference_precision": default_precision,
                              "rel_diff": info["rel_diff"], "max_abs_diff": info["max_abs_diff"],
                              "top1_agreement": info["top1_agreement"]}
    return checks


def export_stage(ctx: StageContext, config: ExportConfig) -> dict[str, Path]:
    """Run the export stage (see edgemml/stages/export.py for the contract)."""
    import torch

    from edgemml.exporters.bundle import copy_support_files, write_archive, write_manifest
    from edgemml.exporters.onnx import check_onnx, convert_fp16, export_onnx, io_signature, slim_onnx
    from edgemml.exporters.openvino import IR_XML, convert_to_ir, ir_signature

    model, spec = load_input_model(ctx)
    pre, pre_from = resolve_preprocess(spec, config, ctx.pipeline)
    check_channels(pre, spec)
    data = load_stage_data(ctx, config, preprocess=pre)
    classes = list(spec.class_names or data.classes)
    if len(classes) != spec.num_classes:
        raise InputError(f"{len(classes)} class names for a model with {spec.num_classes} outputs",
                         key="data.classes")
    pool = data.val if len(data.val) else (data.test if len(data.test) else data.train)
    x, _ = dataset_arrays(pool, evenly_spaced(len(pool), config.parity_samples).tolist())
    ref = torch_logits(model, x)
    report: dict[str, Any] = {"input_stage": ctx.input_name, "preprocess_from": pre_from,
                              "parity_split": pool.name, "artifacts": {}}
    outputs: dict[str, Path] = {}
    arts: dict[str, dict[str, Any]] = {}

    fp32 = ctx.work_dir / FP32_ONNX
    exp = export_onnx(model, torch.from_numpy(x[:2]), fp32, opset=config.onnx.opset,
                      exporter=config.onnx.exporter, input_name=config.onnx.input_name,
                      output_name=config.onnx.output_name, dynamic_batch=config.onnx.dynamic_batch,
                      log=ctx.log)
    exp.slimmed_with = slim_onnx(fp32, config.slim)
    check_onnx(fp32)
    parity = _check("model.fp32.onnx", ref, run_onnx(onnx_session(fp32), x), config.tolerance)
    ctx.log(f"onnx-fp32: opset {exp.opset} via {exp.exporter}"
            f"{', slimmed with ' + exp.slimmed_with if exp.slimmed_with else ''}; max abs diff vs "
            f"torch {parity['max_abs_diff']:.3g} ({parity['rel_diff']:.2g} of scale) on "
            f"{parity['samples']} samples")
    outputs["onnx-fp32"] = fp32
    arts["onnx-fp32"] = {"file": FP32_ONNX, "files": [FP32_ONNX], "format": "onnx",
                         "precision": "fp32", "runtime": "onnxruntime", "export": exp.as_dict(),
                         "checks": {"parity_vs_torch": parity}, **io_signature(fp32)}
    if config.fp16:
        fp16 = ctx.work_dir / FP16_ONNX
        convert_fp16(fp32, fp16)
        check_onnx(fp16)
        p16 = _check(FP16_ONNX, ref, run_onnx(onnx_session(fp16), x), config.fp16_tolerance)
        outputs["onnx-fp16"] = fp16
        arts["onnx-fp16"] = {"file": FP16_ONNX, "files": [FP16_ONNX], "format": "onnx",
                             "precision": "fp16", "runtime": "onnxruntime",
                             "checks": {"parity_vs_torch": p16}, **io_signature(fp16)}
    if config.openvino.enabled:
        w = config.openvino.weights
        key = f"openvino-{w}"
        folder = ctx.work_dir / key
        ir = convert_to_ir(fp32 if config.openvino.source == "onnx" else model, folder,
                           example=torch.from_numpy(x[:2]), weights=w,
                           input_name=config.onnx.input_name, output_name=config.onnx.output_name,
                           dynamic_batch=config.onnx.dynamic_batch)
        checks = _ov_parity(key, folder / IR_XML, x, ref,
                            config.tolerance if w == "fp32" else config.fp16_tolerance)
        ctx.log(f"{key}: from {ir.source}, runs in {checks['inference_precision']}: max abs diff vs "
                f"torch {checks['max_abs_diff']:.3g}; with OpenVINO's default precision "
                f"({checks['default_hint']['inference_precision']}) it would be "
                f"{checks['default_hint']['max_abs_diff']:.3g}")
        outputs[key] = folder
        arts[key] = {"file": f"{key}/{IR_XML}", "files": [f"{key}/{IR_XML}", f"{key}/model.bin"],
                     "format": "openvino", "precision": w, "runtime": "openvino",
                     "inference_precision": checks["inference_precision"], "export": ir.as_dict(),
                     "checks": {"parity_vs_torch": checks}, **ir_signature(folder)}

    quant = _quantize_stage(ctx, config)
    if quant is not None:
        qreport = json.loads(quant["report"].read_text()) if quant.get("report") else {}
        for key, backend in (("onnx-int8", "onnxruntime"), ("openvino-int8", "openvino")):
            path = quant.get(key)
            if path is None:
                continue
            res = qreport.get(backend, {})
            checks = {"quantize_report": {k: res.get(k) for k in
                                          ("accuracy", "accuracy_drop_pp",
                                           "top1_agreement_with_fp32", "float_layers")}}
            if key == "onnx-int8":
                out = run_onnx(onnx_session(path), x)
                entry = {"file": "model.int8.onnx", "files": ["model.int8.onnx"], "format": "onnx",
                         "runtime": "onnxruntime", **io_signature(path)}
            else:
                compiled, prec = openvino_compiled(path / IR_XML, precision="f32")
                out = run_openvino(compiled, x)
                entry = {"file": f"{key}/{IR_XML}", "files": [f"{key}/{IR_XML}", f"{key}/model.bin"],
                         "format": "openvino", "runtime": "openvino", "inference_precision": prec,
                         **ir_signature(path)}
            agree = compare_outputs(ref, out, tolerance=1.0)
            checks["vs_torch"] = {"top1_agreement": agree.top1_agreement,
                                  "rel_diff": agree.rel_diff, "samples": agree.samples}
            arts[key] = {**entry, "precision": "int8", "source_stage": quant.name, "checks": checks,
                         "_path": path}
    report["artifacts"] = {k: {kk: vv for kk, vv in v.items() if kk != "_path"}
                           for k, v in arts.items()}

    bundle = ctx.work_dir / BUNDLE
    include = config.bundle.include or [k for k in ("onnx-fp32", "onnx-int8", "openvino-fp32",
                                                    "openvino-int8") if k in arts]
    missing = [k for k in include if k not in arts]
    if missing:
        raise StageError(f"bundle.include lists {', '.join(missing)}, which this pipeline does not "
                         f"produce (available: {', '.join(arts)})", key="bundle.include")
    default = config.bundle.default_model
    if default == "auto":
        default = "onnx-int8" if "onnx-int8" in include else include[0]
    if default not in include:
        raise StageError(f"bundle.default_model {default} is not in the bundle", key="bundle")
    pre_spec = pre.model_dump(mode="json")
    copy_support_files(bundle, pre_spec, classes)
    models = []
    for key in include:
        art = arts[key]
        src = art.get("_path") or (ctx.work_dir / (art["file"].split("/")[0]))
        dst = bundle / art["file"].split("/")[0]
        (shutil.copytree if Path(src).is_dir() else shutil.copyfile)(src, dst)
        models.append({"key": key, **{k: v for k, v in art.items() if k != "_path"},
                       "source_stage": art.get("source_stage", ctx.name), "metrics": {}})
    samples = _write_samples(bundle, data.test if len(data.test) else pool, config.bundle.samples,
                             classes, models)
    write_manifest(bundle, {"pipeline": ctx.pipeline.config.name, "stage": ctx.name,
                            "versions": _versions(), "preprocess": "preprocess.json",
                            "labels": "labels.txt", "classes": classes,
                            "default_model": arts[default]["file"], "models": models,
                            "samples": samples, "validation": None})
    outputs["bundle"] = bundle
    report["bundle"] = {"models": [m["file"] for m in models], "default_model": arts[default]["file"],
                        "samples": len(samples)}
    if config.bundle.archive:
        outputs["bundle_archive"] = write_archive(bundle, ctx.work_dir / ARCHIVE)
    outputs["report"] = write_json(ctx, "export.json", report)
    final = ctx.work_dir.parent / f"{ctx.index + 1:02d}-{ctx.name}"  # where the runner moves it
    ctx.record(onnx_opset=exp.opset, onnx_exporter=exp.exporter,
               fp32_max_abs_diff=parity["max_abs_diff"], bundle_models=len(models),
               highlights=[f"bundle: {final / BUNDLE} ({len(models)} models, default "
                           f"{arts[default]['file']}); check it with: python {final / BUNDLE}/"
                           f"predict.py --self-check"])
    return outputs


def _write_samples(bundle: Path, dataset: Any, n: int, classes: list[str],
                   models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Held-out images as PNG files plus the label each bundled model gives them in the pipeline.

    The pipeline's prediction is computed from the dataset item (the same preprocessing code on the
    in-memory image), not from the PNG, so predict.py reading the PNG must reproduce it exactly.
    """
    if n == 0 or len(dataset) == 0:
        return []
    idx = evenly_spaced(len(dataset), n)
    x, y = dataset_arrays(dataset, idx.tolist())
    folder = bundle / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for j, i in enumerate(idx.tolist()):
        label = classes[int(y[j])] if 0 <= int(y[j]) < len(classes) else ""
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in label) or "unlabelled"
        name = f"samples/{j:03d}_{safe}.png"
        dataset.raw_image(i).save(bundle / name, format="PNG")
        samples.append({"file": name, "label": label or None, "predictions": {}})
    for m in models:
        path = bundle / m["file"]
        if m["runtime"] == "onnxruntime":
            logits = run_onnx(onnx_session(path), x)
        else:
            logits = run_openvino(openvino_compiled(path, precision="f32")[0], x)
        for s, k in zip(samples, logits.argmax(1).tolist()):
            s["predictions"][m["file"]] = classes[k]
    return samples
