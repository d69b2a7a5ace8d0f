"""``unigeoseg predict RASTER --text ... --whole-raster``: a text prompt over the whole raster.

The raster is cut into overlapping tiles (:func:`~..geo.tiling.tile_grid`), read window by
window. Each tile is converted to RGB like the service does (``to_rgb8``: uint8 kept, other
types percentile-stretched per tile), encoded and prompted with the text by the UniGeoSeg
engine, in groups of ``--batch-size`` tiles (row-major). Each tile's *core* (the tile less half
the overlap on sides with a neighbour; cores partition the raster) is pasted into the buffer of
its tile row; a finished row is one strip for :class:`~..geo.tiling.StripPolygonizer`, which
merges regions across strip seams, so a region crossing tiles is one polygon, exactly the
polygon of the stitched mask. Seams between tiles of one row need no merging: the strip is
polygonised whole.

With the model on a GPU, reading (one batch ahead) and vectorizing (finished strips) run on
threads of their own, so the device is not left waiting for the disk or for GEOS; on the CPU
they run inline. The summary line says where the time went.

Polygons are appended to a GeoPackage built in a private folder next to the output, which is
moved onto the output only once complete: an error or Ctrl+C leaves no output file (and
removes the folder). Memory holds at most the rows of tiles in flight (a strip is one tile row
of cores, ``core_height x width`` bools), a batch of tiles, and the regions open across the
last seam, whatever the raster's size.

Attributes are those ``unigeoseg predict`` writes: ``score``, ``engine``, ``model``, ``task``,
``prompt``, ``created``. A polygon's ``score`` is the mean of its tiles' scores weighted by
its area in each tile's core (a tile's score is the engine's mean sigmoid inside that tile's
mask); for a polygon inside one core it is that tile's score.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import rasterio
import shapely

from unigeoseg_protocol.params import Prompt, RasterOptions

from ..errors import CRSError, InvalidInputError, NoValidPixelsError

logger = logging.getLogger(__name__)

LAYER = "segments"


def add_whole_raster_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the whole-raster run (added to ``unigeoseg predict``)."""
    p.add_argument("--whole-raster", action="store_true",
                   help="with --text: segment the whole raster tile by tile (seams merged, "
                        "streamed to the output; see --tile, --overlap, --batch-size)")
    p.add_argument("--tile", type=int, default=512, help="whole-raster tile side in px "
                                                         "(default 512)")
    p.add_argument("--overlap", type=int, default=64,
                   help="whole-raster overlap between neighbouring tiles in px (default 64)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="whole-raster tiles read and segmented per group (default 8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--gdal-cache-mb", type=int, default=128,
                   help="whole-raster GDAL block cache in MB (default 128; GDAL's own default, "
                        "5%% of RAM, would fill with the raster's blocks as they are read)")


def run_predict_raster(args: argparse.Namespace) -> int:
    from ..geo.crs import parse_crs
    from ..geo.tiling import StripPolygonizer, axis_spans, tile_grid

    text = args.text.strip() if args.text else ""
    if not text:
        raise InvalidInputError("--whole-raster needs a non-empty --text")
    if args.point or args.box is not None:
        raise InvalidInputError("--whole-raster takes --text only (no --point / --box)")
    if args.server:
        raise InvalidInputError("--whole-raster runs in this process; drop --server")
    from ..runtime import MODEL_ENV, configured_model

    if configured_model(args.model) is None:
        raise InvalidInputError(f"--whole-raster needs --model (the UniGeoSeg model) or "
                                f"${MODEL_ENV}")
    output = Path(args.output)
    if output.suffix.lower() != ".gpkg":
        raise InvalidInputError(f"--whole-raster writes a GeoPackage: name the output *.gpkg, "
                                f"got {output.name!r}")
    if output.exists() and not args.overwrite:
        raise InvalidInputError(f"{output} exists; pass --overwrite to replace it")
    if args.batch_size < 1:
        raise InvalidInputError(f"--batch-size must be >= 1, got {args.batch_size}")
    bands = [int(b) for b in args.bands.split(",")] if args.bands else None
    prompt = Prompt(text=text, task=args.task)

    with rasterio.Env(GDAL_CACHEMAX=max(1, args.gdal_cache_mb) * 2**20), \
            rasterio.open(args.raster) as dataset:
        if dataset.crs is None:
            raise CRSError(f"{args.raster} has no CRS; georeference it first")
        raster_crs = parse_crs(dataset.crs.to_wkt())
        width, height, transform = dataset.width, dataset.height, dataset.transform
        tiles = tile_grid(width, height, args.tile, args.overlap)
        row_spans = axis_spans(height, args.tile, args.overlap)
        col_spans = axis_spans(width, args.tile, args.overlap)
        engine = _load_engine(args)
        polygonizer = StripPolygonizer(
            transform, width, [s.core_stop - s.core_start for s in row_spans],
            simplify=args.simplify, min_area=args.min_area)
        base = {"engine": engine.name, "model": engine.model_id, "task": prompt.task,
                "prompt": text,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        col_bounds = np.array([s.core_start for s in col_spans] + [width], dtype=np.float64)
        row_bounds = np.array([s.core_start for s in row_spans] + [height], dtype=np.float64)
        scores = np.zeros((len(row_spans), len(col_spans)))
        writer = _StreamingGpkg(output, raster_crs, overwrite=args.overwrite)
        with writer:
            strips: dict[int, np.ndarray] = {}
            left_in_row = {i: len(col_spans) for i in range(len(row_spans))}
            next_row = 0
            start = time.perf_counter()
            stages = _StageTimes()
            batches = [tiles[b0:b0 + args.batch_size]
                       for b0 in range(0, len(tiles), args.batch_size)]
            on_gpu = engine.device.type == "cuda"
            with _progress(len(tiles), disabled=args.no_progress) as bar, \
                    _Lane("read", on_gpu) as reader, _Lane("vectorize", on_gpu) as lane:
                vectorizer = _StripVectorizer(polygonizer, writer.add,
                                              (base, scores, row_bounds, col_bounds), lane)
                pending = reader.submit(_read_batch, dataset, batches[0], bands)
                for index, batch in enumerate(batches):
                    with stages.timing("read"):  # only the wait, when the reader runs ahead
                        pixels = pending.result()
                    if index + 1 < len(batches):
                        pending = reader.submit(_read_batch, dataset, batches[index + 1], bands)
                    with stages.timing("segment"):
                        results = list(_segment_batch(pixels, engine, prompt))
                    for tile, (mask, score) in zip(batch, results, strict=True):
                        core = tile.core
                        strip = strips.get(tile.row)
                        if strip is None:
                            strip = strips[tile.row] = np.zeros((int(core.height), width), bool)
                        rows, cols = tile.core_in_tile
                        c0 = int(core.col_off)
                        strip[:, c0:c0 + int(core.width)] = mask[rows, cols]
                        scores[tile.row, tile.col] = score
                        left_in_row[tile.row] -= 1
                        bar.update(1)
                    with stages.timing("vectorize"):  # inline, or waiting for the thread
                        while next_row in left_in_row and left_in_row[next_row] == 0:
                            vectorizer.feed(strips.pop(next_row))
                            next_row += 1
                with stages.timing("vectorize"):
                    vectorizer.finish()
            writer.commit()
        elapsed = time.perf_counter() - start
    print(f"{writer.count} polygon(s) written to {output} ({len(tiles)} tiles in "
          f"{elapsed:.1f} s, {len(tiles) / max(elapsed, 1e-9):.2f} tiles/s; {stages}; model "
          f"{engine.model_id})")
    return 0


def _load_engine(args: argparse.Namespace):
    from ..runtime import configured_model, load_text_engine, resolve_model, select_device

    return load_text_engine(resolve_model(configured_model(args.model)),
                            select_device(args.device))


class _StageTimes:
    """Seconds spent per stage of the loop, for the summary line (where the time goes)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def timing(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def __str__(self) -> str:
        return ", ".join(f"{stage} {s:.1f} s" for stage, s in self.seconds.items())


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

    def submit(self, fn, *args) -> Future:
        if self.pool is not None:
            return self.pool.submit(fn, *args)
        done: Future = Future()
        done.set_result(fn(*args))
        return done


class _StripVectorizer:
    """Polygonizes finished strips, in order, and appends their polygons to the output, on
    ``lane``. At most ``max_waiting`` strips wait for a threaded lane, so memory stays bounded
    when vectorizing is the slower side."""

    def __init__(self, polygonizer, add, add_args: tuple, lane: _Lane, max_waiting: int = 2):
        self.polygonizer, self.add, self.add_args = polygonizer, add, add_args
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
        self.add(self.polygonizer.finish(), *self.add_args)

    def _vectorize(self, strip: np.ndarray) -> None:
        self.add(self.polygonizer.feed(strip), *self.add_args)


def _read_batch(dataset, batch, bands) -> list[tuple[np.ndarray | None, np.ndarray]]:
    """(RGB uint8 or None, valid-pixel mask) of each tile of ``batch``; the RGB is None for a
    tile with no valid pixel (its mask is then all False).

    Runs on the read lane, the only user of ``dataset`` while the loop runs."""
    from ..geo.pixels import to_rgb8
    from ..geo.raster_io import read_tile

    out: list[tuple[np.ndarray | None, np.ndarray]] = []
    for tile in batch:
        pixels = read_tile(dataset, tile.window, bands).pixels
        try:
            out.append(to_rgb8(pixels, RasterOptions()))
        except NoValidPixelsError:
            out.append((None, np.zeros(pixels.shape[:2], bool)))
    return out


def _segment_batch(pixels, engine, prompt):
    """(mask on the tile, score) of each tile: the tiles with valid pixels as one batch."""
    predictions = iter(engine.segment_tiles([rgb for rgb, _ in pixels if rgb is not None],
                                            prompt))
    for rgb, valid in pixels:
        if rgb is None:
            yield valid, 0.0  # nodata only: nothing to segment
            continue
        prediction = next(predictions)
        yield prediction.mask & valid, float(prediction.score)


def _progress(total: int, disabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="tile", disable=disabled, file=sys.stderr,
                dynamic_ncols=True, desc="segmenting")


def _score(pixel: shapely.Polygon, scores: np.ndarray, row_bounds: np.ndarray,
           col_bounds: np.ndarray) -> float:
    """Mean of the tile scores weighted by the polygon's area in each tile core."""
    x0, y0, x1, y1 = pixel.bounds
    r0 = int(np.searchsorted(row_bounds, y0, side="right")) - 1
    r1 = int(np.searchsorted(row_bounds, y1, side="left"))
    c0 = int(np.searchsorted(col_bounds, x0, side="right")) - 1
    c1 = int(np.searchsorted(col_bounds, x1, side="left"))
    if r1 - r0 == 1 and c1 - c0 == 1:
        return float(scores[r0, c0])
    total = weight = 0.0
    for r in range(r0, r1):
        for c in range(c0, c1):
            part = shapely.intersection(pixel, shapely.box(
                col_bounds[c], row_bounds[r], col_bounds[c + 1], row_bounds[r + 1])).area
            total += part * scores[r, c]
            weight += part
    return float(total / weight) if weight else 0.0


class _StreamingGpkg:
    """Appends features to a GeoPackage in a private folder next to ``path``; :meth:`commit`
    moves it onto ``path``. Leaving the ``with`` block removes the folder (and so the partial
    file) whatever happened."""

    def __init__(self, path: Path, crs, overwrite: bool):
        self.path, self.crs, self.overwrite = path, crs, overwrite
        self.count = 0
        self._geoms: list[shapely.Polygon] = []
        self._props: list[dict] = []
        self._created = False

    def __enter__(self) -> _StreamingGpkg:
        self.dir = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".tmp",
                                         dir=self.path.parent))
        self.tmp = self.dir / self.path.name
        return self

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def add(self, regions, base: dict, scores, row_bounds, col_bounds) -> None:
        for region in regions:
            self._geoms.append(region.polygon)
            self._props.append({"score": _score(region.pixel, scores, row_bounds, col_bounds),
                                **base})
        if self._geoms:
            self._flush()  # one append per strip: nothing accumulates in memory

    def _flush(self) -> None:
        from ..geo.vector_io import write_layer

        if not self._geoms and self._created:
            return
        write_layer(self.tmp, "GPKG", LAYER, self._geoms, self._props or None, self.crs,
                     append=self._created)
        self._created = True
        self.count += len(self._geoms)
        self._geoms, self._props = [], []

    def commit(self) -> None:
        from ..geo.vector_io import check_written_crs, commit_file

        self._flush()
        check_written_crs(self.tmp, LAYER, self.crs)
        commit_file(self.tmp, self.path, self.overwrite)
