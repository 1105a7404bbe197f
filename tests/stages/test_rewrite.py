"""The rewrite stage: activations swapped and squeeze-excitation removed exactly as reported (counted
here independently, by walking the modules), the SE fold checked against a hand-built constant gate,
the rewritten model reloaded without pickle, recovery run, the int8 comparison in the validate
report, and bad mappings refused with exit 2 at `edgemml check` or at the stage."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from adapt_models import random_bn
from conftest import REPO, run_cli, write
from torch import nn
from torchvision.ops.misc import SqueezeExcitation

from edgemml import activation_names as names
from edgemml.config import ModelConfig
from edgemml.models import ModelSpec, build_model, load_model, save_model
from edgemml.models.rewrite import rewrite_model
from edgemml.models.squeeze_excitation import find_squeeze_excitation


def _explain(proc) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"


def _tv(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return random_bn(build_model(ModelConfig(arch=f"torchvision/{arch}"), num_classes=10,
                                 in_chans=3), 1)


def _paths(model: nn.Module, cls: type) -> set[str]:
    return {p for p, m in model.named_modules() if type(m) is cls}


# ------------------------------------------------------------------------------------------------
# The naming scheme
# ------------------------------------------------------------------------------------------------


def test_every_torch_activation_is_classified_and_every_name_builds() -> None:
    import torch.nn.modules.activation as act

    for cls_name in act.__all__:
        assert cls_name in names.ELEMENTWISE or cls_name in names.REFUSED, cls_name
    x = torch.randn(2, 3, 4, 4)
    from edgemml.models.rewrite import make_activation

    for name in names.all_names():
        out = make_activation(name)(x.clone())
        assert out.shape == x.shape, name
    assert torch.equal(make_activation("Hardtanh01")(torch.tensor([-2.0, 0.5, 3.0])),
                       torch.tensor([0.0, 0.5, 1.0]))


@pytest.mark.parametrize("bad,fragment", [("Relu6", "did you mean 'ReLU6'"),
                                          ("HardTanh01", "did you mean 'Hardtanh01'"),
                                          ("GLU", "changes output shapes"),
                                          ("Softmax", "not an elementwise"),
                                          ("Swishy", "unknown activation")])
def test_bad_names_say_why(bad: str, fragment: str) -> None:
    with pytest.raises(ValueError) as exc:
        names.check_name(bad)
    assert fragment in str(exc.value)


# ------------------------------------------------------------------------------------------------
# The surgery, on torchvision models
# ------------------------------------------------------------------------------------------------


def test_mobilenet_v3_activations_replaced_exactly_as_reported() -> None:
    model = _tv("mobilenet_v3_small")
    original = copy.deepcopy(model)
    hswish, hsig, relu6 = (_paths(original, c) for c in (nn.Hardswish, nn.Hardsigmoid, nn.ReLU6))
    assert hswish and hsig  # the test means something
    x = torch.randn(4, 3, 64, 64)
    result = rewrite_model(model, {"Hardswish": "ReLU6", "Hardsigmoid": "Hardtanh01"},
                           batches=[x], example=x)
    assert result.counts() == {"Hardswish -> ReLU6": len(hswish),
                               "Hardsigmoid -> Hardtanh01": len(hsig)}
    assert {r.path for r in result.replaced} == hswish | hsig
    assert not _paths(model, nn.Hardswish) and not _paths(model, nn.Hardsigmoid)
    assert _paths(model, nn.ReLU6) == relu6 | hswish
    for p in hsig:
        m = model.get_submodule(p)
        assert type(m) is nn.Hardtanh and (m.min_val, m.max_val) == (0.0, 1.0)
    # Everything else is untouched: same parameters, same module types.
    assert all(torch.equal(a, b) for a, b in zip(original.state_dict().values(),
                                                  model.state_dict().values()))
    assert result.se_kept == find_squeeze_excitation(original) and not result.se_removed


def test_efficientnet_se_removed_and_folded_like_a_constant_gate(tmp_path: Path) -> None:
    model = _tv("efficientnet_b0")
    original = copy.deepcopy(model)
    se = [p for p, m in original.named_modules() if isinstance(m, SqueezeExcitation)]
    silu_outside = {p for p in _paths(original, nn.SiLU) if not any(p.startswith(s + ".")
                                                                    for s in se)}
    batches = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    result = rewrite_model(model, {"SiLU": "ReLU6"}, squeeze_excitation="remove",
                           batches=batches, example=batches[0])
    assert [s.path for s in result.se_removed] == se
    assert all(s.folded_into == f"{s.path.rsplit('.', 1)[0]}.{int(s.path.rsplit('.', 1)[1]) + 1}.0"
               for s in result.se_removed)  # MBConv: the projection conv right after the gate
    assert {r.path for r in result.replaced} == silu_outside
    assert result.counts() == {"SiLU -> ReLU6": len(silu_outside)}
    assert not _paths(model, nn.SiLU) and all(type(model.get_submodule(p)) is nn.Identity
                                              for p in se)

    # Independently: the original with each gate frozen to the reported scale, activations swapped
    # the same way, must equal the folded model (the fitted scales are what the report says).
    class Frozen(nn.Module):
        def __init__(self, scale: torch.Tensor) -> None:
            super().__init__()
            self.scale = scale.view(1, -1, 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.scale

    from edgemml.models.squeeze_excitation import fit_se_scales

    ref = copy.deepcopy(original)
    fits = fit_se_scales(copy.deepcopy(original), se, batches)
    for s in result.se_removed:
        assert abs(float(fits[s.path].scale.mean()) - s.scale_mean) < 1e-6
        parent, _, child = s.path.rpartition(".")
        setattr(ref.get_submodule(parent), child, Frozen(fits[s.path].scale))
    for p in silu_outside:
        parent, _, child = p.rpartition(".")
        setattr(ref.get_submodule(parent), child, nn.ReLU6())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        a, b = ref.eval()(x), model.eval()(x)
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()

    # model.json records the replaced modules: the rewritten model reloads bit-identically.
    save_model(model, ModelSpec(arch="torchvision/efficientnet_b0", num_classes=10, in_chans=3),
               tmp_path / "m")
    reloaded, spec = load_model(tmp_path / "m")
    assert len(spec.module_types) == len(se) + len(silu_outside)
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))


def test_a_fold_that_would_change_the_function_is_undone() -> None:
    """The SE output also feeds a residual add (not a module): folding into the conv alone would
    be wrong, and the check on real data catches it."""
    from adapt_models import SharedSE

    torch.manual_seed(0)
    model = SharedSE().eval()
    x = torch.randn(4, 8, 8, 8)
    result = rewrite_model(model, {}, squeeze_excitation="remove", batches=[x], example=x)
    (removed,) = result.se_removed
    assert removed.folded_into is None and "does not consume its output alone" in removed.note
    with torch.no_grad():
        assert torch.equal(model(x), model.conv(x) + x)  # removed, unfolded: conv weights intact


def test_shape_changing_or_unrecordable_replacements_are_refused(tmp_path: Path) -> None:
    from edgemml.errors import InputError

    model = _tv("resnet18")
    model.relu = nn.Softmax(dim=1)  # not something model.json records: saving says so
    with pytest.raises(ValueError, match="relu .*Softmax"):
        save_model(model, ModelSpec(arch="torchvision/resnet18", num_classes=10, in_chans=3),
                   tmp_path / "m")
    good = _tv("resnet18")
    save_model(good, ModelSpec(arch="torchvision/resnet18", num_classes=10, in_chans=3),
               tmp_path / "ok")
    spec = json.loads((tmp_path / "ok/model.json").read_text())
    spec["module_types"] = {"layer1": {"type": "os.system", "args": {}}}  # hostile model.json
    (tmp_path / "ok/model.json").write_text(json.dumps(spec))
    with pytest.raises(InputError) as exc:
        load_model(tmp_path / "ok")
    assert exc.value.exit_code == 2 and "os.system" in str(exc.value)


# ------------------------------------------------------------------------------------------------
# The stage through the CLI: rewrite, recover, quantize both, validate both
# ------------------------------------------------------------------------------------------------

PIPELINE = """
name: rw
seed: 0
preprocess: {size: [16, 16], channels: gray, mean: [0.5], std: [0.5]}
data: {source: builtin:digits, split: {train: 0.6, val: 0.2, test: 0.2}}
stages:
  - name: train
    type: finetune
    model: {python: "adapt_models:tiny_edge", options: {width: 8, functional: true}}
    max_steps: 30
    batch_size: 64
    lr: 0.01
  - type: rewrite
    activations: {SiLU: ReLU6, Hardswish: ReLU6, GELU: ReLU, Hardsigmoid: Hardtanh01}
    squeeze_excitation: remove
    recover: {max_steps: 4, batch_size: 64}
  - name: int8-original
    type: quantize
    input: train
    backends: [onnxruntime]
    calibration: {samples: 32}
  - type: quantize
    backends: [onnxruntime]
    calibration: {samples: 32}
  - type: validate
    latency: {runs: 3, warmup: 1, throughput_runs: 1, batch: 4}
    min_reference_diversity: null
"""


def test_rewrite_stage_end_to_end(tmp_path: Path) -> None:
    write(tmp_path / "p.yaml", PIPELINE)
    proc = run_cli("run", str(tmp_path / "p.yaml"), "--out", str(tmp_path / "run"), cwd=REPO)
    assert proc.returncode == 0, _explain(proc)
    run = tmp_path / "run"
    report = json.loads((run / "02-rewrite/rewrite.json").read_text())
    original, _ = load_model(run / "01-train/model")
    rewritten, _ = load_model(run / "02-rewrite/model")
    se = [p for p, m in original.named_modules() if isinstance(m, SqueezeExcitation)]
    outside = [(p, type(m).__name__) for p, m in original.named_modules()
               if type(m) in (nn.SiLU, nn.Hardswish, nn.GELU, nn.Hardsigmoid)
               and not any(p.startswith(s + ".") for s in se)]
    assert [(r["path"], r["old"]) for r in report["replaced"]] == outside
    assert [s["path"] for s in report["squeeze_excitation"]["removed"]] == se
    expected = {"SiLU": "ReLU6", "Hardswish": "ReLU6", "GELU": "ReLU"}
    for path, old in outside:
        assert type(rewritten.get_submodule(path)).__name__ == expected[old]
    assert not any(isinstance(m, SqueezeExcitation) for m in rewritten.modules())
    assert report["functional_calls_left"] == {"SiLU": 1}  # F.silu in forward() is reported
    assert "written as functions" in proc.stderr + proc.stdout
    assert report["recovery"]["steps"] == 4 and report["recovery"]["distilled"]
    acc = report["top1_pct"]
    assert all(acc[k] is not None for k in ("before", "right_after", "after_bn_reestimation",
                                            "recovered"))

    validate = json.loads((run / "05-validate/report.json").read_text())
    by_name = {a["name"]: a for a in validate["artifacts"]}
    assert by_name["onnx-int8@int8-original"]["reference"] == "torch@train"
    assert by_name["onnx-int8@quantize"]["reference"] == "torch"
    md = (run / "05-validate/report.md").read_text()
    assert "## Rewrite: original vs rewritten in int8" in md
    section = md.split("## Rewrite", 1)[1]
    assert "| original | onnx-int8@int8-original |" in section
    assert "| rewritten | onnx-int8@quantize |" in section
    assert "Rewrite: original vs rewritten in int8" in (run / "05-validate/report.html").read_text()


def test_bad_mappings_exit_2(tmp_path: Path) -> None:
    for mapping, fragment in (("{Swish: Relu6}", "did you mean 'ReLU6'"),
                              ("{GLU: ReLU}", "changes output shapes")):
        write(tmp_path / "bad.yaml", PIPELINE.replace(
            "{SiLU: ReLU6, Hardswish: ReLU6, GELU: ReLU, Hardsigmoid: Hardtanh01}", mapping))
        proc = run_cli("check", str(tmp_path / "bad.yaml"), cwd=REPO)
        assert proc.returncode == 2, _explain(proc)
        assert "stages[1].rewrite.activations" in proc.stderr and fragment in proc.stderr
        assert "Traceback" not in proc.stderr

    # Known only when the model is there: nothing in it matches. The stage names what it has.
    model = build_model(ModelConfig(arch="torchvision/resnet18"), num_classes=10, in_chans=1)
    save_model(model, ModelSpec(arch="torchvision/resnet18", num_classes=10, in_chans=1,
                                class_names=[str(i) for i in range(10)]), tmp_path / "r18")
    write(tmp_path / "nothing.yaml", f"""
        name: nothing
        preprocess: {{size: [16, 16], channels: gray}}
        data: {{source: builtin:digits}}
        stages:
          - {{type: load, path: {tmp_path / "r18"}}}
          - {{type: rewrite, activations: {{SiLU: ReLU6}}}}
        """)
    proc = run_cli("run", str(tmp_path / "nothing.yaml"), "--out", str(tmp_path / "run2"),
                   cwd=REPO)
    assert proc.returncode == 2, _explain(proc)
    assert "nothing was rewritten" in proc.stderr and "ReLU x" in proc.stderr
    assert "Traceback" not in proc.stderr
