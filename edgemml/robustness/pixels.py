"""Model inputs <-> the [0, 1] pixels they were made from, per edgemml's one preprocessing spec.

Attack budgets (eps) are in pixel units after resize and before normalisation (1/255 = one grey
level), whatever mean/std the model uses, and corruptions act on the 8-bit image at the model's
input resolution. Both need the affine map the bundle's preprocess.py applies; this module reads it
from the same spec (gray/rgb/bgr, per-channel mean/std, NCHW/NHWC), so `to_inputs(to_pixels(x)) ==
x` and the 8-bit images behind validate's inputs are recovered exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal, Mapping

import numpy as np


def eps_label(eps: float) -> str:
    """4/255 rather than 0.0156862745: budgets are read in grey levels."""
    levels = eps * 255
    if abs(levels - round(levels)) < 1e-6:
        return f"{round(levels)}/255"
    return f"{float(Fraction(eps).limit_denominator(255 * 64)):.6g}"


@dataclass(frozen=True)
class PixelSpace:
    """How model inputs relate to [0, 1] pixels: x = (pixel - mean) / std per channel. Pixel
    batches keep the model's layout (only the affine map differs)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int
    layout: Literal["NCHW", "NHWC"] = "NCHW"

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> PixelSpace:
        from edgemml.data.preprocess import normalize_spec

        s = normalize_spec(spec)
        n = 1 if s["channels"] == "gray" else 3
        mean = [float(v) for v in s["mean"]] * (n if len(s["mean"]) == 1 else 1)
        std = [float(v) for v in s["std"]] * (n if len(s["std"]) == 1 else 1)
        return cls(tuple(mean), tuple(std), n, s["layout"])

    def _shape(self) -> tuple[int, ...]:
        return (1, self.channels, 1, 1) if self.layout == "NCHW" else (1, 1, 1, self.channels)

    def stats(self, like: Any = None) -> tuple[Any, Any]:
        """(mean, std) broadcastable over a batch: numpy, or torch tensors when `like` is one."""
        mean = np.asarray(self.mean, np.float32).reshape(self._shape())
        std = np.asarray(self.std, np.float32).reshape(self._shape())
        if like is not None and not isinstance(like, np.ndarray):
            import torch

            return torch.from_numpy(mean).to(like.device), torch.from_numpy(std).to(like.device)
        return mean, std

    def to_pixels(self, x: Any) -> Any:
        mean, std = self.stats(x)
        return x * std + mean

    def to_inputs(self, pixels: Any) -> Any:
        mean, std = self.stats(pixels)
        out = (pixels - mean) / std
        return out.astype(np.float32) if isinstance(out, np.ndarray) else out

    def to_uint8_nhwc(self, x: np.ndarray) -> np.ndarray:
        """Model inputs -> the 8-bit images they came from (N, H, W, C), exactly when they did."""
        pixels = self.to_pixels(np.asarray(x, np.float32))
        if self.layout == "NCHW":
            pixels = pixels.transpose(0, 2, 3, 1)
        return np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)

    def from_uint8_nhwc(self, images: np.ndarray) -> np.ndarray:
        pixels = images.astype(np.float32) / np.float32(255.0)
        if self.layout == "NCHW":
            pixels = pixels.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(self.to_inputs(pixels), dtype=np.float32)

    def on_8bit_grid(self, x: np.ndarray, tol: float = 1e-3) -> bool:
        """Do these inputs come from 8-bit images (so attacks can snap back to that grid)?"""
        pixels = self.to_pixels(np.asarray(x, np.float32)) * 255.0
        return bool(np.abs(pixels - np.rint(pixels)).max(initial=0.0) < tol * 255.0)
