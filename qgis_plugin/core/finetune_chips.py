"""Training chips for a fine-tune, cut from an analyst's raster and polygon layer.

Pure logic (numpy and the standard library: no QGIS, no torch), so it runs in the plain test
suite. The QGIS side (``processing_algs/finetune.py``) reprojects the polygons into the raster
CRS and reads the pixels; everything here works in the raster's own pixel frame:

- a point is ``(col, row)``, continuous: pixel ``(i, j)`` spans ``[i, i+1) x [j, j+1)`` and
  its centre is ``(i + 0.5, j + 0.5)``;
- a window is ``(col0, row0, width, height)`` in whole pixels of the raster grid;
- the raster's georeference is its GDAL geotransform ``(x0, dx, 0, y0, 0, dy)``, north-up.

How a chip set is made (:func:`plan_chips`, then :func:`write_chip_set`):

1. The polygons become :class:`TrainingObject` in raster pixels; those outside the raster or
   smaller than a pixel are counted and dropped, a layer with more than ``max_objects`` is
   sampled (every polygon still marks the masks; only the chip centres are sampled).
2. The held-out split is spatial: one line across the raster's longer axis puts the
   validation polygons on its far side; every validation window lies beyond the line and
   every training window before it, so no validation pixel is ever trained on.
3. A chip window of ``chip_px`` pixels is centred on each polygon (shifted, not shrunk, to
   lie in its side of the line), plus windows between the polygons that touch none
   (negatives, with empty targets).
4. Masks rasterise the polygons on the window grid: a pixel is inside when its centre is
   (even-odd over the rings, so holes stay holes). A polygon whose edges lie on pixel edges
   gives exactly those pixels.
5. Records in the ``local`` layout (docs/datasets.md): for each polygon's chip, its class as
   text (target: every polygon of that class in the window), a click and a box inside the
   polygon (target: that polygon); an empty text target for each class absent from a chip.

The pixels become 8-bit RGB by the service's own rule (:func:`tile_rgb8`), so a fine-tuned
model sees at training time what it is handed for a tile sent from QGIS.
"""

from __future__ import annotations

import json
import math
import os
import struct
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..unigeoseg_protocol.params import RasterOptions

#: Side of a chip, pixels (a multiple of 16, as the models' strides need).
CHIP_PX = 256
#: The smallest chip side a small raster may be cut into, pixels.
MIN_CHIP_PX = 64
#: A fine-tune needs at least this many polygons (training and held out together).
MIN_OBJECTS = 4
#: Chips are centred on at most this many polygons (a larger layer is sampled).
MAX_OBJECTS = 2000
#: Negative (empty) windows per polygon chip, in each split.
NEGATIVES_PER_POSITIVE = 0.25
#: Share of click prompts that get a background click beside the foreground one.
BACKGROUND_CLICK_CHANCE = 0.3
#: A box prompt is skipped when the polygon's box covers more of the chip than this.
BOX_MAX_SHARE = 0.9
#: A chip with fewer valid (not nodata) pixels than this share is skipped.
MIN_VALID_SHARE = 0.5
#: Empty-target text records per chip for classes absent from it, at most.
MAX_ABSENT_CLASSES = 2

# The service's stretch (``unigeoseg_backend.geo.pixels.to_rgb8``), which the plugin cannot
# import; written out here and must stay the same rule (a plain test compares the two).
_PERCENTILES = (2.0, 98.0)
_MAX_PERCENTILE_SAMPLES = 1_000_000
# The benchmark's interactive wording (``unigeoseg_backend.model.prompting``), likewise.
_INTERACTIVE_LEAD = "Please segment the region/target corresponding to the"


class ChipInputError(ValueError):
    """The layers cannot make a chip set; the message says why in the analyst's words."""


Ring = np.ndarray  # N x 2 float64 (col, row), raster pixels; closed or not
Part = tuple[Ring, ...]  # exterior ring first, then holes
Window = tuple[int, int, int, int]  # col0, row0, width, height


@dataclass(frozen=True)
class TrainingObject:
    """One polygon feature in the raster's pixel frame.

    Attributes:
        feature_id: the feature's id in its layer (to show it on the map).
        class_name: its instruction (the fixed text, or the feature's field value).
        parts: polygon parts, each ``(exterior, hole, ...)`` rings of ``N x 2`` (col, row).
    """

    feature_id: int
    class_name: str
    parts: tuple[Part, ...]

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """``(col_min, row_min, col_max, row_max)`` of the exterior rings, continuous."""
        points = np.concatenate([part[0] for part in self.parts])
        return (float(points[:, 0].min()), float(points[:, 1].min()),
                float(points[:, 0].max()), float(points[:, 1].max()))


def map_to_pixels(xy: np.ndarray, geotransform: Sequence[float]) -> np.ndarray:
    """Map points ``N x 2`` (x, y) in the raster CRS -> continuous ``N x 2`` (col, row).

    Raises:
        ChipInputError: a rotated geotransform (the window reader reads north-up grids).
    """
    x0, dx, rx, y0, ry, dy = (float(v) for v in geotransform)
    if rx != 0.0 or ry != 0.0 or dx <= 0.0 or dy >= 0.0:
        raise ChipInputError("the raster's grid is rotated or not north-up: fine-tuning "
                             "needs a north-up raster (warp it first)")
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    return np.column_stack(((xy[:, 0] - x0) / dx, (xy[:, 1] - y0) / dy))


def chip_transform(geotransform: Sequence[float], window: Window) -> list[float]:
    """The chip's pixel -> map affine ``[a, b, c, d, e, f]`` (``x = a*col + b*row + c``,
    ``y = d*col + e*row + f``) of ``window`` of the raster, as the chip records carry it."""
    x0, dx, _, y0, _, dy = (float(v) for v in geotransform)
    return [dx, 0.0, x0 + window[0] * dx, 0.0, dy, y0 + window[1] * dy]


# ------------------------------------------------------------------ rasterising

def rasterise(parts: Iterable[Part], window: Window) -> np.ndarray:
    """``height x width`` bool: pixels of ``window`` whose centre is inside the polygon.

    Each part is filled even-odd over its rings (a hole is a hole); parts are unioned. A
    centre exactly on a left edge counts as inside, on a right edge as outside, so two
    polygons sharing an edge never both take a pixel.
    """
    col0, row0, width, height = window
    mask = np.zeros((height, width), dtype=bool)
    for rings in parts:
        mask |= _rasterise_part(rings, col0, row0, width, height)
    return mask


def _rasterise_part(rings: Part, col0: int, row0: int, width: int, height: int) -> np.ndarray:
    starts, ends = [], []
    for ring in rings:
        ring = np.asarray(ring, dtype=np.float64) - (col0, row0)
        if len(ring) >= 2 and np.array_equal(ring[0], ring[-1]):
            ring = ring[:-1]
        if len(ring) < 3:
            continue
        starts.append(ring)
        ends.append(np.roll(ring, -1, axis=0))
    mask = np.zeros((height, width), dtype=bool)
    if not starts:
        return mask
    a, b = np.concatenate(starts), np.concatenate(ends)
    low, high = np.minimum(a[:, 1], b[:, 1]), np.maximum(a[:, 1], b[:, 1])
    first = max(int(math.floor(low.min())), 0)
    last = min(int(math.ceil(high.max())), height)
    if first >= last:
        return mask
    centres = np.arange(first, last, dtype=np.float64) + 0.5           # rows R
    # An edge crosses a row when the row centre is in [low, high): horizontal edges never do.
    crosses = (low[:, None] <= centres[None, :]) & (centres[None, :] < high[:, None])  # E x R
    edge, row = np.nonzero(crosses)
    if edge.size == 0:
        return mask
    t = (centres[row] - a[edge, 1]) / (b[edge, 1] - a[edge, 1])
    x = a[edge, 0] + t * (b[edge, 0] - a[edge, 0])
    # A pixel centre is inside when an odd number of crossings lie at or left of it: toggle
    # from the first column whose centre is at or right of each crossing.
    column = np.clip(np.ceil(x - 0.5), 0, width).astype(np.int64)
    toggles = np.zeros((last - first, width + 1), dtype=np.int32)
    np.add.at(toggles, (row, column), 1)
    mask[first:last] = (np.cumsum(toggles[:, :width], axis=1) & 1).astype(bool)
    return mask


# ------------------------------------------------------------------ objects

@dataclass
class PreparedObjects:
    """The polygons a chip set is made of, and what was dropped on the way.

    Attributes:
        objects: every polygon inside the raster (all of them mark the masks).
        centred: the ones chips are centred on (``objects``, or a sample of them).
        outside: polygons entirely outside the raster.
        too_small: polygons covering no pixel centre.
        sampled_from: how many polygons ``centred`` was sampled from (None: not sampled).
    """

    objects: list[TrainingObject]
    centred: list[TrainingObject]
    outside: int = 0
    too_small: int = 0
    sampled_from: int | None = None

    def messages(self) -> list[str]:
        """What the analyst should know about the polygons, one sentence each."""
        notes = []
        if self.outside:
            notes.append(f"{self.outside} polygon(s) lie outside the raster and were left out")
        if self.too_small:
            notes.append(f"{self.too_small} polygon(s) cover no pixel centre (smaller than a "
                         f"pixel) and were left out")
        if self.sampled_from is not None:
            notes.append(f"the layer has {self.sampled_from} polygons: chips are centred on a "
                         f"sample of {len(self.centred)} (every polygon still marks the masks)")
        return notes


def prepare_objects(objects: Sequence[TrainingObject], width: int, height: int,
                    max_objects: int = MAX_OBJECTS, seed: int = 0) -> PreparedObjects:
    """Keep the polygons of a ``width x height`` raster that cover a pixel centre.

    Raises:
        ChipInputError: no polygons, none inside the raster, or fewer than
            :data:`MIN_OBJECTS` usable ones.
    """
    if not objects:
        raise ChipInputError("the polygon layer has no polygons to learn from")
    kept: list[TrainingObject] = []
    outside = too_small = 0
    for obj in objects:
        c0, r0, c1, r1 = obj.bbox
        if c1 <= 0 or r1 <= 0 or c0 >= width or r0 >= height:
            outside += 1
            continue
        window = _bbox_window(obj.bbox, width, height)
        if not rasterise(obj.parts, window).any():
            too_small += 1
            continue
        kept.append(obj)
    if not kept:
        raise ChipInputError(f"none of the {len(objects)} polygon(s) overlaps the raster: "
                             f"check that the layers cover the same place")
    if len(kept) < MIN_OBJECTS:
        raise ChipInputError(
            f"only {len(kept)} usable polygon(s) over the raster ({outside} outside it, "
            f"{too_small} smaller than a pixel): a fine-tune needs at least {MIN_OBJECTS}, "
            f"some of them held out to measure it")
    centred, sampled_from = kept, None
    if len(kept) > max_objects:
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(len(kept), size=max_objects, replace=False))
        centred, sampled_from = [kept[i] for i in chosen], len(kept)
    return PreparedObjects(kept, centred, outside, too_small, sampled_from)


def _bbox_window(bbox: tuple[float, float, float, float], width: int, height: int) -> Window:
    """The whole pixels of the raster a continuous bbox touches (at least one)."""
    c0 = min(max(int(math.floor(bbox[0])), 0), width - 1)
    r0 = min(max(int(math.floor(bbox[1])), 0), height - 1)
    c1 = max(min(int(math.ceil(bbox[2])), width), c0 + 1)
    r1 = max(min(int(math.ceil(bbox[3])), height), r0 + 1)
    return c0, r0, c1 - c0, r1 - r0


# ------------------------------------------------------------------ split and windows

@dataclass(frozen=True)
class SpatialSplit:
    """Training and held-out polygons, on either side of one line across the raster.

    Attributes:
        axis: 0 when the line is a column (training west of it, validation east), 1 when it
            is a row (training north, validation south).
        line: the pixel index of the line: training windows end at or before it, validation
            windows start at or after it.
        train, val: feature ids of the polygons chips are centred on, per split.
        on_line: feature ids of polygons crossing the line (no chip is centred on them).
    """

    axis: int
    line: int
    train: tuple[int, ...]
    val: tuple[int, ...]
    on_line: tuple[int, ...]

    def zone(self, split: str, width: int, height: int) -> Window:
        """The part of the raster a split's windows lie in."""
        if self.axis == 0:
            return (0, 0, self.line, height) if split == "train" else \
                (self.line, 0, width - self.line, height)
        return (0, 0, width, self.line) if split == "train" else \
            (0, self.line, width, height - self.line)


def chip_side(width: int, height: int) -> int:
    """The chip side for a raster: :data:`CHIP_PX`, or less (a multiple of 16) for a raster
    whose longer side cannot hold two chips side by side, or whose shorter side one.

    Raises:
        ChipInputError: the raster is too small for chips of :data:`MIN_CHIP_PX`.
    """
    side = min(CHIP_PX, max(width, height) // 2, min(width, height)) // 16 * 16
    if side < MIN_CHIP_PX:
        raise ChipInputError(f"the raster is {width} x {height} pixels: fine-tuning needs at "
                             f"least {2 * MIN_CHIP_PX} x {MIN_CHIP_PX}")
    return side


def split_held_out(objects: Sequence[TrainingObject], width: int, height: int,
                   held_out_share: float, chip_px: int) -> SpatialSplit:
    """Hold out about ``held_out_share`` of the polygons, spatially separate from the rest.

    The line runs across the raster's longer axis; among the lines that leave room for a
    chip on both sides, the one whose held-out share is nearest ``held_out_share`` (and that
    cuts the fewest polygons) is taken. At least one polygon is held out and two train.

    Raises:
        ChipInputError: a share outside (0, 0.9], or no line separates the polygons so.
    """
    if not 0.0 < held_out_share <= 0.9:
        raise ChipInputError(f"the held-out share must be more than 0 and at most 0.9, got "
                             f"{held_out_share}")
    axis = 0 if width >= height else 1
    length = width if axis == 0 else height
    boxes = np.array([obj.bbox for obj in objects], dtype=np.float64).reshape(-1, 4)
    low, high = boxes[:, axis], boxes[:, axis + 2]
    candidates = np.unique(np.concatenate((np.ceil(high), np.floor(low))).astype(np.int64))
    candidates = candidates[(candidates >= chip_px) & (candidates <= length - chip_px)]
    best: tuple[float, int] | None = None
    for line in candidates:
        val = int(np.count_nonzero(low >= line))
        train = int(np.count_nonzero(high <= line))
        if val < 1 or train < 2:
            continue
        cut = len(objects) - val - train
        score = abs(val / (val + train) - held_out_share) + cut / len(objects)
        if best is None or score < best[0]:
            best = (score, int(line))
    if best is None:
        raise ChipInputError(
            "the polygons cannot be split into a training area and a separate held-out area "
            "of the raster (they are too few, too close together, or too near the raster's "
            "edge): digitise a few more objects farther apart")
    line = best[1]
    ids = np.array([obj.feature_id for obj in objects])
    return SpatialSplit(axis, line, tuple(int(i) for i in ids[high <= line]),
                        tuple(int(i) for i in ids[low >= line]),
                        tuple(int(i) for i in ids[(low < line) & (high > line)]))


def window_around(centre: tuple[float, float], chip_px: int, zone: Window) -> Window:
    """The ``chip_px`` window centred on ``centre`` (col, row), shifted to lie in ``zone``.

    The start on each axis is ``floor(c - chip_px / 2)``, as the plugin's click windows.
    """
    starts = []
    for c, z0, zsize in ((centre[0], zone[0], zone[2]), (centre[1], zone[1], zone[3])):
        start = int(math.floor(c - chip_px / 2))
        starts.append(min(max(start, z0), z0 + zsize - chip_px))
    return starts[0], starts[1], chip_px, chip_px


def windows_overlap(a: Window, b: Window) -> bool:
    """Whether two windows share a pixel."""
    return (a[0] < b[0] + b[2] and b[0] < a[0] + a[2]
            and a[1] < b[1] + b[3] and b[1] < a[1] + a[3])


@dataclass(frozen=True)
class PlannedChip:
    """One chip window: centred on a polygon (``feature_id``), or a negative (None)."""

    split: str
    window: Window
    feature_id: int | None


@dataclass
class ChipPlan:
    """Which windows to cut, from which polygons.

    Attributes:
        width, height, chip_px: the raster's size and the chip side, pixels.
        prepared: the polygons (:func:`prepare_objects`).
        split: the held-out split.
        chips: the windows, training ones first.
    """

    width: int
    height: int
    chip_px: int
    prepared: PreparedObjects
    split: SpatialSplit
    chips: list[PlannedChip]

    @property
    def classes(self) -> list[str]:
        """The instructions of the polygons, sorted."""
        return sorted({obj.class_name for obj in self.prepared.objects})


def plan_chips(objects: Sequence[TrainingObject], width: int, height: int,
               held_out_share: float = 0.25, max_objects: int = MAX_OBJECTS,
               seed: int = 0) -> ChipPlan:
    """Everything but the pixels: polygons checked, split, and the windows to cut.

    Raises:
        ChipInputError: see :func:`prepare_objects`, :func:`chip_side`,
            :func:`split_held_out`.
    """
    chip_px = chip_side(width, height)
    prepared = prepare_objects(objects, width, height, max_objects, seed)
    split = split_held_out(prepared.centred, width, height, held_out_share, chip_px)
    by_id = {obj.feature_id: obj for obj in prepared.centred}
    boxes = np.array([obj.bbox for obj in prepared.objects], dtype=np.float64)
    rng = np.random.default_rng([seed, 1])
    chips: list[PlannedChip] = []
    for name, ids in (("train", split.train), ("val", split.val)):
        zone = split.zone(name, width, height)
        for feature_id in ids:
            c0, r0, c1, r1 = by_id[feature_id].bbox
            chips.append(PlannedChip(name, window_around(((c0 + c1) / 2, (r0 + r1) / 2),
                                                         chip_px, zone), feature_id))
        wanted = math.ceil(NEGATIVES_PER_POSITIVE * len(ids))
        chips.extend(PlannedChip(name, window, None)
                     for window in _negative_windows(boxes, zone, chip_px, wanted, rng))
    return ChipPlan(width, height, chip_px, prepared, split, chips)


def _negative_windows(boxes: np.ndarray, zone: Window, chip_px: int, wanted: int,
                      rng: np.random.Generator) -> list[Window]:
    """Up to ``wanted`` windows of ``zone`` that no polygon's box touches."""
    found: list[Window] = []
    for _ in range(20 * wanted):
        if len(found) == wanted:
            break
        col = int(rng.integers(zone[0], zone[0] + zone[2] - chip_px + 1))
        row = int(rng.integers(zone[1], zone[1] + zone[3] - chip_px + 1))
        touches = ((boxes[:, 0] < col + chip_px) & (boxes[:, 2] > col)
                   & (boxes[:, 1] < row + chip_px) & (boxes[:, 3] > row))
        if not touches.any():
            found.append((col, row, chip_px, chip_px))
    return found


# ------------------------------------------------------------------ pixels

def tile_rgb8(pixels: np.ndarray, raster: RasterOptions) -> tuple[np.ndarray, np.ndarray]:
    """8-bit RGB of a tile's pixels, as the service makes it (``stretch`` auto or none).

    Args:
        pixels: ``H x W x C`` as the window reader returns them (the display bands: C = 1
            grey or 3 RGB), any dtype it reads.
        raster: the tile's nodata and stretch (``RasterTile.raster``).

    Returns:
        ``(rgb, valid)``: ``H x W x 3`` uint8 (0 where invalid) and ``H x W`` bool.
    """
    frame = pixels[:, :, np.newaxis] if pixels.ndim == 2 else pixels
    height, width, n_bands = frame.shape
    sources = (0, 0, 0) if n_bands < 3 else (0, 1, 2)
    nodata = _nodata_value(frame.dtype, raster.nodata)
    valid = np.ones((height, width), dtype=bool)
    for b in sorted(set(sources)):
        if frame.dtype.kind == "f":
            valid &= np.isfinite(frame[:, :, b])
        if nodata is not None:
            valid &= frame[:, :, b] != nodata
    rgb = np.zeros((height, width, 3), dtype=np.uint8)
    if not valid.any():
        return rgb, valid
    all_valid = bool(valid.all())
    for k, b in enumerate(sources):
        band = frame[:, :, b]
        if frame.dtype == np.uint8 and raster.stretch in ("auto", "none"):
            rgb[:, :, k] = band
        elif raster.stretch == "none":
            rgb[:, :, k] = np.rint(np.clip(np.where(valid, band, 0), 0, 255))
        else:
            lo, hi = _band_range(band, None if all_valid else valid,
                                 "percentile" if raster.stretch == "auto" else "minmax")
            rgb[:, :, k] = _stretch(band, lo, hi, valid)
    rgb[~valid] = 0
    return rgb, valid


def _nodata_value(dtype: np.dtype, nodata: float | None) -> float | int | None:
    if nodata is None or math.isnan(nodata):
        return None
    if dtype.kind == "f":
        return float(nodata)
    if not float(nodata).is_integer():
        return None
    info = np.iinfo(dtype)
    return int(nodata) if info.min <= int(nodata) <= info.max else None


def _band_range(band: np.ndarray, valid: np.ndarray | None, stretch: str) -> tuple[float, float]:
    if stretch == "percentile":
        flat = band.reshape(-1)
        step = max(1, math.ceil(flat.size / _MAX_PERCENTILE_SAMPLES))
        values = flat[::step] if valid is None else flat[::step][valid.reshape(-1)[::step]]
        if values.size == 0:
            values = flat[valid.reshape(-1)]
        lo, hi = np.percentile(values, _PERCENTILES)
        if hi > lo:
            return float(lo), float(hi)
    values = band if valid is None else band[valid]
    return float(values.min()), float(values.max())


def _stretch(band: np.ndarray, lo: float, hi: float, valid: np.ndarray) -> np.ndarray:
    if not hi > lo:
        return np.zeros(band.shape, dtype=np.uint8)
    work_dtype = np.float32 if band.dtype.itemsize <= 2 or band.dtype == np.float32 \
        else np.float64
    work = band.astype(work_dtype)
    work[~valid] = work_dtype(lo)
    with np.errstate(over="ignore"):
        work -= work_dtype(lo)
        work *= work_dtype(255.0 / (hi - lo))
    np.clip(work, 0, 255, out=work)
    return np.rint(work).astype(np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    """A PNG of ``H x W`` (grey) or ``H x W x 3`` (RGB) uint8, unfiltered, zlib level 6."""
    if image.dtype != np.uint8 or image.ndim not in (2, 3) \
            or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"png_bytes takes H x W or H x W x 3 uint8, got {image.dtype} "
                         f"{image.shape}")
    height, width = image.shape[:2]
    colour = 0 if image.ndim == 2 else 2
    rows = np.ascontiguousarray(image).reshape(height, -1)
    raw = np.concatenate((np.zeros((height, 1), dtype=np.uint8), rows), axis=1).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def interactive_instruction(points: Sequence[Sequence[float]] | None = None,
                            box: Sequence[float] | None = None, chip_px: int = CHIP_PX) -> str:
    """The benchmark's interactive wording for chip-pixel ``points`` or a ``box``."""
    def fmt(v: float) -> str:
        return f"{v / chip_px:.3f}"

    if box is not None:
        c0, r0, c1, r1 = box
        return (f"{_INTERACTIVE_LEAD} box x0,y0=[{fmt(c0)},{fmt(r0)}], "
                f"x1,y1=[{fmt(c1)},{fmt(r1)}].")
    assert points is not None
    text = ", ".join(f"[{fmt(c)},{fmt(r)}]" for c, r in points)
    return f"{_INTERACTIVE_LEAD} {'point' if len(points) == 1 else 'points'} {text}."


# ------------------------------------------------------------------ writing

@dataclass(frozen=True)
class RasterGeoreference:
    """Where the raster is: what each chip record's ``chip`` carries.

    Attributes:
        crs: the raster CRS as the backend reads it (authority code or WKT).
        geotransform: GDAL ``(x0, dx, 0, y0, 0, dy)`` of the whole raster.
        gsd_m: the ground size of a pixel, metres.
    """

    crs: str
    geotransform: tuple[float, float, float, float, float, float]
    gsd_m: float


@dataclass
class ChipSetSummary:
    """What :func:`write_chip_set` wrote.

    Attributes:
        root: the chip set's folder (``train.jsonl``, ``val.jsonl``, ``images/``, ``masks/``).
        records, chips: per split, how many records and chip images.
        skipped_nodata: chips left out for lack of valid pixels.
        held_out: feature ids of the held-out polygons (to show on the map).
        seconds: time taken.
    """

    root: Path
    records: dict[str, int] = field(default_factory=dict)
    chips: dict[str, int] = field(default_factory=dict)
    skipped_nodata: int = 0
    held_out: tuple[int, ...] = ()
    seconds: float = 0.0


#: Reads a window of the raster: ``(col0, row0, width, height)`` -> ``(rgb, valid)``
#: (``H x W x 3`` uint8, ``H x W`` bool), e.g. the window reader then :func:`tile_rgb8`.
ReadRgb = Callable[[Window], tuple[np.ndarray, np.ndarray]]


def write_chip_set(root: Path, plan: ChipPlan, read_rgb: ReadRgb,
                   georeference: RasterGeoreference, seed: int = 0,
                   is_cancelled: Callable[[], bool] = lambda: False,
                   on_progress: Callable[[int, int], None] = lambda done, total: None
                   ) -> ChipSetSummary:
    """Cut and write the chips of ``plan`` into ``root`` (an empty folder of the caller's,
    e.g. a temporary one). The ``{split}.jsonl`` files are written last, each atomically,
    so a chip set with its index files is complete.

    Raises:
        ChipInputError: no training or no held-out chip has enough valid pixels.
    """
    started = time.perf_counter()
    root = Path(root)
    objects = plan.prepared.objects
    boxes = np.array([obj.bbox for obj in objects], dtype=np.float64)
    by_id = {obj.feature_id: obj for obj in objects}
    classes = plan.classes
    chip_px = plan.chip_px
    empty_mask = f"masks/empty-{chip_px}.png"
    _write_atomically(root / empty_mask, png_bytes(np.zeros((chip_px, chip_px), np.uint8)))
    records: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
    summary = ChipSetSummary(root, held_out=plan.split.val)
    for index, chip in enumerate(plan.chips):
        if is_cancelled():
            break
        on_progress(index, len(plan.chips))
        rgb, valid = read_rgb(chip.window)
        if valid.mean() < MIN_VALID_SHARE:
            summary.skipped_nodata += 1
            continue
        rng = np.random.default_rng([seed, index])
        stem = f"{chip.split}/{index:05d}"
        writer = _ChipRecords(root, stem, chip, georeference, chip_px, empty_mask)
        _write_atomically(root / writer.image, png_bytes(rgb))
        touching = [objects[i] for i in np.nonzero(
            (boxes[:, 0] < chip.window[0] + chip_px) & (boxes[:, 2] > chip.window[0])
            & (boxes[:, 1] < chip.window[1] + chip_px) & (boxes[:, 3] > chip.window[1]))[0]]
        class_masks = {}
        for name in classes:
            parts = [p for obj in touching if obj.class_name == name for p in obj.parts]
            class_masks[name] = rasterise(parts, chip.window) & valid
        if chip.feature_id is not None:
            writer.object_records(by_id[chip.feature_id], class_masks, valid, rng)
        absent = [name for name in classes if not class_masks[name].any()]
        for k in rng.permutation(len(absent))[:MAX_ABSENT_CLASSES]:
            writer.record("referring", absent[k], empty_mask,
                          {"kind": "text", "class": absent[k]}, "empty")
        records[chip.split].extend(writer.records)
        summary.chips[chip.split] = summary.chips.get(chip.split, 0) + 1
    for split in ("train", "val"):
        if not is_cancelled() and not summary.chips.get(split):
            raise ChipInputError(f"no {'training' if split == 'train' else 'held-out'} chip "
                                 f"has enough valid pixels (the raster is mostly nodata "
                                 f"there)")
        lines = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records[split])
        _write_atomically(root / f"{split}.jsonl", lines.encode("utf-8"))
        summary.records[split] = len(records[split])
    on_progress(len(plan.chips), len(plan.chips))
    summary.seconds = time.perf_counter() - started
    return summary


@dataclass
class _ChipRecords:
    """The records of one chip, and its mask files."""

    root: Path
    stem: str
    chip: PlannedChip
    georeference: RasterGeoreference
    chip_px: int
    empty_mask: str
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def image(self) -> str:
        return f"images/{self.stem}.png"

    def chip_meta(self) -> dict[str, Any]:
        return {"scene": None, "window": list(self.chip.window),
                "gsd_m": self.georeference.gsd_m, "crs": self.georeference.crs,
                "transform": chip_transform(self.georeference.geotransform, self.chip.window)}

    def mask_file(self, name: str, mask: np.ndarray) -> str:
        path = f"masks/{self.stem}-{name}.png"
        _write_atomically(self.root / path, png_bytes(mask.astype(np.uint8) * np.uint8(255)))
        return path

    def record(self, task: str, instruction: str, mask: str, prompt: dict[str, Any],
               target: str) -> None:
        self.records.append({
            "id": f"{self.stem.replace('/', '-')}-{len(self.records)}", "image": self.image,
            "mask": mask, "instruction": instruction, "task": task, "prompt": prompt,
            "target": target, "chip": self.chip_meta()})

    def object_records(self, obj: TrainingObject, class_masks: dict[str, np.ndarray],
                       valid: np.ndarray, rng: np.random.Generator) -> None:
        """The centred polygon's records: its class as text, a click and a box in it."""
        name = obj.class_name
        self.record("referring", name, self.mask_file("class", class_masks[name]),
                    {"kind": "text", "class": name}, "class")
        component = rasterise(obj.parts, self.chip.window) & valid
        if not component.any():
            return
        component_file = self.mask_file("object", component)
        points = [_pick_pixel(rng, _interior(component))]
        labels = [1]
        if rng.random() < BACKGROUND_CLICK_CHANCE:
            background = _background_pixel(rng, class_masks[name] | component,
                                           _bounding_box(component))
            if background is not None:
                points.append(background)
                labels.append(0)
        # The benchmark wording names the foreground click only; the prompt holds both.
        self.record("interactive", interactive_instruction(points[:1], chip_px=self.chip_px),
                    component_file, {"kind": "click", "class": name,
                                     "points": [list(p) for p in points], "labels": labels},
                    "component")
        box = _bounding_box(component)
        if (box[2] - box[0]) * (box[3] - box[1]) <= BOX_MAX_SHARE * self.chip_px ** 2:
            self.record("interactive", interactive_instruction(box=box, chip_px=self.chip_px),
                        component_file,
                        {"kind": "box", "class": name, "box": [float(v) for v in box]},
                        "component")


def _interior(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` whose four neighbours are in it too (itself if none are)."""
    padded = np.pad(mask, 1)
    inner = (mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2]
             & padded[1:-1, 2:])
    return inner if inner.any() else mask


def _pick_pixel(rng: np.random.Generator, where: np.ndarray) -> tuple[float, float]:
    """The centre ``(col + 0.5, row + 0.5)`` of a random True pixel of ``where``."""
    rows, cols = np.nonzero(where)
    k = int(rng.integers(0, rows.size))
    return float(cols[k]) + 0.5, float(rows[k]) + 0.5


def _bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """``(col_min, row_min, col_max, row_max)`` pixel edges around a mask's pixels."""
    rows, cols = np.nonzero(mask)
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


def _background_pixel(rng: np.random.Generator, foreground: np.ndarray,
                      box: tuple[int, int, int, int]) -> tuple[float, float] | None:
    """A pixel outside ``foreground``, within 8 pixels of ``box`` where there is one."""
    height, width = foreground.shape
    near = np.zeros_like(foreground)
    near[max(box[1] - 8, 0):min(box[3] + 8, height),
         max(box[0] - 8, 0):min(box[2] + 8, width)] = True
    for where in (near & ~foreground, ~foreground):
        if where.any():
            return _pick_pixel(rng, where)
    return None
