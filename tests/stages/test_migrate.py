"""The migrate stage: key matching, stem and head adaptation, fusion, coverage, BN re-estimation.

Numbers, not "it ran": mapped tensors are compared with torch.equal, adapted models are compared
with their source on equivalent inputs, and recorded accuracies are recomputed from the saved model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from conftest import run_cli, write
from edgemml.config import ModelConfig
from edgemml.pipeline.loader import load_pipeline
from edgemml.errors import StageError
from edgemml.models import build_model, load_model
from edgemml.models.transfer import (
    RenameRule,
    adapt_in_chans,
    coverage,
    fuse,
    map_source,
    match_keys,
    natural_order,
)

DIGITS = [str(i) for i in range(10)]


def tv(arch: str, num_classes: int = 10, in_chans: int = 3, seed: int = 0) -> nn.Module:
    """A torchvision model with random weights and random (non-trivial) BatchNorm statistics, so
    that equalities below cannot hold by accident of identity BN."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig(arch=f"torchvision/{arch}"), num_classes=num_classes,
                        in_chans=in_chans)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def migrate(target: nn.Module, source: dict[str, torch.Tensor], **kw):
    """match + map + fuse one source into `target` (loaded in place); returns (fused, matches)."""
    tstate = target.state_dict()
    matches, _ = match_keys(shapes(tstate), shapes(source), rules=kw.pop("rules", ()),
                            align=kw.pop("align", True), stem=kw.get("stem"), head=kw.get("head"))
    smap = map_source("src", tstate, source, matches, **kw)
    assert not [m for m in smap.mismatched if m.fatal], smap.mismatched
    fused = fuse([smap])
    target.load_state_dict({**tstate, **{k: f.value for k, f in fused.items()}}, strict=True)
    return fused, matches


# ------------------------------------------------------------------------------------------------
# Key matching
# ------------------------------------------------------------------------------------------------


def test_prefixed_keys_map_exactly() -> None:
    src = tv("resnet18", seed=1)
    source = {("module._orig_mod." if i % 2 else "model.") + k: v
              for i, (k, v) in enumerate(src.state_dict().items())}
    target = tv("resnet18", seed=2)
    fused, matches = migrate(target, source, stem="conv1", head="fc")
    assert {m.rule for m in matches.values()} == {"prefix"}
    for key, value in target.state_dict().items():
        assert torch.equal(value, src.state_dict()[key]), key
    assert coverage(dict(target.named_parameters()), fused)[0] == 1.0
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(target(x), src(x))


@pytest.mark.parametrize("how", ["rules", "align"])
def test_every_key_renamed_reaches_full_coverage(how: str) -> None:
    src = tv("resnet18", seed=3)
    # another prefix and other separators: "backbone/layer1/0/conv1:weight"
    source = {"backbone/" + k.rpartition(".")[0].replace(".", "/") + ":" + k.rpartition(".")[2]: v
              for k, v in src.state_dict().items()}
    rules = [RenameRule.parse(r"^backbone/", ""), RenameRule.parse(r"[/:]", ".")] \
        if how == "rules" else []
    target = tv("resnet18", seed=4)
    fused, matches = migrate(target, source, rules=rules, align=how == "align", stem="conv1",
                             head="fc")
    assert len(matches) == len(target.state_dict())
    assert {m.rule for m in matches.values()} == {"rename" if how == "rules" else "align"}
    for key, m in matches.items():
        assert m.source == "backbone/" + key.rpartition(".")[0].replace(".", "/") + ":" + \
            key.rpartition(".")[2]
        assert torch.equal(target.state_dict()[key], source[m.source])
    assert coverage(dict(target.named_parameters()), fused) == (1.0, 11_181_642, 11_181_642)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(target(x), src(x))


def test_alignment_of_sorted_safetensors_keys_uses_natural_order() -> None:
    """mobilenet_v3_small has features.2 .. features.12: plain sorting would put 10 before 2."""
    src = tv("mobilenet_v3_small", seed=5)
    source = {"net_" + k.replace(".", "_"): v for k, v in src.state_dict().items()}
    ordered = {k: source[k] for k in natural_order(sorted(source))}
    target = tv("mobilenet_v3_small", seed=6)
    _, matches = migrate(target, ordered, stem="features.0.0", head="classifier.3")
    assert len(matches) == len(target.state_dict())
    assert all(m.source == "net_" + k.replace(".", "_") for k, m in matches.items())


# ------------------------------------------------------------------------------------------------
# Stem: another number of input channels
# ------------------------------------------------------------------------------------------------


def test_rgb_to_gray_sum_equals_source_on_replicated_input() -> None:
    src = tv("resnet18", seed=7)
    target = tv("resnet18", in_chans=1, seed=8)
    fused, _ = migrate(target, src.state_dict(), stem="conv1", head="fc")
    assert fused["conv1.weight"].provenance[0].adaptation == "stem sum 3->1"
    assert torch.equal(target.conv1.weight, src.conv1.weight.sum(1, keepdim=True))
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(target(x), src(x.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-5)


def test_extra_zeros_equals_source_on_rgb_channels() -> None:
    src = tv("resnet18", seed=9)
    target = tv("resnet18", in_chans=4, seed=10)
    migrate(target, src.state_dict(), stem="conv1", head="fc", in_chans_rule="zeros")
    rgb = torch.randn(3, 3, 32, 32)
    rgbd = torch.cat([rgb, torch.randn(3, 1, 32, 32)], dim=1)
    with torch.no_grad():
        assert torch.allclose(target(rgbd), src(rgb), rtol=1e-4, atol=1e-5)
    assert torch.equal(target.conv1.weight[:, 3], torch.zeros_like(target.conv1.weight[:, 3]))


def test_in_chans_rules_arithmetic() -> None:
    w = torch.randn(8, 3, 3, 3)
    rep, how = adapt_in_chans(w, 5, "auto")
    assert how.startswith("repeat 3->5")
    for j in range(5):
        assert torch.allclose(rep[:, j], w[:, j % 3] * 3 / 5)
    summed, how = adapt_in_chans(torch.randn(8, 4, 3, 3), 2, "auto")
    assert how == "sum 4->2"
    w4 = torch.arange(8 * 4 * 9, dtype=torch.float32).view(8, 4, 3, 3)
    folded, _ = adapt_in_chans(w4, 2, "sum")
    assert torch.equal(folded[:, 0], w4[:, 0] + w4[:, 2]) and torch.equal(folded[:, 1],
                                                                            w4[:, 1] + w4[:, 3])


# ------------------------------------------------------------------------------------------------
# Head: another label set
# ------------------------------------------------------------------------------------------------


def _head_case(target_classes, source_classes, label_map=None, n_target=None):
    torch.manual_seed(0)
    n_target = n_target or len(target_classes)
    n_source = len(source_classes) if source_classes else 10
    target = {"fc.weight": torch.randn(n_target, 6), "fc.bias": torch.randn(n_target)}
    source = {"fc.weight": torch.randn(n_source, 6), "fc.bias": torch.randn(n_source)}
    matches, _ = match_keys(shapes(target), shapes(source), head="fc")
    smap = map_source("s", target, source, matches, head="fc", target_classes=target_classes,
                      source_classes=source_classes, label_map=label_map)
    return target, source, smap


def test_head_rows_copied_by_class_name_and_label_map() -> None:
    target, source, smap = _head_case(["7", "3", "cat", "0"], DIGITS, label_map={"cat": "5"})
    w, b = smap.mapped["fc.weight"], smap.mapped["fc.bias"]
    for row, src_row in enumerate([7, 3, 5, 0]):
        assert torch.equal(w.value[row], source["fc.weight"][src_row])
        assert torch.equal(b.value[row], source["fc.bias"][src_row])
    assert w.rows is None or bool(w.rows.all())

    target, source, smap = _head_case(["7", "3", "cat", "0"], DIGITS)
    w = smap.mapped["fc.weight"]
    assert w.rows.tolist() == [True, True, False, True]
    assert torch.equal(w.value[2], target["fc.weight"][2]), "an unknown class keeps its init"
    assert w.adaptation == "rows by class names: 3/4"
    fused = fuse([smap])
    share, taken, total = coverage(target, fused)
    assert (taken, total) == (3 * 6 + 3, 4 * 6 + 4)


def test_same_shape_head_with_other_label_order_is_permuted_not_copied() -> None:
    order = ["3", "1", "4", "0", "9", "2", "6", "5", "8", "7"]
    _, source, smap = _head_case(order, DIGITS)
    w = smap.mapped["fc.weight"].value
    for row, name in enumerate(order):
        assert torch.equal(w[row], source["fc.weight"][int(name)])


def test_head_without_source_names_is_initialised_or_mapped_by_row_index() -> None:
    _, _, smap = _head_case(["a", "b"], None)
    assert "fc.weight" not in smap.mapped
    assert [m.fatal for m in smap.mismatched] == [False, False]
    assert "class names unknown" in smap.mismatched[0].reason
    _, source, smap = _head_case(["a", "b"], None, label_map={"b": 4})
    assert torch.equal(smap.mapped["fc.weight"].value[1], source["fc.weight"][4])


# ------------------------------------------------------------------------------------------------
# Fusion
# ------------------------------------------------------------------------------------------------


def _maps(*states, weights=None, target=None):
    target = target or tv("resnet18", seed=20).state_dict()
    out = []
    for i, state in enumerate(states):
        matches, _ = match_keys(shapes(target), shapes(state), stem="conv1", head="fc")
        out.append(map_source(f"s{i}", target, state, matches, stem="conv1", head="fc",
                              weight=(weights or [1.0] * len(states))[i]))
    return out


def test_weighted_average_is_the_elementwise_weighted_mean() -> None:
    a, b = tv("resnet18", seed=11).state_dict(), tv("resnet18", seed=12).state_dict()
    fused = fuse(_maps(a, b, weights=[1.0, 3.0]), "average")
    assert set(fused) == set(a)
    for key, f in fused.items():
        if a[key].is_floating_point():
            assert torch.allclose(f.value, (a[key] + 3 * b[key]) / 4, rtol=1e-6, atol=1e-7), key
            assert [p.weight for p in f.provenance] == [0.25, 0.75]
        else:
            assert torch.equal(f.value, a[key])
    uniform = fuse(_maps(a, b), "average")
    assert torch.allclose(uniform["layer2.0.conv1.weight"].value,
                          (a["layer2.0.conv1.weight"] + b["layer2.0.conv1.weight"]) / 2)


def test_first_takes_each_tensor_from_the_first_source_that_has_it() -> None:
    a, b = tv("resnet18", seed=13).state_dict(), tv("resnet18", seed=14).state_dict()
    partial = {k: v for k, v in a.items() if not k.startswith("layer4.")}
    fused = fuse(_maps(partial, b), "first")
    for key, f in fused.items():
        want = b[key] if key.startswith("layer4.") else a[key]
        assert torch.equal(f.value, want), key
        assert f.provenance[0].source == ("s1" if key.startswith("layer4.") else "s0")
    with pytest.raises(StageError, match=r"tensor layer4\.0\.conv1\.weight comes from s1 but not "
                                         r"from s0"):
        fuse(_maps(partial, b), "average")


def test_incompatible_tensor_is_never_loaded() -> None:
    a = tv("resnet18", seed=15).state_dict()
    a["layer3.0.conv1.weight"] = torch.randn(256, 64, 3, 3)
    (smap,) = _maps(a)
    assert "layer3.0.conv1.weight" not in smap.mapped
    (bad,) = [m for m in smap.mismatched if m.fatal]
    assert (bad.target, bad.source_shape, bad.target_shape) == (
        "layer3.0.conv1.weight", (256, 64, 3, 3), (256, 128, 3, 3))


# ------------------------------------------------------------------------------------------------
# The stage: in process (fast) and through the CLI
# ------------------------------------------------------------------------------------------------


def _run_in_process(path: Path) -> Path:
    from edgemml.pipeline import Runner
    from edgemml.progress import QuietReporter

    loaded = load_pipeline(path)
    run_dir = loaded.run_dir()
    with QuietReporter() as reporter:
        Runner(loaded, run_dir, reporter).run()
    return run_dir


def test_stage_gray_target_from_renamed_safetensors(tmp_path: Path) -> None:
    src = tv("mobilenet_v3_small", seed=21)
    order = DIGITS[::-1]  # the source's rows are 9..0: rows must be permuted by name
    with torch.no_grad():
        src.classifier[3].weight.copy_(src.classifier[3].weight.flip(0))
        src.classifier[3].bias.copy_(src.classifier[3].bias.flip(0))
    save_file({"enc." + k: v.contiguous() for k, v in src.state_dict().items()},
              str(tmp_path / "src.safetensors"))
    write(tmp_path / "pipeline.yaml", f"""
        name: m
        output_dir: runs/m
        preprocess: {{channels: gray, size: [32, 32]}}
        data: {{source: builtin:digits, samples: 400}}
        stages:
          - type: migrate
            target: {{arch: torchvision/mobilenet_v3_small}}
            sources: [{{checkpoint: src.safetensors, classes: {json.dumps(order)}}}]
            rename: [{{from: '^enc\\.', to: ''}}]
            bn_batches: 3
            min_coverage: 1.0
        """)
    run_dir = _run_in_process(tmp_path / "pipeline.yaml")
    stage = run_dir / "01-migrate"
    report = json.loads((stage / "migration.json").read_text())
    summary = report["summary"]
    assert summary["coverage"] == 1.0 and summary["rules"] == {"rename": len(report["tensors"])}
    assert summary["stem"]["adaptation"] == "sum 3->1"
    assert summary["head"]["how"] == "rows by class names: 10/10"
    assert summary["bn"]["ran"] and summary["bn"]["samples"] > 0
    model, spec = load_model(stage / "model")
    assert (spec.in_chans, spec.class_names) == (1, DIGITS)
    assert spec.extra["preprocess"]["channels"] == "gray"
    state = model.state_dict()
    src_state = src.state_dict()
    assert torch.equal(state["features.1.block.0.0.weight"], src_state["features.1.block.0.0.weight"])
    assert torch.equal(state["classifier.3.weight"], src_state["classifier.3.weight"].flip(0))
    assert not torch.equal(state["features.1.block.0.1.running_mean"],
                           src_state["features.1.block.0.1.running_mean"]), "BN not re-estimated"
    # the recorded zero-shot accuracy is what the saved model scores on the val split
    from edgemml.data import load_data
    from edgemml.training import evaluate

    loaded = load_pipeline(tmp_path / "pipeline.yaml")
    splits = load_data(loaded.stages[0].data, loaded.stages[0].preprocess, seed=0,
                       base_dir=tmp_path)
    metrics = json.loads((stage / "stage.json").read_text())["metrics"]
    assert metrics["zero_shot_top1_pct"] == evaluate(model, splits.val)["top1_pct"]
    assert "| features.0.0.weight | 16x1x3x3 | adapted | src.safetensors | enc.features.0.0.weight " \
           "| rename | stem sum 3->1 |" in (stage / "migration.md").read_text()


def test_stage_refuses_an_incompatible_source_naming_the_tensor(tmp_path: Path) -> None:
    state = tv("resnet18", seed=22).state_dict()
    state["layer3.0.conv1.weight"] = torch.randn(256, 64, 3, 3)
    torch.save(state, tmp_path / "bad.pt")
    write(tmp_path / "pipeline.yaml", """
        name: bad
        output_dir: runs/bad
        stages:
          - type: migrate
            target: {arch: torchvision/resnet18, num_classes: 10}
            sources: [{checkpoint: bad.pt}]
        """)
    with pytest.raises(StageError) as exc:
        _run_in_process(tmp_path / "pipeline.yaml")
    assert "layer3.0.conv1.weight needs shape [256, 128, 3, 3]" in str(exc.value)
    assert "[256, 64, 3, 3]" in str(exc.value) and exc.value.exit_code == 2


def test_cli_chain_fusion_and_min_coverage_failure(tmp_path: Path) -> None:
    """Through the real CLI: checkpoint -> gray model; that model fused with a second checkpoint;
    a third stage whose source lacks layer4 fails min_coverage (exit 2) naming the tensors."""
    a = tv("resnet18", seed=30)
    b = tv("resnet18", in_chans=1, seed=31).state_dict()
    torch.save({"state_dict": {"module." + k: v for k, v in a.state_dict().items()},
                "classes": DIGITS}, tmp_path / "a.pt")
    torch.save(b, tmp_path / "b.pt")
    torch.save({k: v for k, v in a.state_dict().items() if not k.startswith("layer4.")},
               tmp_path / "partial.pt")
    write(tmp_path / "pipeline.yaml", """
        name: chain
        preprocess: {channels: gray, size: [32, 32]}
        data: {source: builtin:digits, samples: 300}
        model: {arch: torchvision/resnet18}
        stages:
          - type: migrate
            sources: [{checkpoint: a.pt}]
            bn_batches: 2
          - name: soup
            type: migrate
            sources: [{stage: migrate, weight: 1}, {checkpoint: b.pt, weight: 3}]
            fuse: average
            recalibrate_bn: false
          - name: strict
            type: migrate
            sources: [{checkpoint: partial.pt}]
            recalibrate_bn: false
            min_coverage: 0.9
        """)
    proc = run_cli("run", "pipeline.yaml", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr + proc.stdout
    assert "coverage 24.9% is below min_coverage 90.0%" in " ".join(err.split()), err
    assert "layer4.0.conv2.weight [512, 512, 3, 3] (2,359,296 params" in " ".join(err.split())
    assert "Traceback" not in err

    run = tmp_path / "runs/chain"
    first, _ = load_model(run / "01-migrate/model")
    soup, spec = load_model(run / "02-soup/model")
    f, s = first.state_dict(), soup.state_dict()
    for key in ("conv1.weight", "layer1.0.conv1.weight", "fc.weight", "layer2.0.bn1.running_var"):
        assert torch.allclose(s[key], (f[key] + 3 * b[key]) / 4, rtol=1e-6, atol=1e-7), key
    assert torch.equal(f["layer1.0.conv1.weight"], a.state_dict()["layer1.0.conv1.weight"])
    assert torch.equal(f["conv1.weight"], a.state_dict()["conv1.weight"].sum(1, keepdim=True))
    report = json.loads((run / "01-migrate/migration.json").read_text())["summary"]
    assert report["rules"] == {"prefix": 122} and report["bn"]["reasons"][0] == \
        "input channels changed"
    metrics = json.loads((run / "02-soup/stage.json").read_text())["metrics"]
    assert metrics["coverage"] == 1.0 and metrics["bn_recalibrated"] is False
