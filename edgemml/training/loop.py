"""The training loop shared by `finetune` and by `prune`'s recovery.

One loop with: SGD / AdamW, warm-up then cosine or step decay (per step), label smoothing, gradient
clipping, YAML-declared augmentation, freezing schedules (frozen BatchNorm stays in eval mode),
discriminative learning rates, knowledge distillation, early stopping on a validation metric (the best
epoch, not the last, is returned), epoch checkpoints for resuming (bit-identical to an uninterrupted
run on one process), and DDP across processes started by torchrun (`distributed=True`).

`train()` builds a `_Trainer` (the setup: device, freezing, optimizer, schedule, loader), restores a
`ResumeState` from the epoch checkpoint when one matches, and runs epochs; everything an epoch
checkpoint holds is the ResumeState, so what is saved and what is resumed cannot drift apart.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from edgemml.distributed import (
    all_gather_object,
    all_reduce_sum,
    broadcast_object,
    dist_info,
    sync_buffers,
)
from edgemml.errors import ConfigError, InputError, StageError
from edgemml.models.registry import versioned_state
from edgemml.training.core import (
    _epoch_seed,
    adapt_channels,
    build_augment,
    distillation_loss,
    evaluate_split,
    input_channels,
    local_batch,
    lr_factor,
    make_loader,
    match_modules,
    param_groups,
    resolve_device,
    save_last,
    seed_everything,
    split_outputs,
)
from edgemml.training_config import DistillConfig, TrainConfig, TrainOptions

#: the early-stopping option's names (pipeline.yaml) -> history columns
_WATCHED = {"val_accuracy": "val_top1_pct", "val_loss": "val_loss"}


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
    metric: str | None = None  # what best_metric measures (a history column)
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


@dataclass
class ResumeState:
    """Where training stands after an epoch: what the epoch checkpoint (last.pt) holds besides the
    model, optimizer and scheduler states."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best_state: dict[str, torch.Tensor] | None = None
    best_metric: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0
    step: int = 0
    epoch: int = -1  # the last finished epoch (0-based)
    stopped_early: bool = False


class _Trainer:
    """One call of `train`: the setup, then `run` (epochs), then the result."""

    def __init__(self, model: nn.Module, train_set: Dataset, val_set: Dataset | None,
                 cfg: TrainOptions, *, seed: int, teacher: nn.Module | None,
                 checkpoint_dir: Path | None, log: Callable[[str], None],
                 distributed: bool) -> None:
        self.model, self.cfg, self.seed, self.log = model, cfg, seed, log
        self.distill = cfg.distill if isinstance(cfg, TrainConfig) else DistillConfig()
        if distributed and not dist_info()[0]:
            raise StageError("distributed training asked for, but torch.distributed is not "
                             "initialised", hint="start the run with torchrun")
        self.distributed = distributed
        self.world = dist_info()[2] if distributed else 1
        self.rank = dist_info()[1] if distributed else 0
        self.device = resolve_device(cfg.device)
        seed_everything(seed + self.rank)  # ranks draw different augmentations and dropout masks
        self.val_set = val_set
        self.has_val = val_set is not None and len(val_set) > 0  # type: ignore[arg-type]
        if cfg.early_stopping is not None and not self.has_val:
            raise ConfigError("early_stopping needs a validation split, and it is empty",
                              key="early_stopping", hint="give data.split.val a fraction > 0")
        self._freeze_setup()
        groups = param_groups(model, cfg)  # runs before .to(device), like finding the head
        model.to(self.device)
        self.teacher, self.teacher_channels = teacher, None
        if teacher is not None:
            teacher.to(self.device).eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
            self.teacher_channels = input_channels(teacher)
        self._loader_setup(train_set)
        if cfg.optimizer == "sgd":
            self.opt: torch.optim.Optimizer = torch.optim.SGD(
                groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                nesterov=cfg.momentum > 0)
        else:
            self.opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.factor = lr_factor(cfg, self.steps_per_epoch, self.total_steps)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self.factor)
        self.watch = (_WATCHED[cfg.early_stopping.metric] if cfg.early_stopping
                      else ("val_top1_pct" if self.has_val else None))
        self.signature = {"config": cfg.model_dump(mode="json"), "n_train": self.n_train,
                          "teacher": teacher is not None, "checkpoint_format": 2}
        self.last_path = checkpoint_dir / "last.pt" if checkpoint_dir is not None else None
        self.state = ResumeState()
        self.resumed_from: int | None = None
        self.net: nn.Module = model
        self.net_frozen: bool | None = None

    def _freeze_setup(self) -> None:
        cfg, model = self.cfg, self.model
        self.frozen: set[str] = set()
        self.freeze_epochs = 0
        if cfg.freeze is not None and cfg.freeze.epochs > 0:
            self.frozen = match_modules(model, cfg.freeze.modules)
            self.freeze_epochs = cfg.freeze.epochs
        self.frozen_bns = [m for name, m in model.named_modules()
                           if isinstance(m, nn.modules.batchnorm._BatchNorm)
                           and any(n.startswith(name + ".") for n in self.frozen)]

    def _loader_setup(self, train_set: Dataset) -> None:
        cfg = self.cfg
        augment = build_augment(cfg.augment)
        if augment is not None and hasattr(train_set, "with_augment"):
            train_set = train_set.with_augment(augment)  # type: ignore[attr-defined]
        self.n_train = len(train_set)  # type: ignore[arg-type]
        if self.n_train == 0:
            raise InputError("the training split is empty", key="data.split.train",
                             hint="give the train split a larger fraction or more samples")
        batch = local_batch(cfg, self.world, self.log)
        per_rank = math.ceil(self.n_train / self.world)
        # A last batch of one sample breaks BatchNorm in train mode: drop it only then.
        drop_last = per_rank > batch and per_rank % batch == 1
        self.loader = make_loader(train_set, batch, shuffle=True, seed=self.seed,
                                  distributed=self.distributed, drop_last=drop_last)
        self.steps_per_epoch = max(1, len(self.loader))
        epochs = cfg.epochs
        if cfg.max_steps is not None:
            epochs = min(epochs, math.ceil(cfg.max_steps / self.steps_per_epoch)) if epochs else 0
        self.epochs = epochs
        self.total_steps = min(cfg.max_steps or epochs * self.steps_per_epoch,
                               epochs * self.steps_per_epoch)

    # ---- resume ------------------------------------------------------------------------------

    def resume(self) -> None:
        """Restore the epoch checkpoint when it was written for the same settings."""
        saved = None
        path = self.last_path
        if self.rank == 0 and path is not None and path.exists():
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("signature") != self.signature:
                self.log(f"ignoring {path.name}: it was written for other training settings")
                saved = None
        if self.distributed:
            saved = broadcast_object(saved)
        if saved is None:
            return
        self.model.load_state_dict(versioned_state(saved["model"], self.model))
        self.opt.load_state_dict(saved["optimizer"])
        self.sched.load_state_dict(saved["scheduler"])
        self.state = ResumeState(**saved["state"])
        rng = saved["torch_rng"]
        torch.set_rng_state(rng[self.rank] if self.rank < len(rng) else rng[0])
        self.resumed_from = self.state.epoch + 2
        self.log(f"resuming training at epoch {self.resumed_from} of {self.epochs} (epochs "
                 f"1-{self.state.epoch + 1} were saved in {path.name if path else 'a checkpoint'})")

    def _checkpoint(self) -> None:
        rng = [torch.get_rng_state()]
        if self.distributed:
            rng = all_gather_object(rng[0])
        if self.last_path is not None and self.rank == 0:
            save_last(self.last_path, {
                "signature": self.signature, "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "state": asdict(self.state), "torch_rng": rng})

    # ---- epochs ------------------------------------------------------------------------------

    def _set_phase(self, epoch: int) -> bool:
        """Freeze or unfreeze for this epoch; returns whether the freezing phase is on."""
        is_frozen = epoch < self.freeze_epochs and bool(self.frozen)
        for name, p in self.model.named_parameters():
            p.requires_grad_(not (is_frozen and name in self.frozen))
        if self.distributed and self.net_frozen is not is_frozen:
            # DDP registers the parameters that require grad when it is built: rebuild it when
            # the freezing phase changes.
            from torch.nn.parallel import DistributedDataParallel as DDP
            dev = self.device
            self.net = DDP(self.model, device_ids=[dev.index] if dev.type == "cuda" else None)
            self.net_frozen = is_frozen
        self.net.train()
        for m in self.frozen_bns if is_frozen else ():
            m.eval()  # frozen modules keep their running statistics too
        if self.distributed:
            self.loader.sampler.set_epoch(epoch)  # type: ignore[union-attr]
        else:
            self.loader.generator.manual_seed(_epoch_seed(self.seed, epoch))  # type: ignore[union-attr]
        return is_frozen

    def _loss(self, out: torch.Tensor, aux: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
              epoch: int) -> Any:
        cfg = self.cfg
        if self.teacher is not None:
            with torch.no_grad():
                t_logits = self.teacher(adapt_channels(x, self.teacher_channels or x.shape[1]))
            loss = distillation_loss(out, t_logits, y, temperature=self.distill.temperature,
                                     alpha=self.distill.alpha,
                                     label_smoothing=cfg.label_smoothing)
        else:
            loss = F.cross_entropy(out, y, label_smoothing=cfg.label_smoothing)
        if aux and cfg.aux_loss_weight > 0:
            loss = loss + cfg.aux_loss_weight * sum(
                F.cross_entropy(a, y, label_smoothing=cfg.label_smoothing) for a in aux)
        if not torch.isfinite(loss):
            raise StageError(f"the training loss became {float(loss)} at step "
                             f"{self.state.step + 1} (epoch {epoch + 1})", key="lr",
                             hint="lower lr, add warmup_epochs or set grad_clip")
        return loss

    def _epoch(self, epoch: int, bar: Any) -> dict[str, Any]:
        """One pass over the loader; returns the epoch's history row (train figures)."""
        cfg, st = self.cfg, self.state
        is_frozen = self._set_phase(epoch)
        tot_loss = tot_correct = tot_n = 0.0
        shown = 0.0
        for x, y in self.loader:
            if cfg.max_steps is not None and st.step >= cfg.max_steps:
                break
            x, y = x.to(self.device), torch.as_tensor(y).to(self.device)
            out, aux = split_outputs(self.net(x))
            loss = self._loss(out, aux, x, y, epoch)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.opt.step()
            self.sched.step()
            st.step += 1
            n = x.shape[0]
            tot_loss += float(loss.detach()) * n
            tot_correct += float((out.detach().argmax(1) == y).sum())
            tot_n += n
            bar.advance(1)
            if time.perf_counter() - shown > 0.5:
                shown = time.perf_counter()
                bar.update(epoch=f"{epoch + 1}/{self.epochs}", loss=tot_loss / tot_n,
                           acc=100.0 * tot_correct / tot_n)
        if self.distributed:
            tot_loss, tot_correct, tot_n = all_reduce_sum([tot_loss, tot_correct, tot_n],
                                                            self.device)
            sync_buffers(self.model)
        return {"epoch": epoch + 1, "step": st.step,
                "lr": cfg.lr * self.factor(max(0, st.step - 1)),
                "train_loss": tot_loss / max(tot_n, 1),
                "train_top1_pct": 100.0 * tot_correct / max(tot_n, 1), "frozen": is_frozen}

    def _end_epoch(self, epoch: int, row: dict[str, Any]) -> None:
        """Validation, best-epoch tracking, early stopping and the epoch checkpoint."""
        cfg, st = self.cfg, self.state
        if self.has_val:
            rep = evaluate_split(self.model, self.val_set, cfg.eval_batch_size,  # type: ignore[arg-type]
                                  self.device, self.distributed)
            row["val_loss"], row["val_top1_pct"] = rep["loss"], rep["top1_pct"]
        improved = True  # without validation the last epoch is the best known
        if self.watch is not None:
            sign = 1 if self.watch == "val_top1_pct" else -1
            delta = cfg.early_stopping.min_delta if cfg.early_stopping else 0.0
            if self.watch == "val_top1_pct":
                delta *= 100.0  # min_delta is given as a fraction of accuracy in pipeline.yaml
            improved = st.best_metric is None or sign * (row[self.watch] - st.best_metric) > delta
        if improved:
            st.best_metric = row[self.watch] if self.watch else None
            st.best_epoch = epoch + 1
            st.best_state = {k: v.detach().cpu().clone()
                             for k, v in self.model.state_dict().items()}
            st.bad_epochs = 0
        else:
            st.bad_epochs += 1
        row["best"] = st.best_epoch == epoch + 1
        st.history.append(row)
        st.epoch = epoch
        if cfg.early_stopping and st.bad_epochs >= cfg.early_stopping.patience:
            st.stopped_early = True
            self.log(f"early stopping after epoch {epoch + 1}: {self.watch} did not improve for "
                     f"{st.bad_epochs} epochs; best epoch {st.best_epoch}")
        self._checkpoint()

    def run(self, progress: ProgressFactory) -> TrainResult:
        cfg, st = self.cfg, self.state
        t0 = time.perf_counter()
        try:
            with progress("train", float(max(1, self.total_steps))) as bar:
                if st.step:
                    bar.advance(min(st.step, self.total_steps))
                for epoch in range(st.epoch + 1, self.epochs):
                    if st.stopped_early or (cfg.max_steps is not None and st.step >= cfg.max_steps):
                        break
                    row = self._epoch(epoch, bar)
                    self._end_epoch(epoch, row)
                    bar.update(epoch=f"{epoch + 1}/{self.epochs}", loss=row["train_loss"],
                               acc=row["train_top1_pct"],
                               **({"val_acc": row["val_top1_pct"]} if self.has_val else {}))
        except KeyboardInterrupt:
            raise TrainingInterrupted(self.finish(t0)) from None
        return self.finish(t0)

    def finish(self, t0: float) -> TrainResult:
        st, model = self.state, self.model
        if st.best_state is not None:
            model.load_state_dict(versioned_state(st.best_state, model))
        for p in model.parameters():
            p.requires_grad_(True)
        model.eval()
        return TrainResult(model, st.history, st.best_epoch, st.best_metric, st.stopped_early,
                           self.resumed_from, st.step, time.perf_counter() - t0, metric=self.watch,
                           device=str(self.device), world_size=self.world,
                           frozen_params=len(self.frozen) if self.freeze_epochs else 0)


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
    trainer = _Trainer(model, train_set, val_set, cfg, seed=seed, teacher=teacher,
                       checkpoint_dir=checkpoint_dir, log=log or (lambda _m: None),
                       distributed=distributed)
    trainer.resume()
    return trainer.run(progress or _null_progress)
