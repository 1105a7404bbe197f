"""A PNG contact sheet of samples, one row per class, so a human can check the data at a glance.

Why: a wrong channel order, a broken label mapping or a blank generator is obvious in a picture and
invisible in a loss curve. Drawn with Pillow only (no matplotlib backend issues on headless runners).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from PIL import Image, ImageDraw, ImageFont

from edgemml.artifacts import atomic_path
from edgemml.data.preprocess import to_pil


def _items(data: Any, labels: Sequence[int] | None) -> tuple[list[Image.Image], list[int] | None]:
    if hasattr(data, "raw_image") and hasattr(data, "labels"):  # ImageDataset: raw, un-preprocessed
        images = [data.raw_image(i) for i in range(len(data))]
        return images, (list(labels) if labels is not None else [int(v) for v in data.labels])
    images = [to_pil(img) for img in data]
    return images, (list(int(v) for v in labels) if labels is not None else None)


def save_sample_grid(dataset_or_images: Any, labels: Sequence[int] | None = None,
                     class_names: Sequence[str] | None = None, path: str | Path = "samples.png", *,
                     per_class: int = 10, cell: int = 48, max_rows: int = 20) -> Path:
    """Write a PNG grid: rows = classes (first `per_class` samples each), class name at the left.

    `dataset_or_images` is an ImageDataset (its raw images and labels are used) or a sequence of
    uint8 arrays / PIL images with `labels`. Without labels the images fill rows of `per_class`.
    Small images are enlarged with nearest-neighbour so pixels stay visible.
    """
    images, labs = _items(dataset_or_images, labels)
    if class_names is None and hasattr(dataset_or_images, "classes"):
        class_names = list(dataset_or_images.classes)
    if not images:
        raise ValueError("no images to draw")
    rows: list[tuple[str, list[Image.Image]]] = []
    if labs is None:
        for start in range(0, min(len(images), per_class * max_rows), per_class):
            rows.append(("", images[start:start + per_class]))
    else:
        by_class: dict[int, list[Image.Image]] = {}
        for img, lab in zip(images, labs):
            bucket = by_class.setdefault(lab, [])
            if len(bucket) < per_class:
                bucket.append(img)
        for lab in sorted(by_class)[:max_rows]:
            name = (class_names[lab] if class_names is not None and 0 <= lab < len(class_names)
                    else str(lab))
            # drawn as one line of text: a control character (newline, U+2028) would make
            # Pillow refuse it, after the whole training
            rows.append(("".join(c if c.isprintable() else "?" for c in name), by_class[lab]))

    font = ImageFont.load_default(size=max(10, cell // 3))
    label_w = 0
    if any(name for name, _ in rows):
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        label_w = 8 + max(int(probe.textlength(name[:16], font=font)) for name, _ in rows)
    cols = max(len(r) for _, r in rows)
    pad = 2
    sheet = Image.new("RGB", (label_w + cols * (cell + pad) + pad, len(rows) * (cell + pad) + pad),
                      (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (name, row) in enumerate(rows):
        y = pad + r * (cell + pad)
        if name:
            draw.text((4, y + cell // 2), name[:16], fill=(0, 0, 0), font=font, anchor="lm")
        for c, img in enumerate(row):
            img = img.convert("RGB")
            scale = cell / max(img.size)
            size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
            small = max(img.size) * 2 <= cell
            img = img.resize(size, Image.Resampling.NEAREST if small else Image.Resampling.BILINEAR)
            x = label_w + pad + c * (cell + pad)
            sheet.paste(img, (x + (cell - size[0]) // 2, y + (cell - size[1]) // 2))

    out = Path(path)
    with atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG")
    return out
