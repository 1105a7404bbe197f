"""PyTorch eager on the CPU: the fp32 reference every other artifact is compared with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgemml.runtimes.base import Runner

NAME = "torch"
FORMAT = "torch"
EXTRA = None
#: whether the deployed precision may differ from fp32 (validate then also runs it pinned to f32)
HAS_EXACT_MODE = False
MODULES = ("torch",)


def claims(path: Path) -> bool:
    """An edgemml model folder (model.json + model.safetensors)."""
    return path.is_dir() and (path / "model.json").is_file()


def files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_file())


def stored_precision(path: Path) -> str:
    return "fp32"


def open_module(model: Any, *, threads: int, name: str = "torch") -> Runner:
    """A torch module in eval mode, run under inference_mode with `threads` threads."""
    import torch

    model.eval()

    def run(x: np.ndarray) -> np.ndarray:
        # Set once and left set: torch.set_num_threads rebuilds the OpenMP pool, so switching it
        # around every call measured ~0.5 s per call here instead of ~5 ms.
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        with torch.inference_mode():
            out = model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        return out.float().numpy()

    return Runner(name, NAME, threads, "f32", run, None,
                  {"input_dtype": "float32", "output_dtype": "float32"})


def open(path: Path, *, threads: int, exact: bool = False, name: str | None = None) -> Runner:
    from edgemml.models import load_model

    model, _ = load_model(path)
    return open_module(model, threads=threads, name=name or path.name)


def macs_params(model: Any, input_shape: tuple[int, ...]) -> tuple[int, int]:
    """(MACs, parameters) of one forward pass at batch 1, counted by torch-pruning."""
    import torch
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model, torch.zeros(1, *input_shape[1:]))
    model.train(was_training)
    return int(macs), int(params)


def logits(model: Any, x: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
    """fp32 outputs of a torch module on a batch, with the thread count already set."""
    import torch

    from edgemml.runtimes.base import predict

    runner = open_module(model, threads=torch.get_num_threads())
    return predict(runner, x, batch_size=batch_size)
