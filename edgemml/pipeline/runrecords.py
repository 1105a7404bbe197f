"""The run folder's records, as the runner reads them: where a stage's folder is (renaming one left
under an old number), its stage.json, and whether a cached stage still holds — same fingerprint,
every output re-hashed. The base of pipeline.Runner, apart so the runner file holds the run itself.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgemml.artifacts import STAGE_RECORD, read_json, verify_output, write_json_atomic
from edgemml.stages.base import StageOutputs

if TYPE_CHECKING:
    from edgemml.config import StageConfig
    from edgemml.stages.base import Reporter, Stage

#: re-hash every output of a cached stage on every run (measured: the quickstart's cached re-run
#: stays within its 3 s budget, see README); False would trust an unchanged size and mtime
HASH_ALWAYS = True


def _recorded_stage(folder: Path) -> str | None:
    """The stage name in folder/stage.json, when it is an edgemml stage record."""
    try:
        record = read_json(folder / STAGE_RECORD)
    except (OSError, ValueError):
        return None
    return record.get("stage") if isinstance(record, dict) and "fingerprint" in record else None


@dataclass
class PlannedStage:
    """One stage of the run's plan: its place, config, class and the stages it reads."""

    index: int
    name: str
    config: StageConfig
    stage_cls: type[Stage]
    input_name: str | None
    deps: list[str]

    @property
    def dir_name(self) -> str:
        return f"{self.index + 1:02d}-{self.name}"


class RunRecords:
    """Stage folders and records of one run directory (`run_dir`), for the runner."""

    run_dir: Path
    reporter: Reporter
    #: re-hash the recorded outputs of every stage, also those the plan would not look at
    verify: bool
    #: a dry plan (edgemml check) renames and rewrites nothing
    _dry: bool

    def stage_dir(self, item: PlannedStage) -> Path:
        """The stage's folder; a folder of the same stage under an old number is renamed (only
        one that holds this stage's own stage.json: nothing else is edgemml's to move)."""
        final = self.run_dir / item.dir_name
        if not final.exists() and self.run_dir.exists() and not self._dry:
            pattern = re.compile(rf"^\d\d-{re.escape(item.name)}$")
            for other in sorted(self.run_dir.iterdir()):
                if (pattern.match(other.name) and other != final and other.is_dir()
                        and not other.is_symlink() and _recorded_stage(other) == item.name):
                    os.replace(other, final)
                    break
        return final

    def partial_dir(self, item: PlannedStage) -> Path:
        return self.run_dir / f".{item.dir_name}.partial"

    def _read_record(self, final: Path) -> dict[str, Any] | None:
        path = final / STAGE_RECORD
        if not path.exists():
            return None
        try:
            record = read_json(path)
        except (OSError, ValueError) as exc:
            self.reporter.event("warning", stage=final.name,
                                message=f"unreadable {STAGE_RECORD} ({exc}); the stage re-runs")
            return None
        return record if isinstance(record, dict) else None

    def check_cached(self, item: PlannedStage, fp: str | None,
                     record: dict[str, Any] | None) -> tuple[bool, str]:
        """(cached?, reason in words)."""
        final = self.stage_dir(item)
        if record is None:
            return False, "not run before"
        if record.get("status") != "done":
            return False, "previous attempt did not finish"
        if fp is not None and record.get("fingerprint") != fp:
            return False, "changed"
        problem, refreshed = self._output_problem(final, record)
        if problem is not None:
            self.reporter.event("warning", stage=item.name,
                                message=f"{problem}; the stage re-runs")
            return False, problem
        if refreshed and not self._dry:
            write_json_atomic(final / STAGE_RECORD, record)
        return True, "unchanged"

    def _output_problem(self, final: Path, record: dict[str, Any]) -> tuple[str | None, bool]:
        """(what differs from the record, or None; whether recorded mtimes were refreshed).
        Every output file is re-hashed (HASH_ALWAYS): size and mtime alone miss a copy tool that
        keeps times, `touch -r` or bit rot."""
        refreshed = False
        for key, out in record.get("outputs", {}).items():
            ok, problem, ref = verify_output(out, final, rehash=HASH_ALWAYS or self.verify)
            if not ok:
                return f"output {key!r} {problem}", False
            refreshed |= ref
        return None, refreshed

    def _verify_unchecked(self, item: PlannedStage, why: str) -> str:
        """--verify: re-hash the recorded outputs of a stage the plan does not look at (forced,
        or not needed by --only), and say so when they changed."""
        record = self._read_record(self.stage_dir(item)) if self.run_dir.exists() else None
        if not self.verify or record is None or record.get("status") != "done":
            return why
        problem, _ = self._output_problem(self.stage_dir(item), record)
        if problem is None:
            return f"{why}; recorded outputs verified"
        self.reporter.event("warning", stage=item.name, message=f"--verify: {problem}")
        return f"{why}; --verify: {problem}"

    def outputs_from_record(self, item: PlannedStage, record: dict[str, Any]) -> StageOutputs:
        final = self.stage_dir(item)
        outputs = {k: final / v["path"] for k, v in record.get("outputs", {}).items()}
        return StageOutputs(item.name, item.config.type, final, outputs, record.get("metrics", {}),
                            list(record.get("highlights", [])),
                            list(record.get("gate_failures", [])))
