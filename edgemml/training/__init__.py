"""Training: the loop shared by `finetune` and `prune`'s recovery (loop.py) and what it is built
from (core.py: devices, seeds, augmentation, loaders, distillation, evaluation, BatchNorm
re-estimation). Options are declared in edgemml.training_config, which imports no torch."""

from edgemml.training.core import (
    ChannelAdapter,
    adapt_channels,
    build_augment,
    distillation_loss,
    evaluate,
    input_channels,
    make_loader,
    match_modules,
    predict_logits,
    recalibrate_bn,
    resolve_device,
    seed_everything,
    split_outputs,
)
from edgemml.training.loop import TrainingInterrupted, TrainResult, train
from edgemml.training_config import (
    AugmentConfig,
    DistillConfig,
    EarlyStopConfig,
    FreezeConfig,
    LrGroup,
    TrainConfig,
    TrainOptions,
)

__all__ = ["AugmentConfig", "ChannelAdapter", "DistillConfig", "EarlyStopConfig", "FreezeConfig",
           "LrGroup", "TrainConfig", "TrainOptions", "TrainResult", "TrainingInterrupted",
           "adapt_channels", "build_augment", "distillation_loss", "evaluate", "input_channels",
           "make_loader", "match_modules", "predict_logits", "recalibrate_bn", "resolve_device",
           "seed_everything", "split_outputs", "train"]
