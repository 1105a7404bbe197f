"""The one image -> input-tensor transform, shared by training, calibration, validation and the bundle.

This file imports ONLY numpy and Pillow on purpose: it is copied verbatim into the deployable bundle next
to a predict.py that has neither torch nor edgemml. Training (the Dataset), calibration, validation and
deployment all call `preprocess_image` with the same `spec`, so the model sees identical numbers
everywhere; any divergence here would be a silent accuracy loss after export.

`spec` is a plain dict (the JSON form of edgemml.config.PreprocessConfig):
    size: [height, width]            resize: stretch | shorter_center_crop | letterbox
    interpolation: nearest | bilinear | bicubic
    channels: gray | rgb | bgr       mean / std: 1 value or one per channel (applied after /255)
    layout: NCHW | NHWC (the result has no batch dim: CHW or HWC)       dtype: float32
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Union

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "DEFAULT_SPEC",
    "IMAGE_EXTENSIONS",
    "load_image",
    "normalize_mode",
    "normalize_spec",
    "preprocess_batch",
    "preprocess_image",
    "to_pil",
]

ImageLike = Union[Image.Image, np.ndarray]

DEFAULT_SPEC: dict[str, Any] = {
    "size": [32, 32],
    "resize": "stretch",
    "interpolation": "bilinear",
    "channels": "rgb",
    "mean": [0.5],
    "std": [0.5],
    "layout": "NCHW",
    "dtype": "float32",
}

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


def normalize_spec(spec: Mapping[str, Any] | None) -> dict[str, Any]:
    """Fill defaults and check values, so a typo in a bundle's preprocess.json fails loudly."""
    out = dict(DEFAULT_SPEC)
    for key, value in dict(spec or {}).items():
        if key not in DEFAULT_SPEC:
            raise ValueError(f"unknown preprocess key {key!r} (valid: {', '.join(DEFAULT_SPEC)})")
        out[key] = value
    size = out["size"]
    if isinstance(size, int):
        size = [size, size]
    size = [int(s) for s in size]
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"preprocess size must be [height, width] > 0, got {out['size']!r}")
    out["size"] = size
    for key, allowed in (("resize", ("stretch", "shorter_center_crop", "letterbox")),
                         ("interpolation", tuple(_RESAMPLE)), ("channels", ("gray", "rgb", "bgr")),
                         ("layout", ("NCHW", "NHWC")), ("dtype", ("float32",))):
        if out[key] not in allowed:
            raise ValueError(f"preprocess {key} must be one of {', '.join(allowed)}, got {out[key]!r}")
    n = 1 if out["channels"] == "gray" else 3
    for key in ("mean", "std"):
        values = out[key]
        values = [float(values)] if isinstance(values, (int, float)) else [float(v) for v in values]
        if len(values) not in (1, n):
            raise ValueError(f"preprocess {key} needs 1 or {n} values for channels={out['channels']}")
        out[key] = values
    if any(s <= 0 for s in out["std"]):
        raise ValueError("preprocess std values must be > 0")
    return out


def normalize_mode(img: Image.Image) -> Image.Image:
    """Bring any decoded image to L, RGB or RGBA (8 bit), the only modes the pipeline stores.

    Palette, 1-bit, 16-bit and CMYK files are converted the same way wherever they are read, so the
    training set and the deployed predictor agree on pixel values.
    """
    mode = img.mode
    if mode in ("L", "RGB", "RGBA"):
        return img
    if mode == "P":
        return img.convert("RGBA" if "transparency" in img.info else "RGB")
    if mode in ("1", "LA"):
        return img.convert("L")
    if mode in ("PA", "RGBa", "La"):
        return img.convert("RGBA")
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        scale = 65535.0 if (mode.startswith("I;16") or (mode == "I" and arr.max(initial=0) > 255)) else (
            1.0 if mode == "F" and arr.max(initial=0) <= 1.0 else 255.0)
        arr = np.clip(np.round(arr / scale * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L")
    return img.convert("RGB")  # CMYK, YCbCr, LAB, HSV, ...


def load_image(path: str | Path) -> Image.Image:
    """Decode an image file exactly as training did: EXIF orientation applied, mode normalized.

    Raises ValueError naming the file when it cannot be decoded (callers turn it into a user error).
    """
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            return normalize_mode(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{path}: not a readable image ({exc})") from None


def to_pil(img: ImageLike) -> Image.Image:
    """An uint8 array (HW, HWC with C in 1/3/4) or a PIL image -> PIL image in L, RGB or RGBA."""
    if isinstance(img, Image.Image):
        return normalize_mode(img)
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        if arr.dtype == np.bool_:
            arr = arr.astype(np.uint8) * 255
        else:
            raise ValueError(f"image arrays must be uint8 (0..255), got dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(arr), mode="L")
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        return Image.fromarray(np.ascontiguousarray(arr), mode="RGB" if arr.shape[2] == 3 else "RGBA")
    raise ValueError(
        f"cannot interpret an array of shape {tuple(arr.shape)} as an image; expected HxW (gray), "
        f"HxWx3 (RGB) or HxWx4 (RGBA)")


def _resize(img: Image.Image, height: int, width: int, mode: str, resample: int) -> Image.Image:
    w0, h0 = img.size
    if mode == "stretch":
        return img if (w0, h0) == (width, height) else img.resize((width, height), resample)
    if mode == "shorter_center_crop":
        scale = max(height / h0, width / w0)
        nw, nh = max(width, round(w0 * scale)), max(height, round(h0 * scale))
        if (nw, nh) != (w0, h0):
            img = img.resize((nw, nh), resample)
        left, top = (nw - width) // 2, (nh - height) // 2
        return img.crop((left, top, left + width, top + height))
    # letterbox: fit inside, pad with zeros (black), image centered
    scale = min(height / h0, width / w0)
    nw, nh = max(1, min(width, round(w0 * scale))), max(1, min(height, round(h0 * scale)))
    if (nw, nh) != (w0, h0):
        img = img.resize((nw, nh), resample)
    canvas = Image.new(img.mode, (width, height))
    canvas.paste(img, ((width - nw) // 2, (height - nh) // 2))
    return canvas


def preprocess_image(img: ImageLike, spec: Mapping[str, Any]) -> np.ndarray:
    """One image -> float32 array, CHW (layout NCHW) or HWC (layout NHWC), no batch dimension.

    Order: channel conversion (gray/RGB; RGBA and gray convert to RGB, RGB converts to gray),
    resize, scale to [0, 1], BGR swap if asked, (x - mean) / std, layout.
    """
    s = normalize_spec(spec)
    pil = to_pil(img)
    pil = pil.convert("L") if s["channels"] == "gray" else pil.convert("RGB")
    height, width = s["size"]
    pil = _resize(pil, height, width, s["resize"], _RESAMPLE[s["interpolation"]])
    arr = np.asarray(pil, dtype=np.float32) / np.float32(255.0)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if s["channels"] == "bgr":
        arr = arr[:, :, ::-1]
    mean = np.asarray(s["mean"], dtype=np.float32)
    std = np.asarray(s["std"], dtype=np.float32)
    arr = (arr - mean) / std
    if s["layout"] == "NCHW":
        arr = arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr, dtype=np.float32)


def preprocess_batch(images: Iterable[ImageLike], spec: Mapping[str, Any]) -> np.ndarray:
    """Several images -> one float32 batch (N, C, H, W) or (N, H, W, C)."""
    s = normalize_spec(spec)
    arrays = [preprocess_image(img, s) for img in images]
    if not arrays:
        c = 1 if s["channels"] == "gray" else 3
        h, w = s["size"]
        shape = (0, c, h, w) if s["layout"] == "NCHW" else (0, h, w, c)
        return np.zeros(shape, dtype=np.float32)
    return np.stack(arrays).astype(np.float32, copy=False)
