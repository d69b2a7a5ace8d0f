"""What changes with training progress: the task shares and the learning rate.

Progress is ``step / max_steps`` in [0, 1], where ``step`` counts optimizer steps from 0.

**Progressive task scheduling.** Each batch holds one task, drawn with the shares of
:meth:`TaskSchedule.shares_at`. The paper describes the schedule only in words: the
interactive share is lowered gradually, to 0.7 (read here as 0.7 times its start share), the
referring share stays, and the reasoning share grows. Written down as a linear schedule::

    interactive(p) = i0 * (1 - (1 - f) * p)          f = interactive_end_factor (0.7)
    referring(p)   = r0
    reasoning(p)   = 1 - interactive(p) - referring(p) = s0 + i0 * (1 - f) * p

so the shares always sum to 1 and reasoning receives exactly what interactive gives up. With
fewer tasks in the data mixture (a referring-only fine-tune), :meth:`shares_at` renormalises
the shares over the tasks present.

**Learning rate.** Linear warm-up over ``warmup_steps`` (step 0 already takes
``lr / warmup_steps``, never 0), then a cosine from ``lr`` to ``min_lr`` at ``max_steps``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from unigeoseg_protocol.vocabulary import TASKS


def progress(step: int, max_steps: int) -> float:
    """``step / max_steps`` clipped to [0, 1]."""
    return min(max(step / max_steps, 0.0), 1.0)


@dataclass(frozen=True)
class TaskSchedule:
    """Task shares as a function of training progress (the module docstring's formula).

    Attributes:
        start: share of each task at progress 0; tasks missing here have share 0.
        interactive_end_factor: the interactive share at progress 1 over its start share.
    """

    start: Mapping[str, float]
    interactive_end_factor: float = 0.7

    def shares_at(self, progress: float, tasks: Iterable[str] = TASKS) -> dict[str, float]:
        """The share of each of ``tasks`` at ``progress``, renormalised to sum to 1.

        Raises:
            ValueError: every one of ``tasks`` has share 0 (nothing could be drawn).
        """
        p = min(max(progress, 0.0), 1.0)
        interactive0 = self.start.get("interactive", 0.0)
        moved = interactive0 * (1.0 - self.interactive_end_factor) * p
        full = {
            "interactive": interactive0 - moved,
            "referring": self.start.get("referring", 0.0),
            "reasoning": self.start.get("reasoning", 0.0) + moved,
        }
        wanted = [t for t in TASKS if t in set(tasks)]   # fixed order: TASKS
        total = sum(full[t] for t in wanted)
        if total <= 0:
            raise ValueError(f"the task schedule gives {', '.join(wanted)} no share")
        return {t: full[t] / total for t in wanted}


@dataclass(frozen=True)
class LearningRateSchedule:
    """Linear warm-up then cosine decay, per optimizer step."""

    lr: float
    min_lr: float
    warmup_steps: int
    max_steps: int

    @classmethod
    def from_ratio(cls, lr: float, min_lr: float, warmup_ratio: float,
                   max_steps: int) -> LearningRateSchedule:
        """Warm-up over ``ceil(warmup_ratio * max_steps)`` steps."""
        return cls(lr, min_lr, math.ceil(warmup_ratio * max_steps), max_steps)

    def at(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        decay_steps = max(self.max_steps - self.warmup_steps, 1)
        p = min((step - self.warmup_steps) / decay_steps, 1.0)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))
