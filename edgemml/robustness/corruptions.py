"""Common corruptions at fixed severities: Hendrycks & Dietterich (ICLR 2019), five of them.

The formulas and per-severity constants of `make_imagenet_c.py` (224-px images, applied after
Resize(256) + CenterCrop(224), i.e. at the network's input size) and `make_cifar_c.py` (32 px),
implemented with numpy, scipy.ndimage and Pillow. Why not the `imagecorruptions` package (1.1.2,
2020): importing it needs opencv-python (72 MB) even for these five, its gaussian_blur raises a
TypeError with scikit-image >= 0.19 (`multichannel` was removed), and its noise uses numpy's global
random state (no per-call seed); its maintained fork adds numba and llvmlite on top. Equality with
the reference formulas (skimage's gaussian and HSV round trip, Pillow's JPEG) is tested in
tests/unit/test_robustness.py.

Operates on uint8 batches (N, H, W, C), C = 1 or 3; edgemml.robustness turns them into model inputs.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np

__all__ = ["AUTO_TABLE_MAX_SIDE", "CORRUPTIONS", "DEFAULT_TABLE", "SEVERITY_TABLES", "corrupt",
           "resolve_table"]

CORRUPTIONS = ("gaussian_noise", "gaussian_blur", "brightness", "contrast", "jpeg")

#: Per-severity constants (severity 1..5), copied from Hendrycks' make_imagenet_c.py (224 px) and
#: make_cifar_c.py (32 px). gaussian_noise: std of additive noise on [0,1]; gaussian_blur: sigma in
#: pixels; brightness: added to HSV value; contrast: factor towards the per-channel mean; jpeg:
#: Pillow quality.
SEVERITY_TABLES: dict[str, dict[str, tuple[float, ...]]] = {
    "imagenet-c": {
        "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
        "gaussian_blur": (1, 2, 3, 4, 6),
        "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
        "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
        "jpeg": (25, 18, 15, 10, 7),
    },
    "cifar-10-c": {
        "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
        "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
        "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
        "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
        "jpeg": (80, 65, 58, 50, 40),
    },
}
#: The default is imagenet-c at every size: on the quickstart's 32-px digits it spans mild (severity
#: 1) to destroyed (severity 5) for all five corruptions, while the cifar-10-c constants left blur
#: and jpeg flat there (blur 95.5 -> 95.5 %, jpeg 95.3 -> 94.7 % from severity 1 to 5, measured on
#: the quickstart's reference). `table="auto"` picks cifar-10-c below this
#: shorter image side, for users who want CIFAR-10-C's calibration on small natural images.
DEFAULT_TABLE = "imagenet-c"
AUTO_TABLE_MAX_SIDE = 96


def resolve_table(table: str, shape: tuple[int, ...]) -> str:
    if table == "auto":
        return "cifar-10-c" if min(shape[1], shape[2]) < AUTO_TABLE_MAX_SIDE else "imagenet-c"
    if table not in SEVERITY_TABLES:
        raise ValueError(f"unknown corruption table {table!r} ({', '.join(SEVERITY_TABLES)}, auto)")
    return table


def _brightness(x: np.ndarray, c: float) -> np.ndarray:
    """HSV value + c, hue and saturation kept: skimage's rgb2hsv -> hsv2rgb round trip in closed
    form (every channel scales with V = max channel); grey images: the value itself."""
    if x.shape[-1] == 1:
        return np.clip(x + c, 0, 1)
    v = x.max(axis=-1, keepdims=True)
    v_new = np.clip(v + c, 0, 1)
    safe = np.where(v > 0, v, 1.0)
    return np.where(v > 0, x * (v_new / safe), v_new)


def _jpeg(images: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    out = np.empty_like(images)
    for i, img in enumerate(images):
        gray = img.shape[-1] == 1
        pil = Image.fromarray(img[..., 0] if gray else img, mode="L" if gray else "RGB")
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        with Image.open(buf) as dec:
            arr = np.asarray(dec.convert("L" if gray else "RGB"))
        out[i] = arr[..., None] if gray else arr
    return out


def corrupt(images: np.ndarray, name: str, severity: int, *, table: str = DEFAULT_TABLE,
            seed: int | Sequence[int] = 0) -> np.ndarray:
    """Corrupt a batch of 8-bit images (N, H, W, C), C = 1 or 3; returns uint8 of the same shape.

    Hendrycks' formulas; results are cast to uint8 by truncation as `np.uint8(corruption(x))` does
    in make_imagenet_c.py. gaussian_noise draws from numpy's PCG64 seeded with (seed..., corruption,
    severity): the same images and seed give the same noise on every run and every machine.
    """
    from scipy.ndimage import gaussian_filter

    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r} (one of {', '.join(CORRUPTIONS)})")
    if not 1 <= int(severity) <= 5:
        raise ValueError(f"severity must be 1..5, got {severity!r}")
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images (N, H, W, 1|3), got {images.dtype} {images.shape}")
    c = SEVERITY_TABLES[resolve_table(table, images.shape)][name][int(severity) - 1]
    if name == "jpeg":
        return _jpeg(images, int(c))
    x = images.astype(np.float64) / 255.0
    if name == "gaussian_noise":
        seeds = [int(s) for s in (seed if isinstance(seed, Sequence) else [seed])]
        rng = np.random.default_rng([*seeds, CORRUPTIONS.index(name), int(severity)])
        x = np.clip(x + rng.normal(size=x.shape, scale=c), 0, 1)
    elif name == "gaussian_blur":
        # skimage.filters.gaussian(..., channel_axis=-1): scipy with mode='nearest', truncate=4
        x = np.clip(gaussian_filter(x, sigma=(0, c, c, 0), mode="nearest", truncate=4.0), 0, 1)
    elif name == "brightness":
        x = _brightness(x, c)
    else:  # contrast
        means = x.mean(axis=(1, 2), keepdims=True)
        x = np.clip((x - means) * c + means, 0, 1)
    return (x * 255).astype(np.uint8)
