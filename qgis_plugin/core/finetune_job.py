"""What the "Fine-tune model" dialog shows of a job, without QGIS: the stages a job goes
through, its latest numbers (step, loss, held-out IoU, ETA), the live loss curve scaled to a
widget, the base models a backend offers, and the checks on the dialog's fields.

The job itself runs in a QGIS task (``gui/finetune_dialog.py``); every backend reply it gets
is handed to :meth:`JobProgress.apply` on the GUI thread, which only updates numbers here, so
that the GUI thread never does more than a few milliseconds of work per reply.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ..unigeoseg_protocol.operations import TrainJobReply
from ..unigeoseg_protocol.vocabulary import is_model_name

#: The engine of the model the backend ships, and the prefix of the fine-tuned ones.
DEFAULT_ENGINE = "default"
FINETUNED_PREFIX = "default:"
#: Points the loss curve keeps; past it every other point is dropped (the shape stays).
MAX_CURVE_POINTS = 1000


class Stage(Enum):
    """Where a fine-tune stands, as the dialog says it."""

    IDLE = "ready"
    PREPARING = "checking the layers and cutting chips"
    STARTING = "sending the chips and starting the job"
    TRAINING = "training"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REFUSED = "refused"  #: bad input: nothing was built or sent

    @property
    def final(self) -> bool:
        return self in (Stage.SUCCEEDED, Stage.FAILED, Stage.CANCELLED, Stage.REFUSED)


#: Stage -> the stages it may move to; a final stage moves nowhere (a new start makes a
#: new JobProgress).
TRANSITIONS: dict[Stage, tuple[Stage, ...]] = {
    Stage.IDLE: (Stage.PREPARING, Stage.REFUSED),
    Stage.PREPARING: (Stage.STARTING, Stage.REFUSED, Stage.FAILED, Stage.CANCELLED),
    Stage.STARTING: (Stage.TRAINING, Stage.FAILED, Stage.CANCELLED),
    Stage.TRAINING: (Stage.SUCCEEDED, Stage.FAILED, Stage.CANCELLED),
    Stage.SUCCEEDED: (), Stage.FAILED: (), Stage.CANCELLED: (), Stage.REFUSED: (),
}

#: A backend job state -> the dialog's stage.
_STAGE_OF_STATE = {"queued": Stage.TRAINING, "running": Stage.TRAINING,
                   "succeeded": Stage.SUCCEEDED, "failed": Stage.FAILED,
                   "cancelled": Stage.CANCELLED}


@dataclass
class LossCurve:
    """The training loss by optimizer step, for a small plot.

    Attributes:
        points: ``(step, loss)`` in step order, at most MAX_CURVE_POINTS (thinned evenly).
    """

    points: list[tuple[int, float]] = field(default_factory=list)

    def add(self, step: int, loss: float) -> None:
        if not math.isfinite(loss) or (self.points and step <= self.points[-1][0]):
            return  # a repeated event, or a loss the plot cannot place
        self.points.append((step, loss))
        if len(self.points) > MAX_CURVE_POINTS:
            self.points = self.points[::2]

    def scaled(self, width: float, height: float, margin: float = 4.0
               ) -> list[tuple[float, float]]:
        """The points in widget pixels: x from the first step (left) to the last (right),
        y from the highest loss (top) to the lowest (bottom), ``margin`` px inside; a flat
        curve across the middle."""
        if not self.points:
            return []
        steps = [s for s, _ in self.points]
        losses = [v for _, v in self.points]
        s0, s1 = steps[0], max(steps[-1], steps[0] + 1)
        lo, hi = min(losses), max(losses)
        if hi <= lo:  # a flat curve runs across the middle
            lo, hi = lo - 0.5, hi + 0.5
        inner_w, inner_h = max(width - 2 * margin, 1.0), max(height - 2 * margin, 1.0)
        return [(margin + inner_w * (s - s0) / (s1 - s0),
                 margin + inner_h * (hi - v) / (hi - lo)) for s, v in self.points]


def estimated_eta_s(elapsed_s: float, step: int, max_steps: int | None) -> float | None:
    """Seconds left at the job's mean pace so far (for when the backend gives no estimate);
    None without a step budget or before the first step."""
    if not max_steps or step <= 0 or elapsed_s <= 0:
        return None
    return max(max_steps - step, 0) * elapsed_s / step


@dataclass
class JobProgress:
    """The dialog's view of one fine-tune, updated from the task's reports.

    Attributes:
        stage: where it stands; job: the backend's job id once started.
        step, max_steps: optimizer steps done and planned; loss: the latest training loss;
        val_iou: the latest held-out IoU measured; eta_s: seconds left (the backend's
        estimate, else the mean pace so far).
        before_iou, after_iou: held-out IoU before the first and after the last step.
        engine: the new model's engine (``default:<name>``), once it succeeded.
        message: why it failed, was cancelled or refused.
        curve: the loss curve so far.
    """

    stage: Stage = Stage.IDLE
    job: str | None = None
    step: int = 0
    max_steps: int | None = None
    loss: float | None = None
    val_iou: float | None = None
    eta_s: float | None = None
    elapsed_s: float = 0.0
    before_iou: float | None = None
    after_iou: float | None = None
    engine: str | None = None
    message: str | None = None
    curve: LossCurve = field(default_factory=LossCurve)

    def move_to(self, stage: Stage, message: str | None = None) -> None:
        """Change stage; a move the job cannot make (e.g. back from training to preparing)
        is a bug in the caller."""
        if stage is not self.stage and stage not in TRANSITIONS[self.stage]:
            raise ValueError(f"a fine-tune cannot go from {self.stage.name} to {stage.name}")
        self.stage = stage
        if message is not None:
            self.message = message

    def apply(self, reply: TrainJobReply) -> None:
        """Take in a ``train_start`` / ``train_status`` / ``train_cancel`` reply."""
        if self.stage is Stage.STARTING:
            self.move_to(Stage.TRAINING)
        self.job = reply.job
        for event in reply.events:
            if event.loss is not None:
                self.curve.add(event.step, event.loss)
            if event.val_iou is not None:
                self.val_iou = event.val_iou
        self.step, self.max_steps, self.elapsed_s = reply.step, reply.max_steps, reply.elapsed_s
        self.loss = reply.loss if reply.loss is not None else self.loss
        self.eta_s = reply.eta_s if reply.eta_s is not None and math.isfinite(reply.eta_s) \
            else estimated_eta_s(reply.elapsed_s, reply.step, reply.max_steps)
        self.before_iou = reply.before_iou if reply.before_iou is not None else self.before_iou
        self.after_iou = reply.after_iou if reply.after_iou is not None else self.after_iou
        if reply.before_iou is not None and self.val_iou is None:
            self.val_iou = reply.before_iou
        if reply.after_iou is not None:
            self.val_iou = reply.after_iou
        self.engine = reply.engine or self.engine
        stage = _STAGE_OF_STATE[reply.state]
        if stage is not self.stage:
            self.move_to(stage, reply.message)
        if stage.final:
            self.eta_s = None

    def numbers_text(self) -> dict[str, str]:
        """The dialog's live fields: ``step``, ``loss``, ``iou`` (held-out), ``eta``."""
        return {
            "step": f"{self.step}/{self.max_steps}" if self.max_steps else str(self.step),
            "loss": "—" if self.loss is None else f"{self.loss:.4f}",
            "iou": "—" if self.val_iou is None else f"{self.val_iou:.3f}",
            "eta": "—" if self.eta_s is None else duration_text(self.eta_s),
        }

    def result_text(self) -> str:
        """What the dialog says once the job ended."""
        if self.stage is Stage.SUCCEEDED:
            score = "held-out IoU not measured (no held-out chips)"
            if self.before_iou is not None and self.after_iou is not None:
                score = (f"held-out IoU {self.before_iou:.3f} before, {self.after_iou:.3f} "
                         f"after fine-tuning ({self.after_iou - self.before_iou:+.3f})")
            return f"Done: {score}. New model: {self.engine}"
        if self.stage is Stage.CANCELLED:
            return "Cancelled: no model was made"
        if self.stage in (Stage.FAILED, Stage.REFUSED):
            return f"Not fine-tuned: {self.message or 'the backend gave no reason'}"
        return ""


def duration_text(seconds: float) -> str:
    """``"42 s"``, ``"3 min 5 s"``, ``"2 h 10 min"``."""
    seconds = max(int(round(seconds)), 0)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def base_models(engines: Mapping[str, Any]) -> list[str]:
    """The engines of ``hello`` a fine-tune can start from, the shipped default model
    first, then the fine-tuned ones (``default:<name>``) by name; only available ones.

    Args:
        engines: ``HelloReply.engines`` (name -> an object with ``available``).
    """
    names = [name for name, info in engines.items()
             if getattr(info, "available", False)
             and (name == DEFAULT_ENGINE or name.startswith(FINETUNED_PREFIX))]
    return sorted(names, key=lambda name: (name != DEFAULT_ENGINE, name))


def field_problems(name: str, base: str, steps: int, have_raster: bool,
                   have_polygons: bool) -> list[str]:
    """What stops the dialog's fields from starting a fine-tune, one sentence each (the
    layers' own problems are the chip helpers' to say)."""
    problems = []
    if not have_raster:
        problems.append("choose the raster the polygons were digitised on")
    if not have_polygons:
        problems.append("choose the polygon layer of the objects to learn")
    if not base:
        problems.append("choose a base model (connect to a backend that offers the default "
                        "model)")
    if steps <= 0:
        problems.append("give the number of training steps (more than 0)")
    if not is_model_name(name):
        problems.append("name the new model with 1 to 64 letters, digits, '.', '_' or '-', "
                        "starting with a letter or digit (e.g. 'greenhouses-2026')")
    return problems
