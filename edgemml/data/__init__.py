"""Data sources, splits, datasets and the single preprocessing spec.

`preprocess` is importable without torch (it is copied into the deployable bundle); everything that
needs torch lives in `datasets`.
"""

from edgemml.data.datasets import (
    DataSplits,
    ImageDataset,
    data_files,
    load_calibration_folder,
    load_data,
    split_indices,
)
from edgemml.data.grid import save_sample_grid
from edgemml.data.preprocess import load_image, normalize_spec, preprocess_batch, preprocess_image
from edgemml.data.sources import BUILTINS, RawData, load_source

__all__ = [
    "BUILTINS",
    "DataSplits",
    "ImageDataset",
    "RawData",
    "data_files",
    "load_calibration_folder",
    "load_data",
    "load_image",
    "load_source",
    "normalize_spec",
    "preprocess_batch",
    "preprocess_image",
    "save_sample_grid",
    "split_indices",
]
