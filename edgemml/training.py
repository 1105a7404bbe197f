"""The training loop shared by `finetune` and by `prune`'s recovery, plus evaluation helpers.

One loop with: SGD / AdamW, warm-up then cosine or step decay (per step), label smoothing, gradient
clipping, YAML-declared augmentation, freezing schedules (frozen BatchNorm stays in eval mode),
discriminative learning rates, knowledge distillation, early stopping on a validation metric (the best
epoch, not the last, is returned), epoch checkpoints for resuming (bit-identical to an uninterrupted
run on one process), and DDP across processes started by torchrun (`distributed=True`).
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from edgemml.distributed import (
    all_gather_object,
    all_reduce_sum,
    broadcast_object,
    dist_info,
    sync_buffers,
)
from edgemml.errors import ConfigError, InputError, StageError
from edgemml.training_config import (  # noqa: F401 - re-exported: the public training API
    AugmentConfig,
    DistillConfig,
    EarlyStopConfig,
    FreezeConfig,
    LrGroup,
    TrainConfig,
    TrainOptions,
)

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


def copy_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def _evaluate_split(model: nn.Module, dataset: Dataset, cfg: TrainOptions, device: torch.device,
                    distributed: bool) -> dict[str, float]:
    """Loss and accuracy on a split; under DDP each rank scores every world-th sample."""
    if not distributed:
        rep = evaluate(model, dataset, batch_size=cfg.eval_batch_size, device=device)
        return {"loss": rep["loss"], "accuracy": rep["accuracy"]}
    import torch.distributed as dist
    rank, world = dist.get_rank(), dist.get_world_size()
    shard = Subset(dataset, list(range(rank, len(dataset), world)))  # type: ignore[arg-type]
    logits, labels = predict_logits(model, shard, batch_size=cfg.eval_batch_size, device=device)
    loss_sum = correct = 0.0
    if len(labels):
        lt, yt = torch.from_numpy(logits), torch.from_numpy(labels)
        loss_sum = float(F.cross_entropy(lt, yt, reduction="sum"))
        correct = float((lt.argmax(1) == yt).sum())
    loss_sum, correct, n = all_reduce_sum([loss_sum, correct, float(len(labels))], device)
    return {"loss": loss_sum / n, "accuracy": correct / n}


@dataclass
class TrainResult:
    """What `train` returns: the model (best epoch loaded), per-epoch history and bookkeeping."""

    model: nn.Module
    history: list[dict[str, Any]]
    best_epoch: int | None
    best_metric: float | None
    stopped_early: bool
    resumed_from: int | None  # first epoch (1-based) run in this call after a resume
    steps: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    metric: str | None = None  # what best_metric measures
    device: str = "cpu"
    world_size: int = 1
    frozen_params: int = 0  # number of parameter tensors frozen during the first epochs


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training: carries what was reached (best weights loaded into `result.model`).

    A KeyboardInterrupt, so the runner still marks the stage interrupted and keeps its folder; the
    epoch checkpoint written before it lets the next run resume after the last finished epoch.
    """

    def __init__(self, result: TrainResult) -> None:
        super().__init__("training interrupted")
        self.result = result


ProgressFactory = Callable[[str, "float | None"], ContextManager[Any]]


def _null_progress(description: str, total: float | None) -> ContextManager[Any]:
    class _H:
        def advance(self, n: float = 1) -> None: ...
        def update(self, **kw: Any) -> None: ...
    return contextlib.nullcontext(_H())


def _lr_lambda(cfg: TrainOptions, steps_per_epoch: int, total_steps: int) -> Callable[[int], float]:
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


def _param_groups(model: nn.Module, cfg: TrainOptions) -> list[dict[str, Any]]:
    assigned: dict[str, float] = {}
    for group in cfg.lr_groups:
        for name in match_modules(model, group.modules):
            assigned.setdefault(name, group.lr_mult)
    by_mult: dict[float, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        by_mult.setdefault(assigned.get(name, 1.0), []).append(p)
    return [{"params": ps, "lr": cfg.lr * mult, "lr_mult": mult} for mult, ps in by_mult.items()]


def _local_batch(cfg: TrainOptions, world: int, log: Callable[[str], None]) -> int:
    if world == 1:
        return cfg.batch_size
    local = max(1, cfg.batch_size // world)
    if local * world != cfg.batch_size:
        log(f"batch_size {cfg.batch_size} is not a multiple of {world} processes; each takes "
            f"{local} (global batch {local * world})")
    return local


def _signature(cfg: TrainOptions, n_train: int, teacher: bool) -> dict[str, Any]:
    """What an epoch checkpoint must match to be resumed (else training starts over)."""
    return {"config": cfg.model_dump(mode="json"), "n_train": n_train, "teacher": teacher}


def train(model: nn.Module, train_set: Dataset, val_set: Dataset | None, cfg: TrainOptions, *,
          seed: int = 0, teacher: nn.Module | None = None, checkpoint_dir: Path | None = None,
          progress: ProgressFactory | None = None, log: Callable[[str], None] | None = None,
          classes: list[str] | None = None, distributed: bool = False) -> TrainResult:
    """Train `model` in place and return it with the best epoch's weights loaded.

    `checkpoint_dir` (inside the stage's work folder) holds `last.pt` after each epoch; when it
    exists and matches the config, training resumes after the saved epoch instead of starting over.
    `distributed=True` (every rank of a torchrun job calls train) wraps the model in DDP; only rank
    0 writes the checkpoint, and all ranks return the same weights. `cfg` may be TrainOptions (no
    distillation settings; defaults apply) or TrainConfig.
    Ctrl-C raises TrainingInterrupted carrying the best weights reached so far.
    """
    progress = progress or _null_progress
    log = log or (lambda _m: None)
    distill = cfg.distill if isinstance(cfg, TrainConfig) else DistillConfig()
    if distributed and not dist_info()[0]:
        raise StageError("distributed training asked for, but torch.distributed is not initialised",
                         hint="start the run with torchrun")
    world = dist_info()[2] if distributed else 1
    rank = dist_info()[1] if distributed else 0
    device = resolve_device(cfg.device)
    seed_everything(seed + rank)  # ranks draw different augmentations and dropout masks
    has_val = val_set is not None and len(val_set) > 0  # type: ignore[arg-type]
    if cfg.early_stopping is not None and not has_val:
        raise ConfigError("early_stopping needs a validation split, and it is empty",
                          key="early_stopping", hint="give data.split.val a fraction > 0")

    # Everything that runs the model on a dummy input (finding the head) happens before .to(device).
    frozen: set[str] = set()
    freeze_epochs = 0
    if cfg.freeze is not None and cfg.freeze.epochs > 0:
        frozen = match_modules(model, cfg.freeze.modules)
        freeze_epochs = cfg.freeze.epochs
    frozen_bns = [m for name, m in model.named_modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm)
                  and any(n.startswith(name + ".") for n in frozen)]
    groups = _param_groups(model, cfg)
    model.to(device)
    teacher_channels = None
    if teacher is not None:
        teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        teacher_channels = input_channels(teacher)

    augment = build_augment(cfg.augment)
    if augment is not None and hasattr(train_set, "with_augment"):
        train_set = train_set.with_augment(augment)  # type: ignore[attr-defined]
    n_train = len(train_set)  # type: ignore[arg-type]
    if n_train == 0:
        raise InputError("the training split is empty", key="data.split.train",
                         hint="give the train split a larger fraction or more samples")
    local_batch = _local_batch(cfg, world, log)
    per_rank = math.ceil(n_train / world)
    # A last batch of one sample breaks BatchNorm in train mode: drop it only then.
    drop_last = per_rank > local_batch and per_rank % local_batch == 1
    loader = make_loader(train_set, local_batch, shuffle=True, seed=seed, distributed=distributed,
                         drop_last=drop_last)
    steps_per_epoch = max(1, len(loader))
    epochs = cfg.epochs
    if cfg.max_steps is not None:
        epochs = min(epochs, math.ceil(cfg.max_steps / steps_per_epoch)) if epochs else 0
    total_steps = min(cfg.max_steps or epochs * steps_per_epoch, epochs * steps_per_epoch)

    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                                                     weight_decay=cfg.weight_decay,
                                                     nesterov=cfg.momentum > 0)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    factor = _lr_lambda(cfg, steps_per_epoch, total_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)

    history: list[dict[str, Any]] = []
    best_state: dict[str, torch.Tensor] | None = None
    best_metric: float | None = None
    best_epoch: int | None = None
    bad_epochs = 0
    start_epoch = 0
    step = 0
    resumed_from = None
    stopped_early = False
    watch = cfg.early_stopping.metric if cfg.early_stopping else ("val_accuracy" if has_val else None)
    signature = _signature(cfg, n_train, teacher is not None)
    last_path = checkpoint_dir / "last.pt" if checkpoint_dir is not None else None
    state = None
    if rank == 0 and last_path is not None and last_path.exists():
        state = torch.load(last_path, map_location="cpu", weights_only=True)
        if state.get("signature") != signature:
            log(f"ignoring {last_path.name}: it was written for other training settings")
            state = None
    if distributed:
        state = broadcast_object(state)
    if state is not None:
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
        stopped_early = bool(state.get("stopped_early", False))
        rng = state["torch_rng"]
        torch.set_rng_state(rng[rank] if rank < len(rng) else rng[0])
        resumed_from = start_epoch + 1
        log(f"resuming training at epoch {resumed_from} of {epochs} (epochs 1-{start_epoch} were "
            f"saved in {last_path.name if last_path else 'the checkpoint'})")

    def finish() -> TrainResult:
        if best_state is not None:
            model.load_state_dict(best_state)
        for p in model.parameters():
            p.requires_grad_(True)
        model.eval()
        return TrainResult(model, history, best_epoch, best_metric, stopped_early, resumed_from,
                           step, time.perf_counter() - t0, metric=watch, device=str(device),
                           world_size=world, frozen_params=len(frozen) if freeze_epochs else 0)

    net: nn.Module = model
    net_frozen: bool | None = None
    t0 = time.perf_counter()
    try:
        with progress("train", float(max(1, total_steps))) as bar:
            if start_epoch:
                bar.advance(min(step, total_steps))
            for epoch in range(start_epoch, epochs):
                if stopped_early or (cfg.max_steps is not None and step >= cfg.max_steps):
                    break
                is_frozen = epoch < freeze_epochs and bool(frozen)
                for name, p in model.named_parameters():
                    p.requires_grad_(not (is_frozen and name in frozen))
                if distributed and net_frozen is not is_frozen:
                    # DDP registers the parameters that require grad when it is built: rebuild it
                    # when the freezing phase changes.
                    from torch.nn.parallel import DistributedDataParallel as DDP
                    net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
                    net_frozen = is_frozen
                net.train()
                for m in frozen_bns if is_frozen else ():
                    m.eval()  # frozen modules keep their running statistics too
                if distributed:
                    loader.sampler.set_epoch(epoch)  # type: ignore[union-attr]
                else:
                    loader.generator.manual_seed(_epoch_seed(seed, epoch))  # type: ignore[union-attr]
                tot_loss = tot_correct = tot_n = 0.0
                shown = 0.0
                for x, y in loader:
                    if cfg.max_steps is not None and step >= cfg.max_steps:
                        break
                    x, y = x.to(device), torch.as_tensor(y).to(device)
                    out = net(x)
                    if teacher is not None:
                        with torch.no_grad():
                            t_logits = teacher(adapt_channels(x, teacher_channels or x.shape[1]))
                        loss = distillation_loss(out, t_logits, y, temperature=distill.temperature,
                                                 alpha=distill.alpha,
                                                 label_smoothing=cfg.label_smoothing)
                    else:
                        loss = F.cross_entropy(out, y, label_smoothing=cfg.label_smoothing)
                    if not torch.isfinite(loss):
                        raise StageError(f"the training loss became {float(loss)} at step {step + 1} "
                                         f"(epoch {epoch + 1})", key="lr",
                                         hint="lower lr, add warmup_epochs or set grad_clip")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    opt.step()
                    sched.step()
                    step += 1
                    n = x.shape[0]
                    tot_loss += float(loss.detach()) * n
                    tot_correct += float((out.detach().argmax(1) == y).sum())
                    tot_n += n
                    bar.advance(1)
                    if time.perf_counter() - shown > 0.5:
                        shown = time.perf_counter()
                        bar.update(epoch=f"{epoch + 1}/{epochs}", loss=tot_loss / tot_n,
                                   acc=tot_correct / tot_n)
                if distributed:
                    tot_loss, tot_correct, tot_n = all_reduce_sum([tot_loss, tot_correct, tot_n],
                                                                    device)
                    sync_buffers(model)
                row: dict[str, Any] = {
                    "epoch": epoch + 1, "step": step, "lr": cfg.lr * factor(max(0, step - 1)),
                    "train_loss": tot_loss / max(tot_n, 1),
                    "train_accuracy": tot_correct / max(tot_n, 1), "frozen": is_frozen}
                if has_val:
                    rep = _evaluate_split(model, val_set, cfg, device, distributed)  # type: ignore[arg-type]
                    row["val_loss"], row["val_accuracy"] = rep["loss"], rep["accuracy"]
                improved = True  # without validation the last epoch is the best known
                if watch is not None:
                    sign = 1 if watch == "val_accuracy" else -1
                    delta = cfg.early_stopping.min_delta if cfg.early_stopping else 0.0
                    improved = best_metric is None or sign * (row[watch] - best_metric) > delta
                if improved:
                    best_metric = row[watch] if watch else None
                    best_epoch = epoch + 1
                    best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                    bad_epochs = 0
                else:
                    bad_epochs += 1
                row["best"] = best_epoch == epoch + 1
                history.append(row)
                if cfg.early_stopping and bad_epochs >= cfg.early_stopping.patience:
                    stopped_early = True
                    log(f"early stopping after epoch {epoch + 1}: {watch} did not improve for "
                        f"{bad_epochs} epochs; best epoch {best_epoch}")
                rng = [torch.get_rng_state()]
                if distributed:
                    rng = all_gather_object(rng[0])
                if last_path is not None and rank == 0:
                    _save_last(last_path, {
                        "signature": signature, "model": model.state_dict(),
                        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "history": history, "best_state": best_state, "best_metric": best_metric,
                        "best_epoch": best_epoch, "bad_epochs": bad_epochs, "step": step,
                        "epoch": epoch, "stopped_early": stopped_early, "torch_rng": rng})
                bar.update(epoch=f"{epoch + 1}/{epochs}", loss=row["train_loss"],
                           acc=row["train_accuracy"],
                           **({"val_acc": row["val_accuracy"]} if has_val else {}))
    except KeyboardInterrupt:
        raise TrainingInterrupted(finish()) from None
    return finish()


def _save_last(path: Path, state: dict[str, Any]) -> None:
    from edgemml.artifacts import atomic_path

    with atomic_path(path) as tmp:
        torch.save(state, tmp)
