"""ExecuTorch (.pte) and LiteRT (.tflite) targets with the real libraries, on a tiny CNN trained on
the digits at 32x32: a pipeline that writes all four files and validates them, the bundle's
predict.py on a .tflite where torch cannot be imported, the accuracy budget keeping modules in
float in the files, a missing extra at `edgemml check`, and a conversion that fails."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TESTS_DIR, cli_env, run_cli, write

pytest.importorskip("executorch")
pytest.importorskip("litert_torch")

HERE = Path(__file__).resolve().parent

HEAD = """
name: x
preprocess: {size: [32, 32], channels: gray}
data: {source: "builtin:digits"}
stages:
"""

PIPELINE = HEAD + """
  - {type: load, path: "MODEL"}
  - type: quantize
    backends: [executorch, litert]
    calibration: {samples: 32}
    max_accuracy_drop: 1.0
  - type: export
    openvino: {enabled: false}
    executorch: {enabled: true}
    litert: {enabled: true}
    bundle: {samples: 6, archive: false}
  - type: validate
    latency: {runs: 5, warmup: 1, batch: 4, throughput_runs: 2}
    gates:
      executorch: {min_agreement: 0.95}
      litert: {min_agreement: 0.95, max_accuracy_drop: 2.0}
"""


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return cli_env({"PYTHONPATH": f"{HERE}:{TESTS_DIR}", **(extra or {})})


def _explain(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from embedded_models import make_tiny

    root = tmp_path_factory.mktemp("embedded")
    model = make_tiny(root / "tiny")
    write(root / "pipeline.yaml", PIPELINE.replace("MODEL", str(model)))
    proc = run_cli("run", "pipeline.yaml", cwd=root, env=_env())
    assert proc.returncode == 0, _explain(proc)
    assert "ExecuTorch" not in proc.stderr or "Traceback" not in proc.stderr
    again = run_cli("run", "pipeline.yaml", cwd=root, env=_env())
    assert again.returncode == 0, _explain(again)
    statuses = [s["status"] for s in json.loads((root / "runs/x/run.json").read_text())["stages"]]
    assert set(statuses) == {"cached"}, statuses
    return root


def test_four_files_are_written_and_validated(run: Path) -> None:
    from edgemml import runtimes

    q, e, v = run / "runs/x/02-quantize", run / "runs/x/03-export", run / "runs/x/04-validate"
    files = {"executorch-int8": q / "model.int8.pte", "litert-int8": q / "model.int8.tflite",
             "executorch-fp32": e / "model.fp32.pte", "litert-fp32": e / "model.fp32.tflite"}
    for key, path in files.items():
        assert runtimes.detect(path).stored_precision(path) == key.split("-")[1], key
    for target in ("executorch", "litert"):  # (a 12 KB model: the files' fixed overhead dominates)
        assert files[f"{target}-int8"].stat().st_size < files[f"{target}-fp32"].stat().st_size
    qrep = json.loads((q / "quantize.json").read_text())
    for target in ("executorch", "litert"):
        assert qrep[target]["calibration_samples"] == 32
        assert set(qrep[target]["layers"].values()) == {"int8"}
    assert qrep["litert"]["io"]["input_dtype"] == "int8"  # fully int8: int8 in, int8 out

    report = json.loads((v / "report.json").read_text())
    entries = {a["name"]: a for a in report["artifacts"]}
    for key in files:
        a = entries[key]
        assert a["format"] == key.split("-")[0] and a["backend"] == key.split("-")[0]
        assert a["parity"]["agreement"] >= (1.0 if key.endswith("fp32") else 0.95), a["parity"]
        assert a["parity"]["correlation"] > 0.99
        assert a["latency"]["batch1_median_ms"] > 0 and a["size_bytes"] > 0
        assert a["macs"] and a["runtime_precision"] == ("int8" if key.endswith("int8") else "f32")
    assert "scale" in entries["litert-int8"]["notes"]["io"]
    assert "io" not in entries["executorch-int8"]["notes"]
    assert "fed through its own scale" in (v / "report.md").read_text()
    gated = {(r["selector"], r["artifact"]) for r in report["gates"] if r["status"] == "pass"}
    assert {("executorch", "executorch-int8"), ("litert", "litert-fp32")} <= gated
    assert report["recommended"]["executorch"] and report["recommended"]["litert"]


def test_bundle_runs_a_tflite_without_torch(run: Path) -> None:
    import hashlib

    from edgemml import runtimes
    from quantize_export_helpers import digits
    from edgemml.data.datasets import as_arrays, evenly_spaced

    bundle = run / "runs/x/03-export/bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    models = {m["key"]: m for m in manifest["models"]}
    assert {"executorch-fp32", "executorch-int8", "litert-fp32", "litert-int8"} <= set(models)
    for m in models.values():
        for rel in m["files"]:
            assert hashlib.sha256((bundle / rel).read_bytes()).hexdigest() == \
                manifest["files"][rel]["sha256"]
    lite = models["litert-int8"]
    assert lite["inputs"][0]["dtype"] == "int8" and lite["outputs"][0]["dtype"] == "int8"
    assert lite["inputs"][0]["quantization"]["scale"] > 0
    assert models["executorch-int8"]["inputs"][0]["dtype"] == "float32"

    stubs = run / "stubs"  # torch and edgemml cannot be imported in this environment
    for pkg in ("torch", "edgemml"):
        write(stubs / pkg / "__init__.py", f"raise ImportError('{pkg} is hidden in this test')\n")
    env = {"PYTHONPATH": str(stubs), "PATH": "/usr/bin:/bin", "HOME": str(run)}
    pred = subprocess.run([sys.executable, "-s", str(bundle / "predict.py"),
                           str(bundle / "samples"), "--model", "model.int8.tflite", "--json"],
                          env=env, capture_output=True, text=True, cwd=run, timeout=300)
    assert pred.returncode == 0, pred.stdout + pred.stderr
    got = [r["label"] for r in json.loads(pred.stdout)["results"]]
    test = digits().test
    x, _ = as_arrays(test, evenly_spaced(len(test), 6))
    runner = runtimes.open_artifact(bundle / "model.int8.tflite", threads=1)
    want = runtimes.predict(runner, x).argmax(1)
    assert got == [manifest["classes"][k] for k in want]
    check = subprocess.run([sys.executable, "-s", str(bundle / "predict.py"), "--self-check"],
                           env=env, capture_output=True, text=True, cwd=run, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "ok    model.int8.tflite: 6/6" in check.stdout
    assert "skip  model.int8.pte" in check.stdout  # the ExecuTorch runtime needs torch

    full = subprocess.run([sys.executable, str(bundle / "predict.py"), "--self-check"],
                          env=_env(), capture_output=True, text=True, cwd=run, timeout=300)
    assert full.returncode == 0, full.stdout + full.stderr
    assert "ok    model.int8.pte: 6/6" in full.stdout and "ok    model.fp32.pte: 6/6" in full.stdout


def test_hostile_embedded_files_are_input_errors(run: Path, tmp_path: Path) -> None:
    from edgemml import runtimes
    from edgemml.errors import InputError

    for path in (run / "runs/x/02-quantize/model.int8.pte",
                 run / "runs/x/02-quantize/model.int8.tflite"):
        good = path.read_bytes()
        for name, data in {"empty": b"", "junk": b"hello" * 20,
                           "truncated": good[: len(good) // 3]}.items():
            bad = tmp_path / f"{name}{path.suffix}"
            bad.write_bytes(data)
            with pytest.raises(InputError, match=bad.name):
                runtimes.open_artifact(bad, threads=1)


def test_embedded_files_declare_their_input_shape(run: Path) -> None:
    """A .pte / .tflite made at 32x32 and validated with another preprocessing is refused up front
    naming the setting (regression: their runners declared no input shape, so the mismatch only
    surfaced as the runtime's own error in the middle of the measurement)."""
    from edgemml import runtimes
    from edgemml.errors import InputError
    from edgemml.evaluation import Subject, check_input_shape

    for path in (run / "runs/x/02-quantize/model.int8.pte",
                 run / "runs/x/02-quantize/model.int8.tflite"):
        runner = runtimes.open_artifact(path, threads=1)
        assert runner.input_shape is not None and runner.input_shape[1:] == (1, 32, 32), path
        subject = Subject(path.name, "x", path.suffix, "int8", "deployed", path)
        check_input_shape(subject, runner, (1, 32, 32), {"channels": "gray"})
        with pytest.raises(InputError, match="preprocessing makes") as err:
            check_input_shape(subject, runner, (1, 48, 48), {"channels": "gray", "size": [48, 48]})
        assert err.value.key == "preprocess"


def test_budget_keeps_modules_in_float_in_the_files(tmp_path: Path) -> None:
    from embedded_models import make_tiny

    model = make_tiny(tmp_path / "outlier", outlier=True)
    write(tmp_path / "pipeline.yaml", HEAD + f"""
  - {{type: load, path: "{model}"}}
  - type: quantize
    backends: [litert, executorch]
    calibration: {{samples: 32}}
    max_accuracy_drop: 1.0
    sensitivity_samples: 32
""")
    proc = run_cli("run", "pipeline.yaml", cwd=tmp_path, env=_env())
    assert proc.returncode == 0, _explain(proc)
    q = tmp_path / "runs/x/02-quantize"
    rep = json.loads((q / "quantize.json").read_text())
    from edgemml import runtimes

    for target, suffix in (("litert", ".tflite"), ("executorch", ".pte")):
        res = rep[target]
        assert res["plain_int8"]["accuracy_drop_pp"] > 1.0, res["plain_int8"]
        assert res["float_layers"] and res["search"]["met"], res
        assert res["accuracy_drop_pp"] <= 1.0
        # every layer the search kept is float in the graph (a neighbour whose fused pattern the
        # float activations broke may be float too: `layers` reports what the graph holds)
        in_float = {m for m, kind in res["layers"].items() if kind == "float"}
        assert set(res["float_layers"]) <= in_float, res["layers"]
        if target == "litert":  # the file holds them in float (the converter's strict QDQ mode)
            info = runtimes.backend("litert").read_tflite(q / f"model.int8{suffix}")
            floats = [w for _, w, _ in info.weighted if w == "FLOAT32"]
            assert len(floats) == len(in_float), info.weighted
        else:
            assert runtimes.backend("executorch").read_pte(q / f"model.int8{suffix}").precision \
                == "int8"


def test_missing_extra_is_exit_2_at_check(tmp_path: Path) -> None:
    hide = tmp_path / "hide"  # sys.modules[name] = None: find_spec says "not installed"
    write(hide / "sitecustomize.py", "import sys\nsys.modules['executorch'] = None\n"
          "sys.modules['ai_edge_litert'] = None\n")
    env = _env({"PYTHONPATH": f"{hide}:{HERE}:{TESTS_DIR}"})
    for stage, fix in (("{type: quantize, backends: [onnxruntime, executorch]}",
                        "pip install 'edgemml[executorch]'"),
                       ("{type: export, litert: {enabled: true}}", "pip install 'edgemml[litert]'")):
        write(tmp_path / "p.yaml", HEAD + f"  - {{type: load, path: m}}\n  - {stage}\n")
        proc = run_cli("check", "p.yaml", cwd=tmp_path, env=env)
        assert proc.returncode == 2, _explain(proc)
        assert fix in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert "p.yaml:" in proc.stderr


def test_conversion_failure_is_exit_2_naming_the_module(tmp_path: Path) -> None:
    from embedded_models import make_tiny

    model = make_tiny(tmp_path / "det", factory="det_cnn", steps=1)
    write(tmp_path / "pipeline.yaml", HEAD + f"""
  - {{type: load, path: "{model}"}}
  - type: quantize
    backends: [executorch]
    calibration: {{samples: 8}}
""")
    proc = run_cli("run", "pipeline.yaml", cwd=tmp_path, env=_env())
    assert proc.returncode == 2, _explain(proc)
    assert "Traceback" not in proc.stderr
    assert "in module 'odd'" in proc.stderr and "linalg_det" in proc.stderr, proc.stderr
    assert "remove executorch from this quantize stage's backends" in proc.stderr
    assert not list(tmp_path.glob("runs/x/*quantize*/*.pte"))
    assert not list(tmp_path.glob("runs/x/*quantize*/.*.tmp"))


def test_exporter_failure_leaves_the_earlier_file(tmp_path: Path) -> None:
    import torch

    from edgemml.exporters.embedded import ConversionError
    from edgemml.exporters.litert import export_tflite
    from embedded_models import DetCNN

    path = tmp_path / "m.tflite"
    path.write_bytes(b"previous")
    with pytest.raises(ConversionError) as info:
        export_tflite(DetCNN().eval(), torch.randn(1, 1, 16, 16), path, int8=False)
    err = info.value
    assert err.module == "odd" and "linalg_det" in (err.op or ""), str(err)
    assert "\n" not in err.message and "turn the litert target off" in (err.hint or "")
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tflite"]
