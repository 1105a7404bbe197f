"""The shipped pipelines end to end through the real CLI, reduced with --set where they are long.

Each run checks the artifacts and reports the pipeline promises, and that a second run is fully
cached. The full quickstart runs unreduced: it is the README's first command.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, cli_env, run_cli

PIPELINES = REPO / "pipelines"


def _explain(proc) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}"


def _run(pipeline: str, out: Path, *sets: str, env: dict[str, str] | None = None):
    args = ["run", str(PIPELINES / pipeline), "--out", str(out)]
    for s in sets:
        args += ["--set", s]
    return run_cli(*args, cwd=REPO, env=env or cli_env(), timeout=1500)


def _report(run_dir: Path) -> dict:
    (path,) = run_dir.glob("*-validate/report.json")
    return json.loads(path.read_text())


def _assert_cached(pipeline: str, out: Path, *sets: str) -> None:
    again = _run(pipeline, out, *sets)
    assert again.returncode == 0, _explain(again)
    statuses = [s["status"] for s in json.loads((out / "run.json").read_text())["stages"]]
    assert set(statuses) == {"cached"}, statuses


@pytest.mark.slow
def test_quickstart_full(tmp_path: Path):
    """The default pipeline as the README runs it, with its own gates."""
    out = tmp_path / "quickstart"
    proc = _run("quickstart.yaml", out, env=cli_env({"OMP_NUM_THREADS": "2"}))
    assert proc.returncode == 0, _explain(proc)
    assert "bundle:" in proc.stdout and "report.html" in proc.stdout  # where to look next
    stages = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert stages == ["01-pretrain_source", "02-migrate", "03-finetune", "04-prune",
                      "05-quantize", "06-export", "07-validate"]
    for grid in ("01-pretrain_source/samples.png", "03-finetune/samples.png"):
        with Image.open(out / grid) as img:
            assert img.format == "PNG" and img.width >= 200
    migration = json.loads((out / "02-migrate/migration.json").read_text())["summary"]
    assert migration["coverage"] >= 0.95
    prune = json.loads((out / "04-prune/stage.json").read_text())["metrics"]
    assert 0.48 <= prune["achieved"] <= 0.52
    report = _report(out)
    names = {a["name"] for a in report["artifacts"]}
    assert {"torch", "onnx-fp32", "onnx-int8", "openvino-fp32", "openvino-int8"} <= names
    assert report["status"] == "passed" and report["gate_failures"] == []
    with tarfile.open(out / "06-export/bundle.tar.gz") as tar:
        assert any(n.endswith("predict.py") for n in tar.getnames())
    _assert_cached("quickstart.yaml", out)


def test_ci_gate_with_baseline(tmp_path: Path):
    """ci-gate reduced; a second run gated against the first one's report passes, and a run whose
    model got worse fails against it with exit 1."""
    quick = ["stages.train.max_steps=120", "stages.quantize.calibration.samples=64"]
    first = tmp_path / "main"
    proc = _run("ci-gate.yaml", first, *quick)
    assert proc.returncode == 0, _explain(proc)
    baseline = next(first.glob("*-validate/report.json"))
    same = _run("ci-gate.yaml", tmp_path / "branch", *quick,
                f"stages.validate.baseline={baseline}")
    assert same.returncode == 0, _explain(same)
    worse = _run("ci-gate.yaml", tmp_path / "worse", "stages.train.max_steps=15",
                 "stages.quantize.calibration.samples=64", "stages.quantize.max_accuracy_drop=null",
                 "stages.validate.gates.torch.min_top1=0", f"stages.validate.baseline={baseline}")
    assert worse.returncode == 1, _explain(worse)
    assert "max_regression" in worse.stderr
    junit = next((tmp_path / "worse").glob("*-validate/junit.xml")).read_text()
    assert "<failure" in junit


def test_fuse_sources_reduced(tmp_path: Path):
    out = tmp_path / "fuse"
    quick = ["stages.pretrain.max_steps=60", "stages.recipe_a.max_steps=20",
             "stages.recipe_b.max_steps=20", "stages.validate.gates.torch.min_top1=30"]
    proc = _run("fuse-sources.yaml", out, *quick)
    assert proc.returncode == 0, _explain(proc)
    migration = json.loads(next(out.glob("*-soup/migration.json")).read_text())["summary"]
    assert migration["coverage"] == pytest.approx(1.0)
    assert migration["fuse"] == "average"
    _assert_cached("fuse-sources.yaml", out, *quick)


def _photo_folder(root: Path, per_class: int = 12) -> list[str]:
    """A tiny image-folder data set of grayscale crops of scikit-image's bundled photos."""
    from skimage import data as skdata

    photos = {"camera": skdata.camera(), "coins": skdata.coins(), "moon": skdata.moon(),
              "text": skdata.text()}
    rng = np.random.default_rng(0)
    for name, img in photos.items():
        folder = root / name
        folder.mkdir(parents=True)
        h, w = img.shape[:2]
        for i in range(per_class):
            s = int(rng.integers(min(h, w) // 3, min(h, w) // 2))
            y, x = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
            Image.fromarray(img[y:y + s, x:x + s]).resize((72, 72)).save(folder / f"{i:03d}.png")
    return sorted(photos)


def test_resnet18_grayscale_reduced(tmp_path: Path):
    """The realistic pipeline on a tiny generated image folder, with a random-init torchvision
    resnet18 checkpoint standing in for the ImageNet weights (no network here)."""
    import torch
    import torchvision

    classes = _photo_folder(tmp_path / "images")
    ckpt = tmp_path / "resnet18-random.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), ckpt)
    out = tmp_path / "r18"
    sets = [f"data.source={tmp_path / 'images'}", f"stages.migrate.sources.0.checkpoint={ckpt}",
            "preprocess.size=[64, 64]", "data.split={train: 0.5, val: 0.25, test: 0.25}",
            "stages.finetune.max_steps=30", "stages.finetune.batch_size=8",
            "stages.finetune.early_stopping=null", "stages.prune.recover.max_steps=10",
            "stages.prune.recover.batch_size=8", "stages.quantize.calibration.samples=16",
            "stages.quantize.max_accuracy_drop=null",
            "stages.validate.gates={onnx-fp32: {max_abs_diff: 1.0e-4}}",
            "stages.validate.min_reference_diversity=null", "stages.validate.min_correlation=null"]
    proc = _run("resnet18-grayscale.yaml", out, *sets)
    assert proc.returncode == 0, _explain(proc)
    migration = json.loads((out / "01-migrate/migration.json").read_text())["summary"]
    assert migration["coverage"] >= 0.95  # everything but the 4-class head came from the file
    spec = json.loads((out / "03-prune/model/model.json").read_text())
    assert spec["in_chans"] == 1 and spec["class_names"] == classes and spec["layer_shapes"]
    report = _report(out)
    assert {a["name"] for a in report["artifacts"]} >= {"onnx-fp32", "onnx-int8", "openvino-int8"}
    _assert_cached("resnet18-grayscale.yaml", out, *sets)


@pytest.mark.slow
def test_rewrite_reduced(tmp_path: Path):
    """pipelines/rewrite.yaml, reduced: both int8 models measured side by side in the report."""
    out = tmp_path / "rewrite"
    quick = ["preprocess.size=[32, 32]", "data.samples=400", "stages.train.max_steps=3",
             "stages.rewrite.recover.max_steps=2", "stages.int8-original.backends=[onnxruntime]",
             "stages.int8-rewritten.backends=[onnxruntime]",
             "stages.int8-original.calibration.samples=16",
             "stages.int8-rewritten.calibration.samples=16",
             "stages.validate.latency={runs: 3, warmup: 1, throughput_runs: 1, batch: 4}",
             "stages.validate.gates={}", "stages.validate.min_correlation=null",
             "stages.validate.min_reference_diversity=null"]
    proc = _run("rewrite.yaml", out, *quick)
    assert proc.returncode == 0, _explain(proc)
    rewrite = json.loads(next(out.glob("*-rewrite/rewrite.json")).read_text())
    assert set(rewrite["counts"]) == {"Hardswish -> ReLU6"}
    assert len(rewrite["squeeze_excitation"]["removed"]) == 9  # every SE of mobilenet_v3_small
    section = (next(out.glob("*-validate/report.md")).read_text()).split("## Rewrite", 1)[1]
    assert "| original | onnx-int8@int8-original |" in section
    assert "| rewritten | onnx-int8@int8-rewritten |" in section
    _assert_cached("rewrite.yaml", out, *quick)


def test_secure_reduced(tmp_path: Path):
    """secure.yaml reduced: a key made by `edgemml keygen`, a signed bundle that `edgemml verify`
    accepts and refuses once edited, predict.py --verify-key, and the robustness pass with the
    pruned-vs-unpruned comparison and the robust gates."""
    key = tmp_path / "keys" / "k.pem"
    made = run_cli("keygen", str(key), cwd=REPO)
    assert made.returncode == 0, _explain(made)
    out = tmp_path / "secure"
    quick = [f"stages.export.bundle.sign.key={key}", "stages.train.max_steps=120",
             "stages.prune.recover.max_steps=30", "stages.quantize.calibration.samples=64",
             "stages.validate.gates.torch={min_top1: 50, max_robust_drop: 100}",
             "stages.validate.latency.runs=10",
             "stages.validate.robustness={samples: 120, pgd: {steps: 3}, severity: [1, 5]}"]
    proc = _run("secure.yaml", out, *quick)
    assert proc.returncode in (0, 1), _explain(proc)  # robust gates may fail on a short training
    report = _report(out)
    arts = {a["name"]: a for a in report["artifacts"]}
    assert all(a["robustness"]["worst_top1_pct"] is not None for a in arts.values())
    section = report["robustness"]
    assert list(section["references"]) == ["torch@train"] and section["n"] == 120
    kinds = [(g["kind"], g["artifact"], g["baseline"]) for g in section["gaps"]]
    assert kinds[0] == ("pruned vs unpruned", "torch", "torch@train")
    assert ("int8 vs fp32", "onnx-int8", "onnx-fp32") in kinds
    assert arts["torch"]["robustness"]["reference_inputs"] == "own white-box inputs"
    robust_gates = [r for r in report["gates"] if r["metric"] in ("min_robust_top1",
                                                                  "max_robust_drop")]
    assert {r["artifact"] for r in robust_gates} == {"torch", "onnx-int8", "openvino-int8",
                                                      "openvino-int8[f32]"}
    assert proc.returncode == (1 if report["gate_failures"] else 0)
    bundle = out / "04-export/bundle"
    pub = tmp_path / "keys" / "k.pub.pem"
    ok = run_cli("verify", str(bundle), "--key", str(pub), cwd=REPO)
    assert ok.returncode == 0 and "signature ok" in ok.stdout, _explain(ok)
    import subprocess
    import sys

    check = subprocess.run([sys.executable, str(bundle / "predict.py"), "--verify-key", str(pub),
                            "--self-check"], capture_output=True, text=True, timeout=300)
    assert check.returncode == 0 and "FAIL" not in check.stdout, check.stdout + check.stderr
    model = bundle / "model.int8.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    bad = run_cli("verify", str(bundle), "--key", str(pub), cwd=REPO)
    assert bad.returncode == 1 and bad.stderr.splitlines() == [
        f"error: {model}: does not match its sha256 in manifest.json (edited or replaced)"]
