"""What torch-pruning must be told about an architecture so that its channel dependencies are right.

torch-pruning traces the model and couples the channels that must be removed together. For most
CNNs that trace is complete; for some architectures it is wrong or incomplete, and the symptoms
surface late (a crash after minutes of training, or a "could not reach the target" after 32
trials). Each rule below names the cause it fixes (measured with torch 2.14.1 / torch-pruning 1.6):

* shufflenet_v2: torch 2.14's ViewBackward0 no longer saves the input sizes, so torch-pruning reads
  `channel_shuffle` (view -> transpose -> view) as a flatten and divides by zero. While the graph is
  traced the shuffle is an identity, and every width that crosses a shuffle keeps its channels
  (ignored roots), so the permutation the identity hides never matters: what is pruned is each
  branch's inner width (branch2[0] out -> depthwise -> branch2[5] in), where the MACs are.
* densenet: torch-pruning records each torch.cat's input sizes when the graph is built and does not
  update them when an earlier group of the same pass shrank one of the inputs ("running_mean should
  contain 656 elements not 657"). Every conv whose output enters a concat keeps its width; the
  bottleneck widths (conv1 out -> norm2 -> conv2 in) are pruned, which is where DenseNet's MACs are.
* vit: torch's nn.MultiheadAttention ties q/k/v widths to the residual width, so the hidden width
  is pruned in head groups (`out_channel_groups`: the same offsets in every head; torch-pruning's
  `num_heads=` path looks for timm's qkv Linear and silently skips torch's MHA), `class_token` and
  `pos_embedding` follow on their last dim, channel counts round to a multiple of the heads, and
  `VisionTransformer.hidden_dim` (a plain int its forward reshapes with) is updated after pruning.
* convnext: `layer_scale` (C, 1, 1) follows its block's channels on dim 0 (told explicitly rather
  than left to torch-pruning's guess and warning).
* googlenet / inception_v3 with aux heads: the graph is traced in training mode with BatchNorm in
  eval mode, so the aux heads are in it and their inputs follow the inception outputs they read
  (traced in eval mode they are absent, and recovery training then fails on a channel mismatch).

Architectures refused for pruning (swin, maxvit) are refused before anything runs, by
edgemml.arch_capabilities; they have no rule here.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

ModuleList = Callable[[nn.Module], list[nn.Module]]


@dataclass
class ArchRules:
    """torch-pruning options for one architecture family (functions of the model being pruned,
    which is a fresh copy on every trial)."""

    family: str = "generic"
    why: str = ""
    #: roots whose output channels stay (their inputs still follow other groups)
    ignored: ModuleList = field(default=lambda m: [])
    #: bare parameters and the dim that follows the channels
    unwrapped: Callable[[nn.Module], list[tuple[nn.Parameter, int]]] = field(default=lambda m: [])
    #: modules whose output channels are pruned in equal groups (attention heads)
    out_groups: Callable[[nn.Module], dict[nn.Module, int]] = field(default=lambda m: {})
    #: a context manager active while the graph is traced
    trace_patch: Callable[[], Any] = field(default=contextlib.nullcontext)
    #: how torch-pruning runs the model when it traces it (None: model(example))
    forward_fn: Callable[[nn.Module, torch.Tensor], Any] | None = None
    #: called on the pruned model (plain attributes its forward reads)
    post_prune: Callable[[nn.Module], None] = field(default=lambda m: None)

    def round_to(self, model: nn.Module, round_to: int | None) -> int | None:
        """Channel multiple: the configured one, made a multiple of every head count."""
        heads = set(self.out_groups(model).values())
        if not heads:
            return round_to
        r = round_to or 1
        for h in heads:
            r = r * h // math.gcd(r, h)
        return r


# ------------------------------------------------------------------------------------------------
# shufflenet_v2
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _identity_channel_shuffle() -> Iterator[None]:
    import torchvision.models.shufflenetv2 as sv2

    saved = sv2.channel_shuffle
    sv2.channel_shuffle = lambda x, groups: x  # type: ignore[assignment]
    try:
        yield
    finally:
        sv2.channel_shuffle = saved


def _shufflenet_ignored(m: nn.Module) -> list[nn.Module]:
    out: list[nn.Module] = [m.conv1[0]]
    for stage in (m.stage2, m.stage3, m.stage4):
        for blk in stage:
            out += [c for c in blk.branch1.modules() if isinstance(c, nn.Conv2d)]
            out.append(blk.branch2[5])
    return out


# ------------------------------------------------------------------------------------------------
# densenet
# ------------------------------------------------------------------------------------------------


def _densenet_ignored(m: nn.Module) -> list[nn.Module]:
    out: list[nn.Module] = [m.features.conv0]
    for name, mod in m.features.named_modules():
        if name.endswith(".conv2") or (name.startswith("transition") and name.endswith(".conv")):
            out.append(mod)
    return out


# ------------------------------------------------------------------------------------------------
# attention (ViT and any model built from torch's nn.MultiheadAttention)
# ------------------------------------------------------------------------------------------------


def attention_heads(m: nn.Module) -> dict[nn.Module, int]:
    return {mod: mod.num_heads for mod in m.modules() if isinstance(mod, nn.MultiheadAttention)}


def _vit_unwrapped(m: nn.Module) -> list[tuple[nn.Parameter, int]]:
    return [(m.class_token, 2), (m.encoder.pos_embedding, 2)]


def _vit_post(m: nn.Module) -> None:
    m.hidden_dim = m.conv_proj.out_channels


def _convnext_unwrapped(m: nn.Module) -> list[tuple[nn.Parameter, int]]:
    return [(mod.layer_scale, 0) for mod in m.modules() if type(mod).__name__ == "CNBlock"]


# ------------------------------------------------------------------------------------------------
# aux heads
# ------------------------------------------------------------------------------------------------


def has_aux_heads(m: nn.Module) -> bool:
    return bool(getattr(m, "aux_logits", False))


def aux_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run the model in training mode with BatchNorm in eval mode (statistics untouched), so the
    aux heads run too; one tensor out for torch-pruning's tracer."""
    was = model.training
    bns = [b for b in model.modules() if isinstance(b, nn.modules.batchnorm._BatchNorm)]
    dropouts = [d for d in model.modules() if isinstance(d, nn.modules.dropout._DropoutNd)]
    model.train()
    for b in bns + dropouts:
        b.eval()
    try:
        out = model(x)
    finally:
        model.train(was)
    if isinstance(out, torch.Tensor):
        return out
    return sum(o.sum() for o in out if isinstance(o, torch.Tensor))  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------
# Lookup
# ------------------------------------------------------------------------------------------------


def rules_for(arch: str | None, model: nn.Module) -> ArchRules:
    """The rules for a torchvision architecture (`torchvision/<name>`), or what the model's
    structure asks for (attention heads, aux heads) for any other model."""
    name = (arch or "").rpartition("/")[2] if (arch or "").startswith("torchvision/") else ""
    if name.startswith("shufflenet_v2"):
        return ArchRules("shufflenet_v2", "channel_shuffle is an identity while tracing; widths "
                         "that cross a shuffle are kept", ignored=_shufflenet_ignored,
                         trace_patch=_identity_channel_shuffle)
    if name.startswith("densenet"):
        return ArchRules("densenet", "only bottleneck widths are pruned (nothing that feeds a "
                         "torch.cat)", ignored=_densenet_ignored)
    if name.startswith("vit_"):
        return ArchRules("vit", "hidden width pruned in head groups; class_token/pos_embedding "
                         "follow; hidden_dim updated", unwrapped=_vit_unwrapped,
                         out_groups=attention_heads, post_prune=_vit_post)
    if name.startswith("convnext"):
        return ArchRules("convnext", "layer_scale follows its block's channels",
                         unwrapped=_convnext_unwrapped)
    if has_aux_heads(model):
        return ArchRules("aux-heads", "traced in training mode so the aux heads follow",
                         forward_fn=aux_forward)
    if attention_heads(model):
        return ArchRules("attention", "nn.MultiheadAttention widths pruned in head groups",
                         out_groups=attention_heads)
    return ArchRules()


def tp_kwargs(rules: ArchRules, model: nn.Module) -> dict[str, Any]:
    """The BasePruner keyword arguments a rule set adds."""
    kwargs: dict[str, Any] = {}
    unwrapped = rules.unwrapped(model)
    if unwrapped:
        kwargs["unwrapped_parameters"] = unwrapped
    groups = rules.out_groups(model)
    if groups:
        kwargs["out_channel_groups"] = dict(groups)
    if rules.forward_fn is not None:
        kwargs["forward_fn"] = rules.forward_fn
    return kwargs
