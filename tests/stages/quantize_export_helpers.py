"""Test helpers for the quantize and export stages: small models with real accuracy.

Why not train: resnet18 takes ~35 s for 40 steps on this 2-core machine. Instead a randomly
initialised backbone gets its BatchNorm statistics estimated on the digits (recalibrate_bn), and its
linear head is fitted by least squares on the pooled features: a few seconds, deterministic, and a
model whose top-1 on held-out digits is far above chance, so int8-vs-fp32 agreement means something.

Pipelines under test start from such a model folder with the built-in `load` stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PRE = {"size": [32, 32], "resize": "stretch", "interpolation": "bilinear", "channels": "gray",
       "mean": [0.5], "std": [0.5], "layout": "NCHW", "dtype": "float32"}


def digits() -> Any:
    from edgemml.config import DataConfig, PreprocessConfig
    from edgemml.data import load_data

    return load_data(DataConfig(source="builtin:digits"), PreprocessConfig(**PRE), seed=0,
                     base_dir=Path("."))


def _features(model: Any, head: str, dataset: Any) -> Any:
    import torch

    feats: list[Any] = []
    hook = model.get_submodule(head).register_forward_hook(
        lambda m, inp, out: feats.append(inp[0].detach()))
    from edgemml.training import predict_logits

    predict_logits(model, dataset, batch_size=128)
    hook.remove()
    return torch.cat(feats)


def fit_head(model: Any, dataset: Any, head: str, skip_features: tuple[int, ...] = ()) -> None:
    """Least-squares fit of the final Linear on one-hot targets (ridge-regularised)."""
    import torch

    x = _features(model, head, dataset).double()
    keep = torch.ones(x.shape[1], dtype=torch.bool)
    keep[list(skip_features)] = False
    xs = torch.cat([x[:, keep], torch.ones(len(x), 1, dtype=x.dtype)], 1)
    y = torch.nn.functional.one_hot(torch.as_tensor(dataset.labels), 10).double()
    w = torch.linalg.solve(xs.T @ xs + 1e-3 * torch.eye(xs.shape[1], dtype=x.dtype), xs.T @ y)
    layer = model.get_submodule(head)
    with torch.no_grad():
        weight = torch.zeros_like(layer.weight)
        weight[:, keep] = w[:-1].T.float()
        layer.weight.copy_(weight)
        layer.bias.copy_(w[-1].float())


def make_model(arch: str, folder: Path, *, prune: float | None = None,
               outlier: bool = False, train_steps: int = 0, seed: int = 0) -> Path:
    """Build `arch` (1 channel, 10 classes), optionally prune it structurally, estimate BN on the
    digits, fit its head, optionally train `train_steps` steps (features with real margins, so
    int8 noise rarely flips a prediction), and save it (model.json records preprocess, classes)."""
    import torch

    from edgemml.config import ModelConfig
    from edgemml.models import ModelSpec, find_classifier, save_model
    from edgemml.training import recalibrate_bn

    data = digits()
    cfg = ModelConfig(arch=arch)
    torch.manual_seed(seed)
    from edgemml.models import build_model

    model = build_model(cfg, num_classes=10, in_chans=1).eval()
    if prune:
        import torch_pruning as tp

        head = model.get_submodule(find_classifier(model))
        pruner = tp.pruner.MagnitudePruner(model, torch.zeros(1, 1, 32, 32),
                                           importance=tp.importance.MagnitudeImportance(p=1),
                                           pruning_ratio=prune, ignored_layers=[head])
        pruner.step()
    # a third of the train split is plenty for BN statistics and a 10-class linear head
    train = data.train.subset(list(range(0, len(data.train), 3)), "train")
    recalibrate_bn(model, train, batches=4, seed=seed)
    skip: tuple[int, ...] = ()
    if outlier:
        # One feature channel becomes a constant 1000 right before pooling: harmless in float (the
        # head ignores it), but it stretches the per-tensor activation range of the last residual
        # Add / pooling / head input so far that int8 rounds every other feature to zero.
        bn = model.layer4[1].bn2
        with torch.no_grad():
            bn.weight[0] = 0.0
            bn.bias[0] = 1000.0
        skip = (0,)
    model.eval()
    fit_head(model, train, find_classifier(model), skip)
    if train_steps:
        from edgemml.training import TrainConfig, train as train_model

        train_model(model, data.train, None, TrainConfig(max_steps=train_steps, batch_size=32,
                                                         lr=1e-3, device="cpu"), seed=seed)
        model.eval()
    spec = ModelSpec.from_config(cfg, num_classes=10, in_chans=1,
                                 class_names=list(data.classes), preprocess=PRE)
    save_model(model, spec, folder)
    return folder
