"""Reporters: where the runner's events and the stages' progress go.

Three forms: rich bars and messages for people, JSON lines for machines (`--log-json`), and quiet
(warnings only, on stderr). Stages talk only to the Reporter protocol, never to rich directly.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from typing import Any, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from edgemml.artifacts import _json_default


class _NullHandle:
    def advance(self, n: float = 1) -> None:
        pass

    def update(self, *, total: float | None = None, description: str | None = None,
               **fields: Any) -> None:
        pass


class QuietReporter:
    """Prints warnings only (stderr)."""

    def __init__(self) -> None:
        self.err = Console(stderr=True, highlight=False, emoji=False)

    def event(self, kind: str, **data: Any) -> None:
        if kind == "warning":
            self.err.print(f"[yellow]warning[/]: {escape(str(data.get('stage', '')))}: "
                           f"{escape(str(data['message']))}")

    @contextlib.contextmanager
    def progress(self, description: str, total: float | None) -> Iterator[_NullHandle]:
        yield _NullHandle()

    def __enter__(self) -> QuietReporter:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class JsonReporter(QuietReporter):
    """One JSON object per line on stdout: {"event": ..., "time": ..., ...}."""

    def event(self, kind: str, **data: Any) -> None:
        line = {"event": kind, "time": round(time.time(), 3), **data}
        sys.stdout.write(json.dumps(line, default=_json_default) + "\n")
        sys.stdout.flush()

    @contextlib.contextmanager
    def progress(self, description: str, total: float | None) -> Iterator[Any]:
        reporter = self

        class Handle:
            done = 0.0

            def advance(self, n: float = 1) -> None:
                self.done += n

            def update(self, *, total: float | None = None, description: str | None = None,
                       **fields: Any) -> None:
                if fields:
                    reporter.event("progress", task=description or desc, done=self.done,
                                   **fields)

        desc = description
        handle = Handle()
        yield handle
        reporter.event("progress", task=desc, done=handle.done, total=total, finished=True)


class _RichHandle:
    def __init__(self, progress: Progress, task: int) -> None:
        self._progress = progress
        self._task = task

    def advance(self, n: float = 1) -> None:
        self._progress.advance(self._task, n)

    def update(self, *, total: float | None = None, description: str | None = None,
               **fields: Any) -> None:
        kwargs: dict[str, Any] = {}
        if total is not None:
            kwargs["total"] = total
        if description is not None:
            kwargs["description"] = escape(description)
        if fields:
            kwargs["info"] = escape("  ".join(f"{k}={_fmt(v)}" for k, v in fields.items()))
        self._progress.update(self._task, **kwargs)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class RichReporter:
    """Bars for the stages and for long work inside a stage; messages above the bars."""

    def __init__(self, console: Console | None = None) -> None:
        # emoji=False and escape(): stage messages carry user text (paths, class names, file
        # contents) that rich must print as it is, not read as markup or ":emoji:" codes
        self.console = console or Console(stderr=True, highlight=False, emoji=False)
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
            transient=False,
        )
        self._stage_task: int | None = None

    def __enter__(self) -> RichReporter:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def event(self, kind: str, **data: Any) -> None:
        p = self._progress
        if kind == "plan":
            self._stage_task = p.add_task("stages", total=data["total"], info="")
        elif kind == "stage_skip":
            p.console.print(f"[dim]✓ {data['stage']}: cached ({escape(data['reason'])})[/]")
            if self._stage_task is not None:
                p.advance(self._stage_task)
        elif kind == "stage_start":
            p.console.print(f"[bold]▶ {data['stage']}[/] ({escape(data['type'])}): "
                            f"{escape(data['reason'])}")
        elif kind == "stage_end":
            p.console.print(f"[green]✓ {data['stage']}[/] done in {data['seconds']:.1f} s")
            if self._stage_task is not None:
                p.advance(self._stage_task)
        elif kind == "stage_failed":
            p.console.print(f"[red]✗ {data['stage']}[/] failed after {data['seconds']:.1f} s")
        elif kind == "warning":
            p.console.print(f"[yellow]warning[/]: {escape(str(data.get('stage', '')))}: "
                            f"{escape(str(data['message']))}")
        elif kind == "message":
            p.console.print(f"  {escape(str(data.get('stage', '')))}: {escape(str(data['message']))}")
        elif kind == "run_end":
            pass

    @contextlib.contextmanager
    def progress(self, description: str, total: float | None) -> Iterator[_RichHandle]:
        task = self._progress.add_task(f"  {escape(description)}", total=total, info="")
        try:
            yield _RichHandle(self._progress, task)
        finally:
            self._progress.remove_task(task)
