"""Which files a data section names (for cache fingerprints), without torch: a cached run lists and
hashes them before deciding that nothing needs to run, so this must not import the dataset code.
"""

from __future__ import annotations

import os
from pathlib import Path

from edgemml.config import DataConfig
from edgemml.data.sources import is_builtin, source_files


def _resolve(path: str | Path, base_dir: Path) -> Path:
    p = Path(os.path.expanduser(str(path)))
    return p if p.is_absolute() else base_dir / p


def _split_path(value: Path, cfg: DataConfig, base_dir: Path) -> Path:
    """A `splits:` path: relative to the pipeline folder, or else to the source folder."""
    direct = _resolve(value, base_dir)
    if direct.exists() or value.is_absolute() or is_builtin(cfg.source):
        return direct
    under_source = _resolve(cfg.source, base_dir) / value
    return under_source if under_source.exists() else direct


def data_files(cfg: DataConfig, base_dir: Path) -> list[Path]:
    """The files whose bytes define the data (cache fingerprints); empty for built-in sources."""
    base_dir = Path(base_dir)
    paths: list[Path] = []
    if cfg.splits:
        for value in cfg.splits.values():
            paths += source_files(_split_path(value, cfg, base_dir))
    elif not is_builtin(cfg.source):
        paths += source_files(_resolve(cfg.source, base_dir))
    if cfg.calibration is not None:
        paths += source_files(_resolve(cfg.calibration, base_dir))
    return sorted(set(paths))
