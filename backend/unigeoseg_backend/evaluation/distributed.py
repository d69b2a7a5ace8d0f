"""Sharding an evaluation over ``torchrun`` processes and bringing the rows back to rank 0.

``torchrun`` (or ``python -m torch.distributed.run``) sets ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK``; with more than one process the group is initialised with NCCL on CUDA and Gloo
on the CPU. Rank ``r`` of ``W`` evaluates samples ``r, r + W, r + 2W, ...`` of the work list.

Only plain tensors cross process boundaries (``all_gather`` of integers, floats and UTF-8
bytes, padded to a common length): nothing is pickled, so a peer cannot make another rank run
code. Every rank may sit on another machine without a shared file system: rank 0 writes the
merged results from what it gathered, not from the other ranks' files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .records import SampleRow

#: Bytes of a failed sample's error message that travel to rank 0 (longer ones are cut).
ERROR_BYTES = 512


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


def _gather_padded(world: World, tensor: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Concatenation over ranks of ``tensor`` (N_r x ...), N_r padded to the largest."""
    longest = max(counts)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[:tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world.size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])


def _none_to(value: int | None) -> int:
    return -1 if value is None else value


def _to_none(value: int) -> int | None:
    return None if value < 0 else value


def gather_rows(world: World, rows: list[SampleRow],
                names: list[tuple[str, str]]) -> list[SampleRow]:
    """Every rank's rows, on every rank (in rank order; callers order them by index).

    Args:
        rows: this rank's rows.
        names: ``(sample_id, task)`` per index of the selection (identical on every rank),
            so that names do not need to travel.
    """
    if not world.distributed:
        return list(rows)
    count = torch.tensor([len(rows)], dtype=torch.int64, device=world.device)
    counts = [torch.zeros_like(count) for _ in range(world.size)]
    dist.all_gather(counts, count)
    counts = [int(c.item()) for c in counts]
    if sum(counts) == 0:
        return []
    # Columns: index, I, U, native I, native U (-1 for None).
    numbers = torch.tensor(
        [[r.index, _none_to(r.intersection), _none_to(r.union),
          _none_to(r.native_intersection), _none_to(r.native_union)] for r in rows],
        dtype=torch.int64).reshape(len(rows), 5)
    seconds = torch.tensor([r.seconds for r in rows], dtype=torch.float64)
    error_bytes = np.zeros((len(rows), ERROR_BYTES), dtype=np.uint8)
    for i, row in enumerate(rows):
        data = row.error.encode("utf-8")[:ERROR_BYTES]
        error_bytes[i, :len(data)] = np.frombuffer(data, dtype=np.uint8)
    errors = torch.from_numpy(error_bytes)
    numbers, seconds, errors = (_gather_padded(world, t.to(world.device), counts).cpu()
                                for t in (numbers, seconds, errors))
    gathered = []
    for (index, inter, union, n_inter, n_union), sec, err in zip(
            numbers.tolist(), seconds.tolist(), errors.numpy(), strict=True):
        sample_id, task = names[index]
        message = bytes(err).rstrip(b"\0").decode("utf-8", errors="ignore")
        gathered.append(SampleRow(
            index=index, sample_id=sample_id, task=task, intersection=_to_none(inter),
            union=_to_none(union), seconds=sec, error=message,
            native_intersection=_to_none(n_inter), native_union=_to_none(n_union)))
    return gathered
