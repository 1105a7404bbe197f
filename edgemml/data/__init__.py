"""Data sources, splits, datasets and the single preprocessing spec.

`preprocess` is importable without torch (it is copied into the deployable bundle); everything that
needs torch lives in `datasets`. The names below are loaded on first use (PEP 562): a cached run
reads `edgemml.data.files` only, and importing the package must not import torch for it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgemml.data.datasets import (DataSplits, ImageDataset, load_calibration_folder,
                                       load_data, split_indices)
    from edgemml.data.files import data_files
    from edgemml.data.grid import save_sample_grid
    from edgemml.data.preprocess import (load_image, normalize_spec, preprocess_batch,
                                         preprocess_image)
    from edgemml.data.sources import BUILTINS, RawData, load_source

_WHERE = {
    "DataSplits": "datasets", "ImageDataset": "datasets", "load_calibration_folder": "datasets",
    "load_data": "datasets", "split_indices": "datasets", "data_files": "files",
    "save_sample_grid": "grid", "load_image": "preprocess", "normalize_spec": "preprocess",
    "preprocess_batch": "preprocess", "preprocess_image": "preprocess", "BUILTINS": "sources",
    "RawData": "sources", "load_source": "sources",
}

__all__ = ["BUILTINS", "DataSplits", "ImageDataset", "RawData", "data_files",
           "load_calibration_folder", "load_data", "load_image", "load_source", "normalize_spec",
           "preprocess_batch", "preprocess_image", "save_sample_grid", "split_indices"]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'edgemml.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"edgemml.data.{module}"), name)
