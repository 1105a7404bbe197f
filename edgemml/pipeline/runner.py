"""The runner: stage order, fingerprints, skip / resume, and the run summary.

A stage is skipped when its fingerprint (type, version, code, resolved config, shared sections, the
sha256 of every input artifact and data file, library versions) matches its stage.json and every
output still hashes as recorded. Otherwise it runs in a `.partial` folder that is renamed into place
only when the stage succeeded, so a killed run resumes at the first unfinished stage.

The fingerprint itself is computed in fingerprint.py and the run folder's records are read in
runrecords.py. What stays here (over the ~400-line guide, on purpose) is one state machine — plan,
lock, decide per stage, run in a partial folder, finalize, summarise, and the torchrun ranks that
follow rank 0 — whose steps share the runner's state and order; split further, one control flow
would be read across files.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgemml import __version__
from edgemml.artifacts import (
    MANIFEST,
    STAGE_RECORD,
    RunLock,
    describe_output,
    pid_alive,
    replace_dir,
    write_json_atomic,
    write_text_atomic,
)
from edgemml.config import LoadedPipeline, StageConfig, stage_name
from edgemml.errors import ArtifactError, ConfigError, EdgemmlError, GateFailed, StageError
from edgemml.pipeline.fingerprint import (DataHashCache, explain_change, fingerprint_inputs,
                                 fingerprint_of)
from edgemml.machine import versions
from edgemml.pipeline.runrecords import PlannedStage, RunRecords
from edgemml.paths import RUN_FORMAT, check_run_dir, list_files, make_run_dir, os_error
from edgemml.stages import get as get_stage
from edgemml.stages._capabilities import check_pipeline
from edgemml.stages.base import Reporter, Stage, StageContext, StageOutputs

RECORD_SCHEMA = 1
PARTIAL_MARK = ".edgemml-partial"


class InternalError(EdgemmlError):
    """A stage crashed on something edgemml should have handled: a bug (exit 3)."""

    exit_code = 3


@dataclass
class StageOutcome:
    name: str
    type: str
    status: str  # cached | ran | failed | interrupted | not-run
    reason: str
    seconds: float = 0.0
    dir: str | None = None
    fingerprint: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    highlights: list[str] = field(default_factory=list)
    gate_failures: list[str] = field(default_factory=list)


def _reads_all_earlier(cls: type[Stage], cfg: StageConfig) -> bool:
    """Stage.reads_all_earlier, narrowed per config where the stage defines
    `reads_all_earlier_for(config)` (export reads every earlier stage only for `quantized: auto`)."""
    narrow = getattr(cls, "reads_all_earlier_for", None)
    return bool(narrow(cfg)) if narrow is not None else cls.reads_all_earlier


def plan_stages(pipeline: LoadedPipeline) -> list[PlannedStage]:
    """Resolve each stage's class, its default input and the earlier stages it reads."""
    planned: list[PlannedStage] = []
    for i, cfg in enumerate(pipeline.stages):
        cls = get_stage(cfg.type)
        name = stage_name(cfg)
        input_name = cfg.input
        if input_name is None and cls.needs_input(cfg):
            for earlier in reversed(planned):
                if "model" in earlier.stage_cls.provides:
                    input_name = earlier.name
                    break
            if input_name is None:
                raise ConfigError(
                    f"stage {name!r} ({cfg.type}) needs a model from an earlier stage, and no earlier "
                    f"stage produces one", file=str(pipeline.path), key=f"stages[{i}]",
                    hint="add a stage that produces a model before it, or give it its own model")
        deps = [input_name] if input_name else []
        refs = [ref for _, ref in cls.references(cfg)]
        if _reads_all_earlier(cls, cfg):
            refs += [p.name for p in planned]
        for ref in refs:
            if ref not in deps:
                deps.append(ref)
        planned.append(PlannedStage(i, name, cfg, cls, input_name, deps))
    return planned


class Runner(RunRecords):
    """Runs a loaded pipeline in a run directory."""

    def __init__(self, pipeline: LoadedPipeline, run_dir: Path, reporter: Reporter, *,
                 force: bool = False, from_stage: str | None = None,
                 only_stage: str | None = None, rank: int = 0, world_size: int = 1,
                 verify: bool = False, command: str | None = None) -> None:
        self.pipeline = pipeline
        self.run_dir = Path(os.path.abspath(run_dir))
        #: re-hash the recorded outputs of every stage, also those the plan would not look at
        self.verify = verify
        #: the command that resumes this run (shown in crash hints): the user's own, --out included
        self.command = command or f"edgemml run {pipeline.path}"
        self.reporter = reporter
        self.force = force
        self.from_stage = from_stage
        self.only_stage = only_stage
        self.rank = rank
        self.world_size = world_size
        self.plan = plan_stages(pipeline)
        check_pipeline([(p.name, p.config, p.stage_cls, p.input_name) for p in self.plan],
                       pipeline)  # refuses what cannot work on the architecture, before anything
        names = [p.name for p in self.plan]
        for opt, value in (("--from", from_stage), ("--only", only_stage)):
            if value is not None and value not in names:
                import difflib
                close = difflib.get_close_matches(value, names, n=1)
                raise ConfigError(f"{opt} {value}: no such stage (stages: {', '.join(names)})",
                                  hint=f"did you mean {close[0]!r}?" if close else None)
        self.outcomes: list[StageOutcome] = []
        self._data_hashes = DataHashCache()
        self._dry = False

    # ---- the run ----------------------------------------------------------------------------

    def run(self) -> list[StageOutcome]:
        if self.world_size > 1:
            return self._run_distributed()
        return self._run_main()

    # ---- several processes (torchrun) ------------------------------------------------------------
    # Rank 0 alone locks and writes the run directory and decides what runs; it tells the other
    # ranks about each stage that trains on every process (Stage class attribute `distributed`),
    # and they run just those stages, in a private temporary folder, then wait for the next one.

    def _run_distributed(self) -> list[StageOutcome]:
        from edgemml.distributed import init_distributed, shutdown_distributed

        init_distributed()
        try:
            if self.rank == 0:
                outcomes = self._run_main()
                self._announce({"op": "end"})
                return outcomes
            self._follow()
            return []
        finally:
            shutdown_distributed()

    def _announce(self, message: dict[str, Any]) -> None:
        if self.world_size > 1:
            from edgemml.distributed import broadcast_object
            broadcast_object(message)

    def _follow(self) -> None:
        import tempfile

        from edgemml.distributed import broadcast_object

        try:
            while True:
                message = broadcast_object(None)
                if message["op"] == "end":
                    return
                item = self.plan[message["index"]]
                with tempfile.TemporaryDirectory(prefix=f"edgemml-rank{self.rank}-") as tmp:
                    ctx = StageContext(name=item.name, index=item.index, config=item.config,
                                       pipeline=self.pipeline, work_dir=Path(tmp),
                                       inputs=message["inputs"], input_name=item.input_name,
                                       reporter=self.reporter, rank=self.rank,
                                       world_size=self.world_size)
                    item.stage_cls().run(ctx, item.config)
        except RuntimeError as exc:  # a collective failed: another process went away
            first = (str(exc).splitlines() or [""])[0]
            raise InternalError(f"rank {self.rank} lost the other processes ({first[:200]})",
                                hint="usually rank 0 stopped first; its message above says why") \
                from exc

    def _run_main(self) -> list[StageOutcome]:
        check_run_dir(self.run_dir)
        make_run_dir(self.run_dir)
        try:
            lock = RunLock(self.run_dir).acquire()
            self._claim()
        except OSError as exc:
            raise os_error(exc, self.run_dir, doing="write in the run folder",
                           run_dir=self.run_dir) from None
        started = time.time()
        error: BaseException | None = None
        try:
            if lock.took_over_from is not None:
                self.reporter.event("warning", stage="run", message=(
                    f"the previous run (pid {lock.took_over_from}) ended without finishing; "
                    f"resuming"))
            self._remove_orphans()
            self._run_locked()
        except OSError as exc:  # the runner's own reads and writes in the run folder
            error = os_error(exc, self.run_dir, run_dir=self.run_dir)
            raise error from None
        except (EdgemmlError, KeyboardInterrupt) as exc:
            error = exc
            raise
        except Exception as exc:  # a bug in the runner itself: exit 3, with its error.log
            error = self._internal_error("the runner crashed", exc)
            raise error from exc
        except BaseException as exc:
            error = exc
            raise
        finally:
            try:
                self._write_summary(started, error)
            except OSError as exc:  # e.g. the disk is full: keep the error that stopped the run
                if error is None:
                    raise os_error(exc, self.run_dir, run_dir=self.run_dir) from None
            finally:
                lock.release()
        failures = [(o.name, g) for o in self.outcomes for g in o.gate_failures]
        if failures:
            lines = "\n".join(f"  {name}: {g}" for name, g in failures)
            raise GateFailed(f"{len(failures)} gate(s) failed:\n{lines}",
                             hint=f"see the reports in {self.run_dir}")
        return self.outcomes

    def _run_locked(self) -> None:
        results: dict[str, StageOutputs] = {}
        hashes: dict[str, dict[str, str]] = {}
        self.reporter.event("plan", total=len(self.plan), run_dir=str(self.run_dir),
                            stages=[p.name for p in self.plan])
        names = [p.name for p in self.plan]
        from_index = names.index(self.from_stage) if self.from_stage else None
        only_index = names.index(self.only_stage) if self.only_stage else None
        needed = self._needed_for(only_index) if only_index is not None else None
        manifest = self._manifest_base()

        for item in self.plan:
            if needed is not None and item.name not in needed:
                self._outcome(item, "not-run", self._verify_unchecked(item, "not needed by --only"))
                continue
            final = self.stage_dir(item)
            record = self._read_record(final)
            inputs_missing = [d for d in item.deps if d not in hashes]
            if inputs_missing:
                raise ArtifactError(f"stage {item.name!r} needs {inputs_missing} which did not run")
            fp_inputs = fingerprint_inputs(item, self.pipeline, results, hashes, self._data_hashes)
            fp = fingerprint_of(fp_inputs)
            upstream_only = only_index is not None and item.index < only_index
            forced = self.force or (from_index is not None and item.index >= from_index) or (
                only_index is not None and item.index == only_index)
            if upstream_only:
                # --only: inputs are taken from the run directory as they are (verified, not re-run)
                cached, why = self.check_cached(item, None, record)
                if not cached:
                    raise ArtifactError(
                        f"--only {self.only_stage}: its input stage {item.name!r} has no finished "
                        f"outputs in {self.run_dir} ({why})",
                        hint="run the pipeline without --only first")
                if record is not None and record.get("fingerprint") != fp:
                    self.reporter.event("warning", stage=item.name, message=(
                        "its outputs are from an older configuration; --only uses them anyway"))
                reason = "used as input of --only"
            elif forced:
                cached, reason = False, self._verify_unchecked(item, "forced")
            else:
                cached, reason = self.check_cached(item, fp, record)
                if reason == "changed":
                    reason = explain_change(record.get("fingerprint_inputs") if record else None,
                                            fp_inputs)
            if from_index is not None and item.index < from_index and not cached:
                raise ArtifactError(
                    f"--from {self.from_stage}: earlier stage {item.name!r} is not up to date "
                    f"({reason})", hint="run without --from so earlier stages run first")
            if cached and record is not None:
                out = self.outputs_from_record(item, record)
                results[item.name] = out
                hashes[item.name] = {k: v["sha256"] for k, v in record["outputs"].items()}
                self.reporter.event("stage_skip", stage=item.name, type=item.config.type,
                                    reason=reason)
                self._outcome(item, "cached", reason, record.get("wall_time_s", 0.0), final,
                              record.get("fingerprint"), out)
                manifest["stages"].append(self._manifest_entry(item, record.get("fingerprint"),
                                                               "done"))
                continue
            if getattr(item.stage_cls, "distributed", False):
                self._announce({"op": "run", "index": item.index,
                                "inputs": {d: results[d] for d in item.deps}})
            record = self._execute(item, fp, fp_inputs, reason, results, manifest)
            results[item.name] = self.outputs_from_record(item, record)
            hashes[item.name] = {k: v["sha256"] for k, v in record["outputs"].items()}
            manifest["stages"].append(self._manifest_entry(item, fp, "done"))
            write_json_atomic(self.run_dir / MANIFEST, manifest)
        write_json_atomic(self.run_dir / MANIFEST, manifest)

    def _claim(self) -> None:
        """Mark a new (or empty) run folder as edgemml's, before anything else is written in it."""
        if not (self.run_dir / MANIFEST).exists():
            write_json_atomic(self.run_dir / MANIFEST, self._manifest_base())

    def _remove_orphans(self) -> None:
        """Delete what interrupted runs left that no stage of this pipeline will resume: work
        folders of stages that were renamed, renumbered or removed (`.NN-name.partial`), and the
        previous results a replaced stage folder was moved to (`.NN-name.old-PID`)."""
        wanted = {f".{p.dir_name}.partial" for p in self.plan}
        pattern = re.compile(r"^\.\d\d-[A-Za-z][A-Za-z0-9_-]*\.(partial|old-(\d+))$")
        for entry in sorted(self.run_dir.iterdir()):
            m = pattern.match(entry.name)
            if m is None or entry.name in wanted or entry.is_symlink() or not entry.is_dir():
                continue
            if m.group(2) is not None and pid_alive(int(m.group(2))):
                continue  # another process is replacing that folder right now
            shutil.rmtree(entry)
            self.reporter.event("message", stage="run", message=(
                f"removed {entry.name}, left by an interrupted run (no stage of this pipeline "
                f"resumes it)"))

    def _internal_error(self, what: str, exc: BaseException) -> InternalError:
        """A bug in edgemml (exit 3): the traceback goes to the run folder's error.log."""
        log = self.run_dir / "error.log"
        try:
            write_text_atomic(log, traceback.format_exc())
            where = f"traceback in {log}"
        except OSError:
            where = "run with --debug for the traceback"
        return InternalError(f"{what}: {type(exc).__name__}: {exc}",
                             hint=f"{where}; resume with: {self.command} (finished stages are "
                                  f"kept)")

    def _needed_for(self, index: int) -> set[str]:
        by_name = {p.name: p for p in self.plan}
        needed: set[str] = set()
        todo = [self.plan[index].name]
        while todo:
            name = todo.pop()
            if name not in needed:
                needed.add(name)
                todo.extend(by_name[name].deps)
        return needed

    def _prepare_partial(self, item: PlannedStage, fp: str) -> Path:
        """The stage's work folder: an interrupted attempt's is resumed only by a stage that says
        it resumes idempotently (Stage.resumable) and only with the same fingerprint; any other
        is discarded, so no stage ever runs on top of half of an earlier attempt's files."""
        partial = self.partial_dir(item)
        mark = partial / PARTIAL_MARK
        if partial.is_symlink() or (partial.exists() and not partial.is_dir()):
            raise ArtifactError(
                f"{partial} is {'a symbolic link' if partial.is_symlink() else 'not a folder'}; "
                f"edgemml does not follow or delete what it did not create",
                hint="remove it, then run again")
        if partial.exists():
            same = mark.is_file() and mark.read_text().strip() == fp
            if same and getattr(item.stage_cls, "resumable", False):
                self.reporter.event("message", stage=item.name,
                                    message="resuming from an interrupted attempt")
            else:
                shutil.rmtree(partial)
        partial.mkdir(parents=True, exist_ok=True)
        write_text_atomic(mark, fp)
        return partial

    def _execute(self, item: PlannedStage, fp: str, fp_inputs: dict[str, Any], reason: str,
                 results: dict[str, StageOutputs], manifest: dict[str, Any]) -> dict[str, Any]:
        partial = self._prepare_partial(item, fp)
        progress_manifest = dict(manifest)
        progress_manifest["stages"] = manifest["stages"] + [
            self._manifest_entry(item, fp, "running")]
        write_json_atomic(self.run_dir / MANIFEST, progress_manifest)

        ctx = StageContext(name=item.name, index=item.index, config=item.config,
                           pipeline=self.pipeline, work_dir=partial,
                           inputs={d: results[d] for d in item.deps}, input_name=item.input_name,
                           reporter=self.reporter, rank=self.rank, world_size=self.world_size,
                           final_dir=self.run_dir / item.dir_name)
        self.reporter.event("stage_start", stage=item.name, type=item.config.type, reason=reason)
        t0 = time.perf_counter()
        started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        try:
            outputs = item.stage_cls().run(ctx, item.config)
        except KeyboardInterrupt:
            seconds = time.perf_counter() - t0
            self._outcome(item, "interrupted", "interrupted (Ctrl-C)", seconds)
            raise
        except EdgemmlError as exc:
            seconds = time.perf_counter() - t0
            self.reporter.event("stage_failed", stage=item.name, seconds=seconds)
            self._outcome(item, "failed", exc.message, seconds)
            if getattr(exc, "stage", "missing") is None:
                exc.stage = item.name  # type: ignore[attr-defined]
            raise
        except OSError as exc:  # a full disk, a read-only folder, an unreadable input: exit 2
            seconds = time.perf_counter() - t0
            self.reporter.event("stage_failed", stage=item.name, seconds=seconds)
            error = os_error(exc, partial, doing=None if exc.filename else "write in",
                             run_dir=self.run_dir)
            self._outcome(item, "failed", error.message, seconds)
            raise StageError(error.message, stage=item.name, hint=error.hint) from exc
        except Exception as exc:
            seconds = time.perf_counter() - t0
            self.reporter.event("stage_failed", stage=item.name, seconds=seconds)
            self._outcome(item, "failed", f"{type(exc).__name__}: {exc}", seconds)
            raise self._internal_error(f"stage {item.name!r} crashed", exc) from exc
        seconds = time.perf_counter() - t0
        record = self._finalize(item, partial, outputs, fp, fp_inputs, ctx, seconds, started_at)
        self.reporter.event("stage_end", stage=item.name, seconds=seconds,
                            metrics=record.get("metrics", {}))
        self._outcome(item, "ran", reason, seconds, self.stage_dir(item), fp,
                      self.outputs_from_record(item, record))
        return record

    def _finalize(self, item: PlannedStage, partial: Path, outputs: dict[str, Path], fp: str,
                  fp_inputs: dict[str, Any], ctx: StageContext, seconds: float,
                  started_at: str) -> dict[str, Any]:
        if not isinstance(outputs, dict):
            raise InternalError(f"stage {item.name!r} returned {type(outputs).__name__}, "
                                f"expected a dict of output paths")
        (partial / PARTIAL_MARK).unlink(missing_ok=True)
        described: dict[str, Any] = {}
        root = partial.resolve()
        for key, path in outputs.items():
            path = Path(path)
            p = path if path.is_absolute() else partial / path
            try:
                p.resolve().relative_to(root)
            except ValueError:
                raise InternalError(f"stage {item.name!r} output {key!r} ({path}) is outside its "
                                    f"work folder") from None
            if not p.exists():
                raise InternalError(f"stage {item.name!r} declared output {key!r} at {p}, which "
                                    f"it did not write")
            described[key] = describe_output(p.resolve(), root)
        record = {
            "schema": RECORD_SCHEMA,
            "stage": item.name,
            "type": item.config.type,
            "index": item.index,
            "status": "done",
            "fingerprint": fp,
            "fingerprint_inputs": fp_inputs,
            "config": item.config.model_dump(mode="json"),
            "inputs": {d: fp_inputs["inputs"][d] for d in item.deps},
            "outputs": described,
            "metrics": ctx.metrics,
            "highlights": ctx.highlights,
            "gate_failures": ctx.gate_failures,
            "started": started_at,
            "wall_time_s": round(seconds, 3),
            "versions": {"edgemml": __version__,
                         **versions()},
        }
        write_json_atomic(partial / STAGE_RECORD, record)
        replace_dir(partial, self.stage_dir(item))
        return record

    # ---- summaries ---------------------------------------------------------------------------

    def _outcome(self, item: PlannedStage, status: str, reason: str, seconds: float = 0.0,
                 final: Path | None = None, fp: str | None = None,
                 out: StageOutputs | None = None) -> None:
        self.outcomes.append(StageOutcome(
            item.name, item.config.type, status, reason, round(seconds, 3),
            final.name if final else None, fp, out.metrics if out else {},
            out.highlights if out else [], out.gate_failures if out else []))

    def _manifest_base(self) -> dict[str, Any]:
        return {"format": RUN_FORMAT, "schema": RECORD_SCHEMA,
                "pipeline": self.pipeline.config.name, "pipeline_file": str(self.pipeline.path),
                "edgemml": __version__, "stages": []}

    def _manifest_entry(self, item: PlannedStage, fp: str | None, status: str) -> dict[str, Any]:
        return {"name": item.name, "type": item.config.type, "dir": item.dir_name,
                "fingerprint": fp, "status": status}

    def _write_summary(self, started: float, error: BaseException | None) -> None:
        done = {o.name for o in self.outcomes}
        outcomes = self.outcomes + [
            StageOutcome(p.name, p.config.type, "not-run", "an earlier stage stopped the run")
            for p in self.plan if p.name not in done]
        status = "ok"
        if isinstance(error, KeyboardInterrupt):
            status = "interrupted"
        elif error is not None:
            status = "failed"
        elif any(o.gate_failures for o in outcomes):
            status = "gate-failed"
        summary = {
            "schema": RECORD_SCHEMA,
            "pipeline": self.pipeline.config.name,
            "pipeline_file": str(self.pipeline.path),
            "status": status,
            "error": str(error) if error is not None and not isinstance(error, KeyboardInterrupt)
            else None,
            "started": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
            "wall_time_s": round(time.time() - started, 3),
            "stages": [o.__dict__ for o in outcomes],
        }
        write_json_atomic(self.run_dir / "run.json", summary)
        rows = "\n".join(f"| {o.name} | {o.type} | {o.status} | {o.seconds:.1f} | {o.reason} |"
                         for o in outcomes)
        write_text_atomic(self.run_dir / "run.md", (
            f"# edgemml run: {self.pipeline.config.name}\n\nStatus: **{status}**, "
            f"{summary['wall_time_s']:.1f} s\n\n| stage | type | status | seconds | why |\n"
            f"|---|---|---|---:|---|\n{rows}\n"))
        self.reporter.event("run_end", status=status, wall_time_s=summary["wall_time_s"],
                            run_dir=str(self.run_dir))

    # ---- dry plan (edgemml check) ------------------------------------------------------------

    def dry_plan(self) -> list[tuple[PlannedStage, str, str]]:
        """(stage, 'cached' | 'run', why) for each stage, without running or locking anything.

        Refuses (exit 2) what a run would refuse: a run folder that is not edgemml's, and input
        paths that are devices or over the size limits, in every stage."""
        self._dry = True
        check_run_dir(self.run_dir)
        hashes: dict[str, dict[str, str]] = {}
        will_run: set[str] = set()
        out: list[tuple[PlannedStage, str, str]] = []
        for item in self.plan:
            for path in item.stage_cls.data_files(item.config, self.pipeline):
                list_files(path, what="input")
            upstream = [d for d in item.deps if d in will_run]
            if self.force:
                status, why = "run", self._verify_unchecked(item, "forced")
            elif upstream:
                status, why = "run", self._verify_unchecked(item, f"input {upstream[0]!r} runs "
                                                                  f"first")
            else:
                fp_inputs = fingerprint_inputs(item, self.pipeline, {}, hashes, self._data_hashes)
                record = self._read_record(self.stage_dir(item)) if self.run_dir.exists() else None
                cached, why = self.check_cached(item, fingerprint_of(fp_inputs), record)
                if why == "changed":
                    why = explain_change(record.get("fingerprint_inputs") if record else None,
                                         fp_inputs)
                status = "cached" if cached else "run"
                if cached and record is not None:
                    hashes[item.name] = {k: v["sha256"] for k, v in record["outputs"].items()}
            if status == "run":
                will_run.add(item.name)
            out.append((item, status, why))
        return out
