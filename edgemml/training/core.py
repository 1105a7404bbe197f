"""What the training loop is built from: devices, seeds, augmentation, module selection, channel
adapters, the distillation loss, loaders, evaluation and BatchNorm re-estimation."""

from __future__ import annotations

import fnmatch
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from edgemml.errors import ConfigError, InputError, StageError
from edgemml.metrics import accuracy
from edgemml.distributed import all_reduce_sum
from edgemml.training_config import AugmentConfig, TrainOptions

# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


def resolve_device(name: str = "auto") -> torch.device:
    """cpu / cuda / auto; under torchrun on GPUs each process takes cuda:LOCAL_RANK."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but no CUDA device is available",
                          hint="use device: auto or cpu")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed seed per (seed, epoch): the shuffling order of an epoch does not depend on how
    many epochs ran in this process, so a resumed run shuffles exactly like an uninterrupted one."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch]).generate_state(1)[0])


class _RandomResizedCropSameSize:
    """RandomResizedCrop back to the image's own size (raw images of a data set may differ)."""

    def __init__(self, scale: tuple[float, float]) -> None:
        self.scale = scale

    def __call__(self, img: Any) -> Any:
        from torchvision.transforms import v2 as T

        return T.RandomResizedCrop(size=(img.height, img.width), scale=self.scale,
                                   antialias=True)(img)


def build_augment(cfg: AugmentConfig) -> Callable[[Any], Any] | None:
    """A PIL -> PIL transform from the YAML options (None when nothing is enabled).

    Randomness comes from torch's global generator, which `train` seeds (and checkpoints).
    """
    from torchvision.transforms import v2 as T

    ops: list[Any] = []
    if cfg.random_resized_crop is not None:
        lo, hi = cfg.random_resized_crop
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"augment.random_resized_crop {list(cfg.random_resized_crop)}: need "
                              f"0 < low <= high <= 1", key="augment.random_resized_crop")
        ops.append(_RandomResizedCropSameSize((lo, hi)))
    if cfg.translate or cfg.rotation:
        ops.append(T.RandomAffine(degrees=cfg.rotation,
                                  translate=(cfg.translate, cfg.translate) if cfg.translate else None))
    if cfg.hflip:
        ops.append(T.RandomHorizontalFlip())
    if cfg.brightness or cfg.contrast:
        ops.append(T.ColorJitter(brightness=cfg.brightness, contrast=cfg.contrast))
    return T.Compose(ops) if ops else None


def match_modules(model: nn.Module, patterns: Iterable[str],
                  classifier: str | None = None) -> set[str]:
    """Names of parameters that belong to modules matching the patterns ('backbone' = all but head)."""
    names = [n for n, _ in model.named_parameters()]
    selected: set[str] = set()
    for pattern in patterns:
        if pattern == "backbone":
            if classifier is None:
                from edgemml.models import find_classifier
                classifier = find_classifier(model)
            selected |= {n for n in names if not (n == classifier or n.startswith(classifier + "."))}
            continue
        hits = {n for n in names if fnmatch.fnmatchcase(n, pattern)
                or fnmatch.fnmatchcase(n, pattern + ".*")}
        if not hits:
            modules = sorted({n.rsplit(".", 1)[0] for n in names})[:12]
            raise ConfigError(f"module pattern {pattern!r} matches no parameter of the model",
                              hint=f"module names look like: {', '.join(modules)} ...")
        selected |= hits
    return selected


def adapt_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Feed a teacher that takes another channel count: 1 -> C repeats, C -> 1 averages."""
    c = x.shape[1]
    if c == channels:
        return x
    if c == 1:
        return x.repeat(1, channels, 1, 1)
    if channels == 1:
        return x.mean(dim=1, keepdim=True)
    raise InputError(f"cannot feed {c}-channel input to a {channels}-channel teacher")


class ChannelAdapter(nn.Module):
    """Runs `model` (which takes `channels` input channels) on inputs with another channel count."""

    def __init__(self, model: nn.Module, channels: int) -> None:
        super().__init__()
        self.inner = model
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(adapt_channels(x, self.channels))


def input_channels(model: nn.Module) -> int | None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return None


def split_outputs(out: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(main logits, auxiliary logits) of a model's output.

    torchvision's googlenet and inception_v3 built with aux_logits return a namedtuple
    (logits, aux...) in training mode and the logits alone in eval mode; every other model returns
    a tensor. The first field is always the main head.
    """
    if isinstance(out, torch.Tensor):
        return out, []
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0], [o for o in out[1:] if isinstance(o, torch.Tensor)]
    raise StageError(f"the model returned {type(out).__name__}, not logits or a tuple of them",
                     hint="a model for classification must return a logits tensor [N, classes]")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      targets: torch.Tensor, *, temperature: float, alpha: float,
                      label_smoothing: float = 0.0) -> torch.Tensor:
    """alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y).

    T^2 keeps the soft term's gradient size independent of T (Hinton et al., 2015).
    """
    t = temperature
    soft = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                    reduction="batchmean", log_target=True) * (t * t)
    hard = F.cross_entropy(student_logits, targets, label_smoothing=label_smoothing)
    return alpha * soft + (1 - alpha) * hard


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0,
                distributed: bool = False, drop_last: bool = False) -> DataLoader:
    """Single-process loader (num_workers=0: deterministic, and augmentation draws from the seeded
    global generator); with `distributed`, a DistributedSampler gives each rank its share."""
    if distributed:
        from torch.utils.data.distributed import DistributedSampler
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=False)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=0,
                          drop_last=drop_last)
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=0,
                      drop_last=drop_last)


@torch.no_grad()
def predict_logits(model: nn.Module, dataset: Dataset, *, batch_size: int = 256,
                   device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(logits [N, C], labels [N]) of a dataset, in order, in eval mode."""
    was_training = model.training
    model.eval()
    outs, labels = [], []
    for x, y in make_loader(dataset, batch_size, shuffle=False):
        outs.append(model(x.to(device)).float().cpu())
        labels.append(torch.as_tensor(y))
    model.train(was_training)
    if not outs:
        return np.zeros((0, 0), np.float32), np.zeros((0,), np.int64)
    return torch.cat(outs).numpy(), torch.cat(labels).numpy()


def evaluate(model: nn.Module, dataset: Dataset, *, batch_size: int = 256,
             device: torch.device | str = "cpu", classes: list[str] | None = None) -> dict[str, Any]:
    """{n, top1_pct, per_class_pct, loss} of a model on a dataset (eval mode)."""
    logits, labels = predict_logits(model, dataset, batch_size=batch_size, device=device)
    if len(labels) == 0:
        return {"n": 0, "top1_pct": None, "per_class_pct": {}, "loss": None}
    acc = accuracy(logits, labels, classes)
    loss = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item())
    return {"n": acc.n, "top1_pct": acc.top1_pct, "per_class_pct": acc.per_class_pct,
            "loss": loss}


@torch.no_grad()
def recalibrate_bn(model: nn.Module, dataset: Dataset, *, batches: int = 20, batch_size: int = 64,
                   seed: int = 0, device: torch.device | str = "cpu") -> int:
    """Re-estimate BatchNorm running statistics on `dataset` (cumulative average, weights untouched).

    Statistics from another domain (RGB source, unpruned model, random init) are the usual reason a
    transferred or pruned model looks broken. Returns the number of samples used.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or len(dataset) == 0:  # type: ignore[arg-type]
        return 0
    saved = [(m, m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over all batches seen
    was_training = model.training
    model.train()
    seen = 0
    try:
        for i, (x, _) in enumerate(make_loader(dataset, batch_size, shuffle=True, seed=seed)):
            if i >= batches:
                break
            if x.shape[0] < 2:
                continue
            model(x.to(device))
            seen += x.shape[0]
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.train(was_training)
    return seen


# --------------------------------------------------------------------------------------------------
# Pieces of the loop (edgemml.training.loop)
# --------------------------------------------------------------------------------------------------


def lr_factor(cfg: TrainOptions, steps_per_epoch: int, total_steps: int) -> Callable[[int], float]:
    """The learning-rate multiplier per step: linear warm-up, then constant, step or cosine."""
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        if cfg.schedule == "step":
            return cfg.gamma ** ((step // max(1, steps_per_epoch)) // cfg.step_epochs)
        span = max(1, total_steps - warmup)
        progress = min(1.0, (step - warmup) / span)
        return 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def param_groups(model: nn.Module, cfg: TrainOptions) -> list[dict[str, Any]]:
    assigned: dict[str, float] = {}
    for group in cfg.lr_groups:
        for name in match_modules(model, group.modules):
            assigned.setdefault(name, group.lr_mult)
    by_mult: dict[float, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        by_mult.setdefault(assigned.get(name, 1.0), []).append(p)
    return [{"params": ps, "lr": cfg.lr * mult, "lr_mult": mult} for mult, ps in by_mult.items()]


def local_batch(cfg: TrainOptions, world: int, log: Callable[[str], None]) -> int:
    """Each process's batch under DDP: the global batch split over the processes."""
    if world == 1:
        return cfg.batch_size
    local = max(1, cfg.batch_size // world)
    if local * world != cfg.batch_size:
        log(f"batch_size {cfg.batch_size} is not a multiple of {world} processes; each takes "
            f"{local} (global batch {local * world})")
    return local


def evaluate_split(model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device,
                    distributed: bool) -> dict[str, float]:
    """Loss and top-1 (percent) on a split; under DDP each rank scores every world-th sample."""
    if not distributed:
        rep = evaluate(model, dataset, batch_size=batch_size, device=device)
        return {"loss": rep["loss"], "top1_pct": rep["top1_pct"]}
    import torch.distributed as dist
    rank, world = dist.get_rank(), dist.get_world_size()
    shard = Subset(dataset, list(range(rank, len(dataset), world)))  # type: ignore[arg-type]
    logits, labels = predict_logits(model, shard, batch_size=batch_size, device=device)
    loss_sum = correct = 0.0
    if len(labels):
        lt, yt = torch.from_numpy(logits), torch.from_numpy(labels)
        loss_sum = float(F.cross_entropy(lt, yt, reduction="sum"))
        correct = float((lt.argmax(1) == yt).sum())
    loss_sum, correct, n = all_reduce_sum([loss_sum, correct, float(len(labels))], device)
    return {"loss": loss_sum / n, "top1_pct": 100.0 * correct / n}


def save_last(path: Path, state: dict[str, Any]) -> None:
    from edgemml.artifacts import atomic_path

    with atomic_path(path) as tmp:
        torch.save(state, tmp)
