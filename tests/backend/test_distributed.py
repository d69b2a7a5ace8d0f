"""torch.distributed helpers: no-ops for one process, and a real two-process Gloo group."""

from __future__ import annotations

import socket

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from unigeoseg_backend.distributed import (
    World,
    all_gather_variable,
    all_true,
    any_per_item,
    gather_counts,
    init_world,
    launched_world_size,
    max_over_ranks,
    sum_over_ranks,
)


def test_a_single_process_is_rank_zero_of_one(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launched_world_size() == 1
    world = init_world(torch.device("cpu"))
    assert world == World() and world.is_main and not world.distributed
    rows = torch.arange(6).reshape(3, 2)
    assert all_gather_variable(world, rows) is rows
    assert gather_counts(world, 3) == [3]
    assert all_true(world, False) is False and max_over_ranks(world, 2.5) == 2.5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        world = World(rank=rank, size=2)
        rows = torch.full((rank + 1, 3), rank, dtype=torch.int64)  # 1 row on rank 0, 2 on 1
        results[rank] = {
            "gathered": all_gather_variable(world, rows).tolist(),
            "counts": gather_counts(world, rank + 1),
            "all_true": all_true(world, rank == 0),
            "any": any_per_item(world, np.array([rank == 0, False, rank == 1])).tolist(),
            "sum": sum_over_ranks(world, rank + 0.5),
        }
    finally:
        dist.destroy_process_group()


def test_two_processes_gather_rows_of_different_counts():
    results = mp.Manager().dict()
    mp.spawn(_rank_main, args=(_free_port(), results), nprocs=2, join=True)
    expected = {"gathered": [[0, 0, 0], [1, 1, 1], [1, 1, 1]], "counts": [1, 2],
                "all_true": False, "any": [True, False, True], "sum": 2.0}
    assert dict(results[0]) == expected and dict(results[1]) == expected
