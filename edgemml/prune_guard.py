"""A measured memory and time guard for torch-pruning's dependency graph.

Why measured: the graph's memory is not a function of parameter or module count. torch-pruning
traces the model and, for every reshape, infers channels recursively; on window-attention models
(Swin) that recursion grew one process to 21.7 GB at 224x224 on a 24 GB machine and the kernel
killed it, with no message from edgemml. ConvNeXt-T has the same 28 M parameters and needs 0.2 GB.
An estimate cannot see that without doing the trace, and an address-space limit (RLIMIT_AS) is
either far above the resident memory one wants to allow (torch, onnxruntime and openvino map
gigabytes at import) or kills innocent mappings.

So the prune stage first builds the graph and runs one pruning pass in a child process
(`python -m edgemml.prune_guard`), on the input model folder, while the parent polls the child's
resident memory every 0.2 s and kills it above the budget or after the time limit. Only when the
child finished does the search run in the stage's own process (the trials rebuild the same graph
on copies of the model, one at a time, so the child's peak is what a trial needs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

#: default budget: this fraction of the memory available when the stage starts
DEFAULT_FRACTION = 0.6
POLL_S = 0.2


@dataclass
class GraphProbe:
    """What the child process measured (or why it was stopped)."""

    peak_rss_mb: float
    seconds: float
    budget_mb: float
    timeout_s: float
    stopped: str | None = None    # "memory" | "time" when the parent killed it
    error: str | None = None      # the child's own error (the search reports it properly)

    @property
    def ok(self) -> bool:
        return self.stopped is None

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 1) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def default_budget_mb() -> float:
    import psutil

    return DEFAULT_FRACTION * psutil.virtual_memory().available / 2**20


def _tree_rss(proc: Any) -> int:
    import psutil

    try:
        total = proc.memory_info().rss
        for child in proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return int(total)
    except psutil.Error:
        return 0


def probe(model_dir: Path, *, size: tuple[int, int], ratio: float, settings: dict[str, Any],
          budget_mb: float, timeout_s: float) -> GraphProbe:
    """Build the dependency graph and run one pruning pass at `ratio` in a child process.

    `settings`: importance, round_to, head, frozen (names), as the stage uses them.
    """
    import psutil

    job = {"model_dir": str(model_dir), "size": list(size), "ratio": ratio, **settings}
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "edgemml.prune_guard", json.dumps(job)]
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                             text=True)
    ps = psutil.Process(child.pid)
    peak, stopped = 0, None
    try:
        while child.poll() is None:
            peak = max(peak, _tree_rss(ps))
            if peak > budget_mb * 2**20:
                stopped = "memory"
            elif time.perf_counter() - t0 > timeout_s:
                stopped = "time"
            if stopped:
                child.kill()
                break
            time.sleep(POLL_S)
        _, err = child.communicate()
    except BaseException:
        child.kill()
        child.wait()
        raise
    error = None
    if stopped is None and child.returncode != 0:
        lines = [ln for ln in (err or "").strip().splitlines() if ln.strip()]
        error = lines[-1] if lines else f"exit {child.returncode}"
    return GraphProbe(peak / 2**20, time.perf_counter() - t0, budget_mb, timeout_s, stopped,
                      error)


def _child(job: dict[str, Any]) -> int:
    import torch

    from edgemml import pruning
    from edgemml.models import load_model
    from edgemml.prune_rules import rules_for

    torch.set_num_threads(1)
    model, spec = load_model(Path(job["model_dir"]))
    settings = pruning.PruneSettings(importance=job["importance"], round_to=job["round_to"],
                                     head=job["head"], frozen=set(job["frozen"]),
                                     rules=rules_for(spec.arch, model))
    example = torch.zeros(1, spec.in_chans, *job["size"])
    if job["importance"] == "taylor":  # gradients are not what is measured here
        settings.importance = "l2"
    pruning.prune_step(model, example, job["ratio"], settings)
    return 0


if __name__ == "__main__":
    sys.exit(_child(json.loads(sys.argv[1])))
