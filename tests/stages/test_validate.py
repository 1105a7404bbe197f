"""The validate stage end to end through the real CLI, on artifacts made with the real libraries.

One small pipeline (tiny CNN trained on builtin:digits at 16x16, exported to ONNX fp32/int8 and
OpenVINO fp32 by the test plugin tests/validate_stages.py) runs once per module; each test copies
its run directory and re-runs only what its `--set` changes (the earlier stages stay cached).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np
import pytest

from conftest import need_tool, run_cli, write

PIPELINE = """
name: vt
plugins: [validate_stages]
preprocess: {size: [16, 16], channels: gray, mean: [0.5], std: [0.5]}
data: {source: "builtin:digits"}
model: {python: "validate_stages:tiny_cnn"}
stages:
  - type: vt_train
    epochs: 4
  - type: vt_export
  - type: validate
    latency: {runs: 15, warmup: 2, batch: 16, throughput_runs: 3}
    gates:
      onnx-fp32: {max_abs_diff: 1.0e-4}
      openvino-fp32[f32]: {max_abs_diff: 1.0e-4}
      int8: {max_accuracy_drop: 3.0, min_agreement: 0.9}
      all: {max_size_mb: 5, min_top1: 70}
"""

EXPECTED = {"torch", "onnx-fp32", "onnx-int8", "openvino-fp32", "openvino-fp32[f32]"}


def _explain(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("validate")
    write(root / "pipeline.yaml", PIPELINE)
    proc = run_cli("run", "pipeline.yaml", cwd=root)
    assert proc.returncode == 0, _explain(proc)
    return root


def _copy_run(base: Path, name: str) -> Path:
    """A copy of the module's run directory, so a test re-runs only the stages it changes."""
    shutil.copytree(base / "runs/vt", base / "runs" / name)
    return base / "runs" / name


def _run(base: Path, out: str, *sets: str) -> subprocess.CompletedProcess[str]:
    args = ["run", "pipeline.yaml", "--out", f"runs/{out}"]
    for s in sets:
        args += ["--set", s]
    return run_cli(*args, cwd=base)


def _report(run_dir: Path) -> dict:
    return json.loads((run_dir / "03-validate/report.json").read_text())


def test_every_artifact_has_every_figure(base: Path) -> None:
    import torch

    from edgemml.config import DataConfig, PreprocessConfig
    from edgemml.data import load_data
    from edgemml.models import load_model
    from edgemml.training import evaluate

    run = base / "runs/vt"
    report = _report(run)
    assert report["schema"] == "edgemml.validate-report" and report["version"] == 1
    assert report["status"] == "passed"
    arts = {a["name"]: a for a in report["artifacts"]}
    assert set(arts) == EXPECTED
    n = report["data"]["n"]
    assert n == 270  # 15 % of the 1797 digits
    for a in arts.values():
        acc, par, lat = a["accuracy"], a["parity"], a["latency"]
        assert acc["n"] == n and 0 <= acc["top1_pct"] <= 100
        assert acc["top5_pct"] is None and "top5_pct" in a["notes"]  # 10 classes: no top-5
        assert set(acc["per_class_pct"]) == set("0123456789")
        for key in ("agreement", "max_abs_diff", "mean_abs_diff", "cosine", "correlation",
                    "accuracy_drop_pp"):
            assert isinstance(par[key], float), (a["name"], key)
        assert 0 < lat["batch1_median_ms"] <= lat["batch1_p90_ms"]
        assert lat["throughput_ips"] > 0 and lat["batch"] == 16 and lat["threads"] == 1
        assert a["params"] > 0 and a["macs"] > a["params"]
        files = [Path(a["path"])] if Path(a["path"]).is_file() else [
            p for p in Path(a["path"]).iterdir() if p.suffix in (".xml", ".bin", ".json",
                                                                   ".safetensors")]
        assert a["size_bytes"] == sum(p.stat().st_size for p in files)
    # the reference's accuracy is what edgemml.training.evaluate computes on the same split
    model, spec = load_model(run / "02-vt_export/model")
    splits = load_data(DataConfig(source="builtin:digits"),
                       PreprocessConfig.model_validate(spec.extra["preprocess"]), seed=0,
                       base_dir=base)
    torch.set_num_threads(1)
    assert arts["torch"]["accuracy"]["top1_pct"] == pytest.approx(
        evaluate(model, splits.test)["top1_pct"])
    assert arts["torch"]["accuracy"]["top1_pct"] > 70  # a trained model, not a random one
    # fp32 exports reproduce the reference; OpenVINO as deployed says in what precision it ran
    assert arts["onnx-fp32"]["parity"]["max_abs_diff"] < 1e-4
    assert arts["openvino-fp32[f32]"]["runtime_precision"] == "f32"
    assert arts["openvino-fp32[f32]"]["parity"]["max_abs_diff"] < 1e-4
    assert arts["openvino-fp32"]["runtime_precision"] in ("bf16", "f32")
    assert arts["onnx-int8"]["parity"]["agreement"] >= 0.9
    assert arts["onnx-int8"]["parity"]["max_abs_diff"] > arts["onnx-fp32"]["parity"]["max_abs_diff"]
    # the recommendation is the fastest passing deployed artifact, marked in the bundle copy
    rec = report["recommended"]
    ort = [arts["onnx-fp32"], arts["onnx-int8"]]
    assert rec["onnxruntime"] == min(ort, key=lambda a: a["latency"]["batch1_median_ms"])["name"]
    assert rec["openvino"] == "openvino-fp32"
    manifest = json.loads((run / "03-validate/bundle-manifest.json").read_text())
    expected_file = "model.onnx" if rec["onnxruntime"] == "onnx-fp32" else "model-int8.onnx"
    assert manifest["recommended"]["onnxruntime"]["files_in_bundle"] == [expected_file]
    assert "recommended" not in json.loads((run / "02-vt_export/bundle/manifest.json").read_text())
    # junit: one passing test case per gate
    suite = ET.parse(run / "03-validate/junit.xml").getroot().find("testsuite")
    assert suite is not None
    assert int(suite.get("tests", "0")) == len(report["gates"]) == 1 + 4 + 1 + 1 + 2 + 2 * 4
    assert suite.get("failures") == "0"
    stage = json.loads((run / "03-validate/stage.json").read_text())
    assert stage["gate_failures"] == [] and stage["metrics"]["recommended"] == rec


def test_impossible_gate_fails_the_run_after_writing_every_report(base: Path) -> None:
    run = _copy_run(base, "tight")
    proc = _run(base, "tight", "stages.validate.gates.onnx-int8.max_latency_ms=0.000001")
    assert proc.returncode == 1, _explain(proc)
    assert "1 gate(s) failed" in proc.stderr and "onnx-int8.max_latency_ms" in proc.stderr
    for name in ("report.json", "report.md", "junit.xml", "report.html"):
        assert (run / "03-validate" / name).is_file()
    report = _report(run)
    assert report["status"] == "failed"
    failed = [r for r in report["gates"] if r["status"] == "fail"]
    assert [(r["gate"], r["artifact"]) for r in failed] == [("onnx-int8.max_latency_ms",
                                                             "onnx-int8")]
    assert failed[0]["value"] > failed[0]["limit"]
    suite = ET.parse(run / "03-validate/junit.xml").getroot().find("testsuite")
    assert suite is not None and suite.get("failures") == "1"
    bad = [c for c in suite.iter("testcase") if c.find("failure") is not None]
    assert [c.get("name") for c in bad] == ["onnx-int8.max_latency_ms"]
    assert "limit <= 1.000e-06 ms" in bad[0].find("failure").get("message")
    # no recommendation for ORT can include the failing int8; fp32 still passes everything
    assert report["recommended"]["onnxruntime"] == "onnx-fp32"
    # a cached re-run stays red (CI re-runs must not turn green by caching)
    again = _run(base, "tight", "stages.validate.gates.onnx-int8.max_latency_ms=0.000001")
    assert again.returncode == 1 and "cached" in again.stderr, _explain(again)


def test_baseline_regression_gate_catches_a_degraded_model(base: Path) -> None:
    baseline = base / "main-report.json"
    shutil.copy(base / "runs/vt/03-validate/report.json", baseline)
    gate = ["stages.validate.baseline=main-report.json",
            "stages.validate.gates.all.max_regression.top1_pp=2"]
    run = _copy_run(base, "branch")
    same = _run(base, "branch", *gate)  # unchanged model: within 2 points of itself
    assert same.returncode == 0, _explain(same)
    rows = [r for r in _report(run)["gates"] if r["metric"] == "regression.top1_pp"]
    assert len(rows) == 4 and all(r["status"] == "pass" and r["value"] == 0 for r in rows), rows

    worse = _run(base, "branch", *gate, "stages.vt_export.perturb=1.0")
    assert worse.returncode == 1, _explain(worse)
    report = _report(run)
    assert report["baseline"]["path"].endswith("main-report.json")
    rows = {r["artifact"]: r for r in report["gates"] if r["metric"] == "regression.top1_pp"}
    base_top1 = {a["name"]: a["accuracy"]["top1_pct"]
                 for a in json.loads(baseline.read_text())["artifacts"]}
    for name, row in rows.items():
        now = next(a for a in report["artifacts"] if a["name"] == name)["accuracy"]["top1_pct"]
        assert row["value"] == pytest.approx(base_top1[name] - now)
        assert row["status"] == "fail" and row["value"] > 2

    cmp = run_cli("compare", "main-report.json", "runs/branch", "--json", cwd=base)
    assert cmp.returncode == 0, _explain(cmp)
    diff = json.loads(cmp.stdout)
    top1 = next(r for r in diff["metrics"] if r["artifact"] == "onnx-fp32"
                and r["metric"] == "top-1 %")
    assert top1["delta"] == pytest.approx(top1["b"] - top1["a"]) and top1["better"] is False
    assert any(c["gate"] == "all.max_regression.top1_pp" for c in diff["gates"])
    text = run_cli("compare", "main-report.json", "runs/branch", cwd=base)
    assert text.returncode == 0 and "onnx-fp32" in text.stdout and "top-1 %" in text.stdout


def test_near_constant_model_does_not_pass_parity(base: Path) -> None:
    run = _copy_run(base, "constant")
    proc = _run(base, "constant", "stages.vt_export.degenerate=true",
                "stages.validate.gates={}")
    assert proc.returncode == 1, _explain(proc)
    rows = {(r["gate"], r["artifact"]): r for r in _report(run)["gates"]}
    assert rows[("reference.min_diversity", "torch")]["status"] == "fail"
    arts = {a["name"]: a for a in _report(run)["artifacts"]}
    # tiny absolute differences, yet no correlation with the (constant) reference
    assert arts["onnx-fp32"]["parity"]["max_abs_diff"] < 1e-4
    assert rows[("parity.min_correlation", "onnx-fp32")]["status"] == "fail"
    assert _report(run)["recommended"] == {"onnxruntime": None, "openvino": None}


def test_report_html_opens_in_headless_chromium(base: Path, tmp_path: Path) -> None:
    chromium = need_tool("chromium", "chromium-browser", install="apt-get install -y chromium")
    html = base / "runs/vt/03-validate/report.html"
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--virtual-time-budget=5000", "--dump-dom", html.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr
    body = dom.stdout[dom.stdout.index("<body"):].split(">", 1)[0]
    assert 'data-plots-rendered="5"' in body and "data-errors" not in body, body
    for pid in ("tradeoff", "latency", "per-class", "curves", "stages"):
        assert f'id="plot-{pid}"' in dom.stdout
    shot = tmp_path / "report.png"
    proc = subprocess.run([*flags, "--window-size=1200,3000", f"--screenshot={shot}",
                           html.as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (3000, 1200)
    coloured = (pixels.max(2).astype(int) - pixels.min(2)) > 60  # plot marks, not text or white
    assert coloured.sum() > 5000


def test_markdown_renders_the_gate_table(base: Path) -> None:
    from markdown_it import MarkdownIt

    report = _report(base / "runs/vt")
    md = (base / "runs/vt/03-validate/report.md").read_text()
    html = MarkdownIt("commonmark").enable("table").render(md)
    first = html.index("<table>")
    gate_table = html[first:html.index("</table>", first)]
    assert "<th>gate</th>" in gate_table and ">measured</th>" in gate_table
    assert gate_table.count("<tr>") == len(report["gates"]) + 1
    assert "<code>int8.min_agreement</code>" in gate_table


def test_report_command_rerenders_identically(base: Path) -> None:
    proc = run_cli("report", "runs/vt", cwd=base)
    assert proc.returncode == 0, _explain(proc)
    for name in ("report.md", "junit.xml", "report.html"):
        assert (base / "runs/vt/report" / name).read_bytes() == (
            base / "runs/vt/03-validate" / name).read_bytes(), name
    bad = run_cli("report", "runs/vt/manifest.json", cwd=base)
    assert bad.returncode == 2 and "not an edgemml validation report" in bad.stderr


def test_validate_command_on_files_made_elsewhere(base: Path) -> None:
    ext = base / "external"
    ext.mkdir()
    export = base / "runs/vt/02-vt_export"
    shutil.copy(export / "model.onnx", ext / "net.onnx")
    shutil.copytree(export / "openvino", ext / "net-ov")
    write(ext / "check.yaml", """
        name: external
        data: {source: "builtin:digits"}
        preprocess: {size: [16, 16], channels: gray, mean: [0.5], std: [0.5]}
        artifacts:
          - {path: net.onnx}
          - {path: net-ov, name: ov}
        latency: {runs: 5, warmup: 1, batch: 8, throughput_runs: 2}
        gates:
          ov[f32]: {max_abs_diff: 1.0e-4}
    """)
    proc = run_cli("validate", "check.yaml", cwd=ext)
    assert proc.returncode == 0, _explain(proc)
    report = json.loads((ext / "runs/external/01-validate/report.json").read_text())
    arts = {a["name"]: a for a in report["artifacts"]}
    assert set(arts) == {"onnx-fp32", "ov", "ov[f32]"} and report["reference"]["name"] == "onnx-fp32"
    pipeline_top1 = {a["name"]: a["accuracy"]["top1_pct"] for a in _report(base / "runs/vt")["artifacts"]}
    assert arts["onnx-fp32"]["accuracy"]["top1_pct"] == pipeline_top1["onnx-fp32"]
    assert arts["onnx-fp32"]["params"] > 0 and arts["onnx-fp32"]["macs"] > 0  # from the graph
    assert arts["ov[f32]"]["parity"]["max_abs_diff"] < 1e-4
    typo = run_cli("validate", "check.yaml", "--set", "gates.all.max_sise_mb=1", cwd=ext)
    assert typo.returncode == 2 and "gates.all.max_sise_mb: unknown key" in typo.stderr, _explain(typo)


def test_validate_command_refuses_unusable_models_with_exit_2(base: Path) -> None:
    """A truncated file, a model for other channels, a model for another static size: the user's
    input, so exit 2 naming the file and the setting (these were crashes, exit 3)."""
    ext = base / "unusable"
    ext.mkdir()
    model = (base / "runs/vt/02-vt_export/model.onnx").read_bytes()
    (ext / "net.onnx").write_bytes(model)
    (ext / "trunc.onnx").write_bytes(model[:len(model) // 2])
    cases = [("trunc.onnx", "size: [16, 16], channels: gray",
              "trunc.onnx is not a readable ONNX model (truncated or corrupt?)"),
             ("net.onnx", "size: [16, 16], channels: rgb",
              "net.onnx: preprocess: onnx-fp32 takes input [N, 1, 16, 16], but the preprocessing "
              "makes [N, 3, 16, 16] (channels: rgb"),
             ("net.onnx", "size: [8, 8], channels: gray",
              "takes input [N, 1, 16, 16], but the preprocessing makes [N, 1, 8, 8]")]
    for i, (file, pre, words) in enumerate(cases):
        write(ext / f"c{i}.yaml", f"""
            name: c{i}
            data: {{source: "builtin:digits"}}
            preprocess: {{{pre}, mean: [0.5], std: [0.5]}}
            artifacts: [{{path: {file}}}]
            latency: {{runs: 2, warmup: 0, batch: 4, throughput_runs: 1}}
        """)
        proc = run_cli("validate", f"c{i}.yaml", "--out", f"out{i}", cwd=ext)
        assert proc.returncode == 2, _explain(proc)
        assert words in " ".join(proc.stderr.split()) and "Traceback" not in proc.stderr, \
            _explain(proc)


ROBUST = ("stages.validate.robustness={fgsm: {eps: [2/255, 8/255]}, pgd: {eps: 8/255, steps: 3}, "
          "corruptions: [contrast, gaussian_noise], severity: [1, 5]}")


def test_robustness_figure_per_artifact_gates_and_reports(base: Path) -> None:
    """The robustness pass on the module's artifacts: a figure per artifact, the attack lowers the
    reference's accuracy, severity 5 hurts more than 1, the gates read it (junit, markdown, html)."""
    run = _copy_run(base, "robust")
    proc = _run(base, "robust", ROBUST, "stages.validate.gates.all.min_robust_top1=0",
                "stages.validate.gates.int8.max_robust_drop=100",
                "stages.validate.gates.torch.min_robust_top1=99.9")
    assert proc.returncode == 1, _explain(proc)  # the last gate cannot pass: the attack works
    assert "vt_train: cached" in proc.stderr and "vt_export: cached" in proc.stderr
    report = _report(run)
    arts = {a["name"]: a for a in report["artifacts"]}
    for name, a in arts.items():
        r = a["robustness"]
        assert r is not None and r["worst_top1_pct"] is not None, name
        keys = [s["key"] for s in r["sets"]]
        assert keys == ["clean", "fgsm@2/255", "fgsm@8/255", "pgd@8/255", "contrast@1",
                        "contrast@5", "gaussian_noise@1", "gaussian_noise@5"], name
        assert r["clean_top1_pct"] == pytest.approx(a["accuracy"]["top1_pct"])  # same samples
        assert r["transfer"] == (name != "torch") and r["crafted_on"] == "torch"
        assert r["reference"] == (None if name == "torch" else "torch")
    top1 = {s["key"]: s["top1_pct"] for s in arts["torch"]["robustness"]["sets"]}
    assert top1["fgsm@8/255"] < top1["clean"] - 10, top1      # the attack works
    assert top1["pgd@8/255"] <= top1["fgsm@8/255"]
    # severity 5 never helps, and hurts at least one corruption (both may sit at chance: a floor,
    # as contrast does for some seeds of this small model)
    assert all(top1[f"{c}@5"] <= top1[f"{c}@1"] for c in ("contrast", "gaussian_noise")), top1
    assert any(top1[f"{c}@5"] < top1[f"{c}@1"] for c in ("contrast", "gaussian_noise")), top1
    int8 = arts["onnx-int8"]["robustness"]
    for s in int8["sets"]:  # replayed on the same inputs as the reference
        assert s["drop_vs_reference_pp"] == pytest.approx(top1[s["key"]] - s["top1_pct"])
    section = report["robustness"]
    assert section["n"] == 270 and section["table"] == "imagenet-c"
    assert section["timing"]["cpu_s"] > 0 and "attack on torch" in section["timing"]["phases"]
    assert [(g["kind"], g["artifact"], g["baseline"]) for g in section["gaps"]] == [
        ("int8 vs fp32", "onnx-int8", "onnx-fp32")]
    rows = {(r["gate"], r["artifact"]): r for r in report["gates"]}
    assert rows[("all.min_robust_top1", "onnx-int8")]["status"] == "pass"
    assert rows[("int8.max_robust_drop", "onnx-int8")]["message"].startswith("on ")
    bad = rows[("torch.min_robust_top1", "torch")]
    assert bad["status"] == "fail" and bad["message"] == f"on {arts['torch']['robustness']['worst_top1_set']}"
    suite = ET.parse(run / "03-validate/junit.xml").getroot().find("testsuite")
    failed = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None]
    assert failed == ["torch.min_robust_top1"]
    md = (run / "03-validate/report.md").read_text()
    assert "## Robustness" in md and "transfer attack" in md and "| `pgd@8/255` |" in md
    html = (run / "03-validate/report.html").read_text()
    assert 'id="plot-robustness"' in html and "<h2>Robustness</h2>" in html


def test_robust_gates_without_the_pass_are_a_config_error(base: Path) -> None:
    proc = _run(base, "vt", "stages.validate.gates.all.min_robust_top1=50")
    assert proc.returncode == 2, _explain(proc)
    assert "all.min_robust_top1 read robustness figures" in proc.stderr
    bad = _run(base, "vt", "stages.validate.robustness={fgsm: {eps: [4/0]}}")
    assert bad.returncode == 2 and "fraction like 4/255" in bad.stderr, _explain(bad)
