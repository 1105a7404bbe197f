"""The training loop shared by `finetune` and by `prune`'s recovery, plus evaluation helpers.

One loop with: SGD / AdamW, warm-up then cosine or step decay (per step), label smoothing, gradient
clipping, YAML-declared augmentation, freezing schedules (frozen BatchNorm stays in eval mode),
discriminative learning rates, knowledge distillation, early stopping on a validation metric (the best
epoch, not the last, is returned), epoch checkpoints for resuming, and DDP when torch.distributed is
initialised (torchrun).
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.utils.data import DataLoader, Dataset

from edgemml.config import StrictModel
from edgemml.errors import ConfigError, InputError

# --------------------------------------------------------------------------------------------------
# Configuration (shared by finetune and prune.recover)
# --------------------------------------------------------------------------------------------------


class AugmentConfig(StrictModel):
    """Augmentations applied to raw training images before the shared preprocessing."""

    random_resized_crop: tuple[float, float] | None = Field(
        None, description="Scale range of RandomResizedCrop (e.g. [0.8, 1.0]); off by default.")
    translate: float = Field(0.0, ge=0, le=0.5,
                             description="Random shift as a fraction of the size (pad-and-crop).")
    rotation: float = Field(0.0, ge=0, le=180, description="Random rotation range in degrees.")
    hflip: bool = Field(False, description="Random horizontal flip (off: wrong for digits, text).")
    brightness: float = Field(0.0, ge=0, le=1, description="ColorJitter brightness.")
    contrast: float = Field(0.0, ge=0, le=1, description="ColorJitter contrast.")


class FreezeConfig(StrictModel):
    """Train the head first: parameters of matching modules get no updates for `epochs` epochs."""

    modules: list[str] = Field(
        ["backbone"], description="Module name patterns (fnmatch); 'backbone' means every module "
        "except the classifier head.")
    epochs: int = Field(1, ge=0, description="Epochs during which they stay frozen.")


class LrGroup(StrictModel):
    """Discriminative learning rate: a multiplier for matching modules (e.g. lower for migrated)."""

    modules: list[str] = Field(..., description="Module name patterns (fnmatch) or 'backbone'.")
    lr_mult: float = Field(..., gt=0, description="Multiplier of the base learning rate.")


class EarlyStopConfig(StrictModel):
    metric: Literal["val_accuracy", "val_loss"] = Field("val_accuracy",
                                                        description="Metric watched on val split.")
    patience: int = Field(3, ge=1, description="Epochs without improvement before stopping.")
    min_delta: float = Field(0.0, ge=0, description="Smallest change that counts as improvement.")


class DistillConfig(StrictModel):
    """Soft-target knowledge distillation (Hinton et al.): alpha*T^2*KL + (1-alpha)*CE."""

    temperature: float = Field(4.0, gt=0, description="Softmax temperature.")
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the soft-target term.")


class TrainConfig(StrictModel):
    """Training options shared by finetune and prune's recovery."""

    epochs: int = Field(10, ge=0, description="Epochs (an upper bound when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    batch_size: int = Field(64, ge=1, description="Batch size (per process under torchrun).")
    optimizer: Literal["sgd", "adamw"] = Field("adamw", description="sgd (with momentum) or adamw.")
    lr: float = Field(1e-3, gt=0, description="Base learning rate.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    weight_decay: float = Field(1e-4, ge=0, description="Weight decay.")
    schedule: Literal["cosine", "step", "constant"] = Field("cosine", description="LR decay.")
    warmup_epochs: float = Field(0.0, ge=0, description="Linear warm-up length in epochs.")
    step_epochs: int = Field(10, ge=1, description="Step schedule: decay every this many epochs.")
    gamma: float = Field(0.1, gt=0, le=1, description="Step schedule: decay factor.")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Label smoothing of the CE loss.")
    grad_clip: float | None = Field(None, gt=0, description="Clip the gradient norm to this.")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    freeze: FreezeConfig | None = Field(None, description="Freezing schedule (head first).")
    lr_groups: list[LrGroup] = Field(default_factory=list,
                                     description="Discriminative learning rates.")
    early_stopping: EarlyStopConfig | None = Field(None, description="Stop when val stops improving.")
    distill: DistillConfig = Field(default_factory=DistillConfig,
                                   description="Distillation settings (used when a teacher is set).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present.")
    eval_batch_size: int = Field(256, ge=1, description="Batch size for evaluation.")



# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


def resolve_device(name: str = "auto") -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but no CUDA device is available",
                          hint="use device: auto or cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def build_augment(cfg: AugmentConfig) -> Callable[[Any], Any] | None:
    """A PIL -> PIL transform from the YAML options (None when nothing is enabled)."""
    from torchvision.transforms import v2 as T

    ops: list[Any] = []
    if cfg.random_resized_crop is not None:
        lo, hi = cfg.random_resized_crop

        class _RRC:
            def __call__(self, img: Any) -> Any:
                return T.RandomResizedCrop(size=(img.height, img.width), scale=(lo, hi),
                                           antialias=True)(img)
        ops.append(_RRC())
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


def input_channels(model: nn.Module) -> int | None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return None


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      targets: torch.Tensor, *, temperature: float, alpha: float,
                      label_smoothing: float = 0.0) -> torch.Tensor:
    """alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)."""
    t = temperature
    soft = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.softmax(teacher_logits / t, dim=1),
                    reduction="batchmean") * (t * t)
    hard = F.cross_entropy(student_logits, targets, label_smoothing=label_smoothing)
    return alpha * soft + (1 - alpha) * hard


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0,
                distributed: bool = False, drop_last: bool = False) -> DataLoader:
    if distributed:
        from torch.utils.data.distributed import DistributedSampler
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
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


def accuracy_report(logits: np.ndarray, labels: np.ndarray,
                    classes: list[str] | None = None) -> dict[str, Any]:
    """Top-1 accuracy, loss and per-class accuracy from logits (numbers in [0, 1])."""
    if len(labels) == 0:
        return {"n": 0, "accuracy": None, "loss": None, "per_class": {}}
    pred = logits.argmax(1)
    loss = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item())
    per_class = {}
    n_classes = logits.shape[1]
    for c in range(n_classes):
        mask = labels == c
        if mask.any():
            name = classes[c] if classes and c < len(classes) else str(c)
            per_class[name] = float((pred[mask] == c).mean())
    return {"n": int(len(labels)), "accuracy": float((pred == labels).mean()), "loss": loss,
            "per_class": per_class}


def evaluate(model: nn.Module, dataset: Dataset, *, batch_size: int = 256,
             device: torch.device | str = "cpu", classes: list[str] | None = None) -> dict[str, Any]:
    logits, labels = predict_logits(model, dataset, batch_size=batch_size, device=device)
    return accuracy_report(logits, labels, classes)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, dataset: Dataset, *, batches: int = 20, batch_size: int = 64,
                   seed: int = 0, device: torch.device | str = "cpu") -> int:
    """Re-estimate BatchNorm running statistics on `dataset` (cumulative average, weights untouched).

    Statistics from another domain (RGB source, unpruned model, random init) are the usual reason a
    transferred or pruned model looks broken. Returns the number of samples used.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or len(dataset) == 0:
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
# The loop
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict[str, Any]]
    best_epoch: int | None
    best_metric: float | None
    stopped_early: bool
    resumed_from: int | None
    steps: int
    seconds: float
    notes: list[str] = field(default_factory=list)


ProgressFactory = Callable[[str, "float | None"], ContextManager[Any]]


def _null_progress(description: str, total: float | None) -> ContextManager[Any]:
    class _H:
        def advance(self, n: float = 1) -> None: ...
        def update(self, **kw: Any) -> None: ...
    return contextlib.nullcontext(_H())


def _lr_lambda(cfg: TrainConfig, steps_per_epoch: int, total_steps: int) -> Callable[[int], float]:
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


def _param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    assigned: dict[str, float] = {}
    for group in cfg.lr_groups:
        for name in match_modules(model, group.modules):
            assigned.setdefault(name, group.lr_mult)
    by_mult: dict[float, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        by_mult.setdefault(assigned.get(name, 1.0), []).append(p)
    return [{"params": ps, "lr": cfg.lr * mult, "lr_mult": mult} for mult, ps in by_mult.items()]


def _dist_info() -> tuple[bool, int, int]:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return True, dist.get_rank(), dist.get_world_size()
    return False, 0, 1


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    distributed, _, _ = _dist_info()
    if not distributed:
        return values
    import torch.distributed as dist
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def train(model: nn.Module, train_set: Dataset, val_set: Dataset | None, cfg: TrainConfig, *,
          seed: int = 0, teacher: nn.Module | None = None, checkpoint_dir: Path | None = None,
          progress: ProgressFactory | None = None, log: Callable[[str], None] | None = None,
          classes: list[str] | None = None) -> TrainResult:
    """Train `model` in place and return it with the best epoch's weights loaded.

    `checkpoint_dir` (the stage's work folder) holds `last.pt` after each epoch; when it exists
    and matches, training resumes after the saved epoch instead of starting over.
    """
    progress = progress or _null_progress
    log = log or (lambda _m: None)
    device = resolve_device(cfg.device)
    distributed, rank, world = _dist_info()
    seed_everything(seed)
    model.to(device)
    if teacher is not None:
        teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    teacher_channels = input_channels(teacher) if teacher is not None else None

    augment = build_augment(cfg.augment)
    if augment is not None and hasattr(train_set, "with_augment"):
        train_set = train_set.with_augment(augment)  # type: ignore[attr-defined]
    if len(train_set) == 0:  # type: ignore[arg-type]
        raise InputError("the training split is empty", key="data.split.train",
                         hint="give the train split a larger fraction or more samples")
    loader = make_loader(train_set, cfg.batch_size, shuffle=True, seed=seed,
                         distributed=distributed, drop_last=len(train_set) > cfg.batch_size)  # type: ignore[arg-type]
    steps_per_epoch = max(1, len(loader))
    epochs = cfg.epochs
    if cfg.max_steps is not None:
        epochs = math.ceil(cfg.max_steps / steps_per_epoch)
    total_steps = cfg.max_steps or epochs * steps_per_epoch

    frozen: set[str] = set()
    freeze_epochs = 0
    if cfg.freeze is not None and cfg.freeze.epochs > 0:
        frozen = match_modules(model, cfg.freeze.modules)
        freeze_epochs = cfg.freeze.epochs
    frozen_bn_prefixes = {n.rsplit(".", 1)[0] for n in frozen}

    groups = _param_groups(model, cfg)
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                                                     weight_decay=cfg.weight_decay, nesterov=True)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, steps_per_epoch, total_steps))

    net: nn.Module = model
    if distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP
        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    history: list[dict[str, Any]] = []
    best_state: dict[str, torch.Tensor] | None = None
    best_metric: float | None = None
    best_epoch: int | None = None
    bad_epochs = 0
    start_epoch = 0
    step = 0
    resumed_from = None
    stopped_early = False
    watch = cfg.early_stopping.metric if cfg.early_stopping else (
        "val_accuracy" if val_set is not None and len(val_set) > 0 else None)  # type: ignore[arg-type]
    last_path = checkpoint_dir / "last.pt" if checkpoint_dir is not None else None
    if last_path is not None and last_path.exists():
        state = torch.load(last_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history = list(state["history"])
        best_state = state.get("best_state")
        best_metric = state.get("best_metric")
        best_epoch = state.get("best_epoch")
        bad_epochs = int(state.get("bad_epochs", 0))
        step = int(state["step"])
        start_epoch = int(state["epoch"]) + 1
        torch.set_rng_state(state["torch_rng"])
        resumed_from = start_epoch
        log(f"resuming training after epoch {start_epoch} (from {last_path.name})")

    t0 = time.perf_counter()
    with progress("train", float(epochs)) as bar:
        if start_epoch:
            bar.advance(start_epoch)
        for epoch in range(start_epoch, epochs):
            if distributed and hasattr(loader.sampler, "set_epoch"):
                loader.sampler.set_epoch(epoch)  # type: ignore[union-attr]
            is_frozen = epoch < freeze_epochs
            for name, p in model.named_parameters():
                p.requires_grad_(not (is_frozen and name in frozen))
            net.train()
            if is_frozen:
                for mname, m in model.named_modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm) and mname in frozen_bn_prefixes:
                        m.eval()
            tot_loss = tot_correct = tot_n = 0.0
            for x, y in loader:
                if cfg.max_steps is not None and step >= cfg.max_steps:
                    break
                x, y = x.to(device), torch.as_tensor(y).to(device)
                out = net(x)
                if teacher is not None:
                    with torch.no_grad():
                        t_logits = teacher(adapt_channels(x, teacher_channels or x.shape[1]))
                    loss = distillation_loss(out, t_logits, y, temperature=cfg.distill.temperature,
                                             alpha=cfg.distill.alpha,
                                             label_smoothing=cfg.label_smoothing)
                else:
                    loss = F.cross_entropy(out, y, label_smoothing=cfg.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                sched.step()
                step += 1
                n = x.shape[0]
                tot_loss += float(loss.item()) * n
                tot_correct += float((out.argmax(1) == y).sum().item())
                tot_n += n
            tot_loss, tot_correct, tot_n = _all_reduce_sum([tot_loss, tot_correct, tot_n], device)
            row: dict[str, Any] = {
                "epoch": epoch + 1, "step": step, "lr": opt.param_groups[0]["lr"],
                "train_loss": tot_loss / max(tot_n, 1), "train_accuracy": tot_correct / max(tot_n, 1),
                "frozen": bool(is_frozen and frozen)}
            if val_set is not None and len(val_set) > 0:  # type: ignore[arg-type]
                rep = evaluate(model, val_set, batch_size=cfg.eval_batch_size, device=device)
                row["val_loss"], row["val_accuracy"] = rep["loss"], rep["accuracy"]
            history.append(row)
            improved = False
            if watch is not None:
                value = row[watch]
                sign = 1 if watch == "val_accuracy" else -1
                delta = cfg.early_stopping.min_delta if cfg.early_stopping else 0.0
                if best_metric is None or sign * (value - best_metric) > delta:
                    improved = True
            else:
                improved = True  # no validation split: the last epoch is the best known
            if improved:
                best_metric = row.get(watch) if watch else None
                best_epoch = epoch + 1
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                bad_epochs = 0
            else:
                bad_epochs += 1
            bar.advance(1)
            bar.update(loss=row["train_loss"], acc=row["train_accuracy"],
                       **({"val_acc": row["val_accuracy"]} if "val_accuracy" in row else {}))
            if last_path is not None and rank == 0:
                _save_last(last_path, model, opt, sched, history, best_state, best_metric,
                           best_epoch, bad_epochs, step, epoch)
            if cfg.early_stopping and bad_epochs >= cfg.early_stopping.patience:
                stopped_early = True
                log(f"early stopping after epoch {epoch + 1}: {watch} did not improve for "
                    f"{bad_epochs} epochs; best epoch {best_epoch}")
                break
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return TrainResult(model, history, best_epoch, best_metric, stopped_early, resumed_from, step,
                       time.perf_counter() - t0)


def _save_last(path: Path, model: nn.Module, opt: torch.optim.Optimizer, sched: Any,
               history: list[dict[str, Any]], best_state: dict[str, torch.Tensor] | None,
               best_metric: float | None, best_epoch: int | None, bad_epochs: int, step: int,
               epoch: int) -> None:
    from edgemml.artifacts import atomic_path

    state = {"model": model.state_dict(), "optimizer": opt.state_dict(),
             "scheduler": sched.state_dict(), "history": history, "best_state": best_state,
             "best_metric": best_metric, "best_epoch": best_epoch, "bad_epochs": bad_epochs,
             "step": step, "epoch": epoch, "torch_rng": torch.get_rng_state()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def copy_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
