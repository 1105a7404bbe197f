"""Shared fixtures: run the real `edgemml` CLI in a subprocess, with the test stage plugin importable."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent

# edgemml's cache (the measured roofline) goes to a folder of this test session, never the user's
# ~/.cache, and validate's roofline measurement is a small product: CLI subprocesses inherit both.
# Only where it is not set yet: CLI subprocesses import this module too (through the test plugin
# stages), and each would otherwise leave a folder of its own in its TMPDIR.
if "EDGEMML_CACHE_DIR" not in os.environ:
    os.environ["EDGEMML_CACHE_DIR"] = tempfile.mkdtemp(prefix="edgemml-test-cache-")
os.environ.setdefault("EDGEMML_ROOFLINE_SIZE", "256")


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("EDGEMML_DEBUG", None)
    env["COLUMNS"] = "200"
    # One thread per process: the suite runs many small torch processes on 2 cores, where
    # thread oversubscription makes them several times slower (latency figures set their own).
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """`python -m edgemml.cli ARGS` in a subprocess, as a user would run it."""
    return subprocess.run([sys.executable, "-m", "edgemml.cli", *args], cwd=cwd,
                          env=env or cli_env(), capture_output=True, text=True, timeout=timeout)


def need_tool(*names: str, install: str) -> str:
    """The path of the first of `names` on PATH. Without it a developer's run skips the test, but
    CI (CI set, as .ci/run does, which installs the tools) fails it: there the test must be able
    to fail, never pass silently by skipping."""
    import shutil

    for name in names:
        path = shutil.which(name)
        if path:
            return path
    message = f"{names[0]} is not installed ({install})"
    if os.environ.get("CI"):
        pytest.fail(f"{message}: CI must run this test")
    pytest.skip(message)


def interruptible() -> None:
    """preexec_fn of a child the test will Ctrl-C: SIGINT back to its default. A shell that starts
    a job in the background without job control (`bash -c '...' &`, as a CI harness may) makes it
    ignore SIGINT, the children inherit that through exec, and Python then never raises
    KeyboardInterrupt: the Ctrl-C tests failed that way when CI was started in the background."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


@pytest.fixture
def calls_file(tmp_path: Path) -> Path:
    return tmp_path / "calls.txt"


def read_calls(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


#: the engine tests' toy pipeline (test-only stage types from tests/engine_stages.py)
TOY_PIPELINE = """
name: toy
plugins: [engine_stages]
stages:
  - type: toy_source
    value: 3
  - name: double
    type: toy_scale
    factor: 2
  - name: triple
    type: toy_scale
    factor: 3
"""


@pytest.fixture
def project(tmp_path: Path, calls_file: Path) -> tuple[Path, dict[str, str]]:
    """A folder with the toy pipeline, and the environment that records the stages' calls."""
    write(tmp_path / "pipeline.yaml", TOY_PIPELINE)
    return tmp_path, cli_env({"EDGEMML_TEST_CALLS": str(calls_file)})
