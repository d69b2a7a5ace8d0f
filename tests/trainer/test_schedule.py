"""Task shares and learning rate over training progress."""

from __future__ import annotations

import math

import pytest

from unigeoseg_trainer.schedule import LearningRateSchedule, TaskSchedule, progress

START = {"interactive": 0.522, "referring": 0.364, "reasoning": 0.114}


def test_task_shares_at_start_middle_end():
    schedule = TaskSchedule(START, interactive_end_factor=0.7)
    start = schedule.shares_at(0.0)
    middle = schedule.shares_at(0.5)
    end = schedule.shares_at(1.0)
    assert start == pytest.approx(START)
    # interactive falls linearly to 0.7 of its start, referring stays, reasoning takes the rest
    assert middle["interactive"] == pytest.approx(0.522 * 0.85)
    assert end["interactive"] == pytest.approx(0.522 * 0.7)
    assert middle["referring"] == end["referring"] == pytest.approx(0.364)
    assert end["reasoning"] == pytest.approx(0.114 + 0.522 * 0.3)
    for shares in (start, middle, end):
        assert sum(shares.values()) == pytest.approx(1.0)
    assert schedule.shares_at(2.0) == end          # progress is clipped


def test_shares_renormalise_over_the_tasks_present():
    schedule = TaskSchedule(START)
    shares = schedule.shares_at(1.0, tasks=["referring", "reasoning"])
    assert list(shares) == ["referring", "reasoning"]
    total = 0.364 + 0.114 + 0.522 * 0.3
    assert shares["referring"] == pytest.approx(0.364 / total)
    with pytest.raises(ValueError):
        TaskSchedule({"interactive": 1.0}).shares_at(0.0, tasks=["referring"])


def test_progress():
    assert progress(0, 100) == 0.0 and progress(50, 100) == 0.5 and progress(150, 100) == 1.0


def test_learning_rate_warmup_then_cosine():
    schedule = LearningRateSchedule.from_ratio(lr=1e-4, min_lr=1e-6, warmup_ratio=0.03,
                                               max_steps=1000)
    assert schedule.warmup_steps == 30
    assert schedule.at(0) == pytest.approx(1e-4 / 30)          # never a zero first step
    assert schedule.at(29) == pytest.approx(1e-4)
    assert schedule.at(30) == pytest.approx(1e-4)              # cosine starts at the peak
    mid = 30 + (1000 - 30) // 2
    assert schedule.at(mid) == pytest.approx(1e-6 + (1e-4 - 1e-6) * 0.5, rel=1e-6)
    assert schedule.at(1000) == pytest.approx(1e-6)
    values = [schedule.at(s) for s in range(30, 1001)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_learning_rate_without_warmup():
    schedule = LearningRateSchedule(lr=2.0, min_lr=0.0, warmup_steps=0, max_steps=4)
    assert [schedule.at(s) for s in range(5)] == pytest.approx(
        [2.0 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(5)])
