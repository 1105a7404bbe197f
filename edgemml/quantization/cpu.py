"""Which int8 recipe suits the CPU this runs on (or the one named), and why.

ONNX Runtime's own guidance (quantize_static docstring, 1.32): x86 with VNNI -> uint8 activations,
int8 weights, no range reduction; x86 without VNNI -> the same with reduce_range (7-bit weights, so
the u8*s8 pair sums of vpmaddubsw cannot saturate int16); ARM -> int8 activations and weights.
Measured on this project's AVX-512-VNNI CPU (resnet18, batch 1, 2 threads): signed activations ran
16.5 ms, unsigned 6.2 ms, fp32 19.8 ms; signed int8 was slower than fp32 for mobilenet_v3_small.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Literal

from edgemml.machine import cpu

Target = Literal["x86-vnni", "x86", "arm64"]


@dataclass(frozen=True)
class OrtRecipe:
    target: str
    activation_type: Literal["uint8", "int8"]
    weight_type: Literal["int8", "uint8"]
    reduce_range: bool
    why: str


RECIPES: dict[str, OrtRecipe] = {
    "x86-vnni": OrtRecipe("x86-vnni", "uint8", "int8", False,
                          "x86 with VNNI: uint8 activations x int8 weights use the VNNI u8s8 "
                          "dot product; signed activations were ~2.7x slower here"),
    "x86": OrtRecipe("x86", "uint8", "int8", True,
                     "x86 without VNNI: uint8 x int8 with 7-bit weights (reduce_range) so the "
                     "AVX2 u8s8 multiply-add cannot saturate"),
    "arm64": OrtRecipe("arm64", "int8", "int8", False,
                       "ARM: ONNX Runtime's ARM kernels are optimised for symmetric int8 "
                       "activations and weights"),
}


def detect_target() -> tuple[str, str]:
    """(target, evidence) for this machine: arm64, x86-vnni (avx512_vnni or avx_vnni) or x86."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64") or machine.startswith("arm"):
        return "arm64", f"platform.machine()={machine}"
    flags = cpu().flags
    vnni = sorted(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    if vnni:
        return "x86-vnni", f"CPU flags: {', '.join(vnni)}"
    if flags:
        return "x86", "CPU flags: no avx512_vnni / avx_vnni"
    return "x86", f"platform.machine()={machine}, no /proc/cpuinfo flags: assuming x86 without VNNI"
