"""Checkpoints: every supported form loads into its architecture; unsafe or broken files are refused
with an InputError that names the file, and pickled code never runs."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from edgemml.config import ModelConfig
from edgemml.errors import EXIT_USER_ERROR, InputError
from edgemml.models import build_model, find_stem_conv, load_into
from edgemml.models.checkpoints import (
    NESTING_KEYS,
    WRAPPER_PREFIXES,
    load_checkpoint,
    read_checkpoint,
    strip_wrapper_prefixes,
    torchvision_weights_path,
)

ARCH = ModelConfig(arch="torchvision/shufflenet_v2_x0_5")  # small: fast to save and load


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ARCH, num_classes=10, in_chans=3).eval()


def _fresh() -> torch.nn.Module:
    return build_model(ARCH, num_classes=10, in_chans=3).eval()


def _assert_loads(state: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    target = _fresh()
    target.load_state_dict(state, strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt"])
def test_plain_state_dict(tmp_path: Path, model: torch.nn.Module, suffix: str) -> None:
    path = tmp_path / f"weights{suffix}"
    torch.save(model.state_dict(), path)
    _assert_loads(load_checkpoint(path), model)


def test_legacy_torch_format(tmp_path: Path, model: torch.nn.Module) -> None:
    path = tmp_path / "legacy.pth"
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=False)
    _assert_loads(load_checkpoint(path), model)


def test_safetensors(tmp_path: Path, model: torch.nn.Module) -> None:
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    _assert_loads(load_checkpoint(path), model)
    _assert_loads(load_checkpoint(str(path)), model)


@pytest.mark.parametrize("key", ["state_dict", "model", "model_state_dict", "ema", "module"])
def test_nested_weights(tmp_path: Path, model: torch.nn.Module, key: str) -> None:
    assert key in NESTING_KEYS
    path = tmp_path / "ckpt.pt"
    torch.save({key: model.state_dict(), "epoch": 7, "optimizer": {"lr": 0.1},
                "classes": [f"c{i}" for i in range(10)]}, path)
    ckpt = read_checkpoint(path)
    _assert_loads(ckpt.state_dict, model)
    assert ckpt.nested_under == (key,)
    assert ckpt.class_names == [f"c{i}" for i in range(10)]


def test_doubly_nested_ema_module(tmp_path: Path, model: torch.nn.Module) -> None:
    path = tmp_path / "ema.pt"
    torch.save({"ema": {"module": model.state_dict()}, "step": 3}, path)
    _assert_loads(load_checkpoint(path), model)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "model.", "_orig_mod.module."])
def test_wrapper_prefixes(tmp_path: Path, model: torch.nn.Module, prefix: str) -> None:
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {prefix + k: v for k, v in model.state_dict().items()}}, path)
    _assert_loads(load_checkpoint(path), model)


def test_prefix_constant_and_lightning_extras(model: torch.nn.Module) -> None:
    assert set(WRAPPER_PREFIXES) >= {"module.", "_orig_mod.", "model."}
    state = {"model." + k: v for k, v in model.state_dict().items()}
    state["loss_fn.weight"] = torch.ones(3)  # Lightning modules also save loss/metric tensors
    stripped = strip_wrapper_prefixes(state, model.state_dict().keys())
    assert set(model.state_dict()) <= set(stripped)
    # a user model whose own top-level module is called `model` is left alone
    own = {"model.weight": torch.zeros(1)}
    assert strip_wrapper_prefixes(own, ["model.weight"]) == own


def test_compiled_submodule_segments(model: torch.nn.Module) -> None:
    state = {k.replace("conv1.", "conv1._orig_mod.", 1): v for k, v in model.state_dict().items()}
    assert set(strip_wrapper_prefixes(state)) == set(model.state_dict())


def test_torchvision_weights_from_local_hub(tmp_path: Path, model: torch.nn.Module,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    ref = "torchvision:ShuffleNet_V2_X0_5_Weights.IMAGENET1K_V1"
    path, url, _ = torchvision_weights_path(ref.split(":", 1)[1])
    assert path.parent == tmp_path / "hub" / "checkpoints" and path.name == os.path.basename(url)
    with pytest.raises(InputError) as exc:
        load_checkpoint(ref)
    assert str(path) in str(exc.value) and url in str(exc.value)
    # put a (fake ImageNet-shaped) file where torchvision would have cached it
    imagenet = build_model(ARCH, num_classes=1000, in_chans=3)
    path.parent.mkdir(parents=True)
    torch.save(imagenet.state_dict(), path)
    ckpt = read_checkpoint(ref)
    assert len(ckpt.class_names or []) == 1000  # ImageNet categories from the weights' meta
    target = build_model(ARCH, num_classes=1000, in_chans=3)
    target.load_state_dict(ckpt.state_dict, strict=True)
    # into a 10-class grayscale model: stem adapted, classifier skipped
    small = build_model(ARCH, num_classes=10, in_chans=1)
    report = load_into(small, ckpt.state_dict, stem=find_stem_conv(small))
    assert report.adapted == ["conv1.0.weight"]
    assert set(report.skipped) == {"fc.weight", "fc.bias"}


def test_torchvision_home_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path, _, _ = torchvision_weights_path("ResNet18_Weights.IMAGENET1K_V1")
    assert path == tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"


def test_unknown_torchvision_weights() -> None:
    with pytest.raises(InputError, match="ResNet18_Weights.IMAGENET1K_V1"):
        load_checkpoint("torchvision:ResNet18_Weights.IMAGENET1K_V9")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: D105 - runs `touch marker` when unpickled
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["torch", "torch_legacy", "raw_pickle"])
def test_pickled_code_is_refused(tmp_path: Path, how: str) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    payload = {"state_dict": {"w": torch.zeros(2)}, "x": _Evil(marker)}
    if how == "torch":
        torch.save(payload, path)
    elif how == "torch_legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.raises(InputError) as exc:
        load_checkpoint(path)
    text = str(exc.value)
    assert str(path) in text and "pickled code" in text and "system" in text
    assert exc.value.exit_code == EXIT_USER_ERROR
    assert not marker.exists()


def test_whole_pickled_module_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "full.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 2)), path)
    with pytest.raises(InputError, match="state_dict"):
        load_checkpoint(path)


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_file(tmp_path: Path, model: torch.nn.Module, legacy: bool) -> None:
    path = tmp_path / "cut.pt"
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=not legacy)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as exc:
        load_checkpoint(path)
    assert str(path) in str(exc.value) and "truncated" in str(exc.value)


def test_truncated_safetensors(tmp_path: Path, model: torch.nn.Module) -> None:
    path = tmp_path / "cut.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(InputError, match="cut.safetensors"):
        load_checkpoint(path)


@pytest.mark.parametrize("content,match", [
    (b"", "empty"),
    (b"hello, this is a text file\n", "not a checkpoint"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "not a checkpoint"),
])
def test_not_a_checkpoint(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(InputError, match=match) as exc:
        load_checkpoint(path)
    assert str(path) in str(exc.value)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(InputError, match="folder"):
        load_checkpoint(tmp_path)


def test_no_weights_inside(tmp_path: Path) -> None:
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "config": {"lr": 0.1}}, path)
    with pytest.raises(InputError, match="no weights found.*epoch"):
        load_checkpoint(path)


# ------------------------------------------------------------------------------------------------
# Cases the former hand-written opcode walk got wrong or torch's own scanner cannot read; each must still be refused with the right global named, and nothing executed.
# ------------------------------------------------------------------------------------------------


def test_zip_with_pickle_protocol_4_names_the_global(tmp_path: Path) -> None:
    """torch's get_unsafe_globals_in_checkpoint raises on protocol-4 opcodes: picklescan names it."""
    marker = tmp_path / "marker"
    path = tmp_path / "p4.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "x": _Evil(marker)}, path, pickle_protocol=4)
    with pytest.raises(InputError, match=r"pickled code \(global posix.system"):
        load_checkpoint(path)
    assert not marker.exists()


def test_memoized_stack_global_is_named(tmp_path: Path) -> None:
    """STACK_GLOBAL fed from the memo, decoy strings pushed last: the old walk named 'decoy.names'."""
    path = tmp_path / "memo.pkl"
    path.write_bytes(b"\x80\x04\x8c\x05posix\x94\x8c\x06system\x94\x8c\x05decoy\x94\x8c\x05names\x94"
                     b"h\x00h\x01\x93\x8c\x04true\x85R.")
    with pytest.raises(InputError) as exc:
        load_checkpoint(path)
    assert "pickled code (global posix.system" in str(exc.value)
    assert "decoy" not in str(exc.value)


def test_numpy_objects_are_named_not_called_code(tmp_path: Path) -> None:
    """Globals torch's allowlist rejects but that run no code are 'objects', named in the message."""
    import numpy as np

    path = tmp_path / "np.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "best": np.float64(0.5)}, path)
    with pytest.raises(InputError) as exc:
        load_checkpoint(path)
    text = str(exc.value)
    assert "pickled Python objects" in text and "multiarray.scalar" in text
    assert "pickled code" not in text


def test_message_is_deterministic(tmp_path: Path) -> None:
    """torch returns a set: the names must come out in the same order on every run."""
    import subprocess
    import sys

    path = tmp_path / "full.pt"
    torch.save({"a": torch.nn.Linear(2, 2), "b": torch.nn.ReLU(), "c": torch.nn.Tanh()}, path)
    code = ("from edgemml.models.unsafe_pickle import scan_pickle; "
            "from pathlib import Path; print(scan_pickle(Path(%r)).unsafe)" % str(path))
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout
            for seed in (1, 2, 3)}
    assert len(outs) == 1 and "Linear" in outs.pop()
