"""Process groups for multi-process training and evaluation under `torchrun`.

`torchrun --nproc_per_node=N -m padrec ...` starts N copies of the CLI with RANK/WORLD_SIZE/LOCAL_RANK and a
rendezvous address in the environment; `init_from_env` joins them into one process group (gloo on CPU, NCCL
when every local rank has a GPU of its own). Without torchrun (WORLD_SIZE unset or 1) every helper here is a
no-op that describes a group of one, so single-process code paths need no special cases.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist

from padrec import PadrecError

BACKEND_ENV = "PADREC_DIST_BACKEND"  # force "gloo" (CPU) or "nccl"; default: NCCL iff each local rank has a GPU


def requested() -> bool:
    """Whether this process was started as one of several (torchrun sets WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _backend() -> str:
    forced = os.environ.get(BACKEND_ENV)
    if forced:
        if forced not in ("gloo", "nccl"):
            raise PadrecError(f"{BACKEND_ENV}={forced!r}: expected 'gloo' or 'nccl'")
        return forced
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    # Two ranks on one GPU make NCCL fail at the first collective, so a GPU is only used with one per rank.
    if torch.cuda.is_available() and torch.cuda.device_count() >= local_world:
        return "nccl"
    return "gloo"


def init_from_env() -> bool:
    """Join torchrun's process group when WORLD_SIZE > 1. Returns whether this process is distributed."""
    if not requested():
        return False
    if dist.is_initialized():
        return True
    backend = _backend()
    if backend == "nccl":
        local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=local)
    else:
        dist.init_process_group("gloo")
    return True


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0 alone writes files and prints; the others compute their share and wait."""
    return rank() == 0


def device() -> torch.device:
    """Where this rank's model lives: its own GPU under NCCL, else the CPU (single-process runs stay on CPU)."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _reduce(values: Sequence[float], op) -> list[float]:
    if not is_distributed():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device())
    dist.all_reduce(t, op=op)
    return t.tolist()


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum of `values` over all ranks (float64, so token counts stay exact)."""
    return _reduce(values, dist.ReduceOp.SUM)


def all_reduce_max(value: float) -> float:
    return _reduce([value], dist.ReduceOp.MAX)[0]


def sum_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Sum every parameter's gradient over the ranks, in place: the multi-process rule of `training.loop`. Each
    rank scales its loss by its share of the global batch, so the sum is the 1-process gradient of the global
    batch (DDP's averaging would need every forward to go through its wrapper, which a draft's own methods,
    `logits` and the unrolled steps, do not)."""
    if not is_distributed():
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def all_gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shard(items: Sequence, rank_: int | None = None, world: int | None = None) -> list:
    """This rank's contiguous part of `items` (sizes differ by at most one; a part may be empty). Every rank
    must pass the same `items`: the parts of all ranks together are `items` exactly once."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    n = len(items)
    return list(items[r * n // w : (r + 1) * n // w])


def cleanup() -> None:
    """Leave the process group together, so no rank tears down its gloo group while a peer is still finishing its
    last collective (the CLI then ends the rank without the interpreter's teardown: cli._exit_now)."""
    if dist.is_available() and dist.is_initialized():
        barrier()
        dist.destroy_process_group()
