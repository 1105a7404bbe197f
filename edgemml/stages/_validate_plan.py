"""What the validate stage measures: the torch references and every artifact, in order.

Each artifact is compared with the torch model it was made from (the model stage its own stage
names as `input:`, else the nearest earlier model stage), and an artifact whose runtime may deploy
it in a lower precision (OpenVINO's bf16) is measured twice: as deployed, and pinned to f32
(`name[f32]`) for exact parity.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgemml import runtimes
from edgemml.artifacts import read_json
from edgemml.config import stage_name
from edgemml.errors import InputError, StageError
from edgemml.evaluation import Subject

if TYPE_CHECKING:
    from edgemml.stages.base import StageContext

# stages/validate.py imports this module, so its config is not imported back, not even for
# type checking (no import cycle): annotations name it through this alias.
ValidateConfig = Any

PRECISIONS = ("fp32", "fp16", "int8")


def artifact_key_re() -> re.Pattern[str]:
    """Output keys of earlier stages that are artifacts: <format>-<precision> (onnx-int8 ...)."""
    formats = [f for f in runtimes.formats() if f != "torch"]
    return re.compile(rf"^({'|'.join(map(re.escape, formats))})-({'|'.join(PRECISIONS)})$")


@dataclass
class Plan:
    subjects: list[Subject] = field(default_factory=list)
    primary: str | None = None
    preprocess: dict[str, Any] | None = None
    classes: list[str] | None = None
    #: (stage name or None, folder) of the bundle whose manifest validate marks
    bundle: tuple[str | None, Path] | None = None


def _torch_subject(name: str, folder: Path, stage: str | None) -> tuple[Subject, Any]:
    from edgemml.models import load_model

    model, spec = load_model(folder)
    return Subject(name, "torch", "torch", "fp32", "reference", folder, stage=stage,
                   model=model, in_chans=spec.in_chans), spec


def artifact_subjects(name: str, path: Path, *, key: str | None = None, stage: str | None = None,
                      reference: str | None = None,
                      macs_from: str | None = None) -> list[Subject]:
    """One subject per runtime mode: as deployed, plus exact where the runtime has such a mode."""
    backend = runtimes.detect(path)
    if backend.FORMAT == "torch":
        raise InputError(f"{path} is a torch model folder; give it as `reference:`", file=path)
    precision = key.rsplit("-", 1)[1] if key else backend.stored_precision(path)
    args: dict[str, Any] = dict(stage=stage, reference=reference, macs_from=macs_from)
    key = key or f"{backend.FORMAT}-{precision}"
    out = [Subject(name, key, backend.FORMAT, precision, "deployed", path, **args)]
    if backend.HAS_EXACT_MODE:
        out.append(Subject(f"{name}[f32]", key, backend.FORMAT, precision, "exact", path, **args))
    return out


def safe_name(text: str) -> str:
    text = re.sub(r"[^A-Za-z0-9_-]", "_", text)
    return text if text[:1].isalpha() else f"m{text}"


def scan_bundle(folder: Path) -> tuple[dict[str, Any], list[Path]]:
    """A bundle made elsewhere: its manifest and the model files inside it (any format a runtime
    claims; an OpenVINO model.xml stands for its folder)."""
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise InputError(f"{folder} is not a bundle: manifest.json is missing", file=folder)
    try:
        manifest = read_json(manifest_path)
    except (OSError, ValueError) as exc:
        raise InputError(f"unreadable bundle manifest: {exc}", file=manifest_path) from None
    files: list[Path] = []
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        try:
            backend = runtimes.detect(p)
        except InputError:
            continue
        if backend.FORMAT == "openvino":
            if not p.with_suffix(".bin").is_file():
                continue
            p = p.parent if p.name == "model.xml" else p
        files.append(p)
    return manifest if isinstance(manifest, dict) else {}, files


def _manifest_meta(plan: Plan, manifest: dict[str, Any], folder: Path) -> None:
    pre = manifest.get("preprocess")
    if not isinstance(pre, dict) and (folder / "preprocess.json").is_file():
        pre = read_json(folder / "preprocess.json")
    if isinstance(pre, dict) and plan.preprocess is None:
        plan.preprocess = pre
    for key in ("class_names", "classes", "labels"):
        if isinstance(manifest.get(key), list) and plan.classes is None:
            plan.classes = [str(c) for c in manifest[key]]
            break


class _Planner:
    """Builds the plan; keeps the references it loaded by name."""

    def __init__(self, ctx: StageContext, config: ValidateConfig) -> None:
        self.ctx, self.config = ctx, config
        self.plan = Plan()
        self.order = {n: i for i, n in enumerate(ctx.pipeline.stage_names())}
        self.stages = sorted(ctx.inputs.values(), key=lambda o: self.order.get(o.name, 999))
        self.model_stages = [o for o in self.stages if o.get("model") is not None]
        self.refs: dict[str, tuple[Subject, Any]] = {}
        self.inputs = {stage_name(c): c.input for c in ctx.pipeline.stages}
        self.sweep_source = self._sweep_source()

    def _sweep_source(self) -> str | None:
        """With a sweep, the model every branch starts from (e.g. the unpruned one) is the primary
        reference: the front compares every point with it. None without a sweep."""
        for sweep in getattr(self.ctx.pipeline, "sweeps", []):
            first = sweep.points[0].names[sweep.stage]
            cfg = next((c for c in self.ctx.pipeline.stages if (c.name or c.type) == first), None)
            source = cfg.input if cfg is not None else None
            if source is not None and any(o.name == source for o in self.model_stages):
                return source
        return None

    def ref_name(self, stage: str) -> str:
        last = self.model_stages[-1].name
        primary = self.sweep_source or last
        return "torch" if stage == primary else f"torch@{stage}"

    def ref_for(self, name: str) -> str:
        """The torch model an artifact was made from: the model stage its stage names as `input:`
        (e.g. the int8 of the model before a rewrite), else the nearest model stage up to its own."""
        own = any(o.name == name for o in self.model_stages)
        named = [] if own else [o for o in self.model_stages if o.name == self.inputs.get(name)]
        src = named or [o for o in self.model_stages if self.order[o.name] <= self.order[name]]
        if not src:
            return self.plan.primary or ""
        o = src[-1]
        name = self.ref_name(o.name)
        if name not in self.refs:
            self.refs[name] = _torch_subject(name, o["model"], o.name)
        return name

    def choose_primary(self) -> str | None:
        ctx, config = self.ctx, self.config
        if config.input:
            out = ctx.input(config.input)
            if out.get("model") is None:
                raise StageError(f"stage {config.input!r} has no model to use as the reference",
                                 key="input")
            self.refs["torch"] = _torch_subject("torch", out["model"], out.name)
            self.plan.primary = "torch"
            return "torch"
        if config.reference is not None:
            path = ctx.resolve(config.reference)
            if runtimes.detect(path).FORMAT == "torch":
                self.refs["torch"] = _torch_subject("torch", path, None)
                self.plan.primary = "torch"
                return "torch"
        elif self.model_stages:
            self.plan.primary = self.ref_for(self.sweep_source or self.model_stages[-1].name)
        return None

    def stage_artifacts(self, explicit: str | None) -> list[Subject]:
        key_re = artifact_key_re()
        keys = [k for o in self.stages for k in o.outputs if key_re.match(k)]
        subjects: list[Subject] = []
        for o in self.stages:
            for key, path in o.outputs.items():
                if not key_re.match(key):
                    continue
                name = key if keys.count(key) == 1 else f"{key}@{o.name}"
                ref = explicit or (self.ref_for(o.name) if self.model_stages else None)
                subjects += artifact_subjects(name, path, key=key, stage=o.name, reference=ref,
                                              macs_from=ref)
            bundle = o.get("bundle")
            if bundle is not None and (bundle / "manifest.json").is_file():
                self.plan.bundle = (o.name, bundle)
        return subjects

    def given_artifacts(self, taken: set[str]) -> list[Subject]:
        ctx, config, plan = self.ctx, self.config, self.plan
        given: list[tuple[str | None, Path]] = [(a.name, ctx.resolve(a.path))
                                                for a in config.artifacts]
        if config.bundle is not None:
            folder = ctx.resolve(config.bundle)
            manifest, files = scan_bundle(folder)
            _manifest_meta(plan, manifest, folder)
            plan.bundle = (None, folder)
            given += [(None, f) for f in files]
        if config.reference is not None and plan.primary is None:
            given.insert(0, (None, ctx.resolve(config.reference)))
        subjects: list[Subject] = []
        for name, path in given:
            if name is None:
                backend = runtimes.detect(path)
                name = f"{backend.FORMAT}-{backend.stored_precision(path)}"
                if name in taken:
                    name = f"{name}@{safe_name(path.stem if path.suffix else path.name)}"
            if name in taken:
                raise StageError(f"two artifacts are named {name!r}", key="artifacts",
                                 hint="give each entry of `artifacts:` its own `name:`")
            taken.add(name)
            items = artifact_subjects(name, path, reference=plan.primary)
            if plan.primary is None:  # no torch model anywhere: the first file is the reference
                plan.primary = items[-1].name  # one with an exact mode: its exact twin
                items = items[::-1]
                for it in items:
                    it.reference = plan.primary
            subjects += items
        return subjects


def make_plan(ctx: StageContext, config: ValidateConfig) -> Plan:
    """The references and artifacts to evaluate, references first."""
    planner = _Planner(ctx, config)
    plan = planner.plan
    explicit = planner.choose_primary()
    arts = planner.stage_artifacts(explicit)
    arts += planner.given_artifacts({s.name for s in arts} | set(planner.refs))
    if plan.primary is None:
        raise StageError("nothing to validate: no earlier stage produced a model or an artifact, "
                         "and no `artifacts:`, `reference:` or `bundle:` is given",
                         hint="put validate after export/quantize, or list model files under "
                              "`artifacts:`")
    primary = planner.refs.get(plan.primary)
    if primary is not None:
        for subject, _ in planner.refs.values():
            subject.reference = plan.primary
        spec = primary[1]
        pre = spec.extra.get("preprocess")
        if isinstance(pre, dict):
            plan.preprocess = pre
        if spec.class_names:
            plan.classes = list(spec.class_names)
    refs = ([primary[0]] if primary is not None else []) + [
        s for n, (s, _) in planner.refs.items() if n != plan.primary]
    plan.subjects = refs + arts
    return plan


def check_bundle_labels(folder: Path, classes: list[str]) -> None:
    """The names a bundle prints come from its labels.txt, read the way its predict.py reads it:
    they must be the classes measured here, in order, or every figure is right and every printed
    label wrong."""
    from edgemml.exporters.bundle import read_labels

    manifest = read_json(folder / "manifest.json")
    name = manifest.get("labels") if isinstance(manifest, dict) else None
    path = folder / str(name or "labels.txt")
    if not path.is_file():
        if name is None:
            return  # a bundle made elsewhere that prints no names
        raise InputError(f"the bundle's manifest names {name}, which is missing", file=folder,
                         hint="re-export the bundle (edgemml run ... --from export)")
    labels = read_labels(path)
    if labels != classes:
        diff = next((i for i, (a, b) in enumerate(zip(labels, classes)) if a != b),
                    min(len(labels), len(classes)))
        raise InputError(f"{path.name} has {len(labels)} names, which differ from the "
                         f"{len(classes)} classes validated from line {diff + 1} on (predict.py "
                         f"would print wrong labels)", file=path,
                         hint="re-export the bundle (edgemml run ... --from export)")
