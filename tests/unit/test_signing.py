"""Signed bundles, the library and `edgemml verify / keygen / sign`: every tampering case is
refused (exit 1, one line naming the file), keys are handled safely, and the signature is plain
ed25519 that openssl can check. predict.py --verify-key on a real bundle: tests/stages/
test_predict_security.py."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from conftest import cli_env, need_tool
from edgemml.errors import EXIT_GATE_FAILED, EXIT_USER_ERROR, InputError, VerificationError
from edgemml.exporters import signing
from tampering import CASES, edited_labels, flip_byte, make_keys, synthetic_bundle


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture()
def bundle(tmp_path: Path, keys: dict[str, Path]) -> Path:
    b = synthetic_bundle(tmp_path / "bundle")
    signing.sign_bundle(b, keys["priv"])
    return b


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """edgemml ARGS in this process (the subprocess path is tested once below)."""
    from edgemml.cli import main

    capsys.readouterr()
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_clean_bundle_verifies(bundle: Path, keys: dict[str, Path],
                               capsys: pytest.CaptureFixture[str]) -> None:
    result = signing.verify_bundle(bundle, keys["pub"])
    assert result.signed and result.key_id == signing.signing_key_id(keys["priv"])
    assert {"predict.py", "preprocess.py", "preprocess.json", "labels.txt", "model.int8.onnx",
            "openvino-int8/model.bin", "samples/000_0.png"} <= set(result.files)
    code, out, err = _cli(["verify", str(bundle), "--key", str(keys["pub"])], capsys)
    assert code == 0 and "ok, 8 files match manifest.json; signature ok" in out, out + err


@pytest.mark.parametrize("tamper", CASES, ids=lambda f: f.__name__)
def test_tampering_is_refused(bundle: Path, keys: dict[str, Path], tmp_path: Path,
                              tamper: Callable, capsys: pytest.CaptureFixture[str]) -> None:
    names = tamper(bundle, keys, tmp_path)
    with pytest.raises(VerificationError) as exc:
        signing.verify_bundle(bundle, keys["pub"])
    assert exc.value.exit_code == EXIT_GATE_FAILED and names in str(exc.value), str(exc.value)
    code, out, err = _cli(["verify", str(bundle), "--key", str(keys["pub"])], capsys)
    lines = err.strip().splitlines()
    assert code == EXIT_GATE_FAILED and out == ""
    assert len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0], err


def test_wrong_public_key_is_refused(bundle: Path, keys: dict[str, Path]) -> None:
    with pytest.raises(VerificationError, match="signed by another key"):
        signing.verify_bundle(bundle, keys["other_pub"])


def test_cli_in_a_subprocess(bundle: Path, keys: dict[str, Path]) -> None:
    """What a user or CI sees: exit codes and exactly one line on stderr."""
    cmd = [sys.executable, "-m", "edgemml.cli", "verify", str(bundle), "--key", str(keys["pub"])]
    ok = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=120)
    assert ok.returncode == 0 and "signature ok" in ok.stdout, ok.stderr
    flip_byte(bundle / "model.int8.onnx")
    bad = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=120)
    assert bad.returncode == EXIT_GATE_FAILED and bad.stdout == ""
    assert bad.stderr.splitlines() == [f"error: {bundle / 'model.int8.onnx'}: does not match its "
                                       "sha256 in manifest.json (edited or replaced)"]


def test_without_key_hashes_are_still_checked(tmp_path: Path, keys: dict[str, Path]) -> None:
    """No key: an unsigned bundle passes, an edited file is still refused (every file, not only
    the models predict.py checks), and a signature that is there is not looked at."""
    b = synthetic_bundle(tmp_path / "b")
    assert not signing.verify_bundle(b).signed
    edited_labels(b, {}, tmp_path)
    with pytest.raises(VerificationError, match="labels.txt"):
        signing.verify_bundle(b)


def test_table_path_escaping_the_bundle_is_refused(tmp_path: Path) -> None:
    b = synthetic_bundle(tmp_path / "b")
    (tmp_path / "outside.txt").write_text("x")
    m = json.loads((b / "manifest.json").read_text())
    m["files"]["../outside.txt"] = {"sha256": "0" * 64, "bytes": 1}
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(VerificationError, match="outside the bundle"):
        signing.verify_bundle(b)


def test_signing_refuses_a_bundle_that_does_not_match_its_manifest(
        tmp_path: Path, keys: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    b = synthetic_bundle(tmp_path / "b")
    flip_byte(b / "model.int8.onnx")
    with pytest.raises(VerificationError, match="model.int8.onnx"):
        signing.sign_bundle(b, keys["priv"])
    assert not (b / "manifest.sig").exists()
    b2 = synthetic_bundle(tmp_path / "b2")
    code, out, _ = _cli(["sign", str(b2), "--key", str(keys["priv"])], capsys)
    assert code == 0 and signing.signing_key_id(keys["priv"]) in out
    assert signing.verify_bundle(b2, keys["pub"]).signed


def test_archives_and_missing_folders_cannot_be_checked(tmp_path: Path,
                                                        keys: dict[str, Path]) -> None:
    (tmp_path / "bundle.tar.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(InputError, match="is an archive") as exc:
        signing.verify_bundle(tmp_path / "bundle.tar.gz", keys["pub"])
    assert exc.value.exit_code == EXIT_USER_ERROR and "tar -xzf" in (exc.value.hint or "")
    with pytest.raises(InputError, match="not found") as exc:
        signing.verify_bundle(tmp_path / "nope")
    assert exc.value.exit_code == EXIT_USER_ERROR


def test_signature_is_plain_ed25519_that_openssl_checks(bundle: Path, keys: dict[str, Path],
                                                        tmp_path: Path) -> None:
    """The format is documented, not ours alone: openssl verifies CONTEXT + manifest bytes."""
    need_tool("openssl", install="apt-get install -y openssl")
    doc = json.loads((bundle / "manifest.sig").read_text())
    (tmp_path / "sig.bin").write_bytes(base64.b64decode(doc["signature"]))
    (tmp_path / "msg.bin").write_bytes(signing.CONTEXT + (bundle / "manifest.json").read_bytes())
    out = subprocess.run(["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(keys["pub"]),
                          "-rawin", "-in", str(tmp_path / "msg.bin"), "-sigfile",
                          str(tmp_path / "sig.bin")], capture_output=True, text=True)
    assert out.returncode == 0 and "Verified Successfully" in out.stdout, out.stdout + out.stderr


# ---- keys ----------------------------------------------------------------------------------------


def test_keygen_mode_no_overwrite_and_public_path(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _cli(["keygen", str(tmp_path / "k.pem")], capsys)
    assert code == 0, err
    assert (tmp_path / "k.pem").stat().st_mode & 0o777 == 0o600
    pub = signing.load_public_key(tmp_path / "k.pub.pem")
    assert signing.key_id(pub) == signing.signing_key_id(tmp_path / "k.pem") and signing.key_id(
        pub) in out
    code, _, err = _cli(["keygen", str(tmp_path / "k.pem")], capsys)
    assert code == EXIT_USER_ERROR and "refusing to overwrite a key" in err
    code, _, err = _cli(["keygen", str(tmp_path / "new" / "k.pem")], capsys)
    assert code == 0 and (tmp_path / "new").stat().st_mode & 0o777 == 0o700, err
    code, _, err = _cli(["keygen", "/dev/null/k.pem"], capsys)
    assert code == EXIT_USER_ERROR and "cannot write the key" in err and "/dev/null" in err


def test_encrypted_private_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    signing.generate_keypair(tmp_path / "k.pem", passphrase=b"s3cret")
    assert b"ENCRYPTED" in (tmp_path / "k.pem").read_bytes()
    b = synthetic_bundle(tmp_path / "b")
    monkeypatch.delenv(signing.PASSPHRASE_ENV, raising=False)
    with pytest.raises(InputError, match=signing.PASSPHRASE_ENV):
        signing.sign_bundle(b, tmp_path / "k.pem")
    monkeypatch.setenv(signing.PASSPHRASE_ENV, "s3cret")
    signing.sign_bundle(b, tmp_path / "k.pem")
    assert signing.verify_bundle(b, tmp_path / "k.pub.pem").signed


def test_wrong_kinds_of_key_files(tmp_path: Path, keys: dict[str, Path], bundle: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(InputError, match="is a private key"):
        signing.verify_bundle(bundle, keys["priv"])
    with pytest.raises(InputError, match="not found"):
        signing.verify_bundle(bundle, tmp_path / "nope.pem")
    with pytest.raises(InputError, match="not a regular file"):
        signing.verify_bundle(bundle, Path("/dev/zero"))
    (tmp_path / "junk.pem").write_text("hello")
    with pytest.raises(InputError, match="not a readable public key"):
        signing.verify_bundle(bundle, tmp_path / "junk.pem")
    if shutil.which("openssl"):
        subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt",
                        "ec_paramgen_curve:P-256", "-out", str(tmp_path / "ec.pem")], check=True,
                       capture_output=True)
        with pytest.raises(InputError, match="not an ed25519 key"):
            signing.sign_bundle(bundle, tmp_path / "ec.pem")
    code, _, err = _cli(["verify", str(bundle), "--key", str(tmp_path / "junk.pem")], capsys)
    assert code == EXIT_USER_ERROR and "junk.pem" in err.splitlines()[0]


def test_openssh_public_key_is_accepted(tmp_path: Path, keys: dict[str, Path],
                                        bundle: Path) -> None:
    from cryptography.hazmat.primitives import serialization as ser

    pub = signing.load_private_key(keys["priv"]).public_key()
    (tmp_path / "id.pub").write_bytes(pub.public_bytes(ser.Encoding.OpenSSH,
                                                       ser.PublicFormat.OpenSSH) + b" ci@host\n")
    assert signing.verify_bundle(bundle, tmp_path / "id.pub").signed
