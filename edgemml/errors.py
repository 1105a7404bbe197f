"""One error type for everything a user can cause, and the exit codes the CLI maps them to.

Why one type: the CLI catches exactly `EdgemmlError`, prints its message without a traceback and exits
with its code. Anything else escaping a stage is a bug in edgemml (exit 3, traceback with --debug).
"""

from __future__ import annotations

from pathlib import Path

# Exit codes, defined once (documented in README.md).
EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 3


class EdgemmlError(Exception):
    """An error the user can fix: the message names the file, the key and the fix."""

    exit_code: int = EXIT_USER_ERROR

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        line: int | None = None,
        key: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.message = message
        self.file = str(file) if file is not None else None
        self.line = line
        self.key = key
        self.hint = hint
        super().__init__(self.format())

    def format(self) -> str:
        """`file:line: key: message` followed by the hint on its own line."""
        where = ""
        if self.file:
            where = self.file + (f":{self.line}" if self.line else "") + ": "
        elif self.line:
            where = f"line {self.line}: "
        key = f"{self.key}: " if self.key else ""
        text = f"{where}{key}{self.message}"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


class ConfigError(EdgemmlError):
    """pipeline.yaml (or a --set override) is malformed or invalid."""


class InputError(EdgemmlError):
    """A file the pipeline names is missing, unreadable, or not what it claims to be."""


class VerificationError(InputError):
    """A file was checked against what was recorded or signed for it and does not match (a bundle
    with an edited model, a stripped signature): exit 1, like a failed gate, so CI goes red; exit 2
    stays for "could not check at all" (no bundle, unreadable key)."""

    exit_code = EXIT_GATE_FAILED


class ArtifactError(EdgemmlError):
    """The run directory is unusable: locked by another run, or missing a required artifact."""


class StageError(EdgemmlError):
    """A stage could not do what its config asks, for a reason the user can act on."""

    def __init__(self, message: str, *, stage: str | None = None, **kwargs: object) -> None:
        self.stage = stage
        super().__init__(message, **kwargs)  # type: ignore[arg-type]

    def format(self) -> str:
        text = super().format()
        return f"stage {self.stage}: {text}" if self.stage else text


class GateFailed(EdgemmlError):
    """A validation gate failed: reports are written, the run exits 1 so CI blocks the change."""

    exit_code = EXIT_GATE_FAILED
