"""What a run reports: one JSON line per optimizer step, TensorBoard if installed, and a
progress line with loss, learning rate, task mix, samples/s and ETA.

Only the main process (rank 0) writes. ``metrics.jsonl`` in the run folder gets one object per
step, appended and flushed, so an interrupted run keeps every step it finished; a resumed run
appends after them. Each line holds ``step``, ``time`` (Unix seconds) and the numbers the loop
passes (losses, ``lr``, ``task``, the task shares ``share/<task>``, ``samples_per_s``,
skipped samples).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from unigeoseg_backend.model.prompting import PROMPT_TYPES

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def format_duration(seconds: float) -> str:
    """``1h02m03s`` / ``4m05s`` / ``6s``; ``?`` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def progress_line(step: int, max_steps: int, loss: float, lr: float,
                  shares: Mapping[str, float], samples_per_s: float, eta_s: float) -> str:
    """One line: ``step 120/1000  loss 1.2345  lr 9.87e-05  mix intera 0.52 ref 0.36
    reason 0.11  12.3 samples/s  ETA 1h02m03s`` (tasks by their official short names)."""
    mix = " ".join(f"{PROMPT_TYPES.get(task, task)} {share:.2f}"
                   for task, share in shares.items())
    return (f"step {step}/{max_steps}  loss {loss:.4f}  lr {lr:.3g}  mix {mix}  "
            f"{samples_per_s:.1f} samples/s  ETA {format_duration(eta_s)}")


class Throughput:
    """Samples per second over the last ``window`` steps, and the time left."""

    def __init__(self, window: int = 20, clock=time.monotonic):
        self.window = window
        self.clock = clock
        self.marks: list[tuple[float, int]] = []   # (time, samples so far)
        self.samples = 0

    def restart(self) -> None:
        """Start a new window (after time spent outside the steps: validation, saving)."""
        self.marks.clear()

    def update(self, samples: int) -> None:
        self.samples += samples
        self.marks.append((self.clock(), self.samples))
        del self.marks[:-self.window - 1]

    @property
    def samples_per_s(self) -> float:
        if len(self.marks) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self.marks[0], self.marks[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def eta_s(self, steps_left: int) -> float:
        if len(self.marks) < 2:
            return math.inf
        (t0, _), (t1, _) = self.marks[0], self.marks[-1]
        return (t1 - t0) / (len(self.marks) - 1) * steps_left


class MetricsLog:
    """``metrics.jsonl`` (and TensorBoard scalars) of one run; a no-op off the main process.

    Args:
        run_dir: the run folder.
        enabled: False on every process but rank 0.
        tensorboard: also write TensorBoard events under ``run_dir/tensorboard`` if the
            ``tensorboard`` package is installed (a missing one is logged once, not an error).
    """

    def __init__(self, run_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self._file = None
        self._board = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.info("tensorboard is not installed: metrics go to %s only", self.path)
            else:
                self._board = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def write(self, step: int, values: Mapping[str, Any]) -> None:
        """One line for ``step``: numbers, strings and booleans only."""
        if not self.enabled or self._file is None:
            return
        record = {"step": step, "time": round(time.time(), 3), **values}
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        self._file.flush()
        if self._board is not None:
            for name, value in values.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    self._board.add_scalar(name, value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._board is not None:
            self._board.close()
            self._board = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every record of a run's ``metrics.jsonl`` (a torn last line is dropped)."""
    path = Path(run_dir) / METRICS_FILE
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            logger.warning("%s: dropping an unreadable line", path)
    return records
