"""Test-only stage types that exercise the engine without torch (imported via `plugins:`).

Each run appends a line to the file named by EDGEMML_TEST_CALLS, so tests can prove that a cached
stage's run() was not called at all (not merely that its output looked the same).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from edgemml.config import StageConfig
from edgemml.errors import StageError
from edgemml.stages import register
from edgemml.stages.base import Stage, StageContext


def _note_call(name: str) -> None:
    calls = os.environ.get("EDGEMML_TEST_CALLS")
    if calls:
        with open(calls, "a") as f:
            f.write(name + "\n")


class ToySourceConfig(StageConfig):
    type: Literal["toy_source"]
    value: int = Field(1, description="Number written to the model file.")
    sleep_s: float = Field(0.0, ge=0, description="Seconds to sleep in the middle of the stage.")


@register
class ToySource(Stage[ToySourceConfig]):
    """Writes a 'model' file holding a number."""

    type = "toy_source"
    Config = ToySourceConfig

    @classmethod
    def needs_input(cls, config: ToySourceConfig) -> bool:
        return False

    def run(self, ctx: StageContext, config: ToySourceConfig) -> dict[str, Path]:
        _note_call(ctx.name)
        out = ctx.path("model/value.txt")
        out.write_text("0")
        if config.sleep_s:
            marker = os.environ.get("EDGEMML_TEST_STARTED")
            if marker:
                Path(marker).write_text(ctx.name)
            time.sleep(config.sleep_s)
        out.write_text(str(config.value))
        ctx.record(value=config.value)
        return {"model": out.parent}


class ToyScaleConfig(StageConfig):
    type: Literal["toy_scale"]
    factor: int = Field(2, description="Multiply the input number by this.")
    sleep_s: float = Field(0.0, ge=0, description="Seconds to sleep in the middle of the stage.")
    fail: bool = Field(False, description="Raise a StageError (a user-caused failure).")
    crash: bool = Field(False, description="Raise a plain exception (a bug).")
    gate_max: int | None = Field(None, description="Fail a gate when the result exceeds this.")
    also_read: str | None = Field(None, description="Another earlier stage to read.")
    write_mb: int = Field(0, ge=0, description="Also write a file of this many MiB (disk full).")


@register
class ToyScale(Stage[ToyScaleConfig]):
    """Reads the input number, multiplies it and writes a 'model' file."""

    type = "toy_scale"
    Config = ToyScaleConfig

    @classmethod
    def references(cls, config: ToyScaleConfig) -> list[tuple[str, str]]:
        refs = super().references(config)
        if config.also_read:
            refs.append(("also_read", config.also_read))
        return refs

    def run(self, ctx: StageContext, config: ToyScaleConfig) -> dict[str, Path]:
        _note_call(ctx.name)
        value = int((ctx.input()["model"] / "value.txt").read_text())
        if config.also_read:
            value += int((ctx.input(config.also_read)["model"] / "value.txt").read_text())
        if config.fail:
            raise StageError("asked to fail", stage=ctx.name, key="fail", hint="set fail: false")
        if config.crash:
            raise RuntimeError("simulated bug")
        # Not idempotent on purpose, like copying a folder into place (shutil.copytree): a work
        # folder left by a killed attempt must not be reused as it is.
        (ctx.work_dir / "copied").mkdir()
        if config.write_mb:
            with open(ctx.path("model/blob.bin"), "wb") as f:
                for _ in range(config.write_mb):
                    f.write(b"\0" * (1 << 20))
        # EDGEMML_TEST_PAUSE=<stage name> pauses like sleep_s, without changing the fingerprint
        pause = 60.0 if os.environ.get("EDGEMML_TEST_PAUSE") == ctx.name else config.sleep_s
        if pause:
            marker = os.environ.get("EDGEMML_TEST_STARTED")
            if marker:
                Path(marker).write_text(ctx.name)
            time.sleep(pause)
        result = value * config.factor
        out = ctx.path("model/value.txt")
        out.write_text(str(result))
        ctx.record(value=result)
        if config.gate_max is not None and result > config.gate_max:
            ctx.fail_gates([f"value {result} > gate_max {config.gate_max}"])
        return {"model": out.parent}
