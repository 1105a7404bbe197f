"""What an int8 model scored against its fp32 parent, and the result of a budget search.

Shared by the ONNX Runtime and OpenVINO paths so both report the same figures in the same units
(top-1 in percent, drops in percentage points, agreement as a fraction).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from edgemml.metrics import accuracy, agreement, drop_pp


@dataclass
class Scored:
    top1_pct: float | None
    drop_pp: float | None
    agreement: float

    def as_dict(self) -> dict[str, Any]:
        return {"top1_pct": self.top1_pct, "accuracy_drop_pp": self.drop_pp,
                "top1_agreement_with_fp32": self.agreement}


def score(logits: np.ndarray, labels: np.ndarray, ref: np.ndarray,
          fp32_pct: float | None) -> Scored:
    pct = accuracy(logits, labels).top1_pct
    return Scored(pct, drop_pp(fp32_pct, pct), agreement(logits, ref))


@dataclass(frozen=True)
class Budget:
    """What int8 must hold on the validation split: a top-1 drop against fp32 (percentage points)
    and, optionally, the least top-1 agreement with fp32 (a fraction).

    Why agreement too: a drop is the difference of two accuracies, and flips cancel. MobileNetV2
    int8 changed 6 of 359 val predictions (agreement 0.983) with a val drop of 0.00 pp, and then
    dropped 0.56 pp on the test split (benchmarks/zoo.py). The disagreement bounds the drop on any
    data the val split represents; holding it to (1 - min_agreement) makes the budget search
    keep layers in float (or run QAT) until int8 predicts like fp32, not only as often right.
    """

    max_drop_pp: float | None = None
    min_agreement: float | None = None

    @property
    def active(self) -> bool:
        return self.max_drop_pp is not None or self.min_agreement is not None

    def meets(self, s: Scored) -> bool:
        if self.max_drop_pp is not None and (s.drop_pp is None or s.drop_pp > self.max_drop_pp):
            return False
        return self.min_agreement is None or s.agreement >= self.min_agreement

    def miss(self, s: Scored) -> str:
        """Why `s` misses, in words ('' when it meets the budget)."""
        out = []
        if self.max_drop_pp is not None and (s.drop_pp is None or s.drop_pp > self.max_drop_pp):
            out.append(f"drop {s.drop_pp:.2f} pp > max_accuracy_drop {self.max_drop_pp:g} pp"
                       if s.drop_pp is not None else "no accuracy (labels missing)")
        if self.min_agreement is not None and s.agreement < self.min_agreement:
            out.append(f"agreement with fp32 {s.agreement:.4f} < min_agreement "
                       f"{self.min_agreement:g}")
        return "; ".join(out)

    def as_dict(self) -> dict[str, Any]:
        return {"budget_pp": self.max_drop_pp, "min_agreement": self.min_agreement}


@dataclass
class Searched:
    """The plain int8 result, the final one (after keeping layers in float), and the search."""

    plain: Scored
    final: Scored
    quantized_layers: int = 0
    float_layers: list[str] = field(default_factory=list)
    search: dict[str, Any] | None = None

    @property
    def met(self) -> bool:
        return self.search is None or bool(self.search.get("met"))

    def as_dict(self) -> dict[str, Any]:
        return {**self.final.as_dict(), "plain_int8": self.plain.as_dict(),
                "quantized_layers": self.quantized_layers, "float_layers": self.float_layers,
                "search": self.search}


class _NoBar:
    def advance(self, n: float = 1) -> None:
        pass

    def update(self, **fields: Any) -> None:
        pass


@contextlib.contextmanager
def noop_progress(description: str, total: float | None = None) -> Iterator[_NoBar]:
    yield _NoBar()


__all__ = ["Budget", "Scored", "Searched", "noop_progress", "score"]
