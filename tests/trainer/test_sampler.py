"""Task-homogeneous, weighted, distributed, resumable batches."""

from __future__ import annotations

from collections import Counter

import pytest

from unigeoseg_trainer.sampler import Pool, TaskBatchSampler
from unigeoseg_trainer.schedule import TaskSchedule

POOLS = [
    Pool("datasets[0]/interactive", "interactive", 50),
    Pool("datasets[0]/referring", "referring", 30),
    Pool("datasets[1]/referring", "referring", 7, weight=2.0),
    Pool("datasets[0]/reasoning", "reasoning", 11),
]
SCHEDULE = TaskSchedule({"interactive": 0.5, "referring": 0.3, "reasoning": 0.2})


def _sampler(**kwargs) -> TaskBatchSampler:
    args = {"per_device": 4, "max_steps": 100, "seed": 7}
    args.update(kwargs)
    return TaskBatchSampler(POOLS, SCHEDULE, **args)


def _task_of(key: str) -> str:
    return next(p.task for p in POOLS if p.key == key)


def test_batches_are_task_homogeneous():
    for plan in list(_sampler())[:50]:
        assert len(plan.items) == 4
        assert {_task_of(key) for key, _ in plan.items} == {plan.task}


def test_two_ranks_partition_one_ranks_sequence():
    single = _sampler(per_device=4)
    ranks = [_sampler(per_device=2, world_size=2, rank=r) for r in range(2)]
    for _ in range(40):
        whole = single.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert all(p.task == whole.task and p.index == whole.index for p in parts)
        assert parts[0].items + parts[1].items == whole.items


def test_deterministic_for_a_seed():
    assert [p.items for p in list(_sampler())[:20]] == [p.items for p in list(_sampler())[:20]]
    assert [p.items for p in list(_sampler())[:20]] != \
        [p.items for p in list(_sampler(seed=8))[:20]]


def test_resume_reproduces_the_remainder():
    first = _sampler()
    for _ in range(13):
        first.next_batch()
    saved = first.state_dict()
    remainder = [first.next_batch() for _ in range(30)]
    resumed = _sampler()
    resumed.load_state_dict(saved)
    assert [resumed.next_batch() for _ in range(30)] == remainder


def test_resume_on_another_number_of_processes():
    single = _sampler(per_device=4)
    for _ in range(9):
        single.next_batch()
    saved = single.state_dict()
    expected = [single.next_batch().items for _ in range(10)]
    ranks = [_sampler(per_device=2, world_size=2, rank=r) for r in range(2)]
    for r in ranks:
        r.load_state_dict(saved)
    got = [ranks[0].next_batch().items + ranks[1].next_batch().items for _ in range(10)]
    assert got == expected


def test_resume_refuses_another_mixture():
    saved = _sampler().state_dict()
    other = TaskBatchSampler(POOLS[:3], SCHEDULE, per_device=4, max_steps=100, seed=7)
    with pytest.raises(ValueError):
        other.load_state_dict(saved)
    with pytest.raises(ValueError):
        _sampler(seed=1).load_state_dict(saved)


def test_each_epoch_of_a_pool_is_a_permutation():
    pool = Pool("only", "referring", 9)
    sampler = TaskBatchSampler([pool], SCHEDULE, per_device=3, max_steps=6, seed=0)
    indices = [i for plan in sampler for _, i in plan.items]
    assert len(indices) == 18
    assert sorted(indices[:9]) == list(range(9)) and sorted(indices[9:]) == list(range(9))
    assert indices[:9] != indices[9:]


def test_pool_weights_scale_with_size():
    sampler = _sampler(per_device=8, max_steps=3000)
    counts: Counter[str] = Counter()
    for plan in list(sampler)[:3000]:
        if plan.task == "referring":
            counts.update(key for key, _ in plan.items)
    ratio = counts["datasets[1]/referring"] / counts["datasets[0]/referring"]
    assert ratio == pytest.approx(2 * 7 / 30, rel=0.1)


def test_task_shares_follow_the_schedule():
    sampler = _sampler(per_device=1, max_steps=4000)
    plans = list(sampler)
    early = Counter(p.task for p in plans[:1000])
    late = Counter(p.task for p in plans[-1000:])
    assert early["interactive"] / 1000 == pytest.approx(0.5 * 0.96, abs=0.05)
    assert late["interactive"] / 1000 == pytest.approx(0.5 * 0.73, abs=0.05)
    assert late["reasoning"] > early["reasoning"]
    assert plans[0].shares == SCHEDULE.shares_at(0.0)


def test_accumulation_groups_micro_batches_into_steps():
    sampler = _sampler(accumulation=3, max_steps=2)
    plans = list(sampler)
    assert [p.step for p in plans] == [0, 0, 0, 1, 1, 1]
