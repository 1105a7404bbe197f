"""Training options (pydantic), importable without torch.

Separate from edgemml.training so that loading a pipeline file (config validation, `edgemml check`,
`edgemml schema`) does not import torch; edgemml.training re-exports every name.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from edgemml.config import StrictModel

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
    """Stop when the validation metric has not improved for `patience` epochs."""

    metric: Literal["val_accuracy", "val_loss"] = Field("val_accuracy",
                                                        description="Metric watched on val split.")
    patience: int = Field(3, ge=1, description="Epochs without improvement before stopping.")
    min_delta: float = Field(0.0, ge=0, description="Smallest change that counts as improvement "
                             "(val_accuracy: a fraction, 0.005 = half a point; val_loss: absolute).")


class DistillConfig(StrictModel):
    """Soft-target knowledge distillation (Hinton et al.): alpha*T^2*KL + (1-alpha)*CE."""

    temperature: float = Field(4.0, gt=0, description="Softmax temperature.")
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the soft-target term.")


class TrainOptions(StrictModel):
    """The optimisation options (everything but distillation), embedded by the finetune stage."""

    epochs: int = Field(10, ge=0, description="Epochs (an upper bound when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    batch_size: int = Field(64, ge=1, description="Global batch size; under torchrun each of the N "
                            "processes takes batch_size / N, so results do not depend on N.")
    optimizer: Literal["sgd", "adamw"] = Field("adamw", description="sgd (Nesterov momentum) or "
                                               "adamw.")
    lr: float = Field(1e-3, gt=0, description="Base learning rate.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    weight_decay: float = Field(1e-4, ge=0, description="Weight decay (decoupled for adamw).")
    schedule: Literal["cosine", "step", "constant"] = Field("cosine", description="LR decay after "
                                                            "the warm-up, applied per step.")
    warmup_epochs: float = Field(0.0, ge=0, description="Linear warm-up length in epochs.")
    step_epochs: int = Field(10, ge=1, description="Step schedule: decay every this many epochs.")
    gamma: float = Field(0.1, gt=0, le=1, description="Step schedule: decay factor.")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Label smoothing of the CE loss.")
    aux_loss_weight: float = Field(
        0.3, ge=0, description="Models with auxiliary classifiers (googlenet, inception_v3 built "
        "with aux_logits) return their logits in training mode: this weight times each aux "
        "head's cross-entropy is added to the main loss (0.3: the GoogLeNet paper); 0 trains the "
        "main head only. Exported and evaluated models use the main head alone.")
    grad_clip: float | None = Field(None, gt=0, description="Clip the gradient norm to this.")
    augment: AugmentConfig = Field(default_factory=AugmentConfig,
                                   description="Random augmentations of the training images.")
    freeze: FreezeConfig | None = Field(None, description="Freezing schedule (head first).")
    lr_groups: list[LrGroup] = Field(default_factory=list,
                                     description="Discriminative learning rates; the first group "
                                     "matching a parameter wins.")
    early_stopping: EarlyStopConfig | None = Field(None, description="Stop when val stops improving.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present.")
    eval_batch_size: int = Field(256, ge=1, description="Batch size for evaluation.")


class TrainConfig(TrainOptions):
    """Training options shared by finetune and prune's recovery."""

    distill: DistillConfig = Field(default_factory=DistillConfig,
                                   description="Distillation settings (used when a teacher is set).")
