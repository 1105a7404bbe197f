"""The engine end to end through the real CLI in subprocesses, with test-only stage types."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import yaml

from conftest import TOY_PIPELINE as PIPELINE
from conftest import read_calls, run_cli, write



def _run(project: tuple[Path, dict[str, str]], *args: str) -> subprocess.CompletedProcess[str]:
    root, env = project
    return run_cli("run", "pipeline.yaml", *args, cwd=root, env=env)


def _value(root: Path, stage_dir: str) -> int:
    return int((root / "runs/toy" / stage_dir / "model/value.txt").read_text())


def _explain(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


def test_first_run_then_fully_cached(project, calls_file):
    root, _ = project
    first = _run(project)
    assert first.returncode == 0, _explain(first)
    assert read_calls(calls_file) == ["toy_source", "double", "triple"]
    assert _value(root, "03-triple") == 18
    record = json.loads((root / "runs/toy/03-triple/stage.json").read_text())
    assert record["status"] == "done" and len(record["fingerprint"]) == 64
    assert record["outputs"]["model"]["files"]["model/value.txt"]["sha256"]
    assert {"edgemml", "torch", "onnx", "onnxruntime", "openvino"} <= set(record["versions"])

    second = _run(project)
    assert second.returncode == 0, _explain(second)
    assert read_calls(calls_file) == ["toy_source", "double", "triple"], "a cached stage ran"
    assert "0 stage(s) ran, 3 cached" in second.stdout
    assert second.stderr.count("cached (unchanged)") == 3
    summary = json.loads((root / "runs/toy/run.json").read_text())
    assert [s["status"] for s in summary["stages"]] == ["cached"] * 3


def test_changing_a_late_stage_reruns_it_and_later_only(project, calls_file):
    root, _ = project
    assert _run(project).returncode == 0
    calls_file.unlink()
    proc = _run(project, "--set", "stages.double.factor=5")
    assert proc.returncode == 0, _explain(proc)
    assert read_calls(calls_file) == ["double", "triple"]
    assert "config changed: factor 2 -> 5" in proc.stderr
    assert _value(root, "03-triple") == 45
    # Same output of an upstream stage means downstream stays cached (content, not time, matters).
    calls_file.unlink()
    root_yaml = root / "pipeline.yaml"
    root_yaml.write_text(root_yaml.read_text().replace("factor: 3", "factor: 4"))
    proc = _run(project, "--set", "stages.double.factor=5")
    assert read_calls(calls_file) == ["triple"], _explain(proc)


def test_force_from_and_only(project, calls_file):
    root, _ = project
    assert _run(project).returncode == 0
    calls_file.unlink()
    assert _run(project, "--from", "double").returncode == 0
    assert read_calls(calls_file) == ["double", "triple"]
    calls_file.unlink()
    assert _run(project, "--only", "double").returncode == 0
    assert read_calls(calls_file) == ["double"]
    calls_file.unlink()
    assert _run(project, "--force").returncode == 0
    assert read_calls(calls_file) == ["toy_source", "double", "triple"]
    bad = _run(project, "--from", "doubel")
    assert bad.returncode == 2 and "did you mean 'double'" in bad.stderr, _explain(bad)


def test_only_without_inputs_is_a_user_error(project):
    proc = _run(project, "--only", "triple")
    assert proc.returncode == 2, _explain(proc)
    assert "has no finished outputs" in proc.stderr


def test_corrupted_artifact_is_detected_and_rerun(project, calls_file):
    root, _ = project
    assert _run(project).returncode == 0
    calls_file.unlink()
    target = root / "runs/toy/02-double/model/value.txt"
    target.write_text("99")  # same size, different content
    proc = _run(project)
    assert proc.returncode == 0, _explain(proc)
    assert "changed on disk" in proc.stderr
    assert read_calls(calls_file) == ["double"]  # triple's input hash is unchanged after re-run
    assert target.read_text() == "6"
    # a deleted output is detected as well
    calls_file.unlink()
    (root / "runs/toy/03-triple/model/value.txt").unlink()
    proc = _run(project)
    assert "missing" in proc.stderr and read_calls(calls_file) == ["triple"], _explain(proc)


def test_touched_but_unchanged_output_stays_cached(project, calls_file):
    root, _ = project
    assert _run(project).returncode == 0
    target = root / "runs/toy/02-double/model/value.txt"
    os.utime(target, (time.time() + 10, time.time() + 10))
    calls_file.unlink()
    assert _run(project).returncode == 0
    assert read_calls(calls_file) == []


def _start_and_kill_during(project, stage: str, extra: list[str]) -> None:
    root, env = project
    started = root / "started.txt"
    env = dict(env, EDGEMML_TEST_STARTED=str(started))
    proc = subprocess.Popen([sys.executable, "-m", "edgemml.cli", "run", "pipeline.yaml", *extra],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not (started.exists() and started.read_text() == stage):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the stage never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def test_sigkill_during_a_stage_resumes_there(project, calls_file):
    root, _ = project
    _start_and_kill_during(project, "triple", ["--set", "stages.triple.sleep_s=60"])
    assert read_calls(calls_file) == ["toy_source", "double", "triple"]
    assert not (root / "runs/toy/03-triple").exists(), "a killed stage must not look finished"
    assert (root / "runs/toy/.03-triple.partial").exists()
    calls_file.unlink()
    proc = _run(project)  # the stale lock of the killed run is taken over
    assert proc.returncode == 0, _explain(proc)
    assert read_calls(calls_file) == ["triple"], "finished stages were recomputed"
    assert _value(root, "03-triple") == 18
    assert not (root / "runs/toy/.03-triple.partial").exists()


def test_concurrent_run_is_refused(project):
    root, env = project
    started = root / "started.txt"
    env = dict(env, EDGEMML_TEST_STARTED=str(started))
    first = subprocess.Popen([sys.executable, "-m", "edgemml.cli", "run", "pipeline.yaml",
                              "--set", "stages.double.sleep_s=30"], cwd=root, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while not started.exists():
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.05)
        second = run_cli("run", "pipeline.yaml", cwd=root, env=env)
        assert second.returncode == 2, _explain(second)
        assert "another edgemml run is using" in second.stderr
        assert f"pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.kill()
        first.wait()


def test_unknown_key_reports_line_and_suggestion(tmp_path):
    write(tmp_path / "pipeline.yaml", PIPELINE.replace("    factor: 3", "    factr: 3"))
    proc = run_cli("run", "pipeline.yaml", cwd=tmp_path)
    assert proc.returncode == 2, _explain(proc)
    assert "pipeline.yaml:11: stages[2].toy_scale.factr: unknown key" in proc.stderr
    assert "did you mean 'factor'?" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_wrong_type_reports_line(tmp_path):
    write(tmp_path / "pipeline.yaml", PIPELINE.replace("value: 3", "value: three"))
    proc = run_cli("check", "pipeline.yaml", cwd=tmp_path)
    assert proc.returncode == 2, _explain(proc)
    assert "pipeline.yaml:5: stages[0].toy_source.value:" in proc.stderr
    assert "valid integer" in proc.stderr and "'three'" in proc.stderr


def test_wrong_type_from_set_names_the_override(project):
    proc = _run(project, "--set", "stages.triple.factor=abc")
    assert proc.returncode == 2
    assert "--set stages.triple.factor=abc: stages[2].toy_scale.factor" in proc.stderr


def test_unknown_stage_type_and_bad_yaml(tmp_path):
    write(tmp_path / "a.yaml", PIPELINE.replace("type: toy_source", "type: toy_sorce"))
    proc = run_cli("run", "a.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and "a.yaml:4: stages[0].type: unknown stage type" in proc.stderr
    assert "did you mean 'toy_source'?" in proc.stderr
    write(tmp_path / "b.yaml", "name: x\nstages:\n  - type: [unclosed\n")
    proc = run_cli("run", "b.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and "b.yaml:" in proc.stderr and "invalid YAML" in proc.stderr


def test_user_stage_error_and_internal_error_exit_codes(project, calls_file):
    root, _ = project
    proc = _run(project, "--set", "stages.triple.fail=true")
    assert proc.returncode == 2, _explain(proc)
    assert "asked to fail" in proc.stderr and "Traceback" not in proc.stderr
    assert (root / "runs/toy/02-double/stage.json").exists(), "finished stages must be kept"
    proc = _run(project, "--set", "stages.triple.crash=true")
    assert proc.returncode == 3, _explain(proc)
    assert "simulated bug" in proc.stderr and "Traceback" not in proc.stderr
    assert "RuntimeError: simulated bug" in (root / "runs/toy/error.log").read_text()
    debug = run_cli("--debug", "run", "pipeline.yaml", "--set", "stages.triple.crash=true",
                    cwd=root, env=project[1])
    assert debug.returncode == 3 and "Traceback" in debug.stderr


def test_failed_gate_exits_1_and_stays_failed_when_cached(project, calls_file):
    root, _ = project
    proc = _run(project, "--set", "stages.triple.gate_max=10")
    assert proc.returncode == 1, _explain(proc)
    assert "value 18 > gate_max 10" in proc.stderr
    assert (root / "runs/toy/03-triple/stage.json").exists(), "reports of a failed gate are kept"
    calls_file.unlink()
    again = _run(project, "--set", "stages.triple.gate_max=10")
    assert again.returncode == 1 and read_calls(calls_file) == []
    assert json.loads((root / "runs/toy/run.json").read_text())["status"] == "gate-failed"


def test_log_json_and_quiet(project):
    proc = _run(project, "--log-json")
    assert proc.returncode == 0, _explain(proc)
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "plan" and kinds[-1] == "run_end" and kinds.count("stage_end") == 3
    quiet = _run(project, "--quiet")
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""


def test_check_prints_plan_without_running(project, calls_file):
    root, env = project
    proc = run_cli("check", "pipeline.yaml", cwd=root, env=env)
    assert proc.returncode == 0, _explain(proc)
    assert "not run before" in proc.stdout and read_calls(calls_file) == []
    assert not (root / "runs").exists()
    assert _run(project).returncode == 0
    proc = run_cli("check", "pipeline.yaml", "--set", "stages.triple.factor=7", cwd=root, env=env)
    assert proc.stdout.count("cached") == 2 and "factor 3 -> 7" in proc.stdout


def test_schema_validates_a_sample_pipeline(tmp_path):
    proc = run_cli("schema", cwd=tmp_path)
    assert proc.returncode == 0, _explain(proc)
    schema = json.loads(proc.stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    sample = yaml.safe_load(PIPELINE)
    # the engine's own schema knows built-in stage types only; validate the top level and a stage
    validator = jsonschema.Draft202012Validator(schema)
    top_errors = [e for e in validator.iter_errors(sample) if list(e.path)[:1] != ["stages"]]
    assert top_errors == []
    bad = dict(sample, nmae="typo")
    assert any("nmae" in e.message for e in validator.iter_errors(bad))


def test_stages_command_lists_options(tmp_path):
    proc = run_cli("stages", cwd=tmp_path)
    assert proc.returncode == 0, _explain(proc)
