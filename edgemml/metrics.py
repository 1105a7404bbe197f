"""How well a model's outputs do, and how closely they follow a reference: the one place for it.

One accuracy function in one unit (percent): training curves, migrate's zero-shot figure, prune's
recovery, quantize's budget and validate's report all call `accuracy`, so a figure means the same in
every file edgemml writes. Parity figures compare an artifact's logits with its reference's on the
same real samples. numpy only: no runtime is imported here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass
class Accuracy:
    """Top-1 (and top-5 with more than 10 classes) and per-class accuracy, in percent."""

    n: int
    top1_pct: float | None
    top5_pct: float | None = None
    per_class_pct: dict[str, float] = field(default_factory=dict)
    worst_class_pct: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def accuracy(logits: np.ndarray, labels: np.ndarray, classes: list[str] | None = None) -> Accuracy:
    """Accuracy of logits [N, C] against labels [N]; samples labelled -1 (unlabelled) are left out.

    top1_pct is None when no sample is labelled: "not measured" is not 0 %.
    """
    labels = np.asarray(labels)
    mask = labels >= 0
    logits, labels = logits[mask], labels[mask]
    n = int(len(labels))
    if n == 0:
        return Accuracy(0, None)
    pred = logits.argmax(1)
    top5 = None
    if logits.shape[1] > 10:
        best5 = np.argsort(-logits, axis=1)[:, :5]
        top5 = 100.0 * float((best5 == labels[:, None]).any(1).mean())
    per_class: dict[str, float] = {}
    for c in range(logits.shape[1]):
        hit = labels == c
        if hit.any():
            name = classes[c] if classes and c < len(classes) else str(c)
            per_class[name] = 100.0 * float((pred[hit] == c).mean())
    return Accuracy(n, 100.0 * float((pred == labels).mean()), top5, per_class,
                    min(per_class.values()) if per_class else None)


def drop_pp(reference_pct: float | None, pct: float | None) -> float | None:
    """Points lost from the reference to the artifact (negative: the artifact does better)."""
    return None if reference_pct is None or pct is None else reference_pct - pct


def agreement(logits: np.ndarray, ref: np.ndarray) -> float:
    """Fraction of samples whose top-1 class matches the reference's."""
    return float((logits.argmax(1) == ref.argmax(1)).mean()) if len(ref) else 1.0


def _centered_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of the parts of two logit matrices that vary across samples.

    Each class column is centred over the samples first, so a constant offset shared by every input
    contributes nothing: an artifact whose outputs barely move with the input has (near) zero
    variance here and cannot correlate, however small its absolute difference is.
    """
    a = a - a.mean(0, keepdims=True)
    b = b - b.mean(0, keepdims=True)
    na, nb = float(np.sqrt((a * a).sum())), float(np.sqrt((b * b).sum()))
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float((a * b).sum() / (na * nb))


def parity(logits: np.ndarray, ref_logits: np.ndarray, ref_top1_pct: float | None,
           top1_pct: float | None) -> dict[str, Any]:
    """How closely an artifact reproduces the reference on the same real samples."""
    if logits.shape != ref_logits.shape:
        raise ValueError(f"output shape {tuple(logits.shape)} differs from the reference's "
                         f"{tuple(ref_logits.shape)}")
    if len(logits) == 0:
        return {}
    a, b = logits.astype(np.float64), ref_logits.astype(np.float64)
    diff = np.abs(a - b)
    dot = (a * b).sum(1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.where(norms > 0, dot / np.where(norms > 0, norms, 1), 0.0)
    return {
        "agreement": agreement(logits, ref_logits),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "cosine": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "correlation": _centered_correlation(a, b),
        "accuracy_drop_pp": drop_pp(ref_top1_pct, top1_pct),
    }


def output_diversity(logits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Whether a model's predictions depend on its input: distinct predicted classes (relative to
    the classes present in the labels), the share of the most frequent prediction, and how much the
    logits vary across samples relative to their magnitude."""
    if len(labels) == 0:
        return {"distinct_predictions": 0, "classes_in_labels": 0, "distinct_fraction": 0.0,
                "majority_share": None, "relative_spread": None}
    pred = logits.argmax(1)
    counts = np.bincount(pred, minlength=logits.shape[1])
    present = int(len(np.unique(labels)))
    distinct = int((counts > 0).sum())
    spread = float(logits.std(0).mean())
    scale = float(np.abs(logits).mean())
    return {"distinct_predictions": distinct, "classes_in_labels": present,
            "distinct_fraction": distinct / max(present, 1),
            "majority_share": float(counts.max() / len(pred)),
            "relative_spread": spread / scale if scale > 0 else 0.0}


@dataclass
class ParityCheck:
    """A converted model's outputs against the reference's on the same inputs, with a bound."""

    samples: int
    max_abs_diff: float
    output_scale: float
    rel_diff: float
    top1_agreement: float
    tolerance: float
    ok: bool

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 9) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def check_parity(ref: np.ndarray, out: np.ndarray, *, tolerance: float) -> ParityCheck:
    """max |out - ref| relative to the output scale (max |ref|), and top-1 agreement.

    Relative to the scale because logits of one model span 0.1 and of another 50: an absolute bound
    would be either meaningless or impossible.
    """
    if ref.shape != out.shape:
        raise ValueError(f"output shapes differ: reference {ref.shape}, converted {out.shape}")
    diff = float(np.abs(out.astype(np.float64) - ref.astype(np.float64)).max()) if ref.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    rel = diff / max(scale, 1e-12)
    agree = agreement(out, ref) if ref.ndim == 2 else 1.0
    return ParityCheck(samples=int(len(ref)), max_abs_diff=diff, output_scale=scale, rel_diff=rel,
                       top1_agreement=agree, tolerance=tolerance, ok=bool(rel <= tolerance))
