"""What the quantize and export stages both need from their inputs: the preprocessing spec the model
was trained with, real samples as arrays, and torch's reference outputs on them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from edgemml.config import LoadedPipeline, PreprocessConfig, StageConfig
from edgemml.errors import InputError
from edgemml.stages.common import preprocess_config

if TYPE_CHECKING:
    from torch import nn

    from edgemml.models import ModelSpec


def resolve_preprocess(spec: ModelSpec, config: StageConfig,
                       pipeline: LoadedPipeline) -> tuple[PreprocessConfig, str]:
    """(spec, where it came from): the model's own model.json extra.preprocess when present (what
    the model was trained with), else the stage's / pipeline's `preprocess:`."""
    stored = spec.extra.get("preprocess")
    if stored:
        try:
            return PreprocessConfig.model_validate(stored), "model.json"
        except ValueError as exc:
            raise InputError(f"the input model's preprocess spec is invalid: {exc}",
                             file="model.json") from None
    return preprocess_config(config, pipeline), "pipeline"


def check_channels(pre: PreprocessConfig, spec: ModelSpec) -> None:
    if pre.num_channels != spec.in_chans:
        raise InputError(f"preprocess.channels={pre.channels} gives {pre.num_channels} channel(s) but "
                         f"the model takes {spec.in_chans}", key="preprocess.channels",
                         hint="use the preprocessing the model was trained with")


def torch_logits(model: nn.Module, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """fp32 reference outputs of the torch model (eval mode, CPU)."""
    import torch

    model.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            out: Any = model(torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size])))
            outs.append(out.float().numpy())
    return np.concatenate(outs) if outs else np.zeros((0,), np.float32)


def top1(logits: np.ndarray, labels: np.ndarray) -> float | None:
    """Top-1 accuracy in [0, 1] over labelled samples (label >= 0); None when there are none."""
    mask = labels >= 0
    if not mask.any():
        return None
    return float((logits[mask].argmax(1) == labels[mask]).mean())
