"""Regenerate calibration_data/digits: 30 native 8x8 PNGs per class from builtin:digits.

Why shipped as files: the quantize stage and the bundle's own self-check need a small, balanced,
license-clear image folder that works offline and exercises the real file -> preprocess path.
The first 30 samples of each class in scikit-learn's order are taken, so the output is deterministic.

    python -m edgemml.data.calibration [--out calibration_data] [--per-class 30]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from edgemml.data.sources import load_builtin_digits

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "calibration_data"


def write_digits(out: Path = DEFAULT_OUT, per_class: int = 30) -> list[Path]:
    """Write out/digits/<class>/NNN.png (grayscale, 8x8, values 0..255) and return the paths."""
    raw = load_builtin_digits()
    images = np.asarray(raw.images)
    written: list[Path] = []
    for label, name in enumerate(raw.classes):
        folder = out / "digits" / name
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.png"):
            stale.unlink()
        for n, i in enumerate(np.flatnonzero(raw.labels == label)[:per_class]):
            path = folder / f"{n:03d}.png"
            Image.fromarray(images[i], mode="L").save(path, format="PNG", optimize=False)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="calibration_data folder")
    parser.add_argument("--per-class", type=int, default=30)
    args = parser.parse_args(argv)
    paths = write_digits(args.out, args.per_class)
    print(f"wrote {len(paths)} images under {args.out / 'digits'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
