"""Every rank's evaluation rows, brought to every rank as tensors (nothing is pickled).

Rank ``r`` of ``W`` evaluates samples ``r, r + W, r + 2W, ...`` of the work list. Every rank
may sit on another machine without a shared file system: rank 0 writes the merged results
from what it gathered, not from the other ranks' files.
"""

from __future__ import annotations

import numpy as np
import torch

from ..distributed import World, all_gather_variable, gather_counts
from .records import SampleRow

#: Bytes of a failed sample's error message that travel to rank 0 (longer ones are cut).
ERROR_BYTES = 512


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
    if sum(gather_counts(world, len(rows))) == 0:
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
    numbers, seconds, errors = (all_gather_variable(world, t).cpu()
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
