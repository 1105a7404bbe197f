"""The run directory: atomic writes, content hashes, the per-stage record and the run lock.

Layout of `runs/<name>/`:
    .lock                     held (flock) while a run is active; holds the owner's pid
    manifest.json             stages in order, their folder, fingerprint and status
    run.json, run.md          what the last run did (ran / cached / why), machine and human readable
    01-<stage>/               a finished stage: its outputs and stage.json
    .01-<stage>.partial/      a stage in progress (kept across a crash so the stage can resume)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator

from edgemml.errors import ArtifactError

STAGE_RECORD = "stage.json"
MANIFEST = "manifest.json"
LOCK = ".lock"
_CHUNK = 1 << 20
_UMASK = os.umask(0)
os.umask(_UMASK)


def sha256_file(path: Path, *, follow_symlinks: bool = True) -> str:
    """sha256 of a file's bytes; follow_symlinks=False refuses (OSError ELOOP) a path that is a
    symlink, for callers that vouch for a file itself (bundle file tables, signatures)."""
    h = hashlib.sha256()
    flags = os.O_RDONLY | (0 if follow_symlinks else getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(os.open(path, flags), "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> str:
    """Stable JSON for hashing: sorted keys, no whitespace, paths and sets made plain."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path` in one rename.

    A crash leaves only a `.tmp` file, never a half-written file under the real name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------------
# Output records: size -> mtime -> sha256, the order psf/black's cache uses (cheap checks first).
# ---------------------------------------------------------------------------------------------------


def describe_output(path: Path, root: Path) -> dict[str, Any]:
    """Record of one output (a file or a folder): every file's size, mtime and sha256."""
    files: dict[str, dict[str, Any]] = {}
    if path.is_file():
        items = [path]
    else:
        items = sorted(p for p in path.rglob("*") if p.is_file())
    for p in items:
        st = p.stat()
        files[p.relative_to(root).as_posix()] = {
            "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(p)}
    digest = sha256_bytes(canonical_json({k: v["sha256"] for k, v in files.items()}).encode())
    return {"path": path.relative_to(root).as_posix(), "kind": "file" if path.is_file() else "dir",
            "sha256": digest, "files": files}


def verify_output(record: dict[str, Any], root: Path, *,
                  rehash: bool = True) -> tuple[bool, str | None, bool]:
    """Check an output record against disk. Returns (ok, problem, record_refreshed).

    rehash=True hashes every file whose size matches: a copy tool or bit rot can change bytes and
    keep size and mtime. rehash=False trusts an unchanged (size, mtime) and hashes only files whose
    mtime moved; a file whose mtime moved but whose content is unchanged is fine (its mtime is
    refreshed).
    """
    refreshed = False
    target = root / record["path"]
    if not target.exists():
        return False, f"{record['path']} is missing", False
    if record["kind"] == "dir":
        on_disk = {p.relative_to(root).as_posix() for p in target.rglob("*") if p.is_file()}
        expected = set(record["files"])
        if on_disk != expected:
            extra, missing = sorted(on_disk - expected), sorted(expected - on_disk)
            what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
            return False, f"{record['path']}/ changed on disk ({what})", False
    for rel, info in record["files"].items():
        p = root / rel
        try:
            st = p.stat()
        except FileNotFoundError:
            return False, f"{rel} is missing", False
        if st.st_size != info["size"]:
            return False, f"{rel} changed on disk (size {info['size']} -> {st.st_size})", False
        if rehash or st.st_mtime_ns != info["mtime_ns"]:
            if sha256_file(p) != info["sha256"]:
                return False, f"{rel} changed on disk (sha256 differs)", False
            if st.st_mtime_ns != info["mtime_ns"]:
                info["mtime_ns"] = st.st_mtime_ns
                refreshed = True
    return True, None, refreshed


# ---------------------------------------------------------------------------------------------------
# The run lock
# ---------------------------------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive lock on a run directory.

    flock is released by the kernel when its holder dies, even by SIGKILL, so a lock left by a dead
    run is taken over automatically; the pid written in the file lets the message name the owner.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK
        self._fd: int | None = None
        self.took_over_from: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                owner = self._read_owner()
                who = f" (pid {owner.get('pid')} on {owner.get('host')})" if owner else ""
                raise ArtifactError(
                    f"another edgemml run is using {self.path.parent}{who}",
                    hint="wait for it to finish, or use another run directory with --out",
                ) from None
            raise
        previous = self._read_owner()
        if previous and previous.get("host") == socket.gethostname():
            pid = previous.get("pid")
            if isinstance(pid, int) and pid != os.getpid() and not pid_alive(pid):
                self.took_over_from = pid
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
        self._fd = fd
        return self

    def _read_owner(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text() or "null")
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def replace_dir(staging: Path, final: Path) -> None:
    """Move a finished staging folder into place; the previous result is removed only afterwards."""
    trash = None
    if final.exists():
        trash = final.with_name(f".{final.name}.old-{os.getpid()}")
        if trash.exists():
            shutil.rmtree(trash)
        os.replace(final, trash)
    os.replace(staging, final)
    _fsync_dir(final.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
