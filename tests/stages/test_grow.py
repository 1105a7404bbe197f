"""migrate's growth: deeper (new residual blocks start as identities) and wider (Net2WiderNet) targets
compute the source's function before any training — measured here on real inputs, independently of
the stage's own figure — and growth that cannot be exact, or crosses families, is refused with exit 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from adapt_models import random_bn
from conftest import REPO, run_cli, write
from torch import nn

from edgemml.arch_families import family, weights_arch
from edgemml.config import ModelConfig
from edgemml.models import ModelSpec, build_model, load_model, save_model
from edgemml.models.growth import (
    block_identity,
    channel_map,
    first_divergence,
    function_match,
    init_identity_blocks,
    new_blocks,
    split_shares,
    widen_source,
)
from edgemml.models.transfer import match_keys

CLASSES = [str(i) for i in range(10)]


def _explain(proc) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"


def _tv(arch: str, seed: int, **options) -> nn.Module:
    torch.manual_seed(seed)
    return random_bn(build_model(ModelConfig(arch=f"torchvision/{arch}", options=options),
                                  num_classes=10, in_chans=3), seed)


def _grow(source: nn.Module, target: nn.Module, stem: str, head: str, x: torch.Tensor,
          split: str = "random"):
    """The library path migrate takes: match by name, widen, load, identity blocks."""
    s, t = source.state_dict(), target.state_dict()
    matches, _ = match_keys({k: tuple(v.shape) for k, v in t.items()},
                            {k: tuple(v.shape) for k, v in s.items()}, align=False, stem=stem,
                            head=head)
    assert {m.source for m in matches.values()} == set(s)  # every source tensor lands
    grown, widened, problems = widen_source(target, s, {k: m.source for k, m in matches.items()},
                                            stem=stem, head=head, split=split)
    state = {**s, **grown}
    target.load_state_dict({**t, **{k: state[m.source] for k, m in matches.items()}})
    blocks, loose = new_blocks(target, [k for k in t if k not in matches])
    made = init_identity_blocks(target, blocks, x)
    block_identity(target, made, x)
    return widened, problems, made, loose


@pytest.mark.parametrize("src,tgt,stem,head,n_blocks,n_widened", [
    (("resnet18", {}), ("resnet34", {}), "conv1", "fc", 8, 0),
    (("efficientnet_b0", {}), ("efficientnet_b1", {}), "features.0.0", "classifier.1", 7, 0),
    (("mobilenet_v3_small", {}), ("mobilenet_v3_small", {"width_mult": 1.5}), "features.0.0",
     "classifier.3", 0, 208),
])
def test_torchvision_growth_is_exact_before_training(src, tgt, stem, head, n_blocks, n_widened):
    source, target = _tv(src[0], 1, **src[1]), _tv(tgt[0], 2, **tgt[1])
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    widened, problems, blocks, loose = _grow(source, target, stem, head, x)
    assert (len(blocks), len(widened), problems, loose) == (n_blocks, n_widened, [], [])
    assert all(b.is_identity for b in blocks)
    for b in blocks:  # the last BatchNorm of each new residual block is what was zeroed
        assert b.zeroed and all(float(target.state_dict()[k].abs().max()) == 0 for k in b.zeroed)
    with torch.no_grad():
        a, b = source(x), target(x)
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()  # the acceptance target
    fm = function_match(source, target, [x])
    assert fm.match >= 1 - 1e-4 and fm.agreement == 1.0


def test_net2wider_split_is_exact_and_random_shares_break_symmetry():
    from adapt_models import tiny_resnet

    torch.manual_seed(0)
    source = random_bn(tiny_resnet(10, 1, width=8), 1)
    x = torch.randn(8, 1, 12, 12)
    for split in ("equal", "random"):
        target = random_bn(tiny_resnet(10, 1, width=13), 2)
        _grow(source, target, "stem.0", "fc", x, split=split)
        with torch.no_grad():
            a, b = source(x), target(x)
        assert (a - b).abs().max() <= 1e-5 * a.abs().max(), split
        index = channel_map(8, 13)
        src = int(index[8])  # target channel 8 is a copy of source channel `src`
        copies = torch.nonzero(index == src).flatten().tolist()  # src itself and its copies
        cols = target.fc.weight[:, copies].detach()
        if split == "equal":
            assert torch.allclose(cols[:, 0], cols[:, 1])
        else:
            assert not torch.allclose(cols[:, 0], cols[:, 1])
        assert torch.allclose(cols.sum(1), source.fc.weight[:, src], atol=1e-6)
        # The copied channel's incoming weights and BatchNorm statistics are copies.
        assert torch.equal(target.stem[0].weight[8], target.stem[0].weight[src])
        assert torch.equal(target.stem[1].running_var[8], target.stem[1].running_var[src])
    shares = split_shares(torch.tensor([0, 1, 0, 1, 1]), 2, "random", 0, "k")
    assert torch.allclose(torch.zeros(2, dtype=shares.dtype).index_add_(
        0, torch.tensor([0, 1, 0, 1, 1]), shares), torch.ones(2, dtype=shares.dtype))


def test_non_exact_growth_names_the_module_where_it_departs():
    """shufflenet's channel shuffle reorders channels: copying by index is not exact there."""
    source = _tv("shufflenet_v2_x0_5", 1)
    target = _tv("shufflenet_v2_x1_0", 2)
    x = torch.randn(4, 3, 32, 32)
    _grow(source, target, "conv1.0", "fc", x)
    fm = function_match(source, target, [x])
    assert fm.match < 0.99
    assert first_divergence(source, target, x).startswith("stage2.")


def test_families_and_weights_names():
    import torchvision

    for name in torchvision.models.list_models(module=torchvision.models):
        assert family(name) is not None, name
    assert family("torchvision/resnet18") == family("resnet34") != family("resnet50")
    assert family("mobilenet_v3_small") == family("mobilenet_v3_large") != family("mobilenet_v2")
    assert family("efficientnet_b0") == family("efficientnet_b7") != family("efficientnet_v2_s")
    assert weights_arch("torchvision:ResNet18_Weights.IMAGENET1K_V1") == "resnet18"
    assert weights_arch("MobileNet_V3_Small_Weights.DEFAULT") == "mobilenet_v3_small"


# ------------------------------------------------------------------------------------------------
# The stage through the CLI
# ------------------------------------------------------------------------------------------------


def _saved(folder: Path, model: nn.Module, **spec) -> Path:
    save_model(model, ModelSpec(num_classes=10, in_chans=1, class_names=CLASSES, **spec), folder)
    return folder


def _digits(n: int = 64) -> torch.Tensor:
    """Real samples through the pipeline's preprocessing (the stage measures on the same)."""
    from edgemml.config import DataConfig, PreprocessConfig
    from edgemml.data import load_data

    splits = load_data(DataConfig(source="builtin:digits"),
                       PreprocessConfig(size=(16, 16), channels="gray", mean=[0.5], std=[0.5]),
                       seed=0, base_dir=Path("."))
    return torch.stack([splits.val[i][0] for i in range(n)])


PIPE = """
name: grow
preprocess: {{size: [16, 16], channels: gray, mean: [0.5], std: [0.5]}}
data: {{source: builtin:digits}}
stages:
  - {{name: source, type: load, path: {src}}}
  - type: migrate
    sources: [{{stage: source}}]
    target: {target}
    grow: {{depth: identity, split: random}}
    min_function_match: 0.9999
    function_samples: 96
"""


def test_stage_grows_deeper_and_wider_exactly(tmp_path: Path):
    from adapt_models import tiny_resnet

    torch.manual_seed(0)
    source = random_bn(tiny_resnet(10, 1, width=8, blocks=1), 1)
    src = _saved(tmp_path / "src", source, python="adapt_models:tiny_resnet",
                 options={"width": 8, "blocks": 1})
    target = '{python: "adapt_models:tiny_resnet", options: {width: 12, blocks: 3}}'
    write(tmp_path / "p.yaml", PIPE.format(src=src, target=target))
    proc = run_cli("run", str(tmp_path / "p.yaml"), "--out", str(tmp_path / "run"), cwd=REPO)
    assert proc.returncode == 0, _explain(proc)
    report = json.loads((tmp_path / "run/02-migrate/migration.json").read_text())
    growth = report["summary"]["growth"]
    assert growth["function_preserving"] and not growth["problems"]
    assert [b["module"] for b in growth["new_blocks"]] == ["layers.1", "layers.2"]
    assert all(b["is_identity"] for b in growth["new_blocks"])
    new = {r["target"] for r in report["tensors"] if r["status"] == "new"}
    assert new == set(growth["new_tensors"]) and all(k.startswith(("layers.1.", "layers.2."))
                                                     for k in new)
    assert growth["new_tensors"]["layers.1.bn2.weight"].startswith("zeros")
    widened = {w["tensor"] for w in growth["widened"]}
    assert "fc.weight" in widened and "layers.0.conv1.weight" in widened
    fm = report["summary"]["function_match"]["before_bn"]
    assert fm["measured"] and fm["relative"] <= 1e-4 and fm["n"] == 96

    # Independently of the stage's figure: the saved grown model vs the source on real digits.
    grown, spec = load_model(tmp_path / "run/02-migrate/model")
    x = _digits()
    with torch.no_grad():
        a, b = source.eval()(x), grown(x)
    assert spec.options == {"width": 12, "blocks": 3}
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()


def test_growth_errors_exit_2(tmp_path: Path):
    from adapt_models import tiny_resnet

    # Across torchvision families: known from the file, `edgemml check` refuses it.
    write(tmp_path / "family.yaml", """
        name: fam
        preprocess: {size: [16, 16], channels: gray}
        data: {source: builtin:digits}
        stages:
          - {name: pre, type: finetune, model: {arch: torchvision/resnet18}, max_steps: 1}
          - type: migrate
            sources: [{stage: pre}]
            target: {arch: torchvision/mobilenet_v3_small}
            grow: {}
        """)
    proc = run_cli("check", str(tmp_path / "family.yaml"), cwd=REPO)
    assert proc.returncode == 2, _explain(proc)
    assert "stages[1].migrate.grow" in proc.stderr and "resnet18" in proc.stderr
    assert "mobilenet_v3" in proc.stderr and "Traceback" not in proc.stderr

    # User architectures: only the stage can see that the source does not fit by name.
    torch.manual_seed(0)
    src = _saved(tmp_path / "res", random_bn(tiny_resnet(10, 1), 1),
                 python="adapt_models:tiny_resnet")
    write(tmp_path / "other.yaml", PIPE.format(
        src=src, target='{python: "adapt_models:tiny_other"}'))
    proc = run_cli("run", str(tmp_path / "other.yaml"), "--out", str(tmp_path / "r1"), cwd=REPO)
    assert proc.returncode == 2, _explain(proc)
    assert "no counterpart in the target by name" in proc.stderr and "stem.0" in proc.stderr
    assert "Traceback" not in proc.stderr

    # Same names, but the target is smaller: nothing can grow.
    write(tmp_path / "smaller.yaml", PIPE.format(
        src=src, target='{python: "adapt_models:tiny_resnet", options: {width: 4}}'))
    proc = run_cli("run", str(tmp_path / "smaller.yaml"), "--out", str(tmp_path / "r2"), cwd=REPO)
    assert proc.returncode == 2, _explain(proc)
    assert "cannot be grown" in proc.stderr and "stem.0.weight" in proc.stderr

    # Not function-preserving (shufflenet's channel shuffle) with min_function_match: exit 2,
    # naming where the outputs part; without it, the stage runs and says "no".
    torch.manual_seed(0)
    shuffle = _saved(tmp_path / "sh", random_bn(build_model(
        ModelConfig(arch="torchvision/shufflenet_v2_x0_5"), num_classes=10, in_chans=1), 1),
        arch="torchvision/shufflenet_v2_x0_5")
    write(tmp_path / "shuffle.yaml", PIPE.format(
        src=shuffle, target="{arch: torchvision/shufflenet_v2_x1_0}"))
    proc = run_cli("run", str(tmp_path / "shuffle.yaml"), "--out", str(tmp_path / "r3"), cwd=REPO)
    assert proc.returncode == 2, _explain(proc)
    assert "below min_function_match" in proc.stderr and "module stage2." in proc.stderr
    assert (tmp_path / "r3").exists()
