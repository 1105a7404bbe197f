"""Where edgemml may write, what it may read, and how a file-system error is told to the user.

Three rules, each a function here so the runner, `check` and the stages apply them the same way:

- **Ownership.** edgemml writes only inside a run folder it created: one whose `manifest.json`
  carries `"format": "edgemml-run"` (or the fields of an older edgemml manifest). A folder that does
  not exist, or is empty, becomes one; anything else (`/`, the home folder, a file, a folder with
  someone's files in it) is refused before a single byte is written (`check_run_dir`).
- **Bounded inputs.** A checkpoint must be a regular file, a data path a regular file or a folder,
  each of bounded size, checked *before* anything opens or hashes it: `/dev/zero` would otherwise
  be hashed forever and `/usr` for minutes (`check_input_file`, `list_files`). The limits can be
  raised with environment variables (README, "How runs are cached and resumed").
- **OSError is the user's to fix.** A full disk, a read-only folder, an unreadable input: exit 2
  with the path and the errno text (`os_error`), never exit 3 ("a bug in edgemml").
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from edgemml.errors import ArtifactError, EdgemmlError, InputError

RUN_FORMAT = "edgemml-run"
RUN_MANIFEST = "manifest.json"

# Names edgemml itself puts in a run folder before its manifest exists (a run killed right after
# taking the lock), and the temporary files of its atomic writes.
_OWN_EARLY = re.compile(r"^(\.lock|\.manifest\.json\.[^/]*\.tmp)$")

_GIB = 1024 ** 3


def _env_number(name: str, default: float) -> float:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        number = float(value)
    except ValueError:
        raise InputError(f"environment variable {name}={value!r} is not a number") from None
    if number <= 0:
        raise InputError(f"environment variable {name}={value!r} must be > 0")
    return number


def max_input_bytes() -> int:
    """Largest input file, and largest total of one input folder (EDGEMML_MAX_INPUT_GB, default
    16: more than this machine class can hold in memory, which is where edgemml decodes data)."""
    return int(_env_number("EDGEMML_MAX_INPUT_GB", 16) * _GIB)


def max_input_files() -> int:
    """Most files one input folder may hold (EDGEMML_MAX_INPUT_FILES, default 500,000)."""
    return int(_env_number("EDGEMML_MAX_INPUT_FILES", 500_000))


# ---------------------------------------------------------------------------------------------
# Ownership of the run folder
# ---------------------------------------------------------------------------------------------


def is_run_manifest(path: Path) -> bool:
    """Whether `path` is a manifest.json that edgemml wrote (this version or an older one)."""
    try:
        if not path.is_file() or path.stat().st_size > 16 * 1024 * 1024:
            return False
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict):
        return False
    if data.get("format") == RUN_FORMAT:
        return True
    # written before the format key existed
    return {"schema", "pipeline", "edgemml"} <= set(data) and isinstance(data.get("stages"), list)


def _only_early_files(folder: Path, entries: list[str]) -> bool:
    """A folder holding nothing but edgemml's lock (and atomic-write temporaries): a run that was
    killed before it wrote its manifest."""
    if not entries or not all(_OWN_EARLY.match(e) for e in entries):
        return False
    lock = folder / ".lock"
    if not lock.exists():
        return True
    try:
        text = lock.read_text(encoding="utf-8", errors="replace")[:4096].strip() if \
            lock.is_file() else None
    except OSError:
        return False
    if text is None:
        return False
    if not text:
        return True
    try:
        owner = json.loads(text)
    except ValueError:
        return False
    return isinstance(owner, dict) and "pid" in owner


def run_dir_problem(run_dir: Path) -> str | None:
    """Why edgemml must not use `run_dir` as its run folder, or None when it may.

    It may when the folder does not exist yet (and can be created), is empty, or is a run folder
    edgemml created (its manifest says so).
    """
    real = Path(os.path.realpath(run_dir))
    if real == Path(real.anchor):
        return f"{run_dir} is the root of the file system"
    home = os.path.expanduser("~")
    if home not in ("~", "/") and real == Path(os.path.realpath(home)):
        return f"{run_dir} is the home folder"
    if run_dir.is_symlink() and not run_dir.exists():
        return f"{run_dir} is a broken symbolic link"
    if not run_dir.exists():
        for parent in real.parents:
            if parent.exists():
                if not parent.is_dir():
                    return f"{parent} is a file, so {run_dir} cannot be a folder"
                break
        return None
    if not run_dir.is_dir():
        return f"{run_dir} is a file, not a folder"
    try:
        entries = sorted(os.listdir(run_dir))
    except OSError as exc:
        return f"cannot list {run_dir}: {exc.strerror}"
    if not entries or is_run_manifest(run_dir / RUN_MANIFEST) or \
            _only_early_files(run_dir, entries):
        return None
    shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    return (f"{run_dir} is not an edgemml run folder (it holds {shown} and no edgemml "
            f"{RUN_MANIFEST}); edgemml writes only into a folder it created")


def check_run_dir(run_dir: Path) -> None:
    """Refuse (exit 2) a run folder edgemml must not write into; see `run_dir_problem`."""
    problem = run_dir_problem(run_dir)
    if problem is not None:
        raise ArtifactError(problem, hint="give a new or empty folder with --out (or output_dir:), "
                                          "e.g. runs/<name>")


def make_run_dir(run_dir: Path) -> None:
    """Create the run folder (and its parents); an OSError becomes exit 2 naming the path."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_error(exc, run_dir, doing="create the run folder") from None


# ---------------------------------------------------------------------------------------------
# Bounded inputs
# ---------------------------------------------------------------------------------------------


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _stat(path: Path, key: str | None) -> os.stat_result | None:
    try:
        return path.stat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise os_error(exc, path, doing="read", key=key) from None


def _too_big(path: Path, size: int, key: str | None, what: str) -> InputError:
    limit = max_input_bytes()
    return InputError(f"{what} {path} is {size / _GIB:.1f} GiB, more than the "
                      f"{limit / _GIB:g} GiB edgemml reads", file=path, key=key,
                      hint="point at the intended file, or raise EDGEMML_MAX_INPUT_GB")


def check_input_file(path: Path, *, key: str | None = None, what: str = "input") -> Path:
    """`path` must be a regular file of bounded size when it exists (a missing file is reported
    by the code that reads it, with its own hint). Checked before anything opens it."""
    st = _stat(path, key)
    if st is None:
        return path
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{what} {path} is {_kind(st.st_mode)}, not a file", file=path, key=key,
                         hint="give the path of a file")
    if st.st_size > max_input_bytes():
        raise _too_big(path, st.st_size, key, what)
    return path


def list_files(root: Path, *, key: str | None = None, what: str = "input folder",
               keep: Any = None) -> list[Path]:
    """Regular files below `root`, sorted, without following symbolic links to folders, counted and
    sized as they are found: a folder over the limits is refused before any of it is read.

    `keep(path)`, when given, selects the files returned (and sized); every file seen counts
    towards the file limit. `root` may also be a file; a missing `root` gives [].
    """
    st = _stat(root, key)
    if st is None:
        return []
    if stat.S_ISREG(st.st_mode):
        if st.st_size > max_input_bytes():
            raise _too_big(root, st.st_size, key, "input")
        return [root] if keep is None or keep(root) else []
    if not stat.S_ISDIR(st.st_mode):
        raise InputError(f"{what} {root} is {_kind(st.st_mode)}, not a file or folder", file=root,
                         key=key, hint="give an image folder or a data file")
    max_files, max_bytes = max_input_files(), max_input_bytes()
    found: list[Path] = []
    total = 0

    def fail(exc: OSError) -> None:
        raise os_error(exc, Path(exc.filename or root), doing="list", key=key)

    scanned = 0
    for folder, dirs, files in os.walk(root, onerror=fail):
        dirs.sort()
        scanned += len(files)
        for name in files:
            p = Path(folder) / name
            if keep is not None and not keep(p):
                continue
            try:
                fst = p.stat()
            except OSError:
                continue  # a dangling link: the data layer says so when it lists the folder
            if not stat.S_ISREG(fst.st_mode):
                continue
            found.append(p)
            total += fst.st_size
        if scanned > max_files or total > max_bytes:
            raise InputError(
                f"{what} {root} holds more than {max_files:,} files or {max_bytes / _GIB:g} GiB; "
                f"edgemml reads (and hashes) every file of it", file=root, key=key,
                hint="point at the intended folder, or raise EDGEMML_MAX_INPUT_FILES / "
                     "EDGEMML_MAX_INPUT_GB")
    return sorted(found)


# ---------------------------------------------------------------------------------------------
# OSError -> exit 2 with the path and the errno text
# ---------------------------------------------------------------------------------------------

_HINTS = {
    errno.ENOSPC: "free space on that disk, or use a run folder on another one (--out)",
    errno.EDQUOT: "free space within your quota, or use a run folder elsewhere (--out)",
    errno.EFBIG: "the file size limit of this process (ulimit -f) was reached",
    errno.EROFS: "that file system is read-only; use a run folder elsewhere (--out)",
    errno.EACCES: "check the permissions of that path (or use another run folder with --out)",
    errno.EPERM: "check the permissions of that path (or use another run folder with --out)",
}


def os_error(exc: OSError, path: Path | str | None = None, *, doing: str | None = None,
             key: str | None = None, run_dir: Path | None = None) -> EdgemmlError:
    """The user-facing error (exit 2) for an OSError: the path it concerns (the error's own, else
    `path`) and the system's words for it. About the run folder: ArtifactError; else InputError."""
    where = exc.filename if exc.filename is not None else path
    text = exc.strerror or str(exc) or type(exc).__name__
    name = errno.errorcode.get(exc.errno or -1)
    if name:
        text = f"{text} ({name})"
    shown = f"{where} -> {exc.filename2}" if exc.filename2 is not None else where
    if shown is None:
        what = f"cannot {doing}" if doing else "file system error"
    else:
        what = f"cannot {doing} {shown}" if doing else f"{shown}"
    cls: type[EdgemmlError] = InputError
    if run_dir is not None and where is not None:
        try:
            Path(os.path.abspath(str(where))).relative_to(os.path.abspath(run_dir))
            cls = ArtifactError
        except ValueError:
            pass
    return cls(f"{what}: {text}", key=key, hint=_HINTS.get(exc.errno or -1))
