"""The `prune` stage: structured channel pruning (torch-pruning) to a MACs / params / channel target,
with BatchNorm re-estimation and recovery fine-tuning (optionally distilled from the unpruned model).

Whole channels are removed, so the pruned model is a smaller dense model that is faster on any CPU
runtime; unstructured sparsity is not offered because CPUs do not run it faster. Every figure in
prune.json is measured here: MACs and parameters by torch-pruning's counter, accuracy on the val
split, latency of the input and the pruned model timed in the same interleaved run (by the runtime
layer's timer).

The work is in _prune.py (one PruneJob: setup, the search loop per step, recovery, the report);
this module holds the options and the stage class.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, model_validator

from edgemml.config import DataConfig, PreprocessConfig, StageConfig, StrictModel
from edgemml.stages import common
from edgemml.stages.base import Stage, StageContext
from edgemml.training_config import TrainConfig

if TYPE_CHECKING:
    from edgemml.config import LoadedPipeline


TARGETS = ("target_macs", "target_params", "channel_sparsity", "target_latency_ms",
           "target_speedup")


class LatencyConfig(StrictModel):
    """Torch CPU latency of the input and the pruned model, timed interleaved in one run."""

    threads: int = Field(1, ge=1, description="torch.set_num_threads during timing (fixed, so "
                         "before/after compare like with like).")
    batch_size: int = Field(1, ge=1, description="Batch size of the timed input.")
    warmup: int = Field(10, ge=0, description="Untimed calls per model before timing.")
    repeats: int = Field(50, ge=1, description="Timed calls per model (median reported).")


class LatencyTargetConfig(StrictModel):
    """What a latency target refers to, and how candidates are measured (target_latency_ms or
    target_speedup)."""

    artifact: Literal["onnx-int8", "openvino-int8", "onnx-fp32", "openvino-fp32", "torch"] = Field(
        "onnx-int8", description="The deployed artifact whose latency the target is: each "
        "candidate is converted to it (int8: calibrated on calibration_samples) and timed.")
    speedup_over: Literal["torch", "input"] = Field(
        "torch", description="target_speedup is relative to: torch (the input model in torch fp32 "
        "eager) or input (the input model as the same artifact, i.e. what pruning alone gains).")
    threads: int = Field(1, ge=1, description="Threads of the runtime while timing (use the "
                         "validate stage's).")
    batch: int = Field(1, ge=1, description="Batch size of the timed calls.")
    calibration_samples: int = Field(16, ge=1, description="Train samples calibrating each "
                                     "candidate's quick int8 conversion (latency does not depend "
                                     "on how well ranges are calibrated).")
    warmup: int = Field(5, ge=0, description="Untimed calls per candidate and anchor.")
    runs: int = Field(30, ge=3, description="Timed calls per candidate (and as many of the anchor, "
                      "interleaved).")
    rounds: int = Field(5, ge=1, description="Interleaved rounds the timed calls are split into.")
    margin: float = Field(0.05, ge=0, lt=0.5, description="Aim this fraction under the target, so "
                          "that timing noise cannot push the chosen artifact over it.")
    resolution: float = Field(0.02, gt=0, lt=0.5, description="Stop bisecting the channel ratio "
                              "when the interval is this narrow.")
    max_probes: int = Field(10, ge=2, description="At most this many candidates are measured.")
    accuracy: bool = Field(True, description="Also measure each candidate's val top-1 after "
                           "BatchNorm re-estimation (before recovery), for the trajectory.")
    exporter: Literal["auto", "dynamo", "torchscript"] = Field(
        "auto", description="ONNX exporter of the candidates (auto: as the quantize stage).")
    opset: int = Field(18, ge=11, le=23, description="ONNX opset of the candidates.")
    max_foreign_load: float | None = Field(
        0.25, ge=0, le=1, description="At most this fraction of the machine's CPUs may be used by "
        "other processes while the baseline (the unpruned model, and torch) is timed: under load "
        "torch fp32 slows about twice as much as int8 runtimes, so a speed-up measured then is "
        "biased (a 12x target became ~6x). null: do not check.")
    busy_wait_s: float = Field(60, ge=0, description="Wait up to this long for a busy machine to "
                               "quiet down before timing the baseline.")
    on_busy: Literal["warn", "fail"] = Field(
        "warn", description="When the machine stays busy: warn (in the log and prune.json) or "
        "fail (exit 2; for CI jobs that must not ship a ratio measured under load).")


class PruneConfig(StageConfig):
    """Options of the prune stage (give exactly one of target_macs, target_params,
    channel_sparsity, target_latency_ms, target_speedup)."""

    type: Literal["prune"]
    target_macs: float | None = Field(None, gt=0, lt=1, description="Fraction of the input model's "
                                      "MACs to keep, e.g. 0.5.")
    target_params: float | None = Field(None, gt=0, lt=1, description="Fraction of the input "
                                        "model's parameters to keep.")
    channel_sparsity: float | None = Field(None, gt=0, lt=1, description="Fraction of the output "
                                           "channels of prunable Conv/Linear layers to remove.")
    target_latency_ms: float | None = Field(
        None, gt=0, description="Latency budget in ms of the deployed artifact (latency_target: "
        "which artifact, threads, batch), measured on this machine: the smallest pruning ratio "
        "that meets it is searched by timing each candidate. Machine-specific: the machine is "
        "recorded in prune.json.")
    target_speedup: float | None = Field(
        None, gt=1, description="Latency budget as a speed-up (e.g. 12: 1/12 of the latency) of "
        "the deployed artifact over latency_target.speedup_over, measured in the same run: "
        "portable across machines, unlike target_latency_ms.")
    latency_target: LatencyTargetConfig = Field(
        default_factory=LatencyTargetConfig, description="The artifact a latency target refers "
        "to and how candidates are timed.")
    tolerance: float = Field(0.02, gt=0, lt=0.5, description="Accepted absolute distance of the kept "
                             "fraction from the target (0.02: 0.48..0.52 for a 0.5 target).")
    importance: Literal["l1", "l2", "bn_scale", "taylor"] = Field(
        "l2", description="Channel ranking (torch-pruning): weight magnitude l1/l2, BatchNorm scale, "
        "or first-order Taylor (uses importance_batches batches of the train split).")
    importance_batches: int = Field(4, ge=1, description="Train batches for Taylor gradients.")
    global_pruning: bool = Field(False, description="Rank channels across all layers (true) or "
                                 "prune every layer by the same ratio (false).")
    round_to: int | None = Field(8, ge=1, description="Keep channel counts multiples of this "
                                 "(SIMD/NPU friendly; odd counts made ORT 2.3x slower). null: off.")
    ignore: list[str] = Field(default_factory=list, description="Module name patterns (fnmatch) "
                              "whose shapes are kept whole; the classifier head's outputs are "
                              "always kept.")
    max_layer_sparsity: float = Field(0.8, gt=0, lt=1, description="No layer loses more than this "
                                      "fraction of its original output channels.")
    steps: int = Field(1, ge=1, description="Iterative pruning: reach the target in this many "
                       "equal steps, re-estimating BatchNorm (and recovering) after each.")
    max_iterations: int = Field(16, ge=2, description="Bisection trials per step (and per refine "
                                "pass) to reach the target within tolerance.")
    recover: TrainConfig | None = Field(
        default_factory=lambda: TrainConfig(epochs=5),
        description="Recovery fine-tuning with the finetune trainer's options (default when omitted: "
        "5 epochs, otherwise the trainer's defaults); null: no recovery.")
    recover_after: Literal["each_step", "last_step"] = Field(
        "each_step", description="Recover after every pruning step or only after the last.")
    distill: bool = Field(True, description="Distil from the unpruned input model during recovery "
                          "(temperature/alpha: recover.distill).")
    bn_batches: int = Field(20, ge=1, description="Train batches used to re-estimate BatchNorm "
                            "statistics after each pruning step (before any accuracy is reported).")
    bn_batch_size: int = Field(64, ge=2, description="Batch size for BatchNorm re-estimation.")
    latency: LatencyConfig | None = Field(default_factory=LatencyConfig,
                                          description="Latency measurement; null: skip.")
    max_memory_mb: float | None = Field(
        None, gt=0, description="Memory budget (MB, resident) of torch-pruning's dependency "
        "graph, measured in a child process before the search; above it the stage stops with "
        "exit 2 instead of being killed by the kernel. Default: 60% of the memory available "
        "when the stage starts.")
    graph_timeout_s: float = Field(900, gt=0, description="Time limit (s) of that measurement.")
    data: DataConfig | None = None
    preprocess: PreprocessConfig | None = None

    @model_validator(mode="after")
    def _one_target(self) -> PruneConfig:
        given = [k for k in TARGETS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(TARGETS)}"
                             + (f" (got {', '.join(given)})" if given else ""))
        if (self.target_speedup is not None and self.latency_target.speedup_over == "torch"
                and self.latency_target.artifact == "torch"):
            raise ValueError("target_speedup over torch of a torch artifact: use "
                             "latency_target.speedup_over: input")
        return self

    def latency_goal(self) -> tuple[str, float] | None:
        """("ms", budget) or ("speedup", factor) for a latency target, else None."""
        if self.target_latency_ms is not None:
            return "ms", self.target_latency_ms
        if self.target_speedup is not None:
            return "speedup", self.target_speedup
        return None

    def target(self) -> tuple[str, float]:
        """(metric, fraction to keep); for a latency target ("latency", the budget), which the
        latency search replaces by the MACs fraction it found."""
        goal = self.latency_goal()
        if goal is not None:
            return "latency", goal[1]
        if self.target_macs is not None:
            return "macs", self.target_macs
        if self.target_params is not None:
            return "params", self.target_params
        assert self.channel_sparsity is not None
        return "channels", 1.0 - self.channel_sparsity


class PruneStage(Stage[PruneConfig]):
    """Prune channels to a target, re-estimate BatchNorm, recover, measure, save."""

    type = "prune"
    Config = PruneConfig
    requires = ("torch", "torchvision", "torch-pruning")
    provides = ("model", "report")
    #: the (seeded) search runs again; recovery resumes after its last epoch checkpoint
    resumable: ClassVar[bool] = True

    @classmethod
    def model_needs(cls, config: PruneConfig) -> tuple[str, ...]:
        return ("prune",)

    @classmethod
    def data_files(cls, config: PruneConfig, pipeline: LoadedPipeline) -> list[Path]:
        return common.stage_data_files(config, pipeline)

    def run(self, ctx: StageContext, config: PruneConfig) -> dict[str, Path]:
        from edgemml.stages._prune import PruneJob

        job = PruneJob(ctx, config)
        search = None
        if config.latency_goal() is not None:
            from edgemml.stages._prune_latency import LatencySearch

            search = job.latency_target = LatencySearch(job)
            search.run()  # sets job.metric, job.keep (and job.preset for one step)
        for k in range(1, config.steps + 1):
            job.step(k)
        if search is not None:
            search.verify()  # the recovered model, measured as deployed
        return job.finish()


STAGE = PruneStage
