"""A signed bundle made by the real export stage, and its predict.py in a subprocess: every
tampering case refused by --verify-key with one line naming the file; hostile inputs answered with
one `error: FILE: reason` line each (exit 1, the good files still classified), never a traceback,
a hang or a silent skip.

One small pipeline per module (the test plugin's tiny CNN trained on builtin:digits at 16x16,
exported with a key made by `edgemml keygen`); each test works on its own copy of the bundle.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from conftest import TESTS_DIR, cli_env, run_cli, write
from hostile_inputs import bad, good, links, many
from tampering import CASES, flip_byte, make_keys, model_file

HERE = Path(__file__).resolve().parent

PIPELINE = """
name: sec
plugins: [validate_stages]
preprocess: {size: [16, 16], channels: gray, mean: [0.5], std: [0.5]}
data: {source: "builtin:digits"}
model: {python: "validate_stages:tiny_cnn"}
stages:
  - type: vt_train
    epochs: 2
  - type: export
    quantized: none
    onnx: {exporter: torchscript}
    bundle: {samples: 4, sign: {key: keys/signer.pem}}
"""


def _env() -> dict[str, str]:
    return cli_env({"PYTHONPATH": f"{HERE}:{TESTS_DIR}"})


def _explain(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sec")
    keys = make_keys(root / "keys")
    write(root / "pipeline.yaml", PIPELINE)
    proc = run_cli("run", "pipeline.yaml", cwd=root, env=_env())
    assert proc.returncode == 0, _explain(proc)
    return {"root": root, "bundle": root / "runs/sec/02-export/bundle", **keys,
            "stdout": proc.stdout}  # type: ignore[dict-item]


@pytest.fixture()
def bundle(made: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(made["bundle"], tmp_path / "bundle", symlinks=True))


def run_predict(bundle: Path, *args: str, block_crypto: bool = False,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """python BUNDLE/predict.py ARGS in a fresh interpreter, as a device would run it (bytecode
    writing allowed, as on a user's machine; optionally without `cryptography`)."""
    cmd = [sys.executable]
    if block_crypto:
        cmd += ["-c", "import runpy, sys; sys.modules['cryptography'] = None; "
                      "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"]
    cmd += [str(bundle / "predict.py"), "--threads", "1", *args]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _no_traceback(out: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in out.stderr + out.stdout, out.stderr


# ---- export signs; the key enters the fingerprint by its public id -------------------------------


def test_export_signs_the_bundle_and_records_only_the_public_key_id(made: dict[str, Path]) -> None:
    from edgemml.exporters.signing import signing_key_id, verify_bundle

    kid = signing_key_id(made["priv"])
    stage = made["bundle"].parent
    result = verify_bundle(made["bundle"], made["pub"])
    assert result.signed and result.key_id == kid
    export = json.loads((stage / "export.json").read_text())
    assert export["bundle"]["signed_by"] == kid
    record = (stage / "stage.json").read_text()
    assert json.loads(record)["fingerprint_inputs"]["extra"] == {"sign_key_id": kid}
    private = made["priv"].read_text().splitlines()[1]  # the key material, base64
    assert private not in record and "PRIVATE" not in record
    from edgemml.artifacts import sha256_file

    assert sha256_file(made["priv"]) not in record
    shown = " ".join(made["stdout"].split())  # type: ignore[attr-defined]
    assert f"bundle signed by {kid}; verify it with: edgemml verify" in shown
    import tarfile

    with tarfile.open(stage / "bundle.tar.gz") as tar:  # the archive carries the signature
        assert "bundle/manifest.sig" in tar.getnames()


def test_a_new_key_at_the_same_path_re_signs_and_a_missing_key_says_how_to_make_one(
        made: dict[str, Path]) -> None:
    """The key enters the fingerprint by its public id: replacing the key file re-runs export."""
    from edgemml.errors import VerificationError
    from edgemml.exporters.signing import generate_keypair, verify_bundle

    root = made["root"]
    shutil.copytree(root / "runs/sec", root / "runs/rekey")
    key = root / "keys2" / "k.pem"
    generate_keypair(key)
    old_pub = Path(shutil.copyfile(root / "keys2/k.pub.pem", root / "old.pub.pem"))
    args = ("run", "pipeline.yaml", "--out", "runs/rekey", "--set",
            "stages.export.bundle.sign.key=keys2/k.pem")
    assert run_cli(*args, cwd=root, env=_env()).returncode == 0
    proc = run_cli(*args, cwd=root, env=_env())
    assert proc.returncode == 0 and "export: cached (unchanged)" in proc.stderr, _explain(proc)
    key.unlink()
    (root / "keys2/k.pub.pem").unlink()
    generate_keypair(key)
    proc = run_cli(*args, cwd=root, env=_env())
    assert proc.returncode == 0, _explain(proc)
    assert "export (export): changed: sign_key_id" in proc.stderr, proc.stderr
    bundle = root / "runs/rekey/02-export/bundle"
    assert verify_bundle(bundle, root / "keys2/k.pub.pem").signed
    with pytest.raises(VerificationError, match="signed by another key"):
        verify_bundle(bundle, old_pub)
    proc = run_cli("run", "pipeline.yaml", "--out", "runs/rekey", "--set",
                   "stages.export.bundle.sign.key=keys/none.pem", cwd=root, env=_env())
    assert proc.returncode == 2, _explain(proc)
    assert "private key not found" in proc.stderr and "edgemml keygen" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---- predict.py --verify-key ------------------------------------------------------------------


def test_verified_self_check_leaves_the_bundle_as_signed(bundle: Path,
                                                        made: dict[str, Path]) -> None:
    from edgemml.exporters.signing import verify_bundle

    out = run_predict(bundle, "--verify-key", str(made["pub"]), "--self-check")
    assert out.returncode == 0, _explain(out)
    assert "4/4 samples as in the pipeline" in out.stdout and "FAIL" not in out.stdout
    out = run_predict(bundle, str(bundle / "samples"))  # unsigned path: imports nothing either
    assert out.returncode == 0 and len(out.stdout.splitlines()) == 4, _explain(out)
    assert not (bundle / "__pycache__").exists()
    assert verify_bundle(bundle, made["pub"]).signed


@pytest.mark.parametrize("tamper", CASES, ids=lambda f: f.__name__)
def test_predict_refuses_a_tampered_bundle(bundle: Path, made: dict[str, Path], tmp_path: Path,
                                           tamper: Callable) -> None:
    names = tamper(bundle, made, tmp_path)
    out = run_predict(bundle, "--verify-key", str(made["pub"]), str(bundle / "samples"))
    _no_traceback(out)
    assert out.returncode == 2 and out.stdout == "", _explain(out)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0], out.stderr


def test_predict_refuses_the_wrong_key(bundle: Path, made: dict[str, Path]) -> None:
    out = run_predict(bundle, "--verify-key", str(made["other_pub"]), "--list")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "signed by another key" in out.stderr


def test_predict_refuses_without_cryptography(bundle: Path, made: dict[str, Path]) -> None:
    out = run_predict(bundle, "--verify-key", str(made["pub"]), "--list", block_crypto=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: --verify-key needs the Python package 'cryptography' (pip install cryptography); "
        "refusing to run a bundle it cannot verify"]


@pytest.mark.parametrize("key", ["/dev/zero", "missing.pem", "predict.py"])
def test_predict_bad_key_files(bundle: Path, key: str) -> None:
    path = key if key.startswith("/") else str(bundle / key)
    out = run_predict(bundle, "--verify-key", path, "--list", timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: not a readable public key")


def test_without_a_key_an_unsigned_bundle_runs_and_edits_are_still_caught(bundle: Path) -> None:
    (bundle / "manifest.sig").unlink()
    out = run_predict(bundle, "--list")
    assert out.returncode == 0 and model_file(bundle) in out.stdout
    for rel in ("labels.txt", model_file(bundle)):
        saved = (bundle / rel).read_bytes()
        flip_byte(bundle / rel)
        out = run_predict(bundle, str(bundle / "samples"))
        assert out.returncode == 2 and out.stderr.splitlines() == [
            f"error: {bundle / rel}: does not match its sha256 in manifest.json (corrupted or "
            "edited)"], _explain(out)
        (bundle / rel).write_bytes(saved)


def test_a_trusted_predict_runs_another_bundle(bundle: Path, made: dict[str, Path],
                                               tmp_path: Path) -> None:
    """The honest answer to "predict.py verifies itself": keep a trusted copy outside the bundle."""
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    shutil.copyfile(bundle / "predict.py", trusted / "predict.py")
    out = run_predict(trusted, "--bundle", str(bundle), "--verify-key", str(made["pub"]),
                      str(bundle / "samples"))
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 4
    assert os.listdir(trusted) == ["predict.py"]


# ---- hostile inputs ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("hostile")
    return {"root": root, "good": good(root / "good"), "bad": bad(root / "bad"),
            "links": links(root / "links"), "many": many(root / "many", 2000)}


def test_good_files_all_classified(bundle: Path, hostile: dict) -> None:
    """RGBA, CMYK, 16-bit, palette, LA, 1-bit, float, animated, EXIF, 1x1, odd names: exit 0,
    one line each (a name holding a newline is escaped, not split)."""
    out = run_predict(bundle, str(hostile["root"] / "good"))
    _no_traceback(out)
    assert out.returncode == 0 and out.stderr == "", _explain(out)
    lines = out.stdout.splitlines()
    assert len(lines) == len(hostile["good"]) == 19
    assert any("new\\nline.png" in line for line in lines)
    assert any("bad-utf8-\\udcff.png" in line for line in lines)


def test_each_bad_file_alone(bundle: Path, hostile: dict) -> None:
    """Each bad file named on its own: one reason line and the summary, exit 1, no hang (fifo)."""
    for name, word in hostile["bad"].items():
        path = hostile["root"] / "bad" / name
        out = run_predict(bundle, str(path), timeout=60)
        _no_traceback(out)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 1 and out.stdout == "" and len(lines) == 2, (name, out.stderr)
        assert lines[0].startswith(f"error: {path}: ") and word in lines[0], lines[0]
        assert lines[1] == "error: 1 of 1 inputs could not be classified (listed above)"


def test_a_folder_mixing_bad_and_good_files(bundle: Path, hostile: dict, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    bad(folder)  # a fresh copy (a fifo cannot be copied)
    shutil.copyfile(hostile["root"] / "good" / "gray.png", folder / "zz_good.png")
    out = run_predict(bundle, str(folder), timeout=120)
    _no_traceback(out)
    assert out.returncode == 1
    errors = [line for line in out.stderr.splitlines() if line.startswith(f"error: {folder}")]
    assert len(errors) == len(hostile["bad"]), out.stderr
    for name, word in hostile["bad"].items():
        hit = [line for line in errors if f"/{name}: " in line]
        assert len(hit) == 1 and word in hit[0], (name, hit)
    assert [Path(line.split("\t")[0]).name for line in out.stdout.splitlines()] == ["zz_good.png"]
    assert out.stderr.splitlines()[-1] == (f"error: {len(errors)} of {len(errors) + 1} inputs "
                                           "could not be classified (listed above)")


def test_links_and_loops(bundle: Path, hostile: dict) -> None:
    out = run_predict(bundle, str(hostile["root"] / "links"), timeout=60)
    _no_traceback(out)
    assert out.returncode == 1
    for name, word in hostile["links"].items():
        hit = [line for line in out.stderr.splitlines() if f"/links/{name}: " in line]
        assert len(hit) == 1 and word in hit[0], (name, out.stderr)
    classified = sorted(Path(line.split("\t")[0]).name for line in out.stdout.splitlines())
    assert classified == ["link_to_real.png", "real.png"]


def test_explicit_paths(bundle: Path, hostile: dict, tmp_path: Path) -> None:
    """Named on the command line: missing, a device, a non-image extension (tried anyway)."""
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    out = run_predict(bundle, str(tmp_path / "missing.png"), "/dev/zero", str(notes),
                      str(hostile["root"] / "good" / "gray.png"), timeout=60)
    _no_traceback(out)
    assert out.returncode == 1
    err = out.stderr.splitlines()
    assert f"error: {tmp_path / 'missing.png'}: no such file or directory" in err
    assert "error: /dev/zero: not a regular file (device, fifo or socket)" in err
    assert any(line.startswith(f"error: {notes}: not an image") for line in err)
    assert len(out.stdout.splitlines()) == 1


def test_non_images_in_folders_are_counted_not_silent(bundle: Path, hostile: dict,
                                                      tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copyfile(hostile["root"] / "good" / "gray.png", folder / "a.png")
    (folder / "README.txt").write_text("x")
    (folder / ".DS_Store").write_bytes(b"\0")
    out = run_predict(bundle, str(folder))
    assert out.returncode == 0
    assert "note: skipped files in folders without an image extension: 1 (none), 1 .txt" in \
        out.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    out = run_predict(bundle, str(empty))
    assert out.returncode == 2 and out.stderr.splitlines() == ["error: no image files found"]


def test_thousands_of_files(bundle: Path, hostile: dict) -> None:
    """2000 files in nested folders: all classified, in sorted order, none lost or repeated."""
    out = run_predict(bundle, str(hostile["root"] / "many"), timeout=600)
    _no_traceback(out)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [Path(line.split("\t")[0]).name for line in out.stdout.splitlines()] == hostile["many"]


def test_json_lists_errors_and_max_pixels(bundle: Path, hostile: dict) -> None:
    gray = str(hostile["root"] / "good" / "gray.png")
    out = run_predict(bundle, "--json", str(hostile["root"] / "bad" / "text.png"), gray)
    assert out.returncode == 1
    doc = json.loads(out.stdout)
    assert len(doc["results"]) == 1 and doc["errors"][0]["file"].endswith("text.png")
    out = run_predict(bundle, "--max-pixels", "100", gray)  # 32x32 = 1024 px > 100
    assert out.returncode == 1 and "decompression bomb" in out.stderr
