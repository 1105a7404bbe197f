"""Read a data source into raw uint8 images + integer labels + class names, with user-facing errors.

Sources: an image-folder tree (root/<class>/*.png|jpg), an .npz with x and y (optional classes),
builtin:digits (scikit-learn's bundled optical digits) and builtin:printed-digits (rendered locally).
Images are decoded eagerly so that an unreadable file is reported, by name, before any training starts.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgemml.config import class_name_problem
from edgemml.data.preprocess import IMAGE_EXTENSIONS, load_image
from edgemml.errors import InputError
from edgemml.paths import list_files

BUILTINS = ("builtin:digits", "builtin:printed-digits")


@dataclass
class RawData:
    """Decoded samples of one source. `images` items are uint8 HW (gray), HWC3 (RGB) or HWC4 (RGBA)."""

    images: list[np.ndarray] | np.ndarray
    labels: np.ndarray
    classes: list[str]
    source: str
    files: list[Path] | None = None  # one file per sample (image folders), else None
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)


def is_builtin(source: str) -> bool:
    return source.startswith("builtin:")


def _is_image_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def list_image_folder(root: Path, *, key: str = "data.source") -> dict[str, list[Path]]:
    """{class name: sorted image files} of root/<class>/...; errors for an empty or flat tree."""
    if not root.exists():
        raise InputError(f"data folder not found: {root}", key=key,
                         hint="give an image folder (root/<class>/*.png), an .npz file or builtin:digits")
    if not root.is_dir():
        raise InputError(f"not a folder: {root}", key=key)
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        loose = [p for p in root.iterdir() if _is_image_file(p)]
        msg = (f"{root} holds images directly but no class folders" if loose
               else f"{root} has no class folders")
        raise InputError(msg, file=root, key=key,
                         hint="lay the images out as root/<class name>/*.png, one folder per class")
    out: dict[str, list[Path]] = {}
    for d in class_dirs:
        files = list_files(d, key=key, what="class folder", keep=_is_image_file)
        if not files:
            raise InputError(f"class folder {d} has no images ({', '.join(IMAGE_EXTENSIONS)})",
                             file=d, key=key, hint="add images or remove the empty folder")
        out[d.name] = files
    return out


def _shown(paths: list[str]) -> str:
    return ", ".join(repr(p) for p in paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3
                                                     else "")


def skipped_in_folder(root: Path) -> list[str]:
    """Notes (warnings) on what an image folder holds that is not read, so that nothing is
    dropped silently: hidden class folders, images outside any class folder, hidden images and
    symbolic links that point nowhere."""
    notes: list[str] = []
    try:
        top = sorted(os.listdir(root))
    except OSError:
        return notes
    hidden = [n for n in top if n.startswith(".") and (root / n).is_dir()]
    if hidden:
        notes.append(f"{root}: ignored hidden folders {_shown(hidden)} (names starting with '.')")
    loose = [n for n in top if _is_image_file(root / n)]
    if loose and any((root / n).is_dir() and not n.startswith(".") for n in top):
        notes.append(f"{root}: ignored {len(loose)} image(s) outside the class folders: "
                     f"{_shown(loose)}")
    broken: list[str] = []
    hidden_images: list[str] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not (Path(folder) == root and d.startswith(".")))
        for name in sorted(files):  # a link that points nowhere is listed as a file
            p = Path(folder) / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink() and not p.exists():
                broken.append(rel)
            elif name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS:
                hidden_images.append(rel)
    if broken:
        notes.append(f"{root}: ignored {len(broken)} symbolic link(s) that point nowhere: "
                     f"{_shown(sorted(broken))}")
    if hidden_images:
        notes.append(f"{root}: ignored {len(hidden_images)} hidden image file(s): "
                     f"{_shown(sorted(hidden_images))}")
    return notes


def check_class_names(names: list[str], source: str, *, key: str = "data.source") -> None:
    """Refuse class names that would break labels.txt (one name per line), the sample grid or the
    console: line breaks (U+2028 included), control characters, empty or repeated names."""
    for name in names:
        problem = class_name_problem(name)
        if problem:
            raise InputError(f"class name {name!r} {problem}", file=source, key=key,
                             hint="rename the class folder (or fix the class list) so that every "
                                  "class name is one line of printable text")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError(f"class names {_shown(repeated)} occur more than once", file=source,
                         key=key, hint="give every class a different name")


def read_image_file(path: Path) -> np.ndarray:
    """Decode one file to an uint8 array (L/RGB/RGBA); InputError naming the file if unreadable."""
    try:
        return np.asarray(load_image(path), dtype=np.uint8).copy()
    except ValueError as exc:
        raise InputError(f"unreadable image: {exc}", file=path,
                         hint="replace or delete the file; it is not a valid image") from None


def load_image_folder(root: Path, classes: list[str] | None = None, *,
                      key: str = "data.source") -> RawData:
    """Decode every image of root/<class>/. `classes` (optional) picks and orders the classes."""
    tree = list_image_folder(root, key=key)
    notes: list[str] = skipped_in_folder(root)
    if classes is not None:
        missing = [c for c in classes if c not in tree]
        if missing:
            raise InputError(f"class folder(s) {', '.join(missing)} not found in {root} "
                             f"(found: {', '.join(tree)})", file=root, key="data.classes")
        ignored = [c for c in tree if c not in classes]
        if ignored:
            notes.append(f"ignored class folders not in data.classes: {', '.join(ignored)}")
        names = list(classes)
    else:
        names = list(tree)
    images: list[np.ndarray] = []
    labels: list[int] = []
    files: list[Path] = []
    for label, name in enumerate(names):
        for path in tree[name]:
            images.append(read_image_file(path))
            labels.append(label)
            files.append(path)
    return RawData(images, np.asarray(labels, dtype=np.int64), names, str(root), files, notes)


def _to_uint8(x: np.ndarray, file: Path) -> np.ndarray:
    if x.dtype == np.uint8:
        return x
    if x.dtype == np.bool_:
        return x.astype(np.uint8) * 255
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise InputError(f"x has dtype {x.dtype}; expected uint8 images", file=file, key="x")
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if lo < 0 or hi > 255:
        raise InputError(f"x values span {lo:g}..{hi:g}; expected 0..255 (or 0..1 floats)",
                         file=file, key="x", hint="save x as uint8 images")
    if np.issubdtype(x.dtype, np.floating) and hi <= 1.0:
        x = x * 255.0
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def load_npz(path: Path, classes: list[str] | None = None) -> RawData:
    """x: (N,H,W) | (N,H,W,C) | (N,C,H,W) with C in 1/3/4; y: (N,) integer labels or strings."""
    if not path.is_file():
        raise InputError(f"data file not found: {path}", key="data.source")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except ValueError as exc:
        raise InputError(f"cannot read {path.name}: {exc}", file=path,
                         hint="store plain numeric/string arrays (object arrays need pickle, refused)") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:  # truncated or not a zip
        raise InputError(f"not a readable .npz file ({type(exc).__name__}: {exc})", file=path) from None
    for need in ("x", "y"):
        if need not in arrays:
            raise InputError(f"missing array {need!r} (found: {', '.join(arrays) or 'none'})", file=path,
                             hint="save with np.savez(path, x=images, y=labels, classes=names)")
    x, y = arrays["x"], arrays["y"]
    if x.ndim == 4 and x.shape[-1] not in (1, 3, 4) and x.shape[1] in (1, 3, 4):
        x = x.transpose(0, 2, 3, 1)
    if not (x.ndim == 3 or (x.ndim == 4 and x.shape[-1] in (1, 3, 4))):
        raise InputError(f"x has shape {x.shape}; expected (N,H,W) or (N,H,W,C) with C in 1, 3, 4",
                         file=path, key="x")
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    y = np.asarray(y).reshape(-1)
    if len(y) != len(x):
        raise InputError(f"x has {len(x)} samples but y has {len(y)}", file=path, key="y")
    x = _to_uint8(x, path)
    file_classes = [str(c) for c in arrays["classes"].tolist()] if "classes" in arrays else None
    if y.dtype.kind in ("U", "S"):
        names = file_classes or sorted({str(v) for v in y.tolist()})
        index = {n: i for i, n in enumerate(names)}
        bad = sorted({str(v) for v in y.tolist()} - set(index))
        if bad:
            raise InputError(f"labels {bad[:5]} are not in the class list {names}", file=path, key="y")
        labels = np.asarray([index[str(v)] for v in y.tolist()], dtype=np.int64)
    elif np.issubdtype(y.dtype, np.integer) or (np.issubdtype(y.dtype, np.floating)
                                               and np.all(np.mod(y, 1) == 0)):
        labels = y.astype(np.int64)
        n = len(file_classes) if file_classes is not None else (int(labels.max()) + 1 if len(labels) else 0)
        names = file_classes or [str(i) for i in range(n)]
        bad = labels[(labels < 0) | (labels >= len(names))]
        if len(bad):
            raise InputError(f"labels outside the class list (0..{len(names) - 1}): "
                             f"{sorted(set(bad.tolist()))[:5]}", file=path, key="y",
                             hint="labels must index the classes array")
    else:
        raise InputError(f"y has dtype {y.dtype}; expected integer labels or class-name strings",
                         file=path, key="y")
    return _rename(RawData(x, labels, names, str(path)), classes, path)


def _rename(raw: RawData, classes: list[str] | None, file: Path | str | None) -> RawData:
    """data.classes on a labelled-by-index source gives the names; the count must match."""
    if classes is None:
        return raw
    if len(classes) != len(raw.classes):
        raise InputError(f"data.classes has {len(classes)} names but the source has "
                         f"{len(raw.classes)} classes ({', '.join(raw.classes)})", file=file,
                         key="data.classes")
    raw.classes = list(classes)
    return raw


def load_builtin_digits() -> RawData:
    """scikit-learn's bundled copy of the UCI optical digits test set: 1797 8x8 images, 0..16."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return RawData(images, d.target.astype(np.int64), [str(i) for i in range(10)], "builtin:digits")


def load_builtin(name: str, *, samples: int | None, seed: int, options: dict[str, Any],
                 classes: list[str] | None) -> RawData:
    if name == "builtin:digits":
        if options:
            raise InputError(f"builtin:digits takes no options (got {', '.join(options)})",
                             key="data.options")
        return _rename(load_builtin_digits(), classes, None)
    if name == "builtin:printed-digits":
        from edgemml.data.printed_digits import generate_from_options

        try:
            x, y, names = generate_from_options(samples, seed, options)
        except ValueError as exc:
            raise InputError(str(exc), key="data.options") from None
        return _rename(RawData(x, y, names, name), classes, None)
    raise InputError(f"unknown built-in data source {name!r} (known: {', '.join(BUILTINS)})",
                     key="data.source")


def load_source(source: str, path: Path | None, *, classes: list[str] | None, samples: int | None,
                seed: int, options: dict[str, Any], key: str = "data.source") -> RawData:
    """Dispatch on the source form; `path` is the resolved path for non-builtin sources."""
    if is_builtin(source):
        return load_builtin(source, samples=samples, seed=seed, options=options, classes=classes)
    assert path is not None
    if options:
        raise InputError(f"data.options are not used by file sources (got {', '.join(options)})",
                         key="data.options")
    if path.suffix.lower() == ".npz":
        return load_npz(path, classes)
    if path.is_file():
        raise InputError(f"unsupported data file {path.name}", file=path, key=key,
                         hint="give an image folder (root/<class>/*.png) or an .npz with x and y")
    return load_image_folder(path, classes, key=key)


def source_files(path: Path) -> list[Path]:
    """Files whose bytes define a file source (for cache fingerprints); a device file or a folder
    over the size limits is refused before anything is read (paths.list_files)."""
    if path.is_file():
        return list_files(path, key="data.source")
    return list_files(path, key="data.source", what="data folder", keep=_is_image_file)
