"""Torch datasets over raw uint8 images, seeded stratified splits, and `load_data` for a DataConfig.

A dataset keeps the raw images and applies, per item, an optional `augment` (PIL -> PIL, set by the
trainer) and then `preprocess_image` with the pipeline's one PreprocessConfig. Because the exported
bundle runs the very same `preprocess_image`, what training saw is what deployment sees.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from edgemml.config import DataConfig, PreprocessConfig, SplitConfig
from edgemml.data.preprocess import normalize_spec, preprocess_image, to_pil
from edgemml.data.sources import (
    RawData,
    check_class_names,
    is_builtin,
    load_image_folder,
    load_source,
)
from edgemml.data.files import _resolve, _split_path, data_files
from edgemml.errors import InputError
from edgemml.paths import list_files

Augment = Callable[[Image.Image], Image.Image]

# Preprocessed tensors of an un-augmented dataset are cached up to this many bytes per dataset.
_CACHE_LIMIT_BYTES = 512 * 1024 * 1024


class ImageDataset(Dataset):
    """Raw uint8 images + int labels; items are (float32 tensor, int label) after preprocessing.

    Label -1 marks an unlabelled image (calibration folders without class subfolders).
    """

    def __init__(self, images: Sequence[np.ndarray] | np.ndarray, labels: Sequence[int] | np.ndarray,
                 classes: list[str], preprocess: PreprocessConfig | dict[str, Any], *,
                 augment: Augment | None = None, files: Sequence[Path] | None = None,
                 name: str = "") -> None:
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(self.images) != len(self.labels):
            raise ValueError("images and labels differ in length")
        self.classes = list(classes)
        spec = preprocess.model_dump(mode="json") if isinstance(preprocess, PreprocessConfig) else preprocess
        self.spec = normalize_spec(spec)
        self.augment = augment
        self.files = list(files) if files is not None else None
        self.name = name
        self._cache: dict[int, torch.Tensor] = {}
        h, w = self.spec["size"]
        per_item = 4 * h * w * (1 if self.spec["channels"] == "gray" else 3)
        self._cache_ok = per_item * max(1, len(self.labels)) <= _CACHE_LIMIT_BYTES

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def targets(self) -> list[int]:
        """torchvision-style alias used by samplers and metrics."""
        return self.labels.tolist()

    def raw_image(self, index: int) -> Image.Image:
        """The stored image as PIL (L, RGB or RGBA), before augmentation and preprocessing."""
        return to_pil(self.images[index])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if index < 0:
            index += len(self)
        if self.augment is None and index in self._cache:
            return self._cache[index], int(self.labels[index])
        try:
            img = self.raw_image(index)
            if self.augment is not None:
                img = self.augment(img)
            x = torch.from_numpy(preprocess_image(img, self.spec))
        except ValueError as exc:
            where = self.files[index] if self.files else f"{self.name or 'dataset'} item {index}"
            raise InputError(f"cannot preprocess image: {exc}", file=where) from None
        if self.augment is None and self._cache_ok:
            self._cache[index] = x
        return x, int(self.labels[index])

    def subset(self, indices: Sequence[int] | np.ndarray, name: str | None = None) -> ImageDataset:
        """A new dataset over the given items (same classes, spec and augment)."""
        idx = np.asarray(indices, dtype=np.int64)
        if isinstance(self.images, np.ndarray):
            images: Any = self.images[idx]
        else:
            images = [self.images[i] for i in idx.tolist()]
        files = [self.files[i] for i in idx.tolist()] if self.files is not None else None
        return ImageDataset(images, self.labels[idx], self.classes, self.spec, augment=self.augment,
                            files=files, name=name or self.name)

    def with_augment(self, augment: Augment | None) -> ImageDataset:
        """The same samples with another augmentation (the trainer passes its random transforms)."""
        ds = self.subset(np.arange(len(self)))
        ds.augment = augment
        return ds

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels[self.labels >= 0], minlength=len(self.classes))
        return {c: int(n) for c, n in zip(self.classes, counts)}


@dataclass
class DataSplits:
    """The train/val/test datasets of one DataConfig (val/test may be empty) and their class names."""

    train: ImageDataset
    val: ImageDataset
    test: ImageDataset
    classes: list[str]
    source: str
    calibration_set: ImageDataset | None = None
    notes: list[str] = field(default_factory=list)

    def split(self, name: str) -> ImageDataset:
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r}; use train, val or test")
        return getattr(self, name)

    def with_augment(self, split: str, augment: Augment | None) -> ImageDataset:
        return self.split(split).with_augment(augment)

    @property
    def calibration(self) -> ImageDataset:
        """data.calibration images if configured, else the train split (never augmented)."""
        return self.calibration_set if self.calibration_set is not None else self.train

    def summary(self) -> dict[str, Any]:
        return {"source": self.source, "classes": self.classes,
                "sizes": {s: len(self.split(s)) for s in ("train", "val", "test")}}


# ----------------------------------------------------------------------------------------------
# Splitting
# ----------------------------------------------------------------------------------------------


def _round(x: float) -> int:
    return int(np.floor(x + 0.5))  # half up, not Python's banker's rounding


def _allocate(counts: np.ndarray, total: int, cap: np.ndarray | None = None) -> np.ndarray:
    """Split `total` over classes proportionally to counts (largest remainder), each <= cap."""
    cap = counts if cap is None else cap
    if counts.sum() == 0 or total <= 0:
        return np.zeros(len(counts), np.int64)
    quota = counts * (total / counts.sum())
    take = np.minimum(np.floor(quota).astype(np.int64), cap)
    order = np.argsort(-(quota - np.floor(quota)), kind="stable")
    for i in order:
        if take.sum() >= total:
            break
        if take[i] < cap[i]:
            take[i] += 1
    return take


def split_indices(labels: np.ndarray, split: SplitConfig, seed: int) -> dict[str, np.ndarray]:
    """Seeded train/val/test index arrays.

    Split sizes are round(N * fraction) for val and test (train gets the rest); with stratify each
    class contributes proportionally (largest remainder, so per-class counts are within 1 of exact).

    Not scikit-learn's train_test_split(stratify=...): it refuses a class with a single sample
    ("The least populated class in y has only 1 member") and a test split smaller than the number
    of classes, both of which real folders of images hit (a rare class; `test: 0.01` of a
    100-class set), where this allocation simply gives such a class no val/test sample.
    """
    rng = np.random.default_rng(seed)
    n = len(labels)
    if split.stratify:
        classes, counts = np.unique(labels, return_counts=True)
        groups = [np.flatnonzero(labels == c) for c in classes]
    else:
        counts, groups = np.asarray([n]), [np.arange(n)]
    n_val = _allocate(counts, _round(n * split.val))
    n_test = _allocate(counts, min(_round(n * split.test), n - int(n_val.sum())), counts - n_val)
    out: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for group, v, t in zip(groups, n_val, n_test):
        perm = rng.permutation(group)
        n_train = len(perm) - v - t
        out["train"].append(perm[:n_train])
        out["val"].append(perm[n_train:n_train + v])
        out["test"].append(perm[n_train + v:])
    return {k: np.sort(np.concatenate(v)) if v else np.zeros(0, np.int64) for k, v in out.items()}


def per_class_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Seeded choice of at most `per_class` indices of each class (sorted)."""
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


def stratified_sample(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Seeded subset of exactly n indices keeping class proportions (data.samples on file sources)."""
    if n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    take = _allocate(counts, n)
    keep = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(keep))


# ----------------------------------------------------------------------------------------------
# load_data
# ----------------------------------------------------------------------------------------------


def _dataset(raw: RawData, idx: np.ndarray | None, spec: dict[str, Any], name: str) -> ImageDataset:
    ds = ImageDataset(raw.images, raw.labels, raw.classes, spec, files=raw.files, name=name)
    return ds if idx is None else ds.subset(idx, name)


def _remap(raw: RawData, classes: list[str]) -> RawData:
    index = {c: i for i, c in enumerate(classes)}
    labels = np.asarray([index[raw.classes[i]] for i in raw.labels.tolist()], dtype=np.int64)
    return RawData(raw.images, labels, classes, raw.source, raw.files, raw.notes)


def _load_explicit_splits(cfg: DataConfig, spec: dict[str, Any], seed: int,
                          base_dir: Path) -> tuple[dict[str, ImageDataset], list[str], list[str]]:
    assert cfg.splits is not None
    raws: dict[str, RawData] = {}
    for name, value in cfg.splits.items():
        path = _split_path(value, cfg, base_dir)
        raws[name] = load_source(str(path), path, classes=None, samples=None, seed=seed,
                                 options={}, key=f"data.splits.{name}")
    if "train" not in raws:
        raise InputError("data.splits needs at least a train folder", key="data.splits")
    if cfg.classes is not None:
        classes = list(cfg.classes)
    elif all(Path(r.source).is_dir() for r in raws.values()):
        classes = sorted({c for r in raws.values() for c in r.classes})  # image folders: by name
    else:
        classes = []
        for name in ("train", "val", "test"):
            for c in raws.get(name, RawData([], np.zeros(0), [], "")).classes:
                if c not in classes:
                    classes.append(c)
    notes: list[str] = []
    out: dict[str, ImageDataset] = {}
    for name, raw in raws.items():
        unknown = [c for c in raw.classes if c not in classes]
        if unknown:
            raise InputError(f"split {name} has classes {', '.join(unknown)} that are not in "
                             f"data.classes ({', '.join(classes)})", key=f"data.splits.{name}")
        out[name] = _dataset(_remap(raw, classes), None, spec, name)
        notes += raw.notes
    empty = ImageDataset(np.zeros((0, 1, 1), np.uint8), [], classes, spec)
    for name in ("train", "val", "test"):
        out.setdefault(name, empty.subset([], name))
    return out, classes, notes


def load_data(cfg: DataConfig, preprocess: PreprocessConfig, *, seed: int, base_dir: Path) -> DataSplits:
    """Load, split and wrap the data of a DataConfig. Relative paths resolve against base_dir."""
    spec = preprocess.model_dump(mode="json")
    base_dir = Path(base_dir)
    notes: list[str] = []
    if cfg.splits:
        sets, classes, notes = _load_explicit_splits(cfg, spec, seed, base_dir)
        if cfg.samples is not None:
            for name, ds in sets.items():
                sets[name] = ds.subset(stratified_sample(ds.labels, cfg.samples, seed), name)
    else:
        path = None if is_builtin(cfg.source) else _resolve(cfg.source, base_dir)
        raw = load_source(cfg.source, path, classes=cfg.classes, samples=cfg.samples, seed=seed,
                          options=dict(cfg.options))
        notes += raw.notes
        classes = raw.classes
        full = _dataset(raw, None, spec, "all")
        generated = cfg.source == "builtin:printed-digits"  # samples = how many to render
        if cfg.samples is not None and not generated and cfg.samples < len(full):
            full = full.subset(stratified_sample(full.labels, cfg.samples, seed), "all")
        idx = split_indices(full.labels, cfg.split, seed)
        sets = {name: full.subset(idx[name], name) for name in ("train", "val", "test")}
    if cfg.train_per_class is not None:
        train = sets["train"]
        keep = per_class_subset(train.labels, cfg.train_per_class, seed)
        short = [c for c, n in train.class_counts().items() if n < cfg.train_per_class]
        if short:
            notes.append(f"train_per_class={cfg.train_per_class}: classes with fewer training "
                         f"samples kept all of them: {', '.join(short)}")
        sets["train"] = train.subset(keep, "train")
    _check_classes(classes, sets["train"], cfg.source, notes)
    if len(sets["train"]) == 0:
        raise InputError(f"the train split of {cfg.source} is empty", key="data.split.train",
                         hint="raise data.split.train or add samples")
    calib = None
    if cfg.calibration is not None:
        calib = load_calibration_folder(_resolve(cfg.calibration, base_dir), classes, spec)
    return DataSplits(sets["train"], sets["val"], sets["test"], list(classes),
                      cfg.source, calib, notes)


def _check_classes(classes: list[str], train: ImageDataset, source: str, notes: list[str]) -> None:
    """A classifier needs two classes or more, each one a line of printable text; classes
    without a training sample are worth a warning (the model can never learn them)."""
    check_class_names(list(classes), source)
    if len(classes) < 2:
        raise InputError(f"{source} has {len(classes)} class ({', '.join(map(repr, classes))}); a "
                         f"classifier needs at least 2 (its accuracy would be 100 % by "
                         f"construction)", key="data.source",
                         hint="lay the images out as root/<class name>/*.png with a folder per class")
    empty = [c for c, n in train.class_counts().items() if n == 0]
    if empty and len(train):
        notes.append(f"classes without any training sample (the model cannot learn them): "
                     f"{', '.join(map(repr, empty[:10]))}{' ...' if len(empty) > 10 else ''}")


def load_calibration_folder(folder: Path, classes: list[str], spec: dict[str, Any]) -> ImageDataset:
    """Images of a calibration folder: root/<class>/* (labelled when names match) or flat (label -1)."""
    from edgemml.data.sources import _is_image_file, read_image_file

    if not folder.is_dir():
        raise InputError(f"calibration folder not found: {folder}", key="data.calibration")
    files = list_files(folder, key="data.calibration", what="calibration folder",
                       keep=_is_image_file)
    if not files:
        raise InputError(f"calibration folder {folder} has no images", key="data.calibration")
    index = {c: i for i, c in enumerate(classes)}
    labels = [index.get(p.parent.name, -1) if p.parent != folder else -1 for p in files]
    images = [read_image_file(p) for p in files]
    return ImageDataset(images, labels, classes, spec, files=files, name="calibration")


def evenly_spaced(n_total: int, n: int) -> np.ndarray:
    """n indices spread over range(n_total) (deterministic; covers every class of a sorted split)."""
    if n >= n_total:
        return np.arange(n_total)
    return np.unique(np.linspace(0, n_total - 1, n).round().astype(np.int64))


def as_arrays(dataset: Any, indices: Sequence[int] | np.ndarray | None = None) -> tuple[
        np.ndarray, np.ndarray]:
    """(inputs [N, ...] float32, labels [N] int64) of a dataset's items through its own
    preprocessing: all of them, or `indices` (an index past the end wraps around, so a small split
    still fills a latency batch of real samples)."""
    n = len(dataset)
    order = range(n) if indices is None else [int(i) % max(n, 1) for i in indices]
    xs, ys = [], []
    for i in order:
        x, y = dataset[i]
        xs.append(np.asarray(x, dtype=np.float32))
        ys.append(int(y))
    if not xs:
        return np.zeros((0,), np.float32), np.zeros((0,), np.int64)
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


__all__ = ["DataSplits", "ImageDataset", "as_arrays", "data_files", "evenly_spaced", "load_calibration_folder", "load_data",
           "load_image_folder", "per_class_subset", "split_indices", "stratified_sample"]
