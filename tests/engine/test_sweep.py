"""`sweep:` expands a stage and the stages after it into one branch per point, each cached like any
stage, and validate presents the accuracy-latency front (the most accurate artifact passing every
gate)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import TESTS_DIR, cli_env, run_cli, write
from edgemml import sweep
from edgemml.errors import ConfigError

STAGES = [
    {"name": "train", "type": "finetune"},
    {"type": "prune", "sweep": {"target_macs": [0.7, 0.5]}, "recover": None},
    {"type": "quantize"},
    {"type": "export"},
    {"type": "validate"},
]


def _expand(stages, **kw):
    return sweep.expand(stages, provides_model=lambda s: s["type"] in ("finetune", "prune", "load"),
                        gathers=lambda s: s["type"] == "validate", **kw)


def test_expansion_names_inputs_and_references():
    items, (sw,) = _expand(STAGES)
    names = [s.get("name") or s["type"] for _, s in items]
    assert names == ["train", "prune-macs0_7", "quantize-macs0_7", "export-macs0_7",
                     "prune-macs0_5", "quantize-macs0_5", "export-macs0_5", "validate"]
    by = {s.get("name") or s["type"]: s for _, s in items}
    assert by["prune-macs0_7"]["target_macs"] == 0.7 and by["prune-macs0_5"]["target_macs"] == 0.5
    assert "sweep" not in by["prune-macs0_7"]
    assert by["prune-macs0_5"]["input"] == "train"  # not the other branch's prune
    assert by["export-macs0_5"]["quantized"] == "quantize-macs0_5"
    assert [i for i, _ in items] == [0, 1, 2, 3, 1, 2, 3, 4]  # file positions, for error lines
    assert sw.source == "train" and sw.branch == ["prune", "quantize", "export"]
    assert [p.tag for p in sw.points] == ["macs0_7", "macs0_5"]
    # the original list is untouched (the loader keeps the file as written)
    assert STAGES[1]["sweep"] == {"target_macs": [0.7, 0.5]}


def test_points_through_and_references_inside_a_branch():
    stages = [{"name": "train", "type": "finetune"},
              {"name": "p", "type": "prune",
               "sweep": {"points": [{"target_macs": 0.5}, {"target_speedup": 12}],
                         "through": "q"}},
              {"name": "q", "type": "quantize", "input": "p"},
              {"type": "export", "input": "train"},
              {"type": "validate"}]
    items, (sw,) = _expand(stages)
    names = [s.get("name") or s["type"] for _, s in items]
    assert names == ["train", "p-macs0_5", "q-macs0_5", "p-speedup12", "q-speedup12", "export",
                     "validate"]
    by = {s.get("name") or s["type"]: s for _, s in items}
    assert by["q-speedup12"]["input"] == "p-speedup12" and by["p-speedup12"]["target_speedup"] == 12
    assert sw.branch == ["p", "q"]


@pytest.mark.parametrize("spec,message", [
    ([0.5], "a sweep is a mapping"),
    ({"target_macs": 0.5}, "give a list of values"),
    ({"target_macs": [0.5], "target_params": [0.5]}, "sweep one option"),
    ({"points": [{"target_macs": 0.5}], "target_macs": [1]}, "either points"),
    ({"target_macs": [0.5, 0.5]}, "same stage names"),
    ({"target_macs": [0.5], "through": "nope"}, "no stage 'nope'"),
])
def test_bad_sweeps_are_config_errors(spec, message):
    stages = [dict(s) for s in STAGES]
    stages[1] = dict(stages[1], sweep=spec)
    with pytest.raises(ConfigError, match=message):
        _expand(stages)


def test_a_later_stage_may_not_refer_to_a_repeated_one():
    stages = [dict(s) for s in STAGES[:4]] + [{"type": "finetune", "input": "prune"}]
    stages[1] = dict(stages[1], sweep={"target_macs": [0.5], "through": "export"})
    with pytest.raises(ConfigError, match="repeats per point"):
        _expand(stages)
    # without `through:` (and no validate) that stage is simply part of every branch
    stages[1] = dict(stages[1], sweep={"target_macs": [0.5]})
    items, _ = _expand(stages)
    assert items[-1][1]["input"] == "prune-macs0_5"


def test_two_sweeps_are_refused():
    stages = [dict(s) for s in STAGES]
    stages[2] = dict(stages[2], sweep={"calibration": [{"samples": 8}]})
    with pytest.raises(ConfigError, match="one sweep per pipeline"):
        _expand(stages)


# ------------------------------------------------------------------------------------------------
# Through the real CLI
# ------------------------------------------------------------------------------------------------

PIPELINE = """
name: front
seed: 0
plugins: [validate_stages]
preprocess: {size: [16, 16], channels: gray, mean: [0.5], std: [0.5]}
data: {source: "builtin:digits"}
model: {python: "validate_stages:tiny_cnn"}
stages:
  - name: train
    type: vt_train
    epochs: 4
  - type: prune
    sweep: {target_macs: [0.8, 0.5]}
    round_to: null
    tolerance: 0.05
    max_layer_sparsity: 0.9
    recover: {max_steps: 10, batch_size: 64, lr: 0.001}
    distill: false
    bn_batches: 4
    latency: null
  - type: quantize
    backends: [onnxruntime]
    calibration: {samples: 32}
  - type: export
    openvino: {enabled: false}
    bundle: {samples: 0, archive: false}
  - type: validate
    roofline: off
    latency: {runs: 10, warmup: 2, batch: 8, throughput_runs: 2}
    gates:
      int8: {max_accuracy_drop: 5}
"""


def test_sweep_runs_caches_and_validate_presents_the_front(tmp_path: Path):
    write(tmp_path / "pipeline.yaml", PIPELINE)
    env = cli_env({"PYTHONPATH": os.pathsep.join([str(tmp_path), str(TESTS_DIR)])})
    check = run_cli("check", "pipeline.yaml", cwd=tmp_path, env=env)
    assert check.returncode == 0, check.stdout + check.stderr
    for name in ("prune-macs0_8", "quantize-macs0_5", "export-macs0_5"):
        assert name in check.stdout
    proc = run_cli("run", "pipeline.yaml", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = tmp_path / "runs/front"
    dirs = sorted(p.name for p in run.iterdir() if p.is_dir())
    assert dirs == ["01-train", "02-prune-macs0_8", "03-quantize-macs0_8", "04-export-macs0_8",
                    "05-prune-macs0_5", "06-quantize-macs0_5", "07-export-macs0_5",
                    "08-validate"]
    for tag, keep in (("macs0_8", 0.8), ("macs0_5", 0.5)):
        prune = json.loads(next(run.glob(f"*-prune-{tag}/prune.json")).read_text())
        assert abs(prune["achieved"]["macs"] - keep) <= 0.05
    report = json.loads((run / "08-validate/report.json").read_text())
    names = {a["name"] for a in report["artifacts"]}
    assert {"torch", "torch@prune-macs0_8", "torch@prune-macs0_5", "onnx-int8@quantize-macs0_8",
            "onnx-int8@quantize-macs0_5", "onnx-fp32@export-macs0_8"} <= names
    assert report["reference"]["name"] == "torch"  # the unpruned model every point starts from
    front = report["front"]
    assert front["policy"] == "most_accurate" and front["reference"] == "torch"
    assert [p["tag"] for p in front["sweeps"][0]["points"]] == ["macs0_8", "macs0_5"]
    points = {r["name"]: r["point"] for r in front["artifacts"]}
    assert points["onnx-int8@quantize-macs0_5"] == "macs0_5" and points["torch"] is None
    passing = [a for a in report["artifacts"] if a["mode"] == "deployed" and a["passed"]]
    best = max(a["accuracy"]["top1_pct"] for a in passing)
    chosen = next(a for a in report["artifacts"] if a["name"] == front["chosen"])
    assert chosen["accuracy"]["top1_pct"] == best and chosen["passed"]
    assert any(r["pareto"] for r in front["artifacts"])
    assert all(a["speedup"] is not None for a in report["artifacts"])
    html = (run / "08-validate/report.html").read_text()
    assert 'id="plot-front"' in html and "Accuracy-latency front" in html
    md = (run / "08-validate/report.md").read_text()
    assert "## Accuracy-latency front" in md and front["chosen"] in md

    again = run_cli("run", "pipeline.yaml", cwd=tmp_path, env=env)
    assert again.returncode == 0 and "0 stage(s) ran, 8 cached" in again.stdout

    # a new value for one point re-runs that branch (and validate) only
    text = (tmp_path / "pipeline.yaml").read_text().replace("[0.8, 0.5]", "[0.8, 0.6]")
    (tmp_path / "pipeline.yaml").write_text(text)
    third = run_cli("run", "pipeline.yaml", cwd=tmp_path, env=env)
    assert third.returncode == 0, third.stdout + third.stderr
    statuses = {s["name"]: s["status"] for s in json.loads((run / "run.json").read_text())["stages"]}
    assert statuses == {"train": "cached", "prune-macs0_8": "cached", "quantize-macs0_8": "cached",
                        "export-macs0_8": "cached", "prune-macs0_6": "ran",
                        "quantize-macs0_6": "ran", "export-macs0_6": "ran", "validate": "ran"}

    # a budget gate only the smaller point meets: with a sweep (require: auto -> chosen) the run
    # passes with the chosen artifact, the other point's failed gates are reported as not required
    ref_mmacs = next(a["mmacs"] for a in report["artifacts"] if a["name"] == "torch")
    budget = f"stages.validate.gates.all.max_mmacs={0.7 * ref_mmacs:.6f}"
    fourth = run_cli("run", "pipeline.yaml", "--set", budget, cwd=tmp_path, env=env)
    assert fourth.returncode == 0, fourth.stdout + fourth.stderr
    report = json.loads((run / "08-validate/report.json").read_text())
    assert report["status"] == "passed" and report["settings"]["require"] == "chosen"
    assert report["front"]["chosen"].endswith("macs0_6")
    optional = [r for r in report["gates"] if r["status"] == "fail"]
    assert optional and all(not r["required"] and "macs0_8" in r["artifact"] for r in optional)
    junit = (run / "08-validate/junit.xml").read_text()
    assert 'failures="0"' in junit and "not required" in junit
    assert "not required" in (run / "08-validate/report.md").read_text()
    strict = run_cli("run", "pipeline.yaml", "--set", budget, "--set",
                     "stages.validate.require=all", cwd=tmp_path, env=env)
    assert strict.returncode == 1 and "max_mmacs" in strict.stderr + strict.stdout
    shutil.rmtree(run)


def test_sweep_errors_name_the_line(tmp_path: Path):
    write(tmp_path / "pipeline.yaml", """
        name: bad
        data: {source: "builtin:digits"}
        stages:
          - name: train
            type: finetune
            model: {arch: torchvision/resnet18}
          - type: prune
            sweep: {target_macs: 0.5}
    """)
    proc = run_cli("check", "pipeline.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and "pipeline.yaml:8" in proc.stderr
    assert "give a list of values" in proc.stderr
    write(tmp_path / "pipeline.yaml", """
        name: bad
        data: {source: "builtin:digits"}
        stages:
          - name: train
            type: finetune
            model: {arch: torchvision/resnet18}
          - type: prune
            sweep: {target_macs: [0.5, 1.5]}
    """)
    proc = run_cli("check", "pipeline.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and "target_macs" in proc.stderr and "prune-macs1_5" in proc.stderr
