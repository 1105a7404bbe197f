"""Signed bundles: an ed25519 signature over manifest.json, whose file table pins every other file.

Why ed25519 via `cryptography` rather than the OpenSSF `model-signing` package: the bundle's
predict.py must be able to verify on a board that has numpy, Pillow and a runtime, and one wheel
(cryptography, with cffi) plus ~100 lines inside predict.py does it. model-signing pulls 25
distributions (sigstore, tuf, requests, in-toto, ...), signs with EC P-256/384/521 keys only, and at
1.1.1 failed to import after a clean install (it imports pyOpenSSL without declaring it). Its
Sigstore bundle format is the better interop story for a workstation; a later `edgemml verify
--sigstore` could add it without changing what a device checks.

What is signed: CONTEXT + the exact bytes of manifest.json. The domain tag keeps the key from ever
signing something that verifies as another protocol's message; signing the bytes on disk (not a
re-serialised dict) leaves no canonicalisation to disagree about. manifest.json's `files` table holds
the sha256 and size of every other file (models, predict.py, preprocess.py, preprocess.json,
labels.txt, samples/), so one signature covers the whole bundle.

Where it lives: manifest.sig beside manifest.json, a small JSON document
    {"format": "edgemml-bundle-signature", "version": 1, "algorithm": "ed25519",
     "signed_file": "manifest.json", "manifest_sha256": ..., "key_id": "ed25519:<16 hex>",
     "signature": <base64 of 64 bytes>}
key_id (sha256 of the raw public key, shortened) is a hint only, so that a failure can say "signed
by another key"; the signature is what is checked. `openssl pkeyutl -verify -rawin` checks it too.

Keys: PKCS#8 PEM private key (optionally encrypted, passphrase from EDGEMML_SIGN_PASSPHRASE),
SubjectPublicKeyInfo PEM public key; an OpenSSH `ssh-ed25519 AAAA...` line is accepted as a public
key. `edgemml keygen` and `openssl genpkey -algorithm ed25519` make compatible keys.

What verification refuses, with one line naming the file: a signature missing, unreadable, made by
another key or not matching the manifest bytes; a manifest that is not an edgemml bundle manifest;
a listed file missing, of another size or hash (edited, or swapped with another bundle's); an
unlisted file (extra, __pycache__ included); any symlink or special file; a table path escaping the
bundle. Without a key the same file checks run and the signature is ignored. Refusals are
VerificationError (exit 1, like a failed gate); "cannot check" is InputError (exit 2).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from edgemml.artifacts import sha256_file, write_text_atomic
from edgemml.errors import InputError, VerificationError
from edgemml.exporters.bundle import BUNDLE_FORMAT, MANIFEST, SIGNATURE, UNLISTED, scan_files

SIGNATURE_FORMAT = "edgemml-bundle-signature"
SIGNATURE_VERSION = 1
#: domain separation: what the key signs is CONTEXT + manifest bytes, never bare bytes
CONTEXT = b"edgemml-bundle-manifest-v1\n"
MAX_MANIFEST_BYTES = 64 << 20
MAX_SIGNATURE_BYTES = 64 << 10
MAX_KEY_BYTES = 64 << 10
PASSPHRASE_ENV = "EDGEMML_SIGN_PASSPHRASE"

__all__ = ["CONTEXT", "PASSPHRASE_ENV", "Verified", "generate_keypair", "key_id",
           "load_private_key", "load_public_key", "public_key_path", "sign_bundle",
           "signing_key_id", "verify_bundle"]


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:  # pragma: no cover - a declared dependency
        raise InputError("signing and verifying bundles needs the 'cryptography' package",
                         hint="pip install cryptography") from None
    return ed25519


# ---- keys ----------------------------------------------------------------------------------------


def key_id(public_key: Any) -> str:
    """ed25519:<16 hex digits of sha256(raw public key)>: names a key without revealing anything."""
    from cryptography.hazmat.primitives import serialization as ser

    raw = public_key.public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def public_key_path(private_path: Path) -> Path:
    """Where `edgemml keygen KEY` writes the public half: KEY's name with .pub.pem."""
    private_path = Path(private_path)
    stem = private_path.name[:-4] if private_path.name.endswith(".pem") else private_path.name
    return private_path.with_name(stem + ".pub.pem")


def _read_key_file(path: Path, what: str) -> bytes:
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InputError(f"{what} not found", file=path) from None
    except OSError as exc:
        raise InputError(f"cannot read the {what}: {exc.strerror}", file=path) from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{what} is not a regular file", file=path)
    if st.st_size > MAX_KEY_BYTES:
        raise InputError(f"{what} is {st.st_size} bytes: not a key file", file=path)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read the {what}: {exc.strerror}", file=path) from None


def generate_keypair(private_path: Path, public_path: Path | None = None, *,
                     passphrase: bytes | None = None) -> tuple[Path, Path, str]:
    """A new ed25519 key pair: PKCS#8 PEM private key (mode 0600, encrypted when a passphrase is
    given) and SubjectPublicKeyInfo PEM public key (default: public_key_path). Refuses to overwrite
    either file. Returns (private path, public path, key id)."""
    ed25519 = _crypto()
    from cryptography.hazmat.primitives import serialization as ser

    private_path = Path(private_path)
    public_path = Path(public_path) if public_path is not None else public_key_path(private_path)
    for p in (private_path, public_path):
        if p.exists() or p.is_symlink():
            raise InputError("already exists; refusing to overwrite a key", file=p,
                             hint="choose another path, or delete the old key first")
    key = ed25519.Ed25519PrivateKey.generate()
    enc = ser.BestAvailableEncryption(passphrase) if passphrase else ser.NoEncryption()
    pem = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, enc)
    try:
        for p in (private_path, public_path):  # a new folder for keys is private to its owner
            p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        public_path.write_bytes(key.public_key().public_bytes(
            ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo))
    except OSError as exc:
        raise InputError(f"cannot write the key: {exc.strerror}",
                         file=exc.filename or private_path) from None
    return private_path, public_path, key_id(key.public_key())


def load_private_key(path: Path, passphrase: bytes | None = None) -> Any:
    ed25519 = _crypto()
    from cryptography.hazmat.primitives import serialization as ser

    data = _read_key_file(path, "private key")
    if passphrase is None and os.environ.get(PASSPHRASE_ENV):
        passphrase = os.environ[PASSPHRASE_ENV].encode()
    try:
        key = ser.load_pem_private_key(data, password=passphrase)
    except TypeError as exc:  # encrypted without a passphrase, or a passphrase for a plain key
        raise InputError(f"private key: {exc}", file=path,
                         hint=f"set {PASSPHRASE_ENV} to the key's passphrase") from None
    except ValueError as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"not a readable PEM private key ({text})", file=path,
                         hint="make one with: edgemml keygen KEY.pem") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise InputError(f"is a {type(key).__name__.lstrip('_')}, not an ed25519 key", file=path,
                         hint="bundles are signed with ed25519 keys: edgemml keygen KEY.pem")
    return key


def load_public_key(path: Path) -> Any:
    ed25519 = _crypto()
    from cryptography.hazmat.primitives import serialization as ser

    data = _read_key_file(path, "public key")
    if b"PRIVATE KEY" in data:
        raise InputError("is a private key; verifying takes the public key", file=path,
                         hint="give KEY.pub.pem (written by edgemml keygen), or make it with: "
                              "openssl pkey -in KEY.pem -pubout -out KEY.pub.pem")
    try:
        key = (ser.load_ssh_public_key(data.strip()) if data.lstrip().startswith(b"ssh-")
               else ser.load_pem_public_key(data))
    except (ValueError, TypeError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"not a readable public key ({text})", file=path,
                         hint="give the PEM public key written next to the signing key") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise InputError(f"is a {type(key).__name__.lstrip('_')}, not an ed25519 public key",
                         file=path)
    return key


def signing_key_id(private_path: Path) -> str:
    """The public key id of a private key file (what the export stage's fingerprint records:
    never the private key's bytes, nor a hash of them)."""
    return key_id(load_private_key(private_path).public_key())


# ---- the bundle's files --------------------------------------------------------------------------


def _check_rel(rel: Any, manifest: Path) -> str:
    """A file-table key must name a file inside the bundle, in one spelling only."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise VerificationError(f"file table entry {rel!r} is not a relative path", file=manifest)
    if rel.startswith("/") or any(p in ("", ".", "..") for p in rel.split("/")) \
            or not PurePosixPath(rel).parts:
        raise VerificationError(f"file table entry {rel!r} points outside the bundle",
                                file=manifest)
    if rel in UNLISTED:
        raise VerificationError(f"file table lists {rel}, which cannot be hashed in it",
                                file=manifest)
    return rel


def _read_capped(path: Path, limit: int, what: str) -> bytes:
    """A regular file's bytes (no symlink followed, size bounded, read exactly once)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        raise VerificationError(f"{what} is missing", file=path) from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
        raise VerificationError(f"{what} is not a regular file (symlink or special file)",
                                file=path)
    if st.st_size > limit:
        raise VerificationError(f"{what} is {st.st_size} bytes (limit {limit})", file=path)
    with os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)), "rb") as fh:
        data = fh.read(st.st_size + 1)  # read(limit) would allocate `limit` bytes up front
    if len(data) != st.st_size:
        raise VerificationError(f"{what} changed while being read", file=path)
    return data


def _parse_manifest(data: bytes, path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VerificationError(f"is not valid JSON ({exc})", file=path) from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise VerificationError("is not an edgemml bundle manifest", file=path)
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise VerificationError("has no file table", file=path)
    for rel, entry in files.items():
        _check_rel(rel, path)
        if (not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str)
                or not isinstance(entry.get("bytes"), int)):
            raise VerificationError(f"file table entry {rel} lacks sha256/bytes", file=path)
    return manifest


def _check_files(bundle: Path, table: dict[str, dict[str, Any]]) -> list[str]:
    """Every listed file present with its size and sha256; nothing else present. Sizes are
    compared first, so a swapped model of another size is refused without hashing it."""
    on_disk = scan_files(bundle)
    extra = sorted(set(on_disk) - set(table) - set(UNLISTED))
    if extra:
        why = ("Python writes __pycache__ when it imports preprocess.py: delete it" if
               "__pycache__" in extra[0] else "a bundle holds exactly the files its manifest lists")
        more = f"; {len(extra) - 1} more unlisted" if len(extra) > 1 else ""
        raise VerificationError(f"is not listed in manifest.json (extra file: {why}{more})",
                                file=bundle / extra[0])
    for rel in sorted(table):
        if rel not in on_disk:
            raise VerificationError("is listed in manifest.json but missing", file=bundle / rel)
        size = on_disk[rel].lstat().st_size
        if size != table[rel]["bytes"]:
            raise VerificationError(f"has {size} bytes, manifest.json says {table[rel]['bytes']} "
                                    "(edited or replaced)", file=on_disk[rel])
        if sha256_file(on_disk[rel], follow_symlinks=False) != table[rel]["sha256"]:
            raise VerificationError("does not match its sha256 in manifest.json (edited or "
                                    "replaced)", file=on_disk[rel])
    return sorted(table)


# ---- sign / verify -------------------------------------------------------------------------------


@dataclass
class Verified:
    """What a successful verification established."""

    bundle: Path
    signed: bool
    key_id: str | None
    manifest_sha256: str
    files: list[str] = field(default_factory=list)

    def summary(self) -> str:
        how = (f"signature ok (key {self.key_id})" if self.signed
               else "hashes only: no key given, the signature was not checked")
        return f"{self.bundle}: ok, {len(self.files)} files match manifest.json; {how}"


def _bundle_dir(bundle: Path) -> Path:
    bundle = Path(bundle)
    if bundle.is_file() and bundle.name.endswith((".tar.gz", ".tgz", ".tar")):
        raise InputError("is an archive; verify the bundle folder", file=bundle,
                         hint=f"unpack it first: tar -xzf {bundle}")
    if not bundle.is_dir():
        raise InputError("is not a bundle folder" + ("" if bundle.exists() else " (not found)"),
                         file=bundle, hint="give the bundle folder (with manifest.json)")
    return bundle


def sign_bundle(bundle: Path, private_key: Path, *, passphrase: bytes | None = None) -> Path:
    """Check the bundle against its own manifest, then write manifest.sig. Signing only what was
    checked means a signature never vouches for a file that already differs from its hash."""
    bundle = _bundle_dir(bundle)
    key = load_private_key(private_key, passphrase)
    data = _read_capped(bundle / MANIFEST, MAX_MANIFEST_BYTES, MANIFEST)
    _check_files(bundle, _parse_manifest(data, bundle / MANIFEST)["files"])
    doc = {"format": SIGNATURE_FORMAT, "version": SIGNATURE_VERSION, "algorithm": "ed25519",
           "signed_file": MANIFEST, "manifest_sha256": hashlib.sha256(data).hexdigest(),
           "key_id": key_id(key.public_key()),
           "signature": base64.b64encode(key.sign(CONTEXT + data)).decode("ascii")}
    out = bundle / SIGNATURE
    write_text_atomic(out, json.dumps(doc, indent=2) + "\n")
    return out


def _check_signature(bundle: Path, data: bytes, public_key: Any) -> str:
    from cryptography.exceptions import InvalidSignature

    sig_path = bundle / SIGNATURE
    if not (sig_path.exists() or sig_path.is_symlink()):
        raise VerificationError("is missing: the bundle is not signed, or its signature was "
                                "stripped", file=sig_path)
    raw = _read_capped(sig_path, MAX_SIGNATURE_BYTES, SIGNATURE)
    try:
        doc = json.loads(raw.decode("utf-8"))
        ok = (isinstance(doc, dict) and doc.get("format") == SIGNATURE_FORMAT
              and doc.get("version") == SIGNATURE_VERSION and doc.get("algorithm") == "ed25519")
        signature = base64.b64decode(doc["signature"], validate=True) if ok else b""
    except (UnicodeDecodeError, ValueError, KeyError, TypeError):
        signature = b""
    if len(signature) != 64:
        raise VerificationError("is not an edgemml ed25519 signature file", file=sig_path)
    want = key_id(public_key)
    try:
        public_key.verify(signature, CONTEXT + data)
    except InvalidSignature:
        if doc.get("key_id") not in (None, want):
            raise VerificationError(f"was signed by another key ({doc.get('key_id')}), not by the "
                                    f"one given ({want})", file=sig_path) from None
        raise VerificationError("does not match its signature (manifest edited after signing, "
                                "or the signature forged)", file=bundle / MANIFEST) from None
    return want


def verify_bundle(bundle: Path, public_key: Path | None = None) -> Verified:
    """Verify a bundle: VerificationError (exit 1) naming the first file that does not check,
    InputError (exit 2) when it cannot be checked (no folder, unreadable key).

    With a key, the signature is checked first over the manifest bytes read once, and the file table
    is taken from those same bytes. Without one, the file checks still run (every file, not only
    the models predict.py checks) and the signature, present or not, is not looked at.
    """
    bundle = _bundle_dir(bundle)
    key = load_public_key(public_key) if public_key is not None else None
    data = _read_capped(bundle / MANIFEST, MAX_MANIFEST_BYTES, MANIFEST)
    kid = _check_signature(bundle, data, key) if key is not None else None
    files = _check_files(bundle, _parse_manifest(data, bundle / MANIFEST)["files"])
    return Verified(bundle, kid is not None, kid, hashlib.sha256(data).hexdigest(), files)
