"""export through the real CLI: ONNX and OpenVINO IR parity with torch for resnet18, mobilenet_v3_small
and a pruned resnet18; the bundle's predict.py in an environment without torch or edgemml."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from conftest import TESTS_DIR, cli_env, run_cli, write
from quantize_export_helpers import digits, make_model

HERE = Path(__file__).resolve().parent


def _env() -> dict[str, str]:
    return cli_env({"PYTHONPATH": f"{HERE}:{TESTS_DIR}"})


def _explain(proc) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


HEAD = """
name: x
preprocess: {size: [32, 32], channels: gray}
data: {source: "builtin:digits"}
stages:
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"resnet18": make_model("torchvision/resnet18", root / "resnet18"),
            "mobilenet": make_model("torchvision/mobilenet_v3_small", root / "mobilenet"),
            "pruned": make_model("torchvision/resnet18", root / "pruned", prune=0.5)}


def test_onnx_and_ir_match_torch_for_three_models(tmp_path, models):
    from edgemml import runtimes
    from edgemml.data.datasets import as_arrays
    from edgemml.metrics import check_parity
    from edgemml.models import load_model

    stages = ""
    variants = {"resnet18": "dynamo", "mobilenet": "torchscript", "pruned": "torchscript"}
    for name, exporter in variants.items():
        source = "onnx" if name != "mobilenet" else "torch"
        stages += f"""
  - {{type: load, name: {name}, path: "{models[name]}"}}
  - type: export
    name: export-{name}
    input: {name}
    quantized: none
    onnx: {{exporter: {exporter}}}
    openvino: {{source: {source}}}
    bundle: {{samples: 0, archive: false}}
"""
    write(tmp_path / "pipeline.yaml", HEAD + stages)
    proc = run_cli("run", "pipeline.yaml", cwd=tmp_path, env=_env())
    assert proc.returncode == 0, _explain(proc)
    assert "max abs diff vs torch" in proc.stderr and "runs in f32" in proc.stderr

    x, _ = as_arrays(digits().val, range(0, 270, 5))
    for i, (name, exporter) in enumerate(variants.items()):
        stage = tmp_path / f"runs/x/{2 * i + 2:02d}-export-{name}"
        report = json.loads((stage / "export.json").read_text())["artifacts"]
        assert report["onnx-fp32"]["export"]["exporter"] == exporter
        assert report["onnx-fp32"]["export"]["opset"] == 18
        assert [p.name for p in stage.glob("*.data")] == []  # one self-contained file
        assert report["onnx-fp32"]["inputs"][0] == {"name": "input", "shape": ["batch", 1, 32, 32],
                                                    "dtype": "float32"}
        assert report["openvino-fp32"]["inference_precision"] == "f32"
        model, _ = load_model(stage.parent / f"{2 * i + 1:02d}-{name}/model")
        ref = runtimes.backend("torch").logits(model, x)
        assert ref.std() > 1e-3  # BN statistics were estimated: outputs are not constant
        onnx_out = runtimes.predict(
            runtimes.open_artifact(stage / "model.fp32.onnx", threads=None), x)
        ir_runner = runtimes.open_artifact(stage / "openvino-fp32/model.xml", threads=None,
                                           exact=True)
        ir_out, precision = runtimes.predict(ir_runner, x), ir_runner.precision
        for out in (onnx_out, ir_out):
            res = check_parity(ref, out, tolerance=1e-4)
            assert res.ok and res.top1_agreement == 1.0, (name, res)
        assert precision == "f32"
        # dynamic batch: batch 3 works and equals three batch-1 runs
        sess = runtimes.backend("onnxruntime").session(stage / "model.fp32.onnx", threads=None)
        single = np.concatenate([sess.run(None, {"input": x[j:j + 1]})[0] for j in range(3)])
        np.testing.assert_allclose(sess.run(None, {"input": x[:3]})[0], single, atol=1e-5)


def test_bundle_predict_runs_without_torch_and_matches_the_pipeline(tmp_path, models):
    import hashlib

    from edgemml import runtimes
    from edgemml.artifacts import sha256_file
    from edgemml.data.datasets import as_arrays, evenly_spaced

    write(tmp_path / "pipeline.yaml", HEAD + f"""
  - {{type: load, path: "{models['pruned']}"}}
  - type: quantize
    calibration: {{samples: 32}}
    onnx: {{exporter: torchscript}}
  - type: export
    onnx: {{exporter: torchscript}}
    bundle: {{samples: 6}}
""")
    proc = run_cli("run", "pipeline.yaml", cwd=tmp_path, env=_env())
    assert proc.returncode == 0, _explain(proc)
    stage = tmp_path / "runs/x/03-export"
    bundle = stage / "bundle"
    shown = " ".join(proc.stdout.split())
    assert f"bundle: {bundle}" in shown and "predict.py --self-check" in shown
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert {m["key"] for m in manifest["models"]} == {"onnx-fp32", "onnx-int8", "openvino-fp32",
                                                      "openvino-int8"}
    assert manifest["default_model"] == "model.int8.onnx"
    for rel, info in manifest["files"].items():
        assert hashlib.sha256((bundle / rel).read_bytes()).hexdigest() == info["sha256"], rel
    assert (bundle / "preprocess.py").read_bytes() == (
        Path(__file__).resolve().parents[2] / "edgemml/data/preprocess.py").read_bytes()
    with tarfile.open(stage / "bundle.tar.gz") as tar:
        members = {m.name for m in tar.getmembers() if m.isfile()}
    assert members == {f"bundle/{rel}" for rel in manifest["files"]} | {"bundle/manifest.json"}

    # an environment where torch and edgemml cannot be imported
    stubs = tmp_path / "stubs"
    for pkg in ("torch", "edgemml"):
        write(stubs / pkg / "__init__.py", f"raise ImportError('{pkg} is hidden in this test')\n")
    env = {"PYTHONPATH": str(stubs), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    probe = subprocess.run([sys.executable, "-s", "-c", "import torch"], env=env,
                           capture_output=True, text=True, cwd=tmp_path)
    assert probe.returncode != 0 and "hidden" in probe.stderr

    check = subprocess.run([sys.executable, "-s", str(bundle / "predict.py"), "--self-check"],
                           env=env, capture_output=True, text=True, cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.count("6/6 samples as in the pipeline") == 4
    # the command export prints leaves the bundle as it was (no __pycache__/): nothing re-runs
    assert not list(bundle.rglob("__pycache__")), sorted(bundle.rglob("*"))
    again = run_cli("run", "pipeline.yaml", cwd=tmp_path, env=_env())
    assert again.returncode == 0 and "0 stage(s) ran, 3 cached" in again.stdout, _explain(again)

    # export re-run in a process that converted nothing before it (the first run had quantized
    # first): byte-identical outputs (OpenVINO names, bundle manifest, archive), so a later stage
    # would stay cached
    def digests() -> dict[str, str]:
        record = json.loads((stage / "stage.json").read_text())
        return {k: v["sha256"] for k, v in record["outputs"].items()}

    before = digests()
    rerun = run_cli("run", "pipeline.yaml", "--from", "export", cwd=tmp_path, env=_env())
    assert rerun.returncode == 0, _explain(rerun)
    assert digests() == before

    # labels.txt with a U+2028 inside a name, its sha256 in the manifest updated to match (as a
    # tool that wrote such a name would): not caught by the file table, but predict.py reads it
    # one name per "\n" line, finds 10 names that differ from the manifest's classes and refuses;
    # so does `edgemml validate`
    tampered = tmp_path / "tampered"
    shutil.copytree(bundle, tampered / "bundle")
    labels = tampered / "bundle/labels.txt"
    labels.write_text(labels.read_text().replace("3\n", "3\u2028x\n"), encoding="utf-8")
    tampered_manifest = json.loads((tampered / "bundle/manifest.json").read_text())
    tampered_manifest["files"]["labels.txt"] = {"sha256": sha256_file(labels),
                                                "bytes": labels.stat().st_size}
    (tampered / "bundle/manifest.json").write_text(json.dumps(tampered_manifest, indent=2))
    listed = subprocess.run([sys.executable, "-s", str(tampered / "bundle/predict.py"),
                             str(bundle / "samples")], env=env, capture_output=True, text=True,
                            cwd=tmp_path)
    assert listed.returncode != 0 and "does not match the 10 classes" in listed.stderr
    write(tampered / "v.yaml", """
        name: t
        data: {source: "builtin:digits"}
        preprocess: {size: [32, 32], channels: gray}
        bundle: bundle
    """)
    proc = run_cli("validate", "v.yaml", cwd=tampered, env=_env())
    assert proc.returncode == 2, _explain(proc)
    assert "labels.txt has 10 names, which differ from the 10 classes validated from line 4 on" \
        in " ".join(proc.stderr.split())

    # the pipeline's own view of the same held-out images: its dataset items, its runtime
    test = digits().test
    idx = evenly_spaced(len(test), 6)
    x, y = as_arrays(test, idx)
    pipeline_labels = runtimes.predict(
        runtimes.open_artifact(stage / "model.fp32.onnx", threads=None), x).argmax(1)
    pred = subprocess.run([sys.executable, "-s", str(bundle / "predict.py"), str(bundle / "samples"),
                           "--model", "model.fp32.onnx", "--json", "--top", "3"],
                          env=env, capture_output=True, text=True, cwd=tmp_path)
    assert pred.returncode == 0, pred.stderr
    results = json.loads(pred.stdout)["results"]
    assert [r["label"] for r in results] == [manifest["classes"][k] for k in pipeline_labels]
    assert [Path(r["file"]).name.split("_")[1][:-4] for r in results] == \
        [manifest["classes"][k] for k in y]
    assert all(len(r["top"]) == 3 and r["top"][0]["score"] >= r["top"][1]["score"] for r in results)

    # a corrupted model file is refused, not silently used
    (bundle / "model.int8.onnx").write_bytes(b"garbage")
    bad = subprocess.run([sys.executable, "-s", str(bundle / "predict.py"), str(bundle / "samples")],
                         env=env, capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode != 0 and "sha256" in bad.stderr


def test_opset_is_checked_and_fallback_reported(tmp_path):
    import torch
    from torch import nn

    from edgemml.errors import StageError
    from edgemml.exporters.onnx import export_onnx, written_opset

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    x = torch.randn(2, 1, 8, 8)
    # measured with torch 2.14: dynamo writes opset 18 when asked for 17; auto falls back and says so
    res = export_onnx(model, x, tmp_path / "a.onnx", opset=17, exporter="auto")
    assert written_opset(tmp_path / "a.onnx") == 17 == res.opset
    assert res.exporter == "torchscript" and "wrote opset 18" in res.fallback_reason
    with pytest.raises(StageError, match="wrote opset 18 when asked for opset 17"):
        export_onnx(model, x, tmp_path / "b.onnx", opset=17, exporter="dynamo")
    assert not (tmp_path / "b.onnx").exists()
    res = export_onnx(model, x, tmp_path / "c.onnx", opset=18, exporter="auto")
    assert (res.exporter, res.opset, res.fallback_reason) == ("dynamo", 18, None)


def _convert_in_a_new_process(tmp_path: Path, name: str, warm: bool) -> bytes:
    """model.xml of one small network, converted by a fresh process (after another network when
    `warm`, as in a run that quantized before exporting)."""
    script = f"""
import torch
from torch import nn
from pathlib import Path
from edgemml.exporters.openvino import convert_to_ir

def net(c):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, c, 3), nn.BatchNorm2d(c), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(c, 3)).eval()

if {warm}:
    convert_to_ir(net(5), Path(r"{tmp_path}") / "other", example=torch.zeros(2, 1, 8, 8))
convert_to_ir(net(4), Path(r"{tmp_path}") / "{name}", example=torch.zeros(2, 1, 8, 8))
"""
    proc = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    return (tmp_path / name / "model.xml").read_bytes()


def test_openvino_ir_bytes_do_not_depend_on_what_the_process_did_before(tmp_path):
    assert _convert_in_a_new_process(tmp_path, "cold", False) == \
        _convert_in_a_new_process(tmp_path, "warm", True)
