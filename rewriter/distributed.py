"""torch.distributed for calibration: samples split across ranks, statistics summed across them.

Nothing here launches processes or moves bytes itself: `torchrun --nproc-per-node N -m rewriter optimize ...` starts
the ranks and sets RANK / WORLD_SIZE / MASTER_ADDR; `init()` joins the process group (NCCL on GPUs, gloo on CPUs).
Outside a process group every function is the one-process identity, so passes call them unconditionally.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def launched() -> bool:
    """True when a launcher (torchrun) started this process as a rank (also a group of one: the same code path,
    NCCL or gloo included, runs with one process)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ and "MASTER_ADDR" in os.environ


def init(device: str | torch.device | None = None) -> None:
    """Join the process group torchrun describes (once); NCCL when the calibration device is CUDA, gloo otherwise."""
    if not launched() or dist.is_initialized():
        return
    cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")


def active() -> bool:
    """A process group is up (reductions go through it, even with one rank)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def share(n: int, r: int | None = None, world: int | None = None) -> range:
    """The contiguous slice of n samples rank r calibrates on (sizes differ by at most one)."""
    r, world = rank() if r is None else r, world_size() if world is None else world
    base, extra = divmod(n, world)
    start = r * base + min(r, extra)
    return range(start, start + base + (1 if r < extra else 0))


def _reduce(t: torch.Tensor, op) -> torch.Tensor:
    if not active():
        return t
    # NCCL reduces CUDA tensors only: a CPU value (a byte count) travels through this rank's GPU and back
    where = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
    out = t.to(where, copy=True)
    dist.all_reduce(out, op=op)
    return out.to(t.device)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of `t` over ranks (on a copy; float64 sums stay float64). Identity without a process group."""
    return _reduce(t, dist.ReduceOp.SUM)


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    return _reduce(t, dist.ReduceOp.MAX)


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s value of a picklable object on every rank (tensors in it: give them on the CPU, since a CUDA
    tensor would be unpickled on the sender's device index)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def owner(i: int) -> int:
    """The rank that does the i-th of a list of independent jobs every rank needs the result of (round robin)."""
    return i % world_size()
