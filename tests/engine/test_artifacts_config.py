"""Unit tests of the artifact store and the config loader (no subprocesses)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgemml.artifacts import (
    RunLock,
    atomic_path,
    describe_output,
    verify_output,
    write_text_atomic,
)
from edgemml.yamlfile import apply_overrides, parse_yaml
from edgemml.pipeline.loader import load_pipeline
from edgemml.errors import ArtifactError, ConfigError
from edgemml.pipeline.fingerprint import explain_change


def test_atomic_write_leaves_old_file_when_writer_crashes(tmp_path: Path):
    target = tmp_path / "model.bin"
    write_text_atomic(target, "finished")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash while writing")
    assert target.read_text() == "finished"
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]


def test_describe_and_verify_output(tmp_path: Path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "a.bin").write_bytes(b"abc")
    record = describe_output(out, tmp_path)
    assert verify_output(record, tmp_path)[0]
    (out / "b.bin").write_bytes(b"new")
    ok, problem, _ = verify_output(record, tmp_path)
    assert not ok and "unexpected" in problem
    (out / "b.bin").unlink()
    (out / "a.bin").write_bytes(b"abd")
    ok, problem, _ = verify_output(record, tmp_path)
    assert not ok and "sha256" in problem


def test_lock_is_exclusive_within_a_process_pair(tmp_path: Path):
    first = RunLock(tmp_path).acquire()
    try:
        # flock locks are per open file description: a second open in this process conflicts too
        with pytest.raises(ArtifactError, match="another edgemml run"):
            RunLock(tmp_path).acquire()
    finally:
        first.release()
    RunLock(tmp_path).acquire().release()


def test_stale_lock_of_dead_process_is_taken_over(tmp_path: Path):
    import json
    import socket
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    (tmp_path / ".lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    lock = RunLock(tmp_path).acquire()
    assert lock.took_over_from == pid
    lock.release()


def test_yaml_line_map_and_overrides():
    data, lines = parse_yaml("name: a\nstages:\n  - type: x\n    k: 1\n", "p.yaml")
    assert lines[("stages", 0, "k")] == 4
    origins = apply_overrides(data, ["stages.x.k=[1, 2]", "seed=3"])
    assert data["stages"][0]["k"] == [1, 2] and data["seed"] == 3
    assert origins[("stages", 0, "k")] == "stages.x.k=[1, 2]"
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides(data, ["stages.x.k"])


def test_top_level_errors(tmp_path: Path):
    p = tmp_path / "p.yaml"
    p.write_text("name: a\nseeed: 1\nstages: []\n")
    with pytest.raises(ConfigError) as info:
        load_pipeline(p)
    text = str(info.value)
    assert "p.yaml:2: seeed: unknown key" in text and "did you mean 'seed'" in text
    assert "p.yaml:3: stages:" in text  # both errors are reported at once


def test_explain_change_names_the_key():
    old = {"config": {"target_macs": 0.5, "round_to": 8}, "inputs": {"a": {"model": "1"}}}
    new = {"config": {"target_macs": 0.4, "round_to": 8}, "inputs": {"a": {"model": "1"}}}
    assert explain_change(old, new) == "config changed: target_macs 0.5 -> 0.4"
    new2 = {"config": old["config"], "inputs": {"a": {"model": "2"}}}
    assert explain_change(old, new2) == "input changed: a re-ran with different output"


def test_did_you_mean_inside_keyed_mappings(tmp_path: Path):
    p = tmp_path / "p.yaml"
    p.write_text("name: g\ndata: {source: builtin:digits}\nstages:\n  - type: validate\n"
                 "    gates:\n      all: {max_sise_mb: 5}\n")
    with pytest.raises(ConfigError) as info:
        load_pipeline(p)
    assert "p.yaml:6: stages[0].validate.gates.all.max_sise_mb: unknown key" in str(info.value)
    assert "did you mean 'max_size_mb'?" in str(info.value)
