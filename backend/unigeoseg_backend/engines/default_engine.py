"""The default engine: the embedded default model (``default_model/``), on a CPU at
interactive speed, for text, points, a box, or text with points.

It is what answers when no SAM or UniGeoSeg weights are configured
(``unigeoseg_protocol.vocabulary.default_engine``). What it does per tile and prompt:

- :meth:`DefaultEngine.encode` reads the tile's ground pixel size from its georeference
  (:func:`ground_pixel_size`, in metres, at the tile's centre, whatever the CRS's units) and
  resamples the tile into the pixel sizes the model was trained at (the model card's
  ``gsd``), then runs the image encoder once. A tile whose georeference gives no usable
  pixel size (a CRS without a datum, a pixel size outside 5 mm..50 km) is segmented at
  its own resolution, and every answer on it says so (``Prediction.message``).
- :meth:`DefaultEngine.decode` matches the text to a class the model knows
  (``text_encoder.PhraseVocabulary``). An instruction it does not understand, or a class
  asked for on a tile whose pixel size that class was not trained at, gives an empty mask
  and a message saying why and what it does know, never a guess. The model's probability is
  sampled back onto the tile grid exactly (:class:`TileResampling`); with foreground clicks
  the mask is the connected region through them (:func:`region_through_points`), with a box
  the part inside the box. A click alone on an extent class (water, vegetation, clouds:
  :data:`EXTENT_CLASSES`) selects that class's connected extent through it.

A prediction's ``score`` is the model's predicted IoU (0 for an empty mask).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from unigeoseg_protocol.vocabulary import TASKS

from ..default_model.network import OUTPUT_STRIDE, STRIDE, ImageFeatures, PromptBatch
from ..default_model.text_encoder import (
    NotUnderstood,
    PhraseVocabulary,
    default_text_encoder,
)
from ..default_model.weights_io import (
    MODEL_CARD_FILE,
    GsdRange,
    LoadedDefaultModel,
    load_default_model,
    read_model_card,
    shipped_weights_dir,
)
from ..errors import EngineUnavailableError
from ..geo.crs import transformer
from ..geo.grid import TileGrid
from .base import Capabilities, Engine, EngineSettings, Prediction, TilePrompt

NOT_SHIPPED = "the default model's weights are not in this installation yet"

#: Ground pixel sizes outside this range (metres) are taken as no usable georeference: a
#: raster without one often gets an identity transform (1 degree or 1 m "pixels").
PLAUSIBLE_GSD_M = (0.005, 50_000.0)
#: The longest side a tile may be upsampled to (encoder time grows with its area).
MAX_MODEL_SIDE = 2048
#: Classes that are extents rather than objects. A click alone on one of them selects its
#: connected extent through the click, as the class's text prompt maps it: the model's
#: interactive output is trained on 128 px chips and sees a lake or a cloud field only in
#: part. Objects (trees, and classes learnt in a fine-tune) keep the interactive mask.
EXTENT_CLASSES = frozenset({"water", "vegetation", "cloud"})


def ground_pixel_size(grid: TileGrid) -> tuple[float, float] | None:
    """Metres on the ground of one column step and one row step at the centre of ``grid``,
    measured on the CRS's ellipsoid (so Web Mercator's scale and degrees are accounted for),
    or None when the CRS has no datum or the sizes are not plausible (:data:`PLAUSIBLE_GSD_M`).
    """
    geodetic = grid.crs.geodetic_crs
    if geodetic is None:  # an engineering CRS: no ellipsoid to measure on
        return None
    centre = np.array([[grid.width / 2, grid.height / 2]])
    pixels = np.concatenate([centre - 0.5, centre + [[0.5, -0.5]], centre + [[-0.5, 0.5]]])
    geod = grid.crs.get_geod()
    if geod is None:
        return None
    try:
        xy = grid.pixel_to_map(pixels)
        lon, lat = transformer(grid.crs, geodetic).transform(xy[:, 0], xy[:, 1])
        _, _, col_m = geod.inv(lon[0], lat[0], lon[1], lat[1])
        _, _, row_m = geod.inv(lon[0], lat[0], lon[2], lat[2])
    except Exception:  # PROJ raises several types for points it cannot transform
        return None
    low, high = PLAUSIBLE_GSD_M
    if not all(math.isfinite(v) and low <= v <= high for v in (col_m, row_m)):
        return None
    return float(col_m), float(row_m)


@dataclass(frozen=True)
class TileResampling:
    """Where a tile sits in the model's input: resampled from ``tile_shape`` to
    ``model_shape`` pixels, then padded (bottom and right) to ``padded_shape``, a multiple of
    the encoder's stride.

    Frames: tile pixels ``(col, row)`` map to model pixels ``(col * sx, row * sy)`` with
    ``sx = model_w / tile_w`` and ``sy = model_h / tile_h`` (pixel edges to pixel edges), the
    same mapping the image resampling uses.

    Attributes:
        tile_shape, model_shape, padded_shape: (rows, cols).
        tile_gsd_m: the tile's (column, row) ground pixel size, or None when unknown.
        model_gsd_m: the model input's nominal (column, row) ground pixel size (the tile's
            over the scale asked for, before the sizes are rounded to whole pixels), or None.
    """

    tile_shape: tuple[int, int]
    model_shape: tuple[int, int]
    padded_shape: tuple[int, int]
    tile_gsd_m: tuple[float, float] | None
    model_gsd_m: tuple[float, float] | None

    @classmethod
    def plan(cls, tile_shape: tuple[int, int], tile_gsd_m: tuple[float, float] | None,
             trained: GsdRange, max_side: int = MAX_MODEL_SIDE) -> TileResampling:
        """Resample each axis into ``trained`` (a pixel size inside it is kept), upsampling
        no side beyond ``max_side``; an unknown pixel size keeps the tile as it is."""
        height, width = tile_shape
        model_gsd: tuple[float, float] | None = None
        if tile_gsd_m is None:
            model_shape = (height, width)
        else:
            scale_col = tile_gsd_m[0] / trained.clamp(tile_gsd_m[0])  # > 1: upsampling
            scale_row = tile_gsd_m[1] / trained.clamp(tile_gsd_m[1])
            # each side is capped on its own: a tile with tall pixels (degrees far from the
            # equator) upsamples its rows more than its columns
            scale_col = min(scale_col, max(1.0, max_side / width))
            scale_row = min(scale_row, max(1.0, max_side / height))
            model_shape = (max(1, round(height * scale_row)), max(1, round(width * scale_col)))
            model_gsd = (tile_gsd_m[0] / scale_col, tile_gsd_m[1] / scale_row)
        padded = (-(-model_shape[0] // STRIDE) * STRIDE, -(-model_shape[1] // STRIDE) * STRIDE)
        return cls((height, width), model_shape, padded, tile_gsd_m, model_gsd)

    @property
    def scale(self) -> tuple[float, float]:
        """(sx, sy): model pixels per tile pixel along columns and rows."""
        return (self.model_shape[1] / self.tile_shape[1], self.model_shape[0] / self.tile_shape[0])

    def image_to_model(self, rgb: np.ndarray, device: torch.device) -> torch.Tensor:
        """H x W x 3 uint8 -> 1 x 3 x padded_h x padded_w float 0..255 (zeros in the pad)."""
        image = torch.from_numpy(np.ascontiguousarray(rgb)).to(device).permute(2, 0, 1)[None]
        image = image.float()
        if self.model_shape != self.tile_shape:
            shrinking = self.model_shape[0] < self.tile_shape[0] or \
                self.model_shape[1] < self.tile_shape[1]
            image = F.interpolate(image, size=self.model_shape, mode="bilinear",
                                  align_corners=False, antialias=shrinking)
        pad_rows = self.padded_shape[0] - self.model_shape[0]
        pad_cols = self.padded_shape[1] - self.model_shape[1]
        return F.pad(image, (0, pad_cols, 0, pad_rows))

    def points_to_model(self, points: np.ndarray) -> np.ndarray:
        """N x 2 (col, row) tile pixels -> model pixels."""
        return np.asarray(points, dtype=np.float64).reshape(-1, 2) * np.array(self.scale)

    def box_to_model(self, box: np.ndarray) -> np.ndarray:
        """(col_min, row_min, col_max, row_max) tile pixels -> model pixels."""
        return self.points_to_model(np.asarray(box).reshape(2, 2)).reshape(4)

    def logits_to_tile(self, logits: torch.Tensor) -> torch.Tensor:
        """B x 1 x padded_h/4 x padded_w/4 logits -> B x H x W, sampled (bilinear) at each
        tile pixel's centre."""
        height, width = self.tile_shape
        sx, sy = self.scale
        cells_h, cells_w = logits.shape[-2:]
        device = logits.device
        # tile pixel centre -> model pixels -> logit cells -> grid_sample's [-1, 1]
        u = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) * sx / OUTPUT_STRIDE
        v = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) * sy / OUTPUT_STRIDE
        grid_x = (2 * u / cells_w - 1).view(1, 1, width).expand(1, height, width)
        grid_y = (2 * v / cells_h - 1).view(1, height, 1).expand(1, height, width)
        grid = torch.stack([grid_x, grid_y], dim=-1).expand(logits.shape[0], -1, -1, -1)
        return F.grid_sample(logits.float(), grid, mode="bilinear", padding_mode="border",
                             align_corners=False)[:, 0]


@dataclass
class DefaultEmbedding:
    """The cached image side of one tile.

    Attributes:
        features: the image encoder's output (batch of 1).
        resampling: where the tile sits in the model input.
        message: what the analyst should know about every answer on this tile ("" for
            nothing), e.g. that its pixel size was unknown.
    """

    features: ImageFeatures
    resampling: TileResampling
    message: str = ""
    #: tile-grid probability of each extent class, computed at the first click on the tile
    extent_probabilities: dict[str, torch.Tensor] | None = None

    @property
    def nbytes(self) -> int:
        return self.features.nbytes


def _runs_touched(mask: np.ndarray, touched: np.ndarray) -> np.ndarray:
    """The pixels of ``mask`` in a horizontal run (along each row) that holds a pixel of
    ``touched``."""
    flat = mask.ravel()
    starts = flat.copy()
    starts[1:] &= ~flat[:-1]
    starts.reshape(mask.shape)[:, 0] = mask[:, 0]  # each row starts new runs
    run_id = np.cumsum(starts)  # the run each pixel of mask belongs to (0: before any)
    hit = np.zeros(int(run_id[-1]) + 1 if run_id.size else 1, dtype=bool)
    hit[run_id[(touched & mask).ravel()]] = True
    return (flat & hit[run_id]).reshape(mask.shape)


def region_through_points(mask: np.ndarray, points: np.ndarray) -> np.ndarray:
    """The 4-connected regions of H x W bool ``mask`` that hold a pixel under one of the
    N x 2 (col, row) tile-pixel ``points`` (others are dropped).

    Grows whole row runs, then whole column runs, until nothing changes: a few passes for
    compact regions.
    """
    height, width = mask.shape
    cols = np.clip(np.floor(points[:, 0]).astype(int), 0, width - 1)
    rows = np.clip(np.floor(points[:, 1]).astype(int), 0, height - 1)
    grown = np.zeros_like(mask)
    grown[rows, cols] = True
    grown &= mask
    while True:
        wider = _runs_touched(mask, grown)
        wider = _runs_touched(mask.T.copy(), wider.T.copy()).T
        if np.array_equal(wider, grown):
            return grown
        grown = wider


def box_region(shape: tuple[int, int], box: np.ndarray) -> np.ndarray:
    """H x W bool: the tile pixels whose centre lies inside the (col_min, row_min, col_max,
    row_max) ``box``."""
    height, width = shape
    centres_c = np.arange(width) + 0.5
    centres_r = np.arange(height) + 0.5
    c0, r0, c1, r1 = (float(v) for v in box)
    return (((centres_r >= r0) & (centres_r < r1))[:, None]
            & ((centres_c >= c0) & (centres_c < c1))[None, :])


class DefaultEngine(Engine):
    """Encode a tile once (resampled to the trained pixel size), then answer text, points,
    a box, or text with points on it.

    Args:
        loaded: the model, its card and folder (``weights_io.load_default_model``).
        vocabulary: the phrase vocabulary text is matched with; None to build it from the
            default text encoder (all-MiniLM-L6-v2) and the card's classes on first use.
    """

    name = "default"
    title = "the default model"
    capabilities = Capabilities(tasks=TASKS, points=True, background_points=True, box=True,
                                text=True, reads_georeference=True)

    def __init__(self, loaded: LoadedDefaultModel, vocabulary: PhraseVocabulary | None = None):
        self.loaded = loaded
        self.model = loaded.model
        self.card = loaded.card
        self.device = next(self.model.parameters()).device
        self._vocabulary = vocabulary

    @classmethod
    def from_folder(cls, folder: Path, device: torch.device | str = "cpu") -> DefaultEngine:
        return cls(load_default_model(folder, device))

    @staticmethod
    def weights_folder(settings: EngineSettings) -> Path:
        """The weights folder ``settings`` name, else the shipped one.

        Raises:
            EngineUnavailableError: none named and none shipped.
        """
        if settings.default_model is not None:
            return Path(settings.default_model)
        folder = shipped_weights_dir()
        if not (folder / MODEL_CARD_FILE).is_file():
            raise EngineUnavailableError(NOT_SHIPPED)
        return folder

    @classmethod
    def loader(cls, settings: EngineSettings) -> Callable[[], DefaultEngine]:
        folder = cls.weights_folder(settings)
        read_model_card(folder)  # a named folder without a valid card stops here
        return lambda: cls.from_folder(folder, settings.device)

    @classmethod
    def about(cls, settings: EngineSettings) -> dict[str, Any]:
        """The model card's summary: name, version, classes, trained pixel sizes, limits."""
        return read_model_card(cls.weights_folder(settings)).summary()

    @property
    def model_id(self) -> str:
        return self.card.model_id

    @property
    def vocabulary(self) -> PhraseVocabulary:
        if self._vocabulary is None:
            self._vocabulary = PhraseVocabulary(default_text_encoder(),
                                                self.card.known_classes())
        return self._vocabulary

    @torch.inference_mode()
    def encode(self, rgb: np.ndarray, grid: TileGrid | None = None) -> DefaultEmbedding:
        """Resample an H x W x 3 uint8 RGB tile on ``grid`` into the trained pixel sizes and
        run the image encoder. Without a grid, or with one that gives no usable pixel size,
        the tile is encoded as it is and the embedding's message says so."""
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"encode expects H x W x 3 uint8, got {rgb.shape} {rgb.dtype}")
        gsd = None if grid is None else ground_pixel_size(grid)
        message = ""
        if gsd is None:
            what = "no georeference was given" if grid is None else (
                "its georeference gives no usable ground pixel size")
            message = (f"The tile was segmented at its own resolution because {what}; the "
                       f"default model was trained at {self.card.gsd.describe()} pixels.")
        resampling = TileResampling.plan(rgb.shape[:2], gsd, self.card.gsd)
        if gsd is not None and resampling.model_gsd_m is not None and \
                not all(g in self.card.gsd for g in resampling.model_gsd_m):
            message = (f"The tile's {min(gsd):.3g} m pixels were upsampled only to "
                       f"{max(resampling.model_gsd_m):.3g} m (at most {MAX_MODEL_SIDE} px a "
                       f"side); the default model was trained at {self.card.gsd.describe()}.")
        features = self.model.encode_image(resampling.image_to_model(rgb, self.device))
        return DefaultEmbedding(features=features, resampling=resampling, message=message)

    def _refusal(self, embedding: DefaultEmbedding, message: str) -> Prediction:
        return Prediction(mask=np.zeros(embedding.resampling.tile_shape, dtype=bool), score=0.0,
                          low_res_logits=None, message=message)

    def _text_vector(self, embedding: DefaultEmbedding, prompt: TilePrompt
                     ) -> tuple[np.ndarray | None, str | None]:
        """(the embedding of the known phrase the text maps to, or None for no text; a
        refusal message, or None)."""
        if not prompt.text:
            return None, None
        match = self.vocabulary.match(prompt.text)
        if isinstance(match, NotUnderstood):
            has_geometry = prompt.box is not None or prompt.n_foreground > 0
            if match.reason == "empty" and has_geometry:
                return None, None  # "this one" with a click: the click says what
            return None, match.message
        known = self.card.class_card(match.class_name)
        model_gsd = embedding.resampling.model_gsd_m
        if known is not None and model_gsd is not None and \
                not all(g in known.gsd for g in model_gsd):
            return None, (f"The default model finds {match.class_name} at "
                          f"{known.gsd.describe()} pixels; this tile is at "
                          f"{min(embedding.resampling.tile_gsd_m or model_gsd):.3g} m, so it "
                          f"was not asked.")
        return self.vocabulary.encoder.encode([match.phrase])[0], None

    def _prompt_batch(self, embedding: DefaultEmbedding, prompt: TilePrompt,
                      text: np.ndarray | None) -> PromptBatch:
        resampling = embedding.resampling
        points = prompt.points if prompt.points is not None and len(prompt.points) else None
        as_tensor = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
        return PromptBatch.single(
            prompt.task, text=None if text is None else as_tensor(text),
            points=None if points is None else as_tensor(resampling.points_to_model(points)),
            labels=None if points is None else torch.as_tensor(prompt.labels),
            box=None if prompt.box is None else as_tensor(resampling.box_to_model(prompt.box)),
            text_dim=self.model.config.text_dim, device=self.device)

    def _extent_probabilities(self, embedding: DefaultEmbedding) -> dict[str, torch.Tensor]:
        """Each extent class's probability on the tile grid, for the classes trained at
        this tile's pixel size (one batched decode, cached on the embedding)."""
        if embedding.extent_probabilities is None:
            model_gsd = embedding.resampling.model_gsd_m
            names, phrases = [], []
            for known in self.card.known_classes():
                card = self.card.class_card(known.name)
                if known.name not in EXTENT_CLASSES or card is None or (
                        model_gsd is not None and not all(g in card.gsd for g in model_gsd)):
                    continue
                names.append(known.name)
                phrases.append(known.phrases[0])
            probabilities: dict[str, torch.Tensor] = {}
            if names:
                vectors = torch.as_tensor(self.vocabulary.encoder.encode(phrases),
                                          dtype=torch.float32, device=self.device)
                batch = PromptBatch(
                    task=torch.full((len(names),), TASKS.index("referring"), device=self.device),
                    text=vectors, has_text=torch.ones(len(names), dtype=torch.bool,
                                                      device=self.device),
                    points=torch.zeros(len(names), 0, 2, device=self.device),
                    labels=torch.zeros(len(names), 0, dtype=torch.int64, device=self.device),
                    boxes=torch.zeros(len(names), 4, device=self.device),
                    has_box=torch.zeros(len(names), dtype=torch.bool, device=self.device))
                logits, _ = self.model.decode(embedding.features, batch)
                tile = torch.sigmoid(embedding.resampling.logits_to_tile(logits))
                probabilities = dict(zip(names, tile, strict=True))
            embedding.extent_probabilities = probabilities
        return embedding.extent_probabilities

    def _extent_under(self, embedding: DefaultEmbedding, points: np.ndarray
                      ) -> np.ndarray | None:
        """H x W bool: the extent class most probable under the foreground ``points`` (mean
        over them), thresholded; None when no extent class passes the threshold there."""
        probabilities = self._extent_probabilities(embedding)
        if not probabilities:
            return None
        height, width = embedding.resampling.tile_shape
        cols = np.clip(np.floor(points[:, 0]).astype(int), 0, width - 1)
        rows = np.clip(np.floor(points[:, 1]).astype(int), 0, height - 1)
        under = {name: float(p[rows, cols].mean()) for name, p in probabilities.items()}
        name = max(under, key=lambda n: under[n])
        if under[name] <= self.card.mask_threshold:
            return None
        return (probabilities[name] > self.card.mask_threshold).cpu().numpy()

    @torch.inference_mode()
    def _decode(self, embedding: DefaultEmbedding, prompt: TilePrompt) -> Prediction:
        """One mask: text through the vocabulary, the model on the cached features, the
        probability on the tile grid, then the clicks' regions and the box."""
        text, refusal = self._text_vector(embedding, prompt)
        if refusal is not None:
            return self._refusal(embedding, refusal)
        has_points = prompt.points is not None and len(prompt.points) > 0
        if text is None and prompt.box is None and prompt.n_foreground == 0:
            return self._refusal(embedding, "Background points alone do not say what to "
                                            "segment: add a foreground point or a box.")
        logits, iou_logits = self.model.decode(embedding.features,
                                               self._prompt_batch(embedding, prompt, text))
        probability = torch.sigmoid(embedding.resampling.logits_to_tile(logits))[0]
        mask = (probability > self.card.mask_threshold).cpu().numpy()
        if prompt.box is not None:
            mask &= box_region(mask.shape, prompt.box)
        if has_points and prompt.n_foreground:
            foreground = np.asarray(prompt.points)[np.asarray(prompt.labels) == 1]
            if text is None and prompt.box is None:
                extent = self._extent_under(embedding, foreground)
                if extent is not None:
                    mask |= extent
            mask = region_through_points(mask, foreground)
        score = float(torch.sigmoid(iou_logits[0])) if mask.any() else 0.0
        return Prediction(mask=mask, score=score, low_res_logits=logits,
                          message=embedding.message)
