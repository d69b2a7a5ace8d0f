"""Which samples each process trains on: task-homogeneous batches from a weighted mixture.

The mixture is a list of :class:`Pool` objects, the samples of one task in one configured
dataset. Micro-batch ``k`` (counted from 0 over the whole run; ``accumulation`` of them make
an optimizer step) is drawn the same way on every process, from a generator seeded with
``(seed, k)`` alone:

1. its task, with the schedule's shares at the optimizer step's progress (so every process
   runs the same task in micro-batch ``k``: LKM's weight is per task);
2. for each of the ``per_device * world_size`` places of the global batch, a pool of that
   task, with probability proportional to ``weight * size`` (a weight of 2 shows each of the
   pool's samples twice as often as a weight of 1);
3. the pool's next sample: each pool runs through its own permutations, one per epoch of
   that pool, seeded with ``(seed, the pool's key, epoch)``.

Process ``rank`` takes places ``rank * per_device`` to ``(rank + 1) * per_device - 1``, so the
processes partition the global batch exactly, and the global sequence does not depend on the
number of processes. The position (the next micro-batch and how many samples each pool has
handed out) is a small JSON-able dict: :meth:`TaskBatchSampler.state_dict` and
:meth:`~TaskBatchSampler.load_state_dict` resume the sequence where it stopped.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .schedule import TaskSchedule, progress


@dataclass(frozen=True)
class Pool:
    """The samples of one task in one dataset of the mixture.

    Attributes:
        key: stable name, also the key of the sampler's position (``datasets[0]/referring``).
        task: a task of ``unigeoseg_protocol.vocabulary.TASKS``.
        size: number of samples; the sampler hands out indices ``0 .. size - 1``.
        weight: how many times each sample counts within its task.
    """

    key: str
    task: str
    size: int
    weight: float = 1.0


@dataclass(frozen=True)
class BatchPlan:
    """One micro-batch of one process.

    Attributes:
        index: the micro-batch number over the whole run (the same on every process).
        step: the optimizer step it belongs to (``index // accumulation``).
        task: the task of every sample in it.
        shares: the task shares it was drawn with (for the metrics log).
        items: this process's samples as ``(pool key, index in the pool)``.
    """

    index: int
    step: int
    task: str
    shares: dict[str, float]
    items: tuple[tuple[str, int], ...]


class TaskBatchSampler:
    """Deterministic, distributed, resumable task-homogeneous batches (module docstring).

    Args:
        pools: the mixture; keys unique, sizes positive.
        schedule: the task shares over progress.
        per_device: samples per process per micro-batch.
        max_steps: optimizer steps of the run (progress = step / max_steps); iteration ends
            after ``max_steps * accumulation`` micro-batches.
        accumulation: micro-batches per optimizer step.
        world_size, rank: this process's place (rank 0 of 1 for a single process).
        seed: the run's seed.
    """

    def __init__(self, pools: Sequence[Pool], schedule: TaskSchedule, *, per_device: int,
                 max_steps: int, accumulation: int = 1, world_size: int = 1, rank: int = 0,
                 seed: int = 0):
        if not pools:
            raise ValueError("the mixture has no pools")
        keys = [p.key for p in pools]
        if len(set(keys)) != len(keys):
            raise ValueError(f"pool keys repeat: {keys}")
        for pool in pools:
            if pool.size <= 0 or pool.weight <= 0:
                raise ValueError(f"pool {pool.key} needs a positive size and weight: {pool}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a world of {world_size}")
        self.pools = {p.key: p for p in pools}
        self.schedule = schedule
        self.per_device = per_device
        self.max_steps = max_steps
        self.accumulation = accumulation
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.tasks = sorted({p.task for p in pools})
        self.next_index = 0
        self.consumed = {key: 0 for key in self.pools}
        self._permutations: dict[str, tuple[int, np.ndarray]] = {}  # key -> (epoch, order)
        self.shares_at(0)  # fails now, not at step 0, if the schedule excludes every task

    @property
    def global_batch(self) -> int:
        """Samples of one micro-batch over all processes."""
        return self.per_device * self.world_size

    @property
    def total_batches(self) -> int:
        return self.max_steps * self.accumulation

    def shares_at(self, step: int) -> dict[str, float]:
        """Task shares of optimizer step ``step`` over the tasks the mixture has."""
        return self.schedule.shares_at(progress(step, self.max_steps), self.tasks)

    def __iter__(self) -> Iterator[BatchPlan]:
        while self.next_index < self.total_batches:
            yield self.next_batch()

    def next_batch(self) -> BatchPlan:
        """This process's next micro-batch (and the sampler moves past it)."""
        index = self.next_index
        step = index // self.accumulation
        rng = np.random.Generator(np.random.PCG64([self.seed, index]))
        shares = self.shares_at(step)
        tasks = list(shares)
        task = tasks[rng.choice(len(tasks), p=np.array([shares[t] for t in tasks]))]
        pools = [p for p in self.pools.values() if p.task == task]
        mass = np.array([p.weight * p.size for p in pools], dtype=np.float64)
        chosen = rng.choice(len(pools), size=self.global_batch, p=mass / mass.sum())
        # Every process walks the whole global batch so that the pool positions stay equal
        # on all of them; it keeps its own slice.
        places = [(pools[c].key, self._take(pools[c])) for c in chosen]
        first = self.rank * self.per_device
        self.next_index += 1
        return BatchPlan(index=index, step=step, task=task, shares=shares,
                         items=tuple(places[first:first + self.per_device]))

    def _take(self, pool: Pool) -> int:
        """The pool's next sample index, through its per-epoch permutation."""
        count = self.consumed[pool.key]
        epoch, offset = divmod(count, pool.size)
        cached = self._permutations.get(pool.key)
        if cached is None or cached[0] != epoch:
            pool_seed = zlib.crc32(pool.key.encode("utf-8"))
            order = np.random.Generator(np.random.PCG64([self.seed, pool_seed, epoch]))
            cached = (epoch, order.permutation(pool.size))
            self._permutations[pool.key] = cached
        self.consumed[pool.key] = count + 1
        return int(cached[1][offset])

    def state_dict(self) -> dict[str, Any]:
        """The position as JSON-able values (the same on every process)."""
        return {
            "next_index": self.next_index,
            "consumed": dict(self.consumed),
            "pool_sizes": {key: p.size for key, p in self.pools.items()},
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict` of a sampler over the same pools and seed.

        The number of processes may differ: the position is global.

        Raises:
            ValueError: the pools (keys or sizes) or the seed differ, so the saved position
                would point at other samples.
        """
        sizes = {key: p.size for key, p in self.pools.items()}
        if state["pool_sizes"] != sizes:
            raise ValueError(f"the saved position is over pools {state['pool_sizes']}, "
                             f"this mixture has {sizes}")
        if state["seed"] != self.seed:
            raise ValueError(f"the saved position used seed {state['seed']}, not {self.seed}")
        self.next_index = int(state["next_index"])
        self.consumed = {key: int(state["consumed"][key]) for key in self.pools}
        self._permutations.clear()
