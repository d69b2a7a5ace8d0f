"""Typed request parameters: parsed (and validated) from, and written to, JSON ``params``.

Both sides use these classes, so a value the client can build is a value the backend accepts.
Coordinates are map coordinates (``x`` east / ``y`` north for projected CRSs, ``x`` lon /
``y`` lat for geographic ones: the traditional GIS axis order, whatever the CRS definition says).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import ErrorCode, ProtocolError
from .vocabulary import ENGINES, TASKS, TEXT_TASKS, default_task, is_engine

MAX_TEXT_CHARS = 2000
MAX_POINTS = 256


def _invalid(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_ARGUMENT, message)


def _finite_number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _invalid(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _optional_str(value: Any, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise _invalid(f"{what} must be a non-empty string")
    return value.strip()


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise _invalid(f"{what} must be true or false, got {value!r}")
    return value


@dataclass(frozen=True)
class Georeference:
    """Where a tile's pixels are on Earth.

    Attributes:
        crs: the tile CRS as WKT or an authority code such as ``"EPSG:32633"``.
        geotransform: GDAL order ``(x0, dx_col, dx_row, y0, dy_col, dy_row)``: map ``x`` of
            pixel corner (col, row) is ``x0 + col*dx_col + row*dx_row``, ``y`` likewise. Rotated
            and south-up grids are allowed; a singular transform is not.
    """

    crs: str
    geotransform: tuple[float, float, float, float, float, float]

    @classmethod
    def from_wire(cls, value: Any) -> Georeference:
        if not isinstance(value, dict):
            raise _invalid("'georeference' must be an object with 'crs' and 'geotransform'")
        crs = _optional_str(value.get("crs"), "georeference.crs")
        if crs is None:
            raise _invalid("georeference.crs is required (WKT or an authority code like EPSG:4326)")
        gt = value.get("geotransform")
        if not isinstance(gt, list) or len(gt) != 6:
            raise _invalid("georeference.geotransform must be a list of 6 numbers (GDAL order)")
        numbers = tuple(_finite_number(v, "georeference.geotransform item") for v in gt)
        if numbers[1] * numbers[5] - numbers[2] * numbers[4] == 0:
            raise _invalid("georeference.geotransform is singular (zero pixel area)")
        return cls(crs=crs, geotransform=numbers)  # type: ignore[arg-type]

    def to_wire(self) -> dict[str, Any]:
        return {"crs": self.crs, "geotransform": list(self.geotransform)}


@dataclass(frozen=True)
class Prompt:
    """What to segment.

    Attributes:
        points: (x, y) map coordinates in ``crs`` (or the tile CRS when ``crs`` is None).
        labels: 1 = foreground, 0 = background; one per point.
        box: ``(xmin, ymin, xmax, ymax)`` in the same CRS as the points.
        text: an instruction for the text engine.
        task: ``interactive`` (points / box), ``referring`` or ``reasoning`` (text).
        crs: CRS of ``points`` and ``box``; None means the tile CRS.
        object_key: a client-chosen key naming the object being refined: the engine feeds its
            previous low-resolution mask back in when the same key comes again on the same image.
    """

    points: tuple[tuple[float, float], ...] = ()
    labels: tuple[int, ...] = ()
    box: tuple[float, float, float, float] | None = None
    text: str | None = None
    task: str | None = None  # None: interactive with points / a box, referring with text
    crs: str | None = None
    object_key: str | None = None

    def __post_init__(self) -> None:
        if self.task is None:
            geometric = bool(self.points) or self.box is not None
            object.__setattr__(self, "task", default_task(geometric, bool(self.text)))
        if self.points and not self.labels:  # points without labels are foreground clicks
            object.__setattr__(self, "labels", (1,) * len(self.points))
        if len(self.labels) != len(self.points):
            raise _invalid(f"{len(self.points)} points but {len(self.labels)} labels")

    @classmethod
    def from_wire(cls, value: Any) -> Prompt:
        if not isinstance(value, dict):
            raise _invalid("'prompt' must be an object")
        points = value.get("points", []) or []
        if not isinstance(points, list) or len(points) > MAX_POINTS:
            raise _invalid(f"prompt.points must be a list of at most {MAX_POINTS} [x, y] pairs")
        parsed_points = []
        for p in points:
            if not isinstance(p, list) or len(p) != 2:
                raise _invalid(f"each prompt point must be [x, y], got {p!r}")
            parsed_points.append((_finite_number(p[0], "point x"), _finite_number(p[1], "point y")))
        labels = value.get("labels")
        if labels is None:
            labels = [1] * len(parsed_points)
        if not isinstance(labels, list) or len(labels) != len(parsed_points) \
                or any(lb not in (0, 1) or isinstance(lb, bool) for lb in labels):
            raise _invalid("prompt.labels must hold one 0 (background) or 1 (foreground) per point")
        box = value.get("box")
        if box is not None:
            if not isinstance(box, list) or len(box) != 4:
                raise _invalid("prompt.box must be [xmin, ymin, xmax, ymax]")
            box = tuple(_finite_number(v, "box coordinate") for v in box)
            if not (box[0] < box[2] and box[1] < box[3]):
                raise _invalid("prompt.box must have xmin < xmax and ymin < ymax")
        text = value.get("text")
        if text is not None:
            if not isinstance(text, str):
                raise _invalid("prompt.text must be a string")
            text = text.strip() or None
            if text and len(text) > MAX_TEXT_CHARS:
                raise _invalid(f"prompt.text is over {MAX_TEXT_CHARS} characters")
        if not parsed_points and box is None and not text:
            raise ProtocolError(ErrorCode.EMPTY_PROMPT,
                                "the prompt is empty: give points, a box or a text instruction")
        has_geometry = bool(parsed_points) or box is not None
        task = value.get("task", default_task(has_geometry, bool(text)))
        if task not in TASKS:
            raise _invalid(f"prompt.task must be one of {TASKS}, got {task!r}")
        if task == "interactive" and not parsed_points and box is None:
            raise ProtocolError(ErrorCode.EMPTY_PROMPT,
                                "an interactive prompt needs points or a box")
        # Guards the wire: refused before the request is queued (the engine API checks again,
        # for callers that build a TilePrompt without the protocol).
        if task in TEXT_TASKS and not text:
            raise ProtocolError(ErrorCode.EMPTY_PROMPT, f"a {task} prompt needs a text instruction")
        return cls(points=tuple(parsed_points), labels=tuple(int(lb) for lb in labels),
                   box=box, text=text, task=task,
                   crs=_optional_str(value.get("crs"), "prompt.crs"),
                   object_key=_optional_str(value.get("object_key"), "prompt.object_key"))

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"task": self.task}
        if self.points:
            wire["points"] = [list(p) for p in self.points]
            wire["labels"] = list(self.labels)
        if self.box is not None:
            wire["box"] = list(self.box)
        if self.text:
            wire["text"] = self.text
        if self.crs:
            wire["crs"] = self.crs
        if self.object_key:
            wire["object_key"] = self.object_key
        return wire


@dataclass(frozen=True)
class SegmentOptions:
    """How to segment and what to return.

    Attributes:
        engine: ``sam`` or ``unigeoseg``; None picks ``sam`` for point/box prompts and
            ``unigeoseg`` for text.
        multimask: ask the engine for several candidates and keep the best-scored one.
        simplify: topology-preserving simplification tolerance in tile-CRS map units (0 = none).
        min_area: drop polygons smaller than this, in tile-CRS square map units.
        output_crs: CRS of the returned GeoJSON; None means the tile CRS.
        return_mask: also return the binary mask on the tile grid as array ``mask``.
    """

    engine: str | None = None
    multimask: bool = True
    simplify: float = 0.0
    min_area: float = 0.0
    output_crs: str | None = None
    return_mask: bool = False

    @classmethod
    def from_wire(cls, value: Any) -> SegmentOptions:
        if value is None:
            return cls()
        if not isinstance(value, dict):
            raise _invalid("'options' must be an object")
        engine = value.get("engine")
        if engine is not None and not is_engine(engine):
            raise _invalid(f"options.engine must be one of {ENGINES} or a fine-tuned model "
                           f"('default:<name>', listed by hello), got {engine!r}")
        simplify = _finite_number(value.get("simplify", 0.0), "options.simplify")
        min_area = _finite_number(value.get("min_area", 0.0), "options.min_area")
        if simplify < 0 or min_area < 0:
            raise _invalid("options.simplify and options.min_area must be >= 0")
        return cls(engine=engine,
                   multimask=_bool(value.get("multimask", True), "options.multimask"),
                   simplify=simplify, min_area=min_area,
                   output_crs=_optional_str(value.get("output_crs"), "options.output_crs"),
                   return_mask=_bool(value.get("return_mask", False), "options.return_mask"))

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"multimask": self.multimask, "simplify": self.simplify,
                                "min_area": self.min_area, "return_mask": self.return_mask}
        if self.engine:
            wire["engine"] = self.engine
        if self.output_crs:
            wire["output_crs"] = self.output_crs
        return wire


@dataclass(frozen=True)
class RasterOptions:
    """How to turn the tile's pixels into the 8-bit RGB the models see.

    Attributes:
        bands: 0-based band indices to use as R, G, B (1 index = grey, replicated). None picks
            the first three bands, or the only band of a single-band tile.
        nodata: pixel value meaning "no data" (NaN always means no data too).
        stretch: ``auto`` (uint8 kept as is, other dtypes 2-98 percentile per band),
            ``minmax`` or ``none`` (values clipped to 0-255).
        value_range: a fixed stretch instead, one ``(low, high)`` per output channel (R, G,
            B; or one for grey): ``low..high`` maps linearly to 0..255 whatever the dtype.
            Computed once over a whole raster (its 2nd..98th percentiles), it makes every
            tile of that raster look alike, where a per-tile stretch makes a tile of open
            water brighter than the same water on a tile of land. Wire name ``range``.
    """

    bands: tuple[int, ...] | None = None
    nodata: float | None = None
    stretch: str = "auto"
    value_range: tuple[tuple[float, float], ...] | None = None

    @classmethod
    def from_wire(cls, value: Any) -> RasterOptions:
        if value is None:
            return cls()
        if not isinstance(value, dict):
            raise _invalid("'raster' must be an object")
        bands = value.get("bands")
        if bands is not None:
            if (not isinstance(bands, list) or len(bands) not in (1, 3)
                    or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0
                               for b in bands)):
                raise _invalid("raster.bands must list 1 or 3 band indices (0-based)")
            bands = tuple(bands)
        nodata = value.get("nodata")
        if nodata is not None and not (isinstance(nodata, float) and math.isnan(nodata)):
            nodata = _finite_number(nodata, "raster.nodata")
        stretch = value.get("stretch", "auto")
        if stretch not in ("auto", "minmax", "none"):
            raise _invalid("raster.stretch must be auto, minmax or none")
        value_range = value.get("range")
        if value_range is not None:
            value_range = _value_range(value_range, bands)
        return cls(bands=bands, nodata=nodata, stretch=stretch, value_range=value_range)

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"stretch": self.stretch}
        if self.bands is not None:
            wire["bands"] = list(self.bands)
        if self.nodata is not None:
            wire["nodata"] = self.nodata
        if self.value_range is not None:
            wire["range"] = [list(pair) for pair in self.value_range]
        return wire


def _value_range(value: Any, bands: tuple[int, ...] | None) -> tuple[tuple[float, float], ...]:
    """``raster.range``: 1 or 3 ``[low, high]`` pairs of finite numbers, low < high, one per
    output channel (as many as ``raster.bands`` names, when it names them)."""
    if not isinstance(value, list) or len(value) not in (1, 3) or not all(
            isinstance(pair, list) and len(pair) == 2 for pair in value):
        raise _invalid("raster.range must list 1 or 3 [low, high] pairs (one per channel)")
    if bands is not None and len(bands) != len(value):
        raise _invalid(f"raster.range has {len(value)} pairs for {len(bands)} bands")
    pairs = tuple((_finite_number(lo, "raster.range"), _finite_number(hi, "raster.range"))
                  for lo, hi in value)
    if not all(lo < hi for lo, hi in pairs):
        raise _invalid("raster.range: each low must be below its high")
    return pairs

