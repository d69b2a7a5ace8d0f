"""The prompt being built for one object: points, a box, and the tile they live on.

Pure Python (no Qt): the controller feeds it clicks already transformed to the tile CRS and
reads prompts out of it (``core.interaction`` decides when).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from ..unigeoseg_protocol.params import Prompt
from .tiles import TileWindow


@dataclass
class PromptSession:
    """Prompts for the object currently being segmented.

    Attributes:
        window: the tile the prompts are on (None until the first click).
        image_id: the backend's id for that tile once uploaded.
        points: (x, y) in the window's CRS.
        labels: 1 foreground / 0 background, one per point.
        box: (xmin, ymin, xmax, ymax) in the window's CRS.
        object_key: sent with every prompt so the backend refines the same object.
        result: the last GeoJSON FeatureCollection (window CRS) for this object.
    """

    window: TileWindow | None = None
    image_id: str | None = None
    points: list[tuple[float, float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    box: tuple[float, float, float, float] | None = None
    object_key: str = field(default_factory=lambda: uuid.uuid4().hex)
    result: dict[str, Any] | None = None

    @property
    def is_empty(self) -> bool:
        return not self.points and self.box is None

    def add_point(self, x: float, y: float, label: int) -> None:
        if label not in (0, 1):
            raise ValueError("label must be 1 (foreground) or 0 (background)")
        self.points.append((x, y))
        self.labels.append(label)

    def set_box(self, xmin: float, ymin: float, xmax: float, ymax: float) -> None:
        self.box = (min(xmin, xmax), min(ymin, ymax), max(xmin, xmax), max(ymin, ymax))

    def undo(self) -> bool:
        """Remove the last point (or the box when there are no points); False if empty.

        The object key changes too: the backend's remembered mask still reflects the removed
        point and must not be fed back.
        """
        if self.points:
            self.points.pop()
            self.labels.pop()
        elif self.box is not None:
            self.box = None
        else:
            return False
        self.object_key = uuid.uuid4().hex
        return True

    def next_object(self) -> None:
        """Start a new object on the same tile (after accept or clear)."""
        self.points.clear()
        self.labels.clear()
        self.box = None
        self.result = None
        self.object_key = uuid.uuid4().hex

    def new_window(self, window: TileWindow | None) -> None:
        """Move to another tile: prompts of the old one do not carry over."""
        self.next_object()
        self.window = window
        self.image_id = None

    def prompt(self) -> Prompt:
        """The interactive prompt of a ``segment`` request (window CRS coordinates)."""
        return Prompt(points=tuple(self.points), labels=tuple(self.labels), box=self.box,
                      task="interactive", object_key=self.object_key)
