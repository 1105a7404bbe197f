"""The Stage interface and the context a stage runs in.

A stage reads only what its context hands it (its inputs, declared up front so the runner can
fingerprint them) and writes only into `ctx.work_dir`. The runner, not the stage, decides whether it
runs: it checks the fingerprint, hashes what the stage returned and moves the folder into place.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

from edgemml.config import StageConfig
from edgemml.errors import ArtifactError

if TYPE_CHECKING:
    from edgemml.config import LoadedPipeline, ModelConfig

C = TypeVar("C", bound=StageConfig)


@dataclass
class StageOutputs:
    """What a finished stage left behind: its output paths by key, and the metrics it recorded."""

    name: str
    type: str
    dir: Path
    outputs: dict[str, Path]
    metrics: dict[str, Any] = field(default_factory=dict)
    #: lines the stage asked to show at the end of a run (e.g. where its bundle is)
    highlights: list[str] = field(default_factory=list)
    #: one line per validation gate the stage found failing; the run then exits 1
    gate_failures: list[str] = field(default_factory=list)

    def __getitem__(self, key: str) -> Path:
        try:
            return self.outputs[key]
        except KeyError:
            raise ArtifactError(
                f"stage {self.name!r} ({self.type}) has no output {key!r}; it has: "
                f"{', '.join(self.outputs) or 'none'}"
            ) from None

    def get(self, key: str) -> Path | None:
        return self.outputs.get(key)


class ProgressHandle(Protocol):
    def advance(self, n: float = 1) -> None: ...
    def update(self, *, total: float | None = None, description: str | None = None,
               **fields: Any) -> None: ...


class Reporter(Protocol):
    """Where the runner and stages send progress and messages (rich, JSON lines, or nothing)."""

    def event(self, kind: str, **data: Any) -> None: ...
    def progress(self, description: str, total: float | None) -> Any: ...


class StageContext:
    """Everything a stage may touch while it runs."""

    def __init__(self, *, name: str, index: int, config: StageConfig, pipeline: LoadedPipeline,
                 work_dir: Path, inputs: dict[str, StageOutputs], input_name: str | None,
                 reporter: Reporter, rank: int = 0, world_size: int = 1,
                 final_dir: Path | None = None) -> None:
        self.name = name
        self.index = index
        self.config = config
        self.pipeline = pipeline
        self.work_dir = work_dir
        #: where the runner moves work_dir once the stage has finished (for messages that name it)
        self.final_dir = final_dir or work_dir
        self.inputs = inputs
        self.input_name = input_name
        self.reporter = reporter
        self.rank = rank
        self.world_size = world_size
        self.metrics: dict[str, Any] = {}
        self.highlights: list[str] = []
        self.gate_failures: list[str] = []

    @property
    def seed(self) -> int:
        return self.pipeline.config.seed

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    def input(self, name: str | None = None) -> StageOutputs:
        """Outputs of the primary input stage, or of a named stage this stage declared it reads."""
        key = name or self.input_name
        if key is None:
            raise ArtifactError(f"stage {self.name!r} has no input stage",
                                hint="add `input: <earlier stage name>` to the stage")
        if key not in self.inputs:
            raise ArtifactError(
                f"stage {self.name!r} did not declare that it reads stage {key!r}",
                hint="a stage may only read the stages it declares (Stage.references)")
        return self.inputs[key]

    def resolve(self, path: str | Path) -> Path:
        """Resolve a path from the pipeline file (relative to the file's folder)."""
        return self.pipeline.resolve_path(path)

    def path(self, relative: str) -> Path:
        """A path inside this stage's output folder, with its parent folders created."""
        p = self.work_dir / relative
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def log(self, message: str) -> None:
        self.reporter.event("message", stage=self.name, message=message)

    def warn(self, message: str) -> None:
        self.reporter.event("warning", stage=self.name, message=message)

    def progress(self, description: str, total: float | None = None) -> Any:
        """A context manager yielding a ProgressHandle shown under the stage's bar."""
        return self.reporter.progress(f"{self.name}: {description}", total)

    def record(self, **metrics: Any) -> None:
        """Metrics that go into stage.json (and the run report)."""
        self.metrics.update(metrics)

    def highlight(self, line: str) -> None:
        """A line shown when the run ends, also when this stage is cached (e.g. where the bundle
        is, what the recommended artifact is)."""
        self.highlights.append(line)

    def fail_gates(self, lines: list[str]) -> None:
        """Validation gates that failed, one line each. The stage still finishes and writes every
        report; the runner then exits 1, also on a cached re-run, so CI stays red."""
        self.gate_failures.extend(lines)


class Stage(ABC, Generic[C]):
    """A pipeline stage. Subclasses set `type`, `Config` and implement `run`."""

    type: ClassVar[str]
    Config: ClassVar[type[StageConfig]]
    #: bump when the meaning of the outputs changes, so old caches are not reused
    version: ClassVar[int] = 1
    #: distributions whose versions enter the fingerprint
    requires: ClassVar[tuple[str, ...]] = ()
    #: output keys this stage provides; a stage providing "model" is a default input for later ones
    provides: ClassVar[tuple[str, ...]] = ("model",)
    #: the stage reads every earlier stage (ctx.inputs has them all), e.g. validate
    reads_all_earlier: ClassVar[bool] = False
    #: the stage resumes an interrupted attempt from what it left in its work folder, and does so
    #: idempotently (finetune's epoch checkpoints); otherwise the runner empties the folder first
    resumable: ClassVar[bool] = False

    @classmethod
    def needs_input(cls, config: C) -> bool:
        """Whether this stage reads a model from an earlier stage (default: yes)."""
        return True

    @classmethod
    def references(cls, config: C) -> list[tuple[str, str]]:
        """(key, stage name) of every earlier stage this stage reads, besides its default input."""
        return [("input", config.input)] if config.input else []

    @classmethod
    def check_pipeline(cls, config: C, earlier: list[StageConfig],
                       model: ModelConfig | None) -> tuple[str, str, str | None] | None:
        """A check that needs the earlier stages' configs (and the pipeline's `model:`), run when
        the file is loaded, so `edgemml check` catches it without torch: None when fine, else
        (key inside this stage, message, hint)."""
        return None

    @classmethod
    def model_needs(cls, config: C) -> tuple[str, ...]:
        """What the stage does with its model: "build" (at its input size), "train", "prune",
        "quantize" (int8 through ONNX), "export". Checked against the architecture's measured capabilities before
        anything runs (edgemml.stages._capabilities)."""
        return ()

    @classmethod
    def data_files(cls, config: C, pipeline: LoadedPipeline) -> list[Path]:
        """Files whose bytes define this stage's result (data, checkpoints): they enter the
        fingerprint by content, so editing a data file re-runs the stage."""
        return []

    @classmethod
    def fingerprint_extra(cls, config: C, pipeline: LoadedPipeline) -> dict[str, Any]:
        """Values that define the result but are neither config nor files hashed by content: e.g.
        the public key id of the key export signs with (a private key must never be recorded,
        not even as a hash). Empty for most stages; recorded in stage.json."""
        return {}

    @abstractmethod
    def run(self, ctx: StageContext, config: C) -> dict[str, Path]:
        """Do the work, write into ctx.work_dir, return {output key: path inside work_dir}."""
