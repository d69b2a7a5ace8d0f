"""COCO segmentations (compressed RLE, uncompressed RLE, polygons) decoded with numpy alone.

RRSIS-D stores each referred object as a COCO ``segmentation``: a list holding one compressed
RLE (``{"size": [h, w], "counts": "<string>"}``) in the released file, polygons in REFER's
other branch. pycocotools is not a dependency of the backend, so this module re-implements
the three pieces of its C ``maskApi`` that the readers need, bit for bit:

* ``rleFrString`` (:func:`rle_counts_from_string`): the counts string is a LEB128-like code,
  5 bits per character offset by 48, bit 0x20 = "more characters follow", bit 0x10 of the last
  character = sign; from the third count on, each value is stored as a difference to the count
  two places earlier.
* ``rleToString`` (:func:`rle_string_from_counts`), its inverse (for fixtures and tests).
* ``rleFrPoly`` (:func:`polygon_to_counts`): rasterise a polygon by walking its boundary at
  5x resolution, exactly as pycocotools does (so a polygon gives the pixels the official
  ``frPyObjects`` gives, not a "pixel centre inside" rasterisation, which differs at edges).

Runs are column-major (Fortran order: down the first column, then the next), alternating
background and foreground and starting with background. Masks are returned as ``H x W`` bool.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

#: pycocotools' boundary upsampling factor in ``rleFrPoly``.
_POLY_SCALE = 5


class SegmentationError(ValueError):
    """A segmentation that cannot be decoded (bad counts, wrong size, unknown form)."""


def rle_counts_from_string(counts: str | bytes) -> list[int]:
    """Run lengths of a compressed COCO RLE counts string (pycocotools ``rleFrString``)."""
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    runs: list[int] = []
    pos = 0
    while pos < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if pos >= len(counts):
                raise SegmentationError("RLE counts string ends inside a value")
            code = ord(counts[pos]) - 48
            if not 0 <= code < 64:
                raise SegmentationError(f"RLE counts string has an invalid character "
                                        f"{counts[pos]!r} at position {pos}")
            value |= (code & 0x1F) << (5 * shift)
            more = bool(code & 0x20)
            pos += 1
            shift += 1
            if not more and code & 0x10:
                value |= -1 << (5 * shift)  # sign-extend the last 5-bit group
        if len(runs) > 2:
            value += runs[-2]  # stored as a difference to the run two places earlier
        runs.append(value)
    return runs


def rle_string_from_counts(runs: Sequence[int]) -> str:
    """Compressed COCO RLE counts string of ``runs`` (pycocotools ``rleToString``)."""
    chars: list[str] = []
    for i, run in enumerate(runs):
        value = int(run) - (int(runs[i - 2]) if i > 2 else 0)
        more = True
        while more:
            code = value & 0x1F
            value >>= 5  # arithmetic shift, as C's on a signed long
            more = value != -1 if code & 0x10 else value != 0
            if more:
                code |= 0x20
            chars.append(chr(code + 48))
    return "".join(chars)


def counts_to_mask(runs: Sequence[int], height: int, width: int) -> np.ndarray:
    """``H x W`` bool mask from column-major run lengths (background first)."""
    counts = np.asarray(runs, dtype=np.int64)
    if counts.size and counts.min() < 0:
        raise SegmentationError("RLE has a negative run length")
    if int(counts.sum()) != height * width:
        raise SegmentationError(f"RLE runs cover {int(counts.sum())} pixels, "
                                f"its size {height} x {width} has {height * width}")
    values = np.zeros(counts.size, dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    return np.ascontiguousarray(flat.reshape(width, height).T)


def mask_to_counts(mask: np.ndarray) -> list[int]:
    """Column-major run lengths of an ``H x W`` mask (nonzero = foreground)."""
    flat = np.asarray(mask).astype(bool).T.reshape(-1)
    # Run boundaries: where the value changes; a leading True gets an empty background run.
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    edges = np.concatenate(([0], change, [flat.size]))
    runs = np.diff(edges).tolist()
    if flat.size and flat[0]:
        runs = [0, *runs]
    return runs


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """Compressed COCO RLE ``{"size": [h, w], "counts": str}`` of an ``H x W`` mask."""
    height, width = np.asarray(mask).shape
    return {"size": [height, width], "counts": rle_string_from_counts(mask_to_counts(mask))}


def polygon_to_counts(xy: Sequence[float], height: int, width: int) -> list[int]:
    """Run lengths of a polygon ``[x0, y0, x1, y1, ...]`` (pycocotools ``rleFrPoly``).

    Coordinates are in pixels, x to the right, y down, the pixel (0, 0) covering
    ``[0, 1) x [0, 1)``. C's ``(int)`` truncation is Python's ``int()`` on these values.
    """
    n = len(xy) // 2
    xs = [int(_POLY_SCALE * float(xy[2 * j]) + 0.5) for j in range(n)]
    ys = [int(_POLY_SCALE * float(xy[2 * j + 1]) + 0.5) for j in range(n)]
    xs.append(xs[0])
    ys.append(ys[0])

    # Dense boundary points (u, v) at 5x resolution, one step along the longer axis each.
    u: list[int] = []
    v: list[int] = []
    for j in range(n):
        x_s, x_e, y_s, y_e = xs[j], xs[j + 1], ys[j], ys[j + 1]
        dx, dy = abs(x_e - x_s), abs(y_s - y_e)
        flip = (dx >= dy and x_s > x_e) or (dx < dy and y_s > y_e)
        if flip:
            x_s, x_e, y_s, y_e = x_e, x_s, y_e, y_s
        if dx >= dy:
            # dx == 0 here means a repeated vertex: C computes 0/0 = NaN and an undefined
            # int; that one point always sits between two points with the same u, so the
            # next stage never reads its v. Any value does; use y_s.
            slope = (y_e - y_s) / dx if dx else 0.0
            for d in range(dx + 1):
                t = dx - d if flip else d
                u.append(t + x_s)
                v.append(int(y_s + slope * t + 0.5))
        else:
            slope = (x_e - x_s) / dy
            for d in range(dy + 1):
                t = dy - d if flip else d
                v.append(t + y_s)
                u.append(int(x_s + slope * t + 0.5))

    # Where the boundary crosses a pixel column: the first row inside, downsampled.
    starts: list[int] = []
    for j in range(1, len(u)):
        if u[j] == u[j - 1]:
            continue
        xd = float(u[j] if u[j] < u[j - 1] else u[j] - 1)
        xd = (xd + 0.5) / _POLY_SCALE - 0.5
        if math.floor(xd) != xd or xd < 0 or xd > width - 1:
            continue
        yd = float(v[j] if v[j] < v[j - 1] else v[j - 1])
        yd = (yd + 0.5) / _POLY_SCALE - 0.5
        yd = min(max(yd, 0.0), float(height))
        starts.append(int(xd) * height + math.ceil(yd))

    # Sorted column-major positions of the toggles, turned into runs; zero-length runs merge
    # their neighbours (two toggles at one position cancel).
    positions = sorted([*starts, height * width])
    deltas, previous = [], 0
    for p in positions:
        deltas.append(p - previous)
        previous = p
    runs = [deltas[0]]
    j = 1
    while j < len(deltas):
        if deltas[j] > 0:
            runs.append(deltas[j])
            j += 1
        else:
            j += 1
            if j < len(deltas):
                runs[-1] += deltas[j]
                j += 1
    return runs


def segmentation_to_mask(segmentation: Any, height: int | None,
                         width: int | None) -> np.ndarray:
    """Union (bool) of the parts of a COCO ``segmentation``, as an ``H x W`` bool mask.

    Args:
        segmentation: a list of polygons (``[x0, y0, ...]``; pycocotools reads a 4-number
            list as an ``[x, y, w, h]`` box, and so does this), a list of RLE dicts, or one
            RLE dict. An RLE's counts are a compressed string or a list of run lengths.
        height, width: the grid of the polygons (image metadata). An RLE uses its own
            ``size``; all parts must agree.

    The official REFER ``getMask`` *sums* the parts (overlaps become 2, which its IoU then
    counts as neither class); the union is what the annotation means.

    Raises:
        SegmentationError: an undecodable part, parts of different sizes, or polygons
            without a grid size.
    """
    parts = [segmentation] if isinstance(segmentation, dict) else segmentation
    if not isinstance(parts, list) or not parts:
        raise SegmentationError(f"segmentation must be a non-empty list or an RLE dict, "
                                f"got {type(segmentation).__name__}")
    masks = [_part_to_mask(part, height, width) for part in parts]
    shapes = {m.shape for m in masks}
    if len(shapes) > 1:
        raise SegmentationError(f"segmentation parts have different sizes {sorted(shapes)}")
    out = masks[0].copy()
    for m in masks[1:]:
        out |= m
    return out


def _part_to_mask(part: Any, height: int | None, width: int | None) -> np.ndarray:
    if isinstance(part, dict):
        size = part.get("size")
        counts = part.get("counts")
        if (not isinstance(size, list) or len(size) != 2
                or not all(isinstance(s, int) and s >= 0 for s in size)):
            raise SegmentationError(f"RLE size must be [height, width], got {size!r}")
        if isinstance(counts, (str, bytes)):
            runs = rle_counts_from_string(counts)
        elif isinstance(counts, list) and all(isinstance(c, int) for c in counts):
            runs = counts
        else:
            raise SegmentationError("RLE counts must be a string or a list of integers")
        return counts_to_mask(runs, size[0], size[1])
    if isinstance(part, list) and all(isinstance(c, (int, float)) for c in part):
        if height is None or width is None:
            raise SegmentationError("a polygon needs the image height and width")
        if len(part) == 4:  # pycocotools frPyObjects: [x, y, w, h] box
            x, y, w, h = part
            part = [x, y, x, y + h, x + w, y + h, x + w, y]
        if len(part) < 6 or len(part) % 2:
            raise SegmentationError(f"a polygon needs at least 3 (x, y) pairs, "
                                    f"got {len(part)} numbers")
        return counts_to_mask(polygon_to_counts(part, height, width), height, width)
    raise SegmentationError(f"unknown segmentation part {type(part).__name__}")
