"""torch.distributed for runs started by torchrun: joining the process group, passing objects from
rank 0, and the collectives the training loop needs.

The runner and the finetune stage use `broadcast_object` to hand rank 0's decisions and models to the
other ranks, so ranks on other machines never need to read rank 0's run directory.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn


def dist_info() -> tuple[bool, int, int]:
    """(initialised?, rank, world size) of torch.distributed."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return True, dist.get_rank(), dist.get_world_size()
    return False, 0, 1


def init_distributed() -> tuple[int, int]:
    """Join the process group torchrun set up (env://), once per process; returns (rank, world).

    gloo carries CPU tensors (and the runner's control messages); on machines with CUDA, nccl carries
    the GPU tensors of DDP. The timeout is long because ranks other than 0 wait in a collective while
    rank 0 alone runs the non-training stages; if a rank dies, torchrun stops the others.
    """
    import datetime

    import torch.distributed as dist
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        dist.init_process_group(backend=backend, init_method="env://",
                                timeout=datetime.timedelta(hours=24))
    return dist.get_rank(), dist.get_world_size()


def shutdown_distributed() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` from rank `src` on every rank (pickled between our own processes; never from files).

    Used so that ranks on other machines need not see rank 0's run directory.
    """
    distributed, _, _ = dist_info()
    if not distributed:
        return obj
    import torch.distributed as dist
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    import torch.distributed as dist
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    import torch.distributed as dist
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def sync_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's BatchNorm statistics (DDP's own convention), so that evaluation,
    the early-stopping decision and the kept best weights are identical on all ranks."""
    import torch.distributed as dist
    for b in model.buffers():
        dist.broadcast(b, 0)
