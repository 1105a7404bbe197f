"""What the machine is: CPU name and features, library versions. The one reader of /proc/cpuinfo.

Every figure edgemml reports was measured on some machine; reports name it (CPU model, the int8/bf16
features its kernels depend on, library versions) so a figure is never shown as another machine's.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

#: versions recorded in every stage.json and report (whether or not they enter a fingerprint)
RECORDED_DISTRIBUTIONS = ("torch", "torchvision", "onnx", "onnxruntime", "openvino", "nncf",
                          "torch-pruning", "numpy")

#: CPU features that decide which int8 / bf16 kernels run
KERNEL_FLAGS = frozenset({"avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16",
                          "amx_int8", "asimddp", "i8mm"})


@dataclass(frozen=True)
class CpuInfo:
    name: str
    machine: str
    flags: frozenset[str]

    @property
    def kernel_flags(self) -> list[str]:
        return sorted(self.flags & KERNEL_FLAGS)


def read_cpuinfo(path: Path = Path("/proc/cpuinfo")) -> CpuInfo:
    """Model name and feature flags of the first CPU listed (x86 "flags", ARM "Features"); on
    systems without /proc/cpuinfo, platform's processor name and no flags."""
    name, flags = "", frozenset()
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not name:
            name = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
    return CpuInfo(name or platform.processor() or platform.machine(), platform.machine(), flags)


@lru_cache(maxsize=1)
def cpu() -> CpuInfo:
    return read_cpuinfo()


#: where edgemml keeps what it measured or listed once per machine (roofline, torchvision's models)
CACHE_ENV = "EDGEMML_CACHE_DIR"


def cache_dir() -> Path:
    """$EDGEMML_CACHE_DIR, else $XDG_CACHE_HOME/edgemml, else ~/.cache/edgemml."""
    import os

    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "edgemml"


def dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def versions(dists: tuple[str, ...] = RECORDED_DISTRIBUTIONS) -> dict[str, str | None]:
    return {d: dist_version(d) for d in dists}


def environment(threads: int) -> dict[str, Any]:
    """The machine a report's figures were measured on."""
    info = cpu()
    return {"threads": threads, "machine": info.machine, "processor": info.name,
            "cpu_flags": info.kernel_flags, "python": platform.python_version(),
            "versions": versions()}


def busy_cpu_seconds(stat: Path = Path("/proc/stat")) -> float | None:
    """CPU-seconds every CPU of the machine spent busy since boot (user, nice, system, irq,
    softirq and steal: time a hypervisor gave to other guests is lost to us too); None where
    /proc/stat does not exist."""
    import os

    try:
        with open(stat, encoding="ascii", errors="replace") as fh:
            fields = fh.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    try:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    except ValueError:
        return None
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class ForeignLoad:
    """How much of the machine's CPU *other* processes used while a block ran.

    Why not the load average: it counts this process's own threads (a stage that just trained with
    two threads shows a load of 2 on an idle machine) and lags by a minute. This meter takes the
    whole machine's busy CPU time (/proc/stat) over the block minus this process's own CPU time
    (and its finished children's: benchmark_app, the pruning graph's child process), as a fraction
    of the CPUs x wall time: 0 on a quiet machine, 0.5 when other processes kept half the cores
    busy. `fraction` is None where /proc/stat is missing (not Linux).

        with ForeignLoad() as load:
            ...timed work...
        load.fraction
    """

    def __init__(self) -> None:
        self.fraction: float | None = None

    def __enter__(self) -> "ForeignLoad":
        import os
        import time

        self._busy = busy_cpu_seconds()
        self._own = sum(os.times()[:4])
        self._wall = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        import os
        import time

        busy = busy_cpu_seconds()
        wall = time.perf_counter() - self._wall
        if busy is None or self._busy is None or wall <= 0:
            return
        own = sum(os.times()[:4]) - self._own
        other = max(0.0, (busy - self._busy) - own)
        self.fraction = min(1.0, other / (wall * (os.cpu_count() or 1)))
