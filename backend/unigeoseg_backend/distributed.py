"""torch.distributed for ``torchrun`` jobs (evaluation and training): the process group and
collectives on plain tensors.

``torchrun`` (or ``python -m torch.distributed.run``) sets ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK``; with more than one process the group is initialised with NCCL on CUDA and Gloo
on the CPU. A single process is rank 0 of a world of 1, and every helper is then a no-op.

Only plain tensors cross process boundaries (``all_gather`` / ``all_reduce`` of numbers and
bytes): nothing is pickled, so a peer cannot make another rank run code.

Public API:
    World, launched_world_size(), init_world(device), close_world(world), barrier(world)
    all_true(world, value), any_per_item(world, flags)
    max_over_ranks(world, value), sum_over_ranks(world, value)
    gather_counts(world, count), all_gather_variable(world, tensor)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place in the run (a single process is rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # where collective tensors live

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched_world_size() -> int:
    """How many processes torchrun started (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_world(device: torch.device) -> World:
    """Join the process group torchrun prepared (no-op for a single process).

    Args:
        device: the compute device; CUDA selects NCCL (with ``cuda:LOCAL_RANK`` as the
            collective device), anything else Gloo.
    """
    size = launched_world_size()
    if size <= 1:
        return World(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=size)
    return World(rank=rank, size=size, local_rank=local_rank, device=device)


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def all_true(world: World, value: bool) -> bool:
    """True on every rank when ``value`` is True on every rank."""
    if not world.distributed:
        return value
    flag = torch.tensor([1 if value else 0], dtype=torch.int64, device=world.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def any_per_item(world: World, flags: np.ndarray) -> np.ndarray:
    """Element-wise OR of a bool vector over the ranks (same length everywhere)."""
    if not world.distributed:
        return flags
    tensor = torch.from_numpy(flags.astype(np.int64)).to(world.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.cpu().numpy().astype(bool)


def _reduce(world: World, value: float, op: dist.ReduceOp) -> float:
    if not world.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=world.device)
    dist.all_reduce(tensor, op=op)
    return float(tensor.item())


def max_over_ranks(world: World, value: float) -> float:
    return _reduce(world, value, dist.ReduceOp.MAX)


def sum_over_ranks(world: World, value: float) -> float:
    return _reduce(world, value, dist.ReduceOp.SUM)


def gather_counts(world: World, count: int) -> list[int]:
    """Every rank's ``count``, in rank order (the same list on every rank)."""
    if not world.distributed:
        return [count]
    mine = torch.tensor([count], dtype=torch.int64, device=world.device)
    counts = [torch.zeros_like(mine) for _ in range(world.size)]
    dist.all_gather(counts, mine)
    return [int(c.item()) for c in counts]


def all_gather_variable(world: World, tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` (N_r x ..., N_r may differ; the other dimensions and the dtype
    must not), concatenated in rank order, on every rank.

    Each rank's rows are padded to the longest for the collective and cut back after it;
    only tensors travel (no pickling).
    """
    if not world.distributed:
        return tensor
    counts = gather_counts(world, tensor.shape[0])
    tensor = tensor.to(world.device)
    longest = max(counts)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[:tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world.size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])
