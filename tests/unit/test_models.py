"""Models: building torchvision / user architectures, stem and classifier discovery, pickle-free
save/load including structurally pruned models."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from edgemml.config import ModelConfig
from edgemml.errors import ConfigError, EdgemmlError, InputError
from edgemml.models import (
    ModelSpec,
    adapt_stem_weight,
    build_model,
    find_classifier,
    find_stem_conv,
    known_architectures,
    load_model,
    save_model,
)


def tv(name: str, **kw) -> ModelConfig:
    return ModelConfig(arch=f"torchvision/{name}", **kw)


def test_known_architectures_cover_common_families() -> None:
    known = known_architectures()
    for name in ("resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
                 "regnet_x_400mf", "shufflenet_v2_x0_5"):
        assert f"torchvision/{name}" in known


def test_unknown_arch_lists_known_ones() -> None:
    with pytest.raises(ConfigError) as exc:
        build_model(tv("resnet81"), num_classes=10, in_chans=3)
    text = str(exc.value)
    assert "resnet81" in text and "torchvision/resnet18" in text and "torchvision/mobilenet_v2" in text
    assert "did you mean 'torchvision/resnet18'" in text
    assert exc.value.exit_code == 2


@pytest.mark.parametrize("arch,stem,head", [
    ("resnet18", "conv1", "fc"),
    ("mobilenet_v3_small", "features.0.0", "classifier.3"),
    ("efficientnet_b0", "features.0.0", "classifier.1"),
    ("shufflenet_v2_x0_5", "conv1.0", "fc"),
    ("regnet_x_400mf", "stem.0", "fc"),
])
@pytest.mark.parametrize("in_chans", [1, 3, 4])
def test_build_in_chans_and_forward(arch: str, stem: str, head: str, in_chans: int) -> None:
    model = build_model(tv(arch), num_classes=7, in_chans=in_chans).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_chans, 32, 32))
    assert out.shape == (2, 7)
    assert find_stem_conv(model) == stem
    assert find_classifier(model) == head
    conv = model.get_submodule(stem)
    assert conv.in_channels == in_chans
    ref = build_model(tv(arch), num_classes=7, in_chans=3).get_submodule(stem)
    for attr in ("out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
        assert getattr(conv, attr) == getattr(ref, attr)


def test_config_values_override_kwargs() -> None:
    model = build_model(tv("resnet18", num_classes=5, in_chans=1), num_classes=10, in_chans=3)
    assert model.fc.out_features == 5 and model.conv1.in_channels == 1


def test_options_pass_to_builder() -> None:
    model = build_model(tv("mobilenet_v2", options={"width_mult": 0.5}), num_classes=3, in_chans=3)
    assert model.features[0][0].out_channels == 16


def test_bad_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="model.options"):
        build_model(tv("resnet18", options={"nonsense": 1}), num_classes=3, in_chans=3)


USER_ARCH = textwrap.dedent("""
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self, num_classes, in_chans, width=8):
            super().__init__()
            self.conv = nn.Conv2d(in_chans, width, 3, padding=1)
            self.bn = nn.BatchNorm2d(width)
            self.head = nn.Linear(width, num_classes)

        def forward(self, x):
            x = torch.relu(self.bn(self.conv(x)))
            return self.head(x.mean(dim=(2, 3)))

    def make(num_classes, in_chans, width=8):
        return Tiny(num_classes, in_chans, width)

    def not_a_model(num_classes, in_chans):
        return 42
""")


@pytest.fixture()
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "user_arch_mod.py").write_text(USER_ARCH)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "user_arch_mod"


def test_python_factory(user_module: str, tmp_path: Path) -> None:
    cfg = ModelConfig(python=f"{user_module}:make", options={"width": 4})
    model = build_model(cfg, num_classes=3, in_chans=2)
    assert model(torch.randn(1, 2, 8, 8)).shape == (1, 3)
    assert find_stem_conv(model) == "conv" and find_classifier(model) == "head"
    spec = ModelSpec.from_config(cfg, num_classes=3, in_chans=2, class_names=["a", "b", "c"])
    save_model(model, spec, tmp_path / "m")
    again, spec2 = load_model(tmp_path / "m")
    x = torch.randn(2, 2, 8, 8)
    model.eval()
    assert torch.equal(model(x), again(x))
    assert spec2.python == f"{user_module}:make" and spec2.options == {"width": 4}


@pytest.mark.parametrize("ref,match", [
    ("no_such_module_xyz:make", "cannot import"),
    ("user_arch_mod:missing", "no attribute"),
    ("user_arch_mod:not_a_model", "not a torch.nn.Module"),
    ("user_arch_mod", "module:factory"),
])
def test_python_factory_errors(user_module: str, ref: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_model(ModelConfig(python=ref), num_classes=3, in_chans=3)


def test_adapt_stem_weight_preserves_gray_response() -> None:
    w = torch.randn(8, 3, 3, 3)
    gray = torch.rand(1, 1, 6, 6)
    rgb = gray.repeat(1, 3, 1, 1)
    out_rgb = torch.nn.functional.conv2d(rgb, w)
    out_gray = torch.nn.functional.conv2d(gray, adapt_stem_weight(w, 1))
    assert torch.allclose(out_rgb, out_gray, atol=1e-5)
    assert adapt_stem_weight(w, 4).shape == (8, 4, 3, 3)


# ------------------------------------------------------------------------------------------------
# save / load
# ------------------------------------------------------------------------------------------------


def _roundtrip(model: nn.Module, cfg: ModelConfig, tmp_path: Path, in_chans: int) -> tuple[
        nn.Module, ModelSpec]:
    spec = ModelSpec.from_config(cfg, num_classes=10, in_chans=in_chans,
                                 class_names=[str(i) for i in range(10)], stage="test")
    save_model(model, spec, tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["model.json", "model.safetensors"]
    return load_model(tmp_path / "saved")


def test_save_load_roundtrip_plain(tmp_path: Path) -> None:
    cfg = tv("resnet18")
    model = build_model(cfg, num_classes=10, in_chans=1).eval()
    again, spec = _roundtrip(model, cfg, tmp_path, 1)
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(model(x), again(x))
    assert spec.layer_shapes == {} and spec.class_names[3] == "3" and spec.extra == {"stage": "test"}
    data = json.loads((tmp_path / "saved" / "model.json").read_text())
    assert data["arch"] == "torchvision/resnet18" and data["in_chans"] == 1


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_save_load_roundtrip_pruned(arch: str, tmp_path: Path) -> None:
    tp = pytest.importorskip("torch_pruning")
    torch.manual_seed(0)
    cfg = tv(arch)
    model = build_model(cfg, num_classes=10, in_chans=3).eval()
    x = torch.randn(2, 3, 32, 32)
    head = model.get_submodule(find_classifier(model))
    n_before = sum(p.numel() for p in model.parameters())
    pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=0.5, ignored_layers=[head])
    pruner.step()
    model.eval()
    assert sum(p.numel() for p in model.parameters()) < n_before * 0.5
    again, spec = _roundtrip(model, cfg, tmp_path, 3)
    assert spec.layer_shapes, "pruned layers must be recorded"
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    # The reloaded model is an ordinary module: it can be saved again unchanged.
    save_model(again, spec, tmp_path / "again")
    third, spec3 = load_model(tmp_path / "again")
    assert spec3.layer_shapes == spec.layer_shapes
    with torch.no_grad():
        assert torch.equal(model(x), third(x))


def test_save_refuses_structural_changes(tmp_path: Path) -> None:
    cfg = tv("resnet18")
    model = build_model(cfg, num_classes=10, in_chans=3)
    model.extra_head = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="extra_head"):
        save_model(model, ModelSpec.from_config(cfg, num_classes=10, in_chans=3), tmp_path / "m")


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="model.json"):
        load_model(tmp_path)
    cfg = tv("resnet18")
    model = build_model(cfg, num_classes=10, in_chans=3)
    save_model(model, ModelSpec.from_config(cfg, num_classes=10, in_chans=3), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(InputError, match="model.safetensors"):
        load_model(tmp_path)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(EdgemmlError, match="model.json"):
        load_model(tmp_path)


def test_no_temp_files_left(tmp_path: Path) -> None:
    cfg = tv("shufflenet_v2_x0_5")
    model = build_model(cfg, num_classes=10, in_chans=3)
    save_model(model, ModelSpec.from_config(cfg, num_classes=10, in_chans=3), tmp_path)
    save_model(model, ModelSpec.from_config(cfg, num_classes=10, in_chans=3), tmp_path)  # overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.safetensors"]


def test_saved_weights_are_byte_identical_across_processes(tmp_path: Path) -> None:
    """safetensors writes its metadata from a Rust HashMap (another key order in every process):
    the same weights must still give the same file, or every later stage re-runs."""
    import subprocess
    import sys

    script = """
import sys, torch
from pathlib import Path
from edgemml.config import ModelConfig
from edgemml.models import ModelSpec, build_model, save_model
torch.manual_seed(0)
cfg = ModelConfig(arch="torchvision/squeezenet1_1")
model = build_model(cfg, num_classes=3, in_chans=1)
save_model(model, ModelSpec.from_config(cfg, num_classes=3, in_chans=1), Path(sys.argv[1]))
"""
    files = []
    for i in range(4):  # unsorted, each process would pick one of two orders: 1 in 16 to pass
        proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / str(i))],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        files.append((tmp_path / str(i) / "model.safetensors").read_bytes())
        assert b'{"__metadata__":{"edgemml":"model","format":"pt"},' in files[-1][:200]
    assert all(f == files[0] for f in files)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "0/model.safetensors"), "pt") as f:
        assert f.metadata() == {"edgemml": "model", "format": "pt"}


def test_squeezenet_logits_have_no_relu_so_no_class_can_die(tmp_path: Path) -> None:
    """Regression: squeezenet1_1 trained on digits ended at 79 % with classes 2 and 6 never
    predicted; torchvision's ReLU on the logits held them at 0 with no gradient (zoo.py)."""
    torch.manual_seed(0)
    model = build_model(tv("squeezenet1_1"), num_classes=10, in_chans=1).eval()
    kept = build_model(tv("squeezenet1_1", options={"logit_relu": True}), num_classes=10,
                       in_chans=1).eval()
    kept.load_state_dict(model.state_dict())  # the ReLU holds no weights
    assert isinstance(kept.classifier[2], nn.ReLU) and isinstance(model.classifier[2], nn.Identity)
    x = torch.randn(8, 1, 32, 32)
    for m in (model, kept):  # a class pushed below zero everywhere
        with torch.no_grad():
            m.classifier[1].bias[2] = -1e3
        m.zero_grad()
        m(x)[:, 2].sum().backward()
    assert model.classifier[1].weight.grad[2].abs().sum() > 0      # it still learns
    assert kept.classifier[1].weight.grad[2].abs().sum() == 0      # dead for good
    save_model(model, ModelSpec(arch="torchvision/squeezenet1_1", num_classes=10, in_chans=1),
               tmp_path / "m")
    assert isinstance(load_model(tmp_path / "m")[0].classifier[2], nn.Identity)
    with pytest.raises(ConfigError, match="logit_relu"):
        build_model(tv("resnet18", options={"logit_relu": False}), num_classes=10, in_chans=1)


def test_bn_momentum_option_sets_every_batchnorm_and_survives_reload(tmp_path: Path) -> None:
    """torchvision's mobilenet_v3 uses momentum 0.01 (its running statistics lag short trainings
    so far that the model evaluates at chance); options.bn_momentum overrides every layer."""
    cfg = tv("mobilenet_v3_small", options={"bn_momentum": 0.1})
    model = build_model(cfg, num_classes=10, in_chans=1)
    moms = {m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    assert moms == {0.1}
    assert {m.momentum for m in build_model(tv("mobilenet_v3_small"), num_classes=10, in_chans=1)
            .modules() if isinstance(m, nn.BatchNorm2d)} == {0.01}
    save_model(model, ModelSpec(arch=cfg.arch, num_classes=10, in_chans=1, options=cfg.options),
               tmp_path / "m")
    reloaded, _ = load_model(tmp_path / "m")
    assert {m.momentum for m in reloaded.modules() if isinstance(m, nn.BatchNorm2d)} == {0.1}
    with pytest.raises(ConfigError, match="bn_momentum"):
        build_model(tv("resnet18", options={"bn_momentum": 2}), num_classes=10, in_chans=1)
