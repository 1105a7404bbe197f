"""`builtin:printed-digits`: digits 0-9 rendered locally with Pillow, RGB, deterministic from a seed.

Why: a colour, non-MNIST dataset that needs no download and no files in the repo, so quickstarts and
tests run offline. Variety comes from fonts (Pillow's default FreeType font and the TTFs matplotlib
bundles: DejaVu, STIX, Computer Modern), sizes, colours, positions, small rotations and backgrounds.
Sample i depends only on (seed, i), so asking for more samples extends the set without changing the
first ones; labels cycle 0..9, so every class has the same count (+-1).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

CLASSES = [str(d) for d in range(10)]

# Fonts whose glyphs for 0-9 are ordinary digits (cmsy/cmex/cmmi map digits to symbols or oldstyle).
_MPL_FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf",
    "cmr10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmb10.ttf", "cmti10.ttf",
)
DEFAULT_FONT = "pillow-default"

_SUPERSAMPLE = 4


def font_dir() -> Path:
    """matplotlib's bundled TTF folder (located without importing pyplot)."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@functools.lru_cache(maxsize=None)
def available_fonts() -> tuple[str, ...]:
    """Font names usable here, in a fixed order (missing matplotlib TTFs are skipped)."""
    names = [DEFAULT_FONT]
    try:
        folder = font_dir()
        names += [n for n in _MPL_FONTS if (folder / n).is_file()]
    except ImportError:  # matplotlib missing: Pillow's default font still works
        pass
    return tuple(names)


@functools.lru_cache(maxsize=512)
def _font(name: str, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if name == DEFAULT_FONT:
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(str(font_dir() / name), size=size)


def _luma(rgb: np.ndarray) -> float:
    return float(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A background and a text colour with clearly different brightness (readable digits)."""
    while True:
        bg = rng.integers(0, 256, 3)
        fg = rng.integers(0, 256, 3)
        if abs(_luma(bg) - _luma(fg)) >= 90:
            return bg, fg


def _background(rng: np.random.Generator, size: int, bg: np.ndarray) -> Image.Image:
    kind = rng.integers(0, 3)
    if kind == 0:  # solid
        arr = np.broadcast_to(bg, (size, size, 3)).astype(np.float32)
    elif kind == 1:  # linear gradient from bg to a nearby colour
        other = np.clip(bg + rng.integers(-60, 61, 3), 0, 255)
        t = np.linspace(0.0, 1.0, size, dtype=np.float32)
        ramp = t[None, :, None] if rng.integers(0, 2) else t[:, None, None]
        arr = bg * (1 - ramp) + other * ramp
        arr = np.broadcast_to(arr, (size, size, 3))
    else:  # low-contrast noise texture
        noise = rng.normal(0.0, 18.0, (size // 4 + 1, size // 4 + 1, 3))
        noise_img = Image.fromarray(np.clip(noise + 128, 0, 255).astype(np.uint8)).resize(
            (size, size), Image.Resampling.BICUBIC)
        arr = bg + (np.asarray(noise_img, dtype=np.float32) - 128)
    return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), mode="RGB")


def render_digit(digit: int, rng: np.random.Generator, *, image_size: int = 32,
                 fonts: tuple[str, ...] | None = None) -> np.ndarray:
    """Render one digit as an (image_size, image_size, 3) uint8 array."""
    fonts = fonts or available_fonts()
    big = image_size * _SUPERSAMPLE
    bg, fg = _colours(rng)
    name = fonts[int(rng.integers(0, len(fonts)))]
    height_frac = float(rng.uniform(0.55, 0.85))
    font = _font(name, max(8, int(round(big * height_frac))))
    angle = float(rng.uniform(-15.0, 15.0))
    dx, dy = rng.uniform(-0.12, 0.12, 2) * big

    # Draw the glyph as a mask centered on its ink bounding box, rotate, then paste with the colour.
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    text = str(digit)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = (big - (right - left)) / 2 - left + dx
    y = (big - (bottom - top)) / 2 - top + dy
    draw.text((x, y), text, fill=255, font=font)
    mask = mask.rotate(angle, resample=Image.Resampling.BICUBIC, center=(big / 2, big / 2))
    canvas = _background(rng, big, bg)
    canvas.paste(Image.new("RGB", (big, big), tuple(int(c) for c in fg)), (0, 0), mask)
    if rng.random() < 0.3:
        canvas = canvas.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 2.0))))
    small = canvas.resize((image_size, image_size), Image.Resampling.LANCZOS)
    return np.asarray(small, dtype=np.uint8).copy()


def generate(samples: int = 2000, seed: int = 0, *, image_size: int = 32,
             fonts: list[str] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Return (images (N, S, S, 3) uint8, labels (N,) int64, class names)."""
    if samples < 1:
        raise ValueError("samples must be >= 1")
    chosen = tuple(fonts) if fonts else available_fonts()
    unknown = [f for f in chosen if f not in available_fonts()]
    if unknown:
        raise ValueError(f"unknown font(s) {', '.join(unknown)}; available: {', '.join(available_fonts())}")
    images = np.empty((samples, image_size, image_size, 3), dtype=np.uint8)
    labels = np.arange(samples, dtype=np.int64) % 10
    for i in range(samples):
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, i])
        images[i] = render_digit(int(labels[i]), rng, image_size=image_size, fonts=chosen)
    return images, labels, list(CLASSES)


def generate_from_options(samples: int | None, seed: int, options: dict[str, Any]) -> tuple[
        np.ndarray, np.ndarray, list[str]]:
    """`data.options` for this source: image_size (default 32), fonts (list of names)."""
    allowed = {"image_size", "fonts"}
    extra = set(options) - allowed
    if extra:
        raise ValueError(f"unknown option(s) {', '.join(sorted(extra))} for builtin:printed-digits "
                         f"(valid: {', '.join(sorted(allowed))})")
    size = int(options.get("image_size", 32))
    if size < 8:
        raise ValueError("image_size must be >= 8")
    return generate(samples or 2000, seed, image_size=size, fonts=options.get("fonts"))
