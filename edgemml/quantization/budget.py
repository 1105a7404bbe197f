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


__all__ = ["Scored", "Searched", "noop_progress", "score"]
