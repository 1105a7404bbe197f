"""Quantization-aware training (QAT) when post-training int8 is not enough: torchao's PT2E QAT,
exported to one standard QDQ ONNX file that both ONNX Runtime and OpenVINO run.

Why torchao PT2E and not NNCF's PyTorch QAT (both tried on a trained mobilenet_v3_small, 30 steps):
* NNCF's torch model exports its own `org.openvinotoolkit:FakeQuantize` ops, which ONNX Runtime
  refuses to load ("FakeQuantize(-1) is not a registered function/op"): the ORT artifact would need
  a second path. torchao's converted graph exports to plain QuantizeLinear/DequantizeLinear (68 Q +
  122 DQ there), which ORT runs as int8 and `openvino.convert_model` turns into a FakeQuantize IR:
  one artifact path for both runtimes, validated like the PTQ ones.
* NNCF's PyTorch backend JIT-compiles a C++ extension on first use; on a loaded machine it hit its
  60 s default timeout, and a killed compile leaves a lock file that makes the next run wait
  forever. torchao needs no compiler.
* torch 2.14 removed `torch.ao.quantization.quantize_pt2e`; the maintained API is
  `torchao.quantization.pt2e` (what executorch's extra pins too: torchao 0.18).

The recipe matches the PTQ one per target: x86 (VNNI or not) -> X86InductorQuantizer (uint8
activations x int8 per-channel weights, as ORT's x86 recipe); arm64 -> ArmInductorQuantizer (int8
activations and weights). The model is exported in training mode (so BatchNorm folds into the
fake-quantized convs), observers are calibrated on the calibration samples in eval mode, the
fake-quantized model is fine-tuned with distillation from the fp32 model (what is measured is the
drop against it), then converted and exported.

Measured limit (torch 2.14.1, torchao 0.18.0): prepare_qat_pt2e with the X86 quantizer fails on
torchvision's ResNets ("Input partition has more than one output node", in its conv-bn-add-relu
fusion annotation), whether the model is exported in training or eval mode; mobilenet_v2,
mobilenet_v3_small and plain conv-bn-relu stacks prepare, train and export. A model that cannot be
prepared raises StageError: the quantize stage records it and reports the post-training figures.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from edgemml.errors import StageError
from edgemml.quantization.budget import noop_progress


@dataclass
class QatResult:
    onnx: Path
    quantizer: str
    steps: int
    seconds: float
    lr: float
    batch_size: int
    loss_start: float | None = None
    loss_end: float | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"method": "torchao PT2E QAT", "quantizer": self.quantizer, "steps": self.steps,
                "seconds": round(self.seconds, 1), "lr": self.lr, "batch_size": self.batch_size,
                "loss_start": self.loss_start, "loss_end": self.loss_end, "notes": self.notes}


class _MainHead(nn.Module):
    """The model's main logits only (googlenet/inception return aux logits in training mode)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from edgemml.training.core import split_outputs

        return split_outputs(self.model(x))[0]


def _quantizer(target: str) -> tuple[Any, str]:
    if target == "arm64":
        from torchao.quantization.pt2e.quantizer.arm_inductor_quantizer import (
            ArmInductorQuantizer, get_default_arm_inductor_quantization_config)

        return (ArmInductorQuantizer().set_global(
            get_default_arm_inductor_quantization_config(is_qat=True)),
            "ArmInductorQuantizer (int8 activations, int8 per-tensor weights)")
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)

    return (X86InductorQuantizer().set_global(
        get_default_x86_inductor_quantization_config(is_qat=True)),
        "X86InductorQuantizer (uint8 activations, int8 per-channel weights)")


def _export_onnx(converted: Any, example: torch.Tensor, path: Path, *, opset: int,
                 input_name: str, output_name: str) -> None:
    from edgemml.exporters.onnx import _quiet, written_opset

    with _quiet():
        torch.onnx.export(converted, (example,), str(path), dynamo=True, opset_version=opset,
                          external_data=False, input_names=[input_name],
                          output_names=[output_name],
                          dynamic_shapes=({0: torch.export.Dim("batch")},), verify=False)
    got = written_opset(path)
    if got != opset:
        raise StageError(f"the QAT model was written with opset {got}, not {opset}: torch's "
                         f"exporter cannot write quantized graphs below opset 18",
                         key="onnx.opset", hint="use onnx.opset: 18 with qat")


def qat_to_onnx(model: nn.Module, train_set: Any, calibration: np.ndarray, out: Path, *,
                target: str, max_steps: int, lr: float, batch_size: int, seed: int,
                opset: int = 18, input_name: str = "input", output_name: str = "logits",
                log: Callable[[str], None] = print, progress: Any = noop_progress) -> QatResult:
    """Fine-tune `model` (not modified) with fake quantization and write an int8 QDQ ONNX file."""
    import copy

    try:
        from torchao.quantization.pt2e import (move_exported_model_to_eval,
                                               move_exported_model_to_train)
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e
    except ImportError as exc:
        raise StageError(f"qat needs torchao ({exc})", key="qat",
                         hint="pip install 'edgemml[qat]' (torchao>=0.18), or remove qat:") \
            from None

    from edgemml.training.core import distillation_loss, make_loader, seed_everything

    seed_everything(seed)
    teacher = copy.deepcopy(model).eval()
    student = _MainHead(copy.deepcopy(model)).train()
    example = torch.from_numpy(np.ascontiguousarray(calibration[:min(len(calibration), 8)]))
    if len(example) < 2:
        example = example.repeat(2, *([1] * (example.dim() - 1)))
    quantizer, described = _quantizer(target)
    t0 = time.perf_counter()
    try:
        graph = torch.export.export(student, (example,),
                                    dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
        prepared = prepare_qat_pt2e(graph, quantizer)
    except Exception as exc:  # noqa: BLE001 - torch.export fails on some graphs: say which
        raise StageError(f"torch.export / prepare_qat_pt2e failed for QAT: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:300]}", key="qat",
                         hint="remove qat: (post-training int8 with layers kept in float only)") \
            from exc
    move_exported_model_to_eval(prepared)
    with torch.no_grad():  # observers see the calibration samples before training starts
        for i in range(0, len(calibration), 32):
            prepared(torch.from_numpy(np.ascontiguousarray(calibration[i:i + 32])))
    move_exported_model_to_train(prepared)
    opt = torch.optim.AdamW([p for p in prepared.parameters() if p.requires_grad], lr=lr,
                            weight_decay=0.0)
    losses: list[float] = []
    step = 0
    with progress("QAT fine-tuning (torchao PT2E)", max_steps) as bar:
        while step < max_steps:
            for x, y in make_loader(train_set, batch_size, shuffle=True, seed=seed + step,
                                    drop_last=len(train_set) > batch_size):
                if step >= max_steps:
                    break
                if x.shape[0] < 2:
                    continue
                for g in opt.param_groups:  # cosine decay per step
                    g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / max_steps))
                with torch.no_grad():
                    t_logits = teacher(x)
                loss = distillation_loss(prepared(x), t_logits, torch.as_tensor(y),
                                         temperature=4.0, alpha=0.5)
                if not torch.isfinite(loss):
                    raise StageError(f"the QAT loss became {float(loss)} at step {step + 1}",
                                     key="qat.lr", hint="lower qat.lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                step += 1
                bar.advance(1)
    move_exported_model_to_eval(prepared)
    converted = convert_pt2e(prepared)
    _export_onnx(converted, example, out, opset=opset, input_name=input_name,
                 output_name=output_name)
    seconds = time.perf_counter() - t0
    log(f"QAT: {step} steps in {seconds:.0f} s, loss {losses[0] if losses else float('nan'):.3f}"
        f" -> {losses[-1] if losses else float('nan'):.3f}")
    head = losses[: max(1, len(losses) // 10)]
    tail = losses[-max(1, len(losses) // 10):]
    return QatResult(out, described, step, seconds, lr, batch_size,
                     round(float(np.mean(head)), 4) if losses else None,
                     round(float(np.mean(tail)), 4) if losses else None)
