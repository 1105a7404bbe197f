"""Training curves as a PNG (the finetune stage's curves.png): loss and top-1 per
epoch, train vs val, the best epoch marked, frozen epochs shaded. A plain function of the history
rows that edgemml.training returns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def draw_curves(history: list[dict[str, Any]], path: Path, *, best_epoch: int | None,
                title: str = "") -> Path:
    """Loss and accuracy per epoch, train vs val, the best epoch marked, frozen epochs shaded."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6), dpi=100)
    epochs = [r["epoch"] for r in history]
    for ax, key, label in ((fig.add_subplot(1, 2, 1), "loss", "loss"),
                           (fig.add_subplot(1, 2, 2), "top1_pct", "top-1 accuracy (%)")):
        ax.plot(epochs, [r[f"train_{key}"] for r in history], "o-", label="train")
        if any(f"val_{key}" in r for r in history):
            ax.plot(epochs, [r.get(f"val_{key}") for r in history], "s-", label="val")
        frozen = [r["epoch"] for r in history if r.get("frozen")]
        if frozen:
            ax.axvspan(min(frozen) - 0.5, max(frozen) + 0.5, color="0.9", label="frozen")
        if best_epoch is not None:
            ax.axvline(best_epoch, color="tab:green", linestyle="--", label=f"best ({best_epoch})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
