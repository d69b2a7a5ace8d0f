"""A text prompt over a whole raster, into a GeoPackage, in bounded memory.

The raster is cut into overlapping tiles (:func:`~..geo.tiling.tile_grid`), read window by
window. Each tile is converted to RGB like the service does (``to_rgb8``: uint8 kept), except
that wider types get one stretch for the whole raster (its 2nd..98th percentiles per band,
from a decimated read of at most :data:`STRETCH_SAMPLE_PX` a side), so tiles of open water
and tiles of land show the same water alike; then it is segmented with the prompt by the engine's
``segment_tiles``, in groups of ``batch_size`` tiles (row-major), each tile on its grid (the
raster's CRS and the window's transform) for an engine that reads the georeference. Each
tile's *core* (the tile less half the overlap on sides with a neighbour; cores partition the
raster) is pasted into the buffer of its tile row; a finished row is one strip for
:class:`~..geo.tiling.StripPolygonizer`, which merges regions across strip seams, so a region
crossing tiles is one polygon, exactly the polygon of the stitched mask. Seams between tiles of
one row need no merging: the strip is polygonised whole.

With the model on a GPU, reading (one batch ahead) and vectorizing (finished strips) run on
threads of their own, so the device is not left waiting for the disk or for GEOS; on the CPU
they run inline (the model's threads already use every core). :class:`RasterRunSummary` says
where the time went.

Polygons are appended to a :class:`~..geo.vector_io.StagedLayer`, moved onto the output only
once complete: an error, a cancellation or Ctrl+C leaves no output file. Memory holds at most
the rows of tiles in flight (a strip is one tile row of cores, ``core_height x width`` bools), a
batch of tiles, and the regions open across the last seam, whatever the raster's size.

Attributes are those of every segment (``Segmenter``): ``score``, ``engine``, ``model``,
``task``, ``prompt``, ``created``. A polygon's ``score`` is the mean of its tiles' scores
weighted by its area in each tile's core; for a polygon inside one core it is that tile's score.
What the engine said about its answers (``Prediction.message``: an assumption it made, a prompt
it did not understand) is in the summary, each distinct message once.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import shapely
from rasterio.windows import Window

from unigeoseg_protocol.params import Prompt, RasterOptions

from ..engines.base import Engine, Prediction, TilePrompt
from ..errors import CRSError, InvalidInputError, NoValidPixelsError
from ..geo.crs import parse_crs
from ..geo.grid import TileGrid
from ..geo.pixels import percentile_ranges, to_rgb8
from ..geo.raster_io import read_tile
from ..geo.tiling import AxisSpan, Region, StripPolygonizer, Tile, axis_spans, tile_grid
from ..geo.vector_io import StagedLayer
from ..segmenter import CancelToken, ProgressCallback, provenance, to_tile_prompt

LAYER = "segments"


@dataclass(frozen=True)
class RasterRunOptions:
    """How a whole raster is cut, read, segmented and written.

    Attributes:
        tile: tile side in px.
        overlap: overlap between neighbouring tiles in px (``0 <= overlap < tile``).
        batch_size: tiles read and segmented per group.
        bands: 1-based bands used as R, G, B (or one grey band); None picks them as the
            service does.
        simplify: polygon simplification tolerance in map units (0: exact pixel outlines).
        min_area: smallest polygon kept, in square map units.
        gdal_cache_mb: GDAL block cache (GDAL's own default, 5% of RAM, would fill with the
            raster's blocks as they are read).
        overwrite: replace an existing output.
    """

    tile: int = 512
    overlap: int = 64
    batch_size: int = 8
    bands: tuple[int, ...] | None = None
    simplify: float = 0.0
    min_area: float = 0.0
    gdal_cache_mb: int = 128
    overwrite: bool = False


@dataclass(frozen=True)
class RasterRunSummary:
    """What a run wrote and where its time went."""

    output: Path
    polygons: int
    tiles: int
    seconds: float
    model: str
    stage_seconds: dict[str, float] = field(default_factory=dict)
    #: The engine's distinct messages on the run's tiles, in the order they first came.
    messages: tuple[str, ...] = ()

    def __str__(self) -> str:
        stages = ", ".join(f"{stage} {s:.1f} s" for stage, s in self.stage_seconds.items())
        said = "".join(f"\n{message}" for message in self.messages)
        return (f"{self.polygons} polygon(s) written to {self.output} ({self.tiles} tiles in "
                f"{self.seconds:.1f} s, {self.tiles / max(self.seconds, 1e-9):.2f} tiles/s; "
                f"{stages}; model {self.model}){said}")


#: The longest side of the decimated read a whole raster's stretch is computed on.
STRETCH_SAMPLE_PX = 1024


def raster_rgb_options(dataset: rasterio.DatasetReader, bands: list[int] | None
                       ) -> RasterOptions:
    """How every tile of ``dataset`` becomes RGB: 8-bit values kept (also where nodata made
    a tile float), wider types with one stretch for the whole raster."""
    if all(dtype == "uint8" for dtype in dataset.dtypes):
        return RasterOptions(stretch="none")
    return RasterOptions(value_range=raster_value_range(dataset, bands))


def raster_value_range(dataset: rasterio.DatasetReader, bands: list[int] | None
                       ) -> tuple[tuple[float, float], ...] | None:
    """One stretch for every tile of ``dataset`` (``RasterOptions.value_range``): the
    percentiles of a decimated read, or None for 8-bit rasters (kept as they are)."""
    if all(dtype == "uint8" for dtype in dataset.dtypes):
        return None
    sample = read_tile(dataset, Window(0, 0, dataset.width, dataset.height), bands,
                       max_side_px=STRETCH_SAMPLE_PX)
    try:
        return percentile_ranges(sample.pixels, RasterOptions())
    except NoValidPixelsError:
        return None             # every tile is then nodata too, and says so


def segment_raster(raster: str | Path, prompt: Prompt, engine: Engine, output: str | Path,
                   options: RasterRunOptions = RasterRunOptions(),
                   progress: ProgressCallback | None = None,
                   cancel: CancelToken | None = None) -> RasterRunSummary:
    """Segment a text ``prompt`` over the whole ``raster`` and write the polygons (raster CRS)
    to the GeoPackage ``output``.

    Args:
        prompt: a referring or reasoning text prompt (no points, no box).
        engine: an engine whose capabilities take the prompt's task.
        progress: called with (tiles done, tiles in all, text) after each batch.
        cancel: checked before each batch; a cancelled run writes nothing.

    Raises:
        InvalidInputError: a prompt with geometry, an output not named ``*.gpkg``, an existing
            output without ``overwrite``, a bad tiling or batch size.
        EmptyPromptError, EngineUnavailableError: the engine cannot answer the prompt.
        CRSError: the raster has no CRS.
    """
    if prompt.points or prompt.box is not None:
        raise InvalidInputError("a whole-raster run takes a text prompt only (no points or box)")
    tile_prompt = to_tile_prompt(prompt)
    engine.capabilities.check(tile_prompt, engine.title)
    output = Path(output)
    if output.suffix.lower() != ".gpkg":
        raise InvalidInputError(f"a whole-raster run writes a GeoPackage: name the output "
                                f"*.gpkg, got {output.name!r}")
    if options.batch_size < 1:
        raise InvalidInputError(f"the batch size must be >= 1, got {options.batch_size}")
    bands = list(options.bands) if options.bands else None
    stages = _StageTimes()
    start = time.perf_counter()
    with rasterio.Env(GDAL_CACHEMAX=max(1, options.gdal_cache_mb) * 2**20), \
            rasterio.open(raster) as dataset:
        if dataset.crs is None:
            raise CRSError(f"{raster} has no CRS; georeference it first")
        width, height = dataset.width, dataset.height
        tiles = tile_grid(width, height, options.tile, options.overlap)
        rgb_options = raster_rgb_options(dataset, bands)
        row_spans = axis_spans(height, options.tile, options.overlap)
        col_spans = axis_spans(width, options.tile, options.overlap)
        polygonizer = StripPolygonizer(
            dataset.transform, width, [s.core_stop - s.core_start for s in row_spans],
            simplify=options.simplify, min_area=options.min_area)
        scores = _TileScores(row_spans, col_spans, width, height)
        base = provenance(engine, prompt)
        crs = parse_crs(dataset.crs.to_wkt())
        messages: dict[str, None] = {}  # an ordered set
        with StagedLayer(output, crs, LAYER,
                         options.overwrite) as staged:

            def write(regions: list[Region]) -> None:
                staged.append([r.polygon for r in regions],
                              [{"score": scores.of(r.pixel), **base} for r in regions])

            strips = _StripAssembler(len(row_spans), len(col_spans), width)
            batches = [tiles[b0:b0 + options.batch_size]
                       for b0 in range(0, len(tiles), options.batch_size)]
            on_gpu = engine.device.type == "cuda"
            with _Lane("read", on_gpu) as reader, _Lane("vectorize", on_gpu) as lane:
                vectorizer = _StripVectorizer(polygonizer, write, lane)
                pending = reader.submit(_read_batch, dataset, batches[0], bands, rgb_options)
                done = 0
                for index, batch in enumerate(batches):
                    if cancel is not None:
                        cancel.check()
                    with stages.timing("read"):  # only the wait, when the reader runs ahead
                        pixels = pending.result()
                    if index + 1 < len(batches):
                        pending = reader.submit(_read_batch, dataset, batches[index + 1], bands,
                                                rgb_options)
                    with stages.timing("segment"):
                        results = list(_segment_batch(pixels, engine, tile_prompt))
                    for tile, (mask, score, message) in zip(batch, results, strict=True):
                        strips.paste(tile, mask)
                        scores.set(tile, score)
                        if message:
                            messages[message] = None
                    done += len(batch)
                    if progress is not None:
                        progress(done, len(tiles), "segmenting")
                    with stages.timing("vectorize"):  # inline, or waiting for the thread
                        for strip in strips.finished_rows():
                            vectorizer.feed(strip)
                with stages.timing("vectorize"):
                    vectorizer.finish()
            staged.commit()
    return RasterRunSummary(output=output, polygons=staged.count, tiles=len(tiles),
                            seconds=time.perf_counter() - start, model=engine.model_id,
                            stage_seconds=stages.seconds, messages=tuple(messages))


class _StripAssembler:
    """Pastes tile cores into the buffer of their tile row and hands out finished rows (strips
    of ``core_height x width`` bools), top to bottom."""

    def __init__(self, n_rows: int, n_cols: int, width: int) -> None:
        self.width = width
        self.strips: dict[int, np.ndarray] = {}
        self.left_in_row = {i: n_cols for i in range(n_rows)}
        self.next_row = 0

    def paste(self, tile: Tile, mask: np.ndarray) -> None:
        core = tile.core
        strip = self.strips.get(tile.row)
        if strip is None:
            strip = self.strips[tile.row] = np.zeros((int(core.height), self.width), bool)
        rows, cols = tile.core_in_tile
        c0 = int(core.col_off)
        strip[:, c0:c0 + int(core.width)] = mask[rows, cols]
        self.left_in_row[tile.row] -= 1

    def finished_rows(self) -> Iterator[np.ndarray]:
        while self.left_in_row.get(self.next_row) == 0:
            yield self.strips.pop(self.next_row)
            self.next_row += 1


class _TileScores:
    """Each tile's score, and a polygon's: the mean of its tiles' scores weighted by its area
    in each tile core."""

    def __init__(self, row_spans: Sequence[AxisSpan], col_spans: Sequence[AxisSpan],
                 width: int, height: int) -> None:
        self.scores = np.zeros((len(row_spans), len(col_spans)))
        self.col_bounds = np.array([s.core_start for s in col_spans] + [width], np.float64)
        self.row_bounds = np.array([s.core_start for s in row_spans] + [height], np.float64)

    def set(self, tile: Tile, score: float) -> None:
        self.scores[tile.row, tile.col] = score

    def of(self, pixel: shapely.Polygon) -> float:
        """The score of a polygon given in the raster's pixel space (col, row)."""
        x0, y0, x1, y1 = pixel.bounds
        r0 = int(np.searchsorted(self.row_bounds, y0, side="right")) - 1
        r1 = int(np.searchsorted(self.row_bounds, y1, side="left"))
        c0 = int(np.searchsorted(self.col_bounds, x0, side="right")) - 1
        c1 = int(np.searchsorted(self.col_bounds, x1, side="left"))
        if r1 - r0 == 1 and c1 - c0 == 1:
            return float(self.scores[r0, c0])
        total = weight = 0.0
        for r in range(r0, r1):
            for c in range(c0, c1):
                part = shapely.intersection(pixel, shapely.box(
                    self.col_bounds[c], self.row_bounds[r], self.col_bounds[c + 1],
                    self.row_bounds[r + 1])).area
                total += part * self.scores[r, c]
                weight += part
        return float(total / weight) if weight else 0.0


class _StageTimes:
    """Seconds spent per stage of the loop (where the time goes)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def timing(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


class _Lane:
    """Runs calls in order on one worker: a thread of its own when ``threaded`` (the model is
    on a GPU, and the calls overlap its work), else inline (on the CPU the model's threads
    already use every core, and another thread only contends with them). ``submit`` returns
    a Future either way; inline, an error is raised at once."""

    def __init__(self, name: str, threaded: bool) -> None:
        self.pool = ThreadPoolExecutor(1, thread_name_prefix=name) if threaded else None

    def __enter__(self) -> _Lane:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        if self.pool is not None:
            return self.pool.submit(fn, *args)
        done: Future = Future()
        done.set_result(fn(*args))
        return done


class _StripVectorizer:
    """Polygonizes finished strips, in order, and hands their regions to ``add``, on ``lane``.
    At most ``max_waiting`` strips wait for a threaded lane, so memory stays bounded when
    vectorizing is the slower side."""

    def __init__(self, polygonizer: StripPolygonizer, add: Callable[[list[Region]], None],
                 lane: _Lane, max_waiting: int = 2):
        self.polygonizer, self.add = polygonizer, add
        self.lane, self.max_waiting = lane, max_waiting
        self.waiting: deque[Future] = deque()

    def feed(self, strip: np.ndarray) -> None:
        while len(self.waiting) >= self.max_waiting:
            self.waiting.popleft().result()  # re-raises the thread's error, if any
        self.waiting.append(self.lane.submit(self._vectorize, strip))

    def finish(self) -> None:
        """Wait for every strip, then close the regions still open at the last seam."""
        while self.waiting:
            self.waiting.popleft().result()
        self.add(self.polygonizer.finish())

    def _vectorize(self, strip: np.ndarray) -> None:
        self.add(self.polygonizer.feed(strip))


@dataclass(frozen=True)
class _TilePixels:
    """One tile as read: RGB uint8 (None for a tile with no valid pixel), its valid-pixel
    mask (all False then) and its grid (the raster's CRS, the window's transform)."""

    rgb: np.ndarray | None
    valid: np.ndarray
    grid: TileGrid


def _read_batch(dataset: rasterio.DatasetReader, batch: list[Tile],
                bands: list[int] | None, rgb_options: RasterOptions) -> list[_TilePixels]:
    """Each tile of ``batch`` read from ``dataset``, on the grid of its georeference (the
    raster's CRS, the window's transform).

    Runs on the read lane, the only user of ``dataset`` while the loop runs."""
    out: list[_TilePixels] = []
    for tile in batch:
        read = read_tile(dataset, tile.window, bands)
        height, width = read.pixels.shape[:2]
        grid = TileGrid.from_georeference(read.georeference, width, height)
        try:
            rgb, valid = to_rgb8(read.pixels, rgb_options)
            out.append(_TilePixels(rgb, valid, grid))
        except NoValidPixelsError:
            out.append(_TilePixels(None, np.zeros((height, width), bool), grid))
    return out


def _segment_batch(pixels: list[_TilePixels], engine: Engine, prompt: TilePrompt
                   ) -> Iterator[tuple[np.ndarray, float, str]]:
    """(mask on the tile, score, the engine's message) of each tile: the tiles with valid
    pixels as one batch."""
    segmented = [tile for tile in pixels if tile.rgb is not None]
    predictions: Iterator[Prediction] = iter(engine.segment_tiles(
        [tile.rgb for tile in segmented if tile.rgb is not None], prompt,
        [tile.grid for tile in segmented]))
    for tile in pixels:
        if tile.rgb is None:
            yield tile.valid, 0.0, ""  # nodata only: nothing to segment
            continue
        prediction = next(predictions)
        yield prediction.mask & tile.valid, float(prediction.score), prediction.message
