"""The capability table that lets `edgemml check` refuse, before anything runs, a pipeline whose
stages cannot work on its architecture (issue 15), and the refusals through the real CLI."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from edgemml.models import known_architectures
from edgemml.arch_capabilities import PARAMS_M, family_of, refusals

ALL = ("build", "train", "prune", "quantize", "export")


def test_every_registered_architecture_has_a_family_and_a_parameter_count() -> None:
    names = [a.split("/", 1)[1] for a in known_architectures()]
    assert [n for n in names if family_of(n) is None] == []
    assert sorted(set(names) - set(PARAMS_M)) == []


def test_parameter_counts_match_torchvision_metadata() -> None:
    """PARAMS_M feeds the training-memory and 2 GB ONNX refusals: it must be torchvision's."""
    import torchvision

    for name, params_m in PARAMS_M.items():
        meta = torchvision.models.get_model_weights(name).DEFAULT.meta
        assert abs(meta["num_params"] / 1e6 - params_m) <= 0.051, name


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "mobilenet_v3_small",
                                  "efficientnet_b0", "shufflenet_v2_x1_0", "mnasnet0_5",
                                  "googlenet", "densenet121", "convnext_tiny", "regnet_y_400mf"])
def test_edge_cnns_are_not_refused_at_32(name: str) -> None:
    assert refusals(f"torchvision/{name}", {}, (32, 32), ALL, available_mb=20_000) == []


def test_window_attention_models_are_refused_for_prune_only() -> None:
    for name in ("swin_t", "swin_v2_s"):
        got = refusals(f"torchvision/{name}", {}, (32, 32), ALL)
        assert [(r.need, r.arch) for r in got] == [("prune", f"torchvision/{name}")]
        assert "window-partition reshape" in got[0].reason
        assert refusals(f"torchvision/{name}", {}, (32, 32), ("build", "train", "export")) == []


def test_fixed_size_models_must_match_the_input() -> None:
    got = refusals("torchvision/vit_b_16", {}, (32, 32), ("train",))
    assert got and got[0].need == "build" and "image_size" in got[0].reason
    assert "image_size: 32" in got[0].hint
    assert refusals("torchvision/vit_b_16", {"image_size": 32}, (32, 32), ALL) == []
    bad_patch = refusals("torchvision/vit_b_16", {"image_size": 40}, (40, 40), ("build",))
    assert bad_patch and "patch size 16" in bad_patch[0].reason
    assert refusals("torchvision/maxvit_t", {}, (224, 224), ("build",)) == []


def test_small_inputs_and_aux_heads() -> None:
    (r,) = refusals("torchvision/alexnet", {}, (32, 32), ("build",))
    assert "at least 63x63" in r.reason
    (r,) = refusals("torchvision/inception_v3", {}, (96, 96), ("train",))
    assert "aux head" in r.reason and "aux_logits: false" in r.hint
    assert refusals("torchvision/inception_v3", {"aux_logits": False}, (96, 96), ("train",)) == []


def test_memory_and_onnx_size_refusals() -> None:
    (r,) = refusals("torchvision/vit_h_14", {"image_size": 224}, (224, 224), ("train",),
                    available_mb=8_000)
    assert r.need == "train" and "633.5 M parameters" in r.reason
    (r,) = refusals("torchvision/regnet_y_128gf", {}, (32, 32), ("quantize",))
    assert r.need == "quantize" and "2 GB" in r.reason
    # a user's own architecture is never refused by the table (the prune guard measures it)
    assert refusals("python:pkg.mod:factory", {}, (8, 8), ALL, available_mb=1) == []


def _pipeline(tmp_path: Path, arch: str, size: int = 32, options: str = "{}") -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent(f"""
        name: cap
        preprocess: {{size: [{size}, {size}], channels: gray, mean: [0.5], std: [0.5]}}
        data: {{source: "builtin:digits", split: {{train: 0.6, val: 0.2, test: 0.2}}}}
        stages:
          - name: train
            type: finetune
            model: {{arch: torchvision/{arch}, options: {options}}}
            max_steps: 2
          - {{type: prune, target_macs: 0.5}}
          - {{type: quantize}}
          - {{type: export}}
          - {{type: validate}}
        """))
    return path


def test_check_refuses_swin_prune_naming_stage_and_architecture(tmp_path: Path) -> None:
    proc = run_cli("check", str(_pipeline(tmp_path, "swin_t")), "--out", str(tmp_path / "run"),
                   cwd=REPO)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr
    assert "stage 'prune' (prune)" in err and "torchvision/swin_t cannot be pruned" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing ran


def test_check_refuses_vit_at_a_size_it_is_not_built_for_once(tmp_path: Path) -> None:
    proc = run_cli("check", str(_pipeline(tmp_path, "vit_b_16")), "--out", str(tmp_path / "run"),
                   cwd=REPO)
    assert proc.returncode == 2
    assert "image_size" in proc.stderr and "also stages 'prune', 'quantize', 'export'" in proc.stderr
    ok = run_cli("check", str(_pipeline(tmp_path, "vit_b_16", options="{image_size: 32}")),
                 "--out", str(tmp_path / "run"), cwd=REPO)
    assert ok.returncode == 0, ok.stderr


def test_what_the_registry_refuses_at_224_for_the_whole_pipeline() -> None:
    """The closing list of issue 15: at 224x224 (every fixed-size model's default), with memory to
    train, only these architectures are refused, and only for these stages; the other 70 of the
    80 go through check."""
    refused = {}
    for arch in known_architectures():
        got = refusals(arch, {}, (224, 224), ALL, available_mb=20_000)
        if got:
            refused[arch.split("/", 1)[1]] = sorted({r.need for r in got})
    assert refused == {
        "inception_v3": ["build"],          # aux head (default) with 224 < 299
        "maxvit_t": ["prune"], "swin_t": ["prune"], "swin_s": ["prune"], "swin_b": ["prune"],
        "swin_v2_t": ["prune"], "swin_v2_s": ["prune"], "swin_v2_b": ["prune"],
        "regnet_y_128gf": ["quantize"], "vit_h_14": ["quantize"],   # > 2 GB of fp32 weights
    }
    assert len(known_architectures()) == 80
