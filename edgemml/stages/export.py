"""export: the input model as ONNX, OpenVINO IR and (optionally) ExecuTorch .pte and LiteRT .tflite,
each checked against torch on real samples, plus the deployable bundle (folder and .tar.gz) with the
int8 models of an earlier quantize stage (which owns every int8 file: see stages/quantize.py).

Outputs: onnx-fp32 (model.fp32.onnx), onnx-fp16 (when fp16: true), openvino-fp32 or openvino-fp16
(folder with model.xml/.bin), executorch-fp32 (model.fp32.pte), litert-fp32 (model.fp32.tflite),
bundle (folder), bundle_archive (bundle.tar.gz), report (export.json). The embedded part is in
_export_embedded.py.
A conversion whose outputs differ from torch by more than the tolerance is an error, not a warning.
Every converted model is run right after conversion, through the runtime layer, on real validation
samples; OpenVINO models with INFERENCE_PRECISION_HINT=f32, and the precision the runtime reports is
stored with the figures (the default — bf16 on CPUs with AVX-512 BF16 — is measured too, for the
record, because that is what a plain `compile_model` would give a user).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from edgemml.config import (STAGE_NAME_RE, DataConfig, LoadedPipeline, PreprocessConfig,
                            StageConfig, StrictModel)
from edgemml.errors import ArtifactError, InputError, StageError
from edgemml.exporters.options import OnnxOptions
from edgemml.stages._export_convert import convert, outputs_of
from edgemml.stages._export_embedded import EmbeddedExportOptions
from edgemml.stages._quantize_embedded import EMBEDDED, check_extras
from edgemml.stages.base import Stage, StageContext, StageOutputs
from edgemml.stages.common import (check_channels, load_input_model, load_stage_data,
                                   model_preprocess, stage_data_files, write_json)

if TYPE_CHECKING:
    import numpy as np

BUNDLE = "bundle"
ARCHIVE = "bundle.tar.gz"
#: artifacts shipped by default, in this order (fp16 ones only when listed in bundle.include)
DEFAULT_INCLUDE = ("onnx-fp32", "onnx-int8", "openvino-fp32", "openvino-int8", "executorch-fp32",
                   "executorch-int8", "litert-fp32", "litert-int8")

ArtifactKey = Literal["onnx-fp32", "onnx-fp16", "onnx-int8", "openvino-fp32", "openvino-fp16",
                      "openvino-int8", "executorch-fp32", "executorch-int8", "litert-fp32",
                      "litert-int8"]


class OpenVinoExportOptions(StrictModel):
    """The OpenVINO IR written by this stage."""

    enabled: bool = Field(True, description="Write an OpenVINO IR.")
    weights: Literal["fp32", "fp16"] = Field(
        "fp32", description="Weight precision stored in model.bin (output key openvino-<weights>).")
    source: Literal["onnx", "torch"] = Field(
        "onnx", description="Convert from the exported ONNX file (same graph and names as the "
        "ONNX artifact) or from the torch module directly.")


class SignOptions(StrictModel):
    """Sign the bundle: an ed25519 signature over manifest.json, whose table pins every file."""

    key: Path = Field(..., description="ed25519 private key, PKCS#8 PEM (relative to the pipeline "
                      "file; make one with `edgemml keygen KEY.pem`; passphrase, if any, from "
                      "EDGEMML_SIGN_PASSPHRASE). Only its public key id enters stage.json.")


class BundleOptions(StrictModel):
    """What goes into the deployable bundle."""

    include: list[ArtifactKey] | None = Field(
        None, description="Artifacts to ship (default: every fp32 and int8 model available; fp16 "
        "ones only when listed).")
    default_model: Literal["auto"] | ArtifactKey = Field(
        "auto", description="Model predict.py uses by default; auto: onnx-int8 when present, else "
        "onnx-fp32.")
    samples: int = Field(8, ge=0, le=1000, description="Held-out images shipped in samples/ with "
                         "the pipeline's predictions (for predict.py --self-check).")
    archive: bool = Field(True, description="Also write bundle.tar.gz.")
    sign: SignOptions | None = Field(
        None, description="Sign the bundle (manifest.sig); check it with `edgemml verify BUNDLE "
        "--key KEY.pub.pem` or `predict.py --verify-key KEY.pub.pem`. Only the bundle is signed, "
        "not the stage's other outputs.")


class ExportConfig(StageConfig):
    type: Literal["export"]
    onnx: OnnxOptions = Field(default_factory=OnnxOptions, description="ONNX export options.")
    slim: Literal["auto", "onnxslim", "onnxsim", "none"] = Field(
        "auto", description="Graph simplification: auto uses onnxslim or onnxsim when installed.")
    fp16: bool = Field(False, description="Also write model.fp16.onnx (fp16 weights and compute, "
                       "fp32 inputs/outputs).")
    openvino: OpenVinoExportOptions = Field(default_factory=OpenVinoExportOptions,
                                            description="OpenVINO IR options.")
    executorch: EmbeddedExportOptions = Field(
        default_factory=EmbeddedExportOptions, description="ExecuTorch .pte lowered to XNNPACK "
        "(pip install 'edgemml[executorch]').")
    litert: EmbeddedExportOptions = Field(
        default_factory=EmbeddedExportOptions, description="LiteRT .tflite "
        "(pip install 'edgemml[litert]').")
    quantized: str = Field(
        "auto", description="Quantize stage whose int8 models go into the bundle: its name, auto "
        "(the nearest earlier quantize stage, if any) or none.")
    parity_samples: int = Field(64, ge=1, description="Val samples on which every converted model "
                                "is compared with torch.")
    tolerance: float = Field(1e-4, gt=0, description="Largest allowed max |diff| relative to the "
                             "output scale (max |torch output|) for fp32 artifacts.")
    fp16_tolerance: float = Field(2e-2, gt=0, description="The same bound for fp16 artifacts.")
    bundle: BundleOptions = Field(default_factory=BundleOptions, description="Bundle contents.")
    data: DataConfig | None = Field(None, description="Data (merged over the pipeline's).")
    preprocess: PreprocessConfig | None = Field(
        None, description="Preprocessing when the input model does not record its own.")

    @field_validator("executorch", "litert")
    @classmethod
    def _extras(cls, value: EmbeddedExportOptions, info: ValidationInfo) -> EmbeddedExportOptions:
        if value.enabled:
            check_extras([str(info.field_name)], f"set {info.field_name}: {{enabled: false}}")
        return value

    @field_validator("quantized")
    @classmethod
    def _stage_ref(cls, value: str) -> str:
        if value not in ("auto", "none") and not STAGE_NAME_RE.match(value):
            raise ValueError("give a stage name, auto or none")
        return value


class ExportStage(Stage[ExportConfig]):
    """ONNX and OpenVINO IR checked against torch, and the deployable bundle with predict.py."""

    type = "export"
    Config = ExportConfig
    provides = ("onnx-fp32", "onnx-fp16", "openvino-fp32", "openvino-fp16", "executorch-fp32",
                "litert-fp32", "bundle", "bundle_archive", "report")
    requires = ("torch", "onnx", "onnxruntime", "openvino", "onnxscript", "onnxslim", "onnxsim",
                "executorch", "torchao", "litert-torch", "ai-edge-litert")
    #: `quantized: auto` picks the nearest earlier quantize stage, which only the run knows
    reads_all_earlier = True

    @classmethod
    def reads_all_earlier_for(cls, config: ExportConfig) -> bool:
        """Only `quantized: auto` needs every earlier stage; a named quantize stage (e.g. a sweep
        branch's own) is a plain reference, so another branch's changes do not re-run this one."""
        return config.quantized == "auto"

    @classmethod
    def model_needs(cls, config: ExportConfig) -> tuple[str, ...]:
        return ("export",)

    @classmethod
    def references(cls, config: ExportConfig) -> list[tuple[str, str]]:
        refs = super().references(config)
        if config.quantized not in ("auto", "none"):
            refs.append(("quantized", config.quantized))
        return refs

    @classmethod
    def data_files(cls, config: ExportConfig, pipeline: LoadedPipeline) -> list[Path]:
        return stage_data_files(config, pipeline)

    @classmethod
    def fingerprint_extra(cls, config: ExportConfig, pipeline: LoadedPipeline) -> dict[str, Any]:
        """The signing key enters the fingerprint by its public key id: another key re-signs the
        bundle, and stage.json never holds the private key's bytes nor a hash of them."""
        if config.bundle.sign is None:
            return {}
        from edgemml.errors import EdgemmlError
        from edgemml.exporters.signing import signing_key_id

        try:
            return {"sign_key_id": signing_key_id(pipeline.resolve_path(config.bundle.sign.key))}
        except EdgemmlError:  # missing or unreadable: the run says why, with the fix
            return {"sign_key_id": "unreadable"}

    def run(self, ctx: StageContext, config: ExportConfig) -> dict[str, Path]:
        from edgemml import runtimes
        from edgemml.data.datasets import as_arrays, evenly_spaced

        model, spec = load_input_model(ctx)
        pre, pre_from = model_preprocess(spec.extra.get("preprocess"), config, ctx.pipeline)
        check_channels(pre, spec.in_chans)
        data = load_stage_data(ctx, config, preprocess=pre)
        classes = list(spec.class_names or data.classes)
        if len(classes) != spec.num_classes:
            raise InputError(f"{len(classes)} class names for a model with {spec.num_classes} "
                             f"outputs", key="data.classes")
        pool = data.val if len(data.val) else (data.test if len(data.test) else data.train)
        x, _ = as_arrays(pool, evenly_spaced(len(pool), config.parity_samples))
        ref = runtimes.backend("torch").logits(model, x)
        arts, exp = convert(ctx, config, model, x, ref)
        arts.update(_int8_artifacts(ctx, config, x, ref))
        outputs = {key: art["_path"] for key, art in arts.items() if art.get("source_stage") is None}
        report: dict[str, Any] = {
            "input_stage": ctx.input_name, "preprocess_from": pre_from, "parity_split": pool.name,
            "artifacts": {k: {kk: vv for kk, vv in v.items() if kk != "_path"}
                          for k, v in arts.items()}}
        bundle, models, default, n_samples = _assemble_bundle(
            ctx, config, arts, pre.model_dump(mode="json"), classes,
            data.test if len(data.test) else pool)
        outputs["bundle"] = bundle
        report["bundle"] = {"models": [m["file"] for m in models], "default_model": default,
                            "samples": n_samples, "signed_by": _sign(ctx, config, bundle)}
        if config.bundle.archive:
            from edgemml.exporters.bundle import write_archive

            outputs["bundle_archive"] = write_archive(bundle, ctx.work_dir / ARCHIVE)
        outputs["report"] = write_json(ctx, "export.json", report)
        ctx.record(onnx_opset=exp.opset, onnx_exporter=exp.exporter,
                   fp32_max_abs_diff=arts["onnx-fp32"]["checks"]["parity_vs_torch"]["max_abs_diff"],
                   bundle_models=len(models))
        ctx.highlight(f"bundle: {ctx.final_dir / BUNDLE} ({len(models)} models, default "
                      f"{default}); check it with: python {ctx.final_dir / BUNDLE}/predict.py "
                      f"--self-check")
        if config.bundle.sign is not None:
            from edgemml.exporters.signing import public_key_path

            ctx.highlight(f"bundle signed by {report['bundle']['signed_by']}; verify it with: "
                          f"edgemml verify {ctx.final_dir / BUNDLE} --key "
                          f"{public_key_path(ctx.resolve(config.bundle.sign.key))}")
        return outputs


def _sign(ctx: StageContext, config: ExportConfig, bundle: Path) -> str | None:
    """manifest.sig, written after manifest.json and before the archive (which then carries it).
    Returns the public key id, or None when the bundle is not signed."""
    if config.bundle.sign is None:
        return None
    from edgemml.exporters.signing import sign_bundle, signing_key_id

    key = ctx.resolve(config.bundle.sign.key)
    try:
        kid = signing_key_id(key)
    except InputError as exc:
        raise InputError(exc.message, file=exc.file, key="bundle.sign.key",
                         hint=exc.hint if exc.hint and "keygen" not in exc.hint else
                         f"make a key pair with: edgemml keygen {key}") from None
    sign_bundle(bundle, key)
    ctx.log(f"bundle signed with key {kid}")
    return kid


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


def _int8_artifacts(ctx: StageContext, config: ExportConfig, x: np.ndarray,
                    ref: np.ndarray) -> dict[str, dict[str, Any]]:
    """The int8 models of the quantize stage, with their agreement with torch on x."""
    from edgemml.exporters.onnx import io_signature
    from edgemml.exporters.openvino import IR_XML, ir_signature
    from edgemml.metrics import check_parity

    quant = _quantize_stage(ctx, config)
    if quant is None:
        return {}
    qreport = json.loads(quant["report"].read_text()) if quant.get("report") else {}
    arts: dict[str, dict[str, Any]] = {}
    from edgemml.stages._export_embedded import entry as embedded_entry

    for key, backend in (("onnx-int8", "onnxruntime"), ("openvino-int8", "openvino"),
                         *((f"{t}-int8", t) for t in EMBEDDED)):
        path = quant.get(key)
        if path is None:
            continue
        res = qreport.get(backend, {})
        checks: dict[str, Any] = {"quantize_report": {
            k: res.get(k) for k in ("top1_pct", "accuracy_drop_pp", "top1_agreement_with_fp32",
                                    "float_layers")}}
        out, precision = outputs_of(path, x)
        if key == "onnx-int8":
            entry = {"file": "model.int8.onnx", "files": ["model.int8.onnx"], "format": "onnx",
                     "runtime": "onnxruntime", **io_signature(path)}
        elif backend in EMBEDDED:
            entry = embedded_entry(key, path)
            checks["quantize_report"]["io_note"] = res.get("io_note")
        else:
            entry = {"file": f"{key}/{IR_XML}", "files": [f"{key}/{IR_XML}", f"{key}/model.bin"],
                     "format": "openvino", "runtime": "openvino", "inference_precision": precision,
                     **ir_signature(path)}
        agree = check_parity(ref, out, tolerance=1.0)
        checks["vs_torch"] = {"top1_agreement": agree.top1_agreement, "rel_diff": agree.rel_diff,
                              "samples": agree.samples}
        arts[key] = {**entry, "precision": "int8", "source_stage": quant.name, "checks": checks,
                     "_path": path}
    return arts


def _assemble_bundle(ctx: StageContext, config: ExportConfig, arts: dict[str, dict[str, Any]],
                     pre_spec: dict[str, Any], classes: list[str],
                     samples_from: Any) -> tuple[Path, list[dict[str, Any]], str, int]:
    """bundle/: the chosen models, predict.py, preprocessing, labels, samples, manifest."""
    from edgemml.exporters.bundle import copy_support_files, write_manifest

    bundle = ctx.work_dir / BUNDLE
    include = config.bundle.include or [k for k in DEFAULT_INCLUDE if k in arts]
    missing = [k for k in include if k not in arts]
    if missing:
        raise StageError(f"bundle.include lists {', '.join(missing)}, which this pipeline does not "
                         f"produce (available: {', '.join(arts)})", key="bundle.include")
    default = config.bundle.default_model
    if default == "auto":
        default = "onnx-int8" if "onnx-int8" in include else include[0]
    if default not in include:
        raise StageError(f"bundle.default_model {default} is not in the bundle", key="bundle")
    copy_support_files(bundle, pre_spec, classes)
    models = []
    for key in include:
        art = arts[key]
        src, dst = art["_path"], bundle / art["file"].split("/")[0]
        (shutil.copytree if Path(src).is_dir() else shutil.copyfile)(src, dst)
        models.append({"key": key, **{k: v for k, v in art.items() if k != "_path"},
                       "source_stage": art.get("source_stage", ctx.name), "metrics": {}})
    samples = _write_samples(bundle, samples_from, config.bundle.samples, classes, models)
    write_manifest(bundle, {"pipeline": ctx.pipeline.config.name, "stage": ctx.name,
                            "versions": _versions(), "preprocess": "preprocess.json",
                            "labels": "labels.txt", "classes": classes,
                            "default_model": arts[default]["file"], "models": models,
                            "samples": samples, "validation": None})
    return bundle, models, arts[default]["file"], len(samples)


def _versions() -> dict[str, str | None]:
    from edgemml.machine import versions

    return versions(("edgemml", "torch", "onnx", "onnxruntime", "openvino", "nncf", "executorch",
                     "litert-torch", "ai-edge-litert", "numpy", "pillow"))


def _write_samples(bundle: Path, dataset: Any, n: int, classes: list[str],
                   models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Held-out images as PNG files plus the label each bundled model gives them in the pipeline.

    The pipeline's prediction is computed from the dataset item (the same preprocessing code on the
    in-memory image), not from the PNG, so predict.py reading the PNG must reproduce it exactly.
    """
    from edgemml.data.datasets import as_arrays, evenly_spaced

    if n == 0 or len(dataset) == 0:
        return []
    idx = evenly_spaced(len(dataset), n)
    x, y = as_arrays(dataset, idx)
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
        logits, _ = outputs_of(bundle / m["file"], x)
        for s, k in zip(samples, logits.argmax(1).tolist()):
            s["predictions"][m["file"]] = classes[k]
    return samples


STAGE = ExportStage
