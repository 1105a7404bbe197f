"""Hostile and awkward inputs for the bundle's predict.py (tests/stages/test_predict_security.py).

good/   images predict.py must classify: odd modes (RGBA, CMYK, 16-bit, palette, LA, 1-bit, float
        TIFF), EXIF rotation, 1x1 and 4000x1, names with spaces, unicode, a newline, invalid UTF-8
bad/    one file per failure kind, and the word its `error: FILE: reason` line must contain
links/  symlink loops (file and folder) and a dangling link
many/   N small PNGs in nested folders

Everything is made with Pillow/zlib in a second and is tiny on disk: the decompression bombs only
*claim* huge sizes in their headers (Pillow refuses them at open, before decoding).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header says width x height (8-bit gray) with a tiny, incomplete IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + _png_chunk(b"IEND", b""))


def png_with_ztxt_bomb() -> bytes:
    """A valid 8x8 PNG with a zTXt chunk that inflates to 64 MB (Pillow caps text chunks)."""
    buf = io.BytesIO()
    Image.new("L", (8, 8), 128).save(buf, format="PNG")
    data = buf.getvalue()
    ztxt = b"Comment\x00\x00" + zlib.compress(b"A" * (64 << 20), 9)
    at = data.index(b"IDAT") - 4
    return data[:at] + _png_chunk(b"zTXt", ztxt) + data[at:]


def png_wrong_channels() -> bytes:
    """A PNG whose header says RGBA but whose pixel data was written for a gray image."""
    ihdr = struct.pack(">IIBBBBB", 16, 16, 8, 6, 0, 0, 0)
    rows = b"".join(b"\x00" + bytes(range(16)) for _ in range(16))
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(rows)) + _png_chunk(b"IEND", b""))


def digit(size: int = 32, value: int = 7, seed: int = 0) -> np.ndarray:
    """A stroke on a dark background, so classifying it is not a degenerate all-zero input."""
    rng = np.random.default_rng(seed + value)
    img = np.zeros((size, size), np.uint8)
    img[size // 4: 3 * size // 4, size // 2 - 2: size // 2 + 2] = 255
    return np.clip(img.astype(int) + rng.integers(0, 20, img.shape), 0, 255).astype(np.uint8)


def good(out: Path) -> list[str]:
    out.mkdir(parents=True)
    g = digit()
    rgb = np.stack([g, g // 2, g], axis=-1)
    Image.fromarray(g).save(out / "gray.png")
    Image.fromarray(rgb).save(out / "rgb.jpg", quality=90)
    Image.fromarray(np.dstack([rgb, np.full_like(g, 200)])).save(out / "rgba.png")
    Image.fromarray(rgb).convert("CMYK").save(out / "cmyk.jpg")
    Image.fromarray(g.astype(np.uint16) * 257).save(out / "gray16.png")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(out / "palette.png")
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE)
    pal.save(out / "palette_transparent.png", transparency=0)
    Image.fromarray(g).convert("LA").save(out / "gray_alpha.png")
    Image.fromarray(g).convert("1").save(out / "bilevel.png")
    Image.fromarray(g.astype(np.float32) / 255.0).save(out / "float.tiff")
    Image.fromarray(g).save(out / "one.bmp")
    Image.fromarray(g).save(out / "animated.gif", save_all=True,
                            append_images=[Image.fromarray(255 - g)])
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    Image.fromarray(rgb).save(out / "exif_rotated.jpg", exif=exif)
    Image.new("L", (1, 1), 200).save(out / "one_pixel.png")
    Image.new("L", (4000, 1), 200).save(out / "long_strip.png")
    Image.fromarray(g).save(out / "UPPER.PNG")
    Image.fromarray(g).save(out / "space and ünïcode.png")
    Image.fromarray(g).save(out / "new\nline.png")
    Image.fromarray(g).save(os.fsencode(out) + b"/bad-utf8-\xff.png")
    return sorted(os.listdir(out))


def bad(out: Path) -> dict[str, str]:
    """file name -> a word its error line must contain."""
    out.mkdir(parents=True)
    cases: dict[str, str] = {}

    def add(name: str, data: bytes, word: str) -> None:
        (out / name).write_bytes(data)
        cases[name] = word

    add("bomb_error.png", png_claiming(100_000, 100_000), "decompression bomb")
    add("bomb_warning.png", png_claiming(10_000, 10_000), "decompression bomb")  # 100 > 89 Mpx
    add("ztxt_bomb.png", png_with_ztxt_bomb(), "not a readable image")
    add("wrong_channels.png", png_wrong_channels(), "not a readable image")
    buf = io.BytesIO()
    Image.fromarray(digit(256)).save(buf, format="PNG")
    add("truncated.png", buf.getvalue()[: len(buf.getvalue()) // 2], "truncated")
    buf = io.BytesIO()
    Image.fromarray(np.stack([digit(256)] * 3, -1)).save(buf, format="JPEG", quality=95)
    add("truncated.jpg", buf.getvalue()[: len(buf.getvalue()) // 3], "truncated")
    add("text.png", b"this is not an image\n" * 10, "not an image")
    add("empty.jpg", b"", "not an image")
    add("random.webp", np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes(),
        "not an image")
    add("header_only.png", b"\x89PNG\r\n\x1a\n", "not an image")
    os.mkfifo(out / "fifo.png")
    cases["fifo.png"] = "not a regular file"
    return cases


def links(out: Path) -> dict[str, str]:
    """file name -> a word its error line must contain; real.png and link_to_real.png are good."""
    out.mkdir(parents=True)
    Image.fromarray(digit()).save(out / "real.png")
    (out / "dangling.png").symlink_to(out / "does-not-exist.png")
    (out / "loop_a.png").symlink_to(out / "loop_b.png")
    (out / "loop_b.png").symlink_to(out / "loop_a.png")
    (out / "sub").mkdir()
    (out / "sub" / "up").symlink_to(out, target_is_directory=True)   # folder loop
    (out / "link_to_real.png").symlink_to(out / "real.png")          # fine: followed
    return {"dangling.png": "no such file", "loop_a.png": "symbolic links",
            "loop_b.png": "symbolic links", "sub/up": "symlink loop"}


def many(out: Path, n: int) -> list[str]:
    """n small PNGs in folders of 500, named in the order a sorted walk meets them."""
    out.mkdir(parents=True)
    for i in range(n):
        sub = out / f"{i // 500:02d}"
        sub.mkdir(exist_ok=True)
        Image.fromarray(digit(16, i % 10, i)).save(sub / f"{i:05d}.png")
    return [f"{i:05d}.png" for i in range(n)]
