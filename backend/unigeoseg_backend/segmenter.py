"""From a georeferenced tile and a prompt to georeferenced polygons.

The :class:`Segmenter` is what the service's worker and ``unigeoseg predict`` both call. It keeps
uploaded tiles and image embeddings in byte-bounded LRU caches keyed by image id, so that every
prompt after the first on a tile runs only the engine's prompt decoder. Engines are reached
through one interface (``engines/base.py``) and an :class:`EngineRegistry` of what this process
offers; the segmenter converts a prompt to the tile's pixel frame once, and keeps, per object,
the previous logits of engines that take mask feedback.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

import numpy as np

from unigeoseg_protocol.operations import SegmentReply, SetImageReply
from unigeoseg_protocol.params import Georeference, Prompt, RasterOptions, SegmentOptions
from unigeoseg_protocol.vocabulary import default_engine

from .engines.base import Capabilities, Engine, TilePrompt, encode_tile, nbytes_of
from .engines.cache import ByteLRUCache
from .errors import (
    CancelledError,
    DeadlineExceededError,
    EngineUnavailableError,
    InvalidInputError,
    OutOfBoundsError,
    UnknownImageError,
)
from .geo.crs import parse_crs
from .geo.grid import TileGrid
from .geo.pixels import to_rgb8
from .geo.vectorize import feature_collection, mask_to_polygons, reproject_geometries

ProgressCallback = Callable[[int, int, str], None]


class CancelToken:
    """Set when a request is cancelled or runs out of time; checked between stages."""

    def __init__(self, deadline: float | None = None):
        self.deadline = deadline  # time.monotonic() value, or None for no deadline
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def check(self) -> None:
        if self._cancelled.is_set():
            raise CancelledError("the request was cancelled")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise DeadlineExceededError("the request ran past its timeout")


@dataclass
class ImageRecord:
    """An uploaded tile: the model-ready RGB, which pixels hold data, and where it is."""

    image_id: str
    grid: TileGrid
    rgb: np.ndarray    # H x W x 3 uint8
    valid: np.ndarray  # H x W bool, False for nodata / NaN

    @property
    def nbytes(self) -> int:
        return self.rgb.nbytes + self.valid.nbytes


def image_id_for(pixels: np.ndarray, georeference: Georeference, raster: RasterOptions) -> str:
    """Content hash of a tile: the same pixels at the same place get the same id (and cache)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps([pixels.dtype.str, pixels.shape, georeference.to_wire(),
                              raster.to_wire()], sort_keys=True).encode())
    digest.update(np.ascontiguousarray(pixels).data)
    return digest.hexdigest()


@dataclass(frozen=True)
class EngineOffer:
    """One engine a process offers: its class (name, title, capabilities) and how to build
    it, or why it cannot be offered.

    Attributes:
        kind: the engine's class; what it answers is known before its weights load.
        load: builds the engine (loads weights); None when the engine is unavailable.
        unavailable: why not, when ``load`` is None (a sentence saying how to fix it).
        about: what ``hello`` shows of its model (``Engine.about``), or None.
    """

    kind: type[Engine]
    load: Callable[[], Engine] | None = None
    unavailable: str = ""
    about: dict[str, Any] | None = None


class EngineRegistry:
    """The engines of this process by name, each created on first use (weights load once)."""

    def __init__(self, offers: list[EngineOffer]):
        self._offers = {offer.kind.name: offer for offer in offers}
        self._engines: dict[str, Engine] = {}
        self._lock = threading.Lock()

    def add(self, offer: EngineOffer) -> None:
        """Offer one more engine (a model fine-tuned while the service runs), under
        ``offer.kind.name``; an earlier one of that name, and its loaded engine, are replaced."""
        with self._lock:
            # A new dict rather than an update: other threads iterate the current one unlocked.
            self._offers = {**self._offers, offer.kind.name: offer}
            self._engines = {name: engine for name, engine in self._engines.items()
                             if name != offer.kind.name}

    def available(self) -> list[str]:
        return sorted(name for name, offer in self._offers.items() if offer.load is not None)

    def reasons_unavailable(self) -> dict[str, str]:
        return {name: offer.unavailable for name, offer in self._offers.items()
                if offer.load is None}

    def loaded(self) -> dict[str, str]:
        return {name: engine.model_id for name, engine in self._engines.items()}

    def about(self, name: str) -> dict[str, Any] | None:
        """What ``hello`` shows of engine ``name``'s model (``EngineOffer.about``)."""
        offer = self._offers.get(name)
        return None if offer is None else offer.about

    def capabilities(self, name: str) -> Capabilities | None:
        """What engine ``name`` answers (known before it loads); None for an unknown name."""
        offer = self._offers.get(name)
        return None if offer is None else offer.kind.capabilities

    def tasks(self, name: str) -> list[str]:
        """The prompt tasks engine ``name`` answers."""
        capabilities = self.capabilities(name)
        return [] if capabilities is None else list(capabilities.tasks)

    def check_task(self, name: str, task: str) -> None:
        """Refuse, before anything loads, a task engine ``name`` does not answer; the message
        names the engines that do."""
        offer = self._offers.get(name)
        if offer is None or task in offer.kind.capabilities.tasks:
            return  # an unknown name is refused by get()
        others = tuple(other for other, o in self._offers.items()
                       if task in o.kind.capabilities.tasks)
        error = offer.kind.capabilities.refuse_task(task, offer.kind.title, others)
        error.details["engine"] = name
        raise error

    def get(self, name: str) -> Engine:
        with self._lock:
            if name in self._engines:
                return self._engines[name]
            offer = self._offers.get(name)
            if offer is None or offer.load is None:
                reason = offer.unavailable if offer else f"engine {name!r} is not configured"
                raise EngineUnavailableError(reason, {"engine": name})
            engine = offer.load()
            self._engines[name] = engine
            return engine


class Segmenter:
    """Tiles in, polygons out, with tile and embedding caches.

    Args:
        engines: the engines this backend offers.
        image_cache_bytes: budget for uploaded tiles (RGB + validity).
        embedding_cache_bytes: budget for image embeddings.
    """

    def __init__(self, engines: EngineRegistry, image_cache_bytes: int = 2 << 30,
                 embedding_cache_bytes: int = 2 << 30):
        self.engines = engines
        self.images: ByteLRUCache[ImageRecord] = ByteLRUCache(image_cache_bytes)
        self.embeddings: ByteLRUCache[Any] = ByteLRUCache(embedding_cache_bytes)
        self._object_masks: ByteLRUCache[Any] = ByteLRUCache(64 << 20)
        self.encode_count = 0  # image-encoder runs since start, for status and benchmarks

    # ------------------------------------------------------------------ images

    def add_image(self, pixels: np.ndarray, georeference: Georeference,
                  raster: RasterOptions) -> ImageRecord:
        """Register a tile (or find it already registered) and return its record."""
        image_id = image_id_for(pixels, georeference, raster)
        record = self.images.get(image_id)
        if record is not None:
            return record
        if pixels.ndim not in (2, 3):
            raise InvalidInputError(f"pixels must be H x W or H x W x C, got shape {pixels.shape}")
        height, width = pixels.shape[:2]
        grid = TileGrid.from_georeference(georeference, width=width, height=height)
        rgb, valid = to_rgb8(pixels, raster)
        record = ImageRecord(image_id=image_id, grid=grid, rgb=rgb, valid=valid)
        self.images.put(image_id, record, record.nbytes)
        return record

    def get_image(self, image_id: str) -> ImageRecord:
        record = self.images.get(image_id)
        if record is None:
            raise UnknownImageError(f"image {image_id} is not cached (evicted or never sent); "
                                    f"send it again with set_image", {"image_id": image_id})
        return record

    def embedding(self, record: ImageRecord, engine: Engine,
                  cancel: CancelToken | None = None) -> tuple[Any, bool]:
        """The engine's embedding of a tile: (embedding, was_cached)."""
        key = (record.image_id, engine.model_id)
        cached = self.embeddings.get(key)
        if cached is not None:
            return cached, True
        if cancel is not None:
            cancel.check()
        embedding = encode_tile(engine, record.rgb, record.grid)
        self.encode_count += 1
        self.embeddings.put(key, embedding, nbytes_of(embedding))
        return embedding, False

    def set_image(self, pixels: np.ndarray, georeference: Georeference, raster: RasterOptions,
                  engine_name: str = "sam", cancel: CancelToken | None = None,
                  progress: ProgressCallback | None = None) -> SetImageReply:
        """Register a tile and compute (or reuse) its embedding for ``engine_name``."""
        start = time.perf_counter()
        record = self.add_image(pixels, georeference, raster)
        engine = self.engines.get(engine_name)
        if progress:
            progress(0, 1, f"encoding with {engine.model_id}")
        _, cached = self.embedding(record, engine, cancel)
        if progress:
            progress(1, 1, "embedding cached" if cached else "encoded")
        return SetImageReply(image_id=record.image_id, width=record.grid.width,
                             height=record.grid.height, engine=engine.name,
                             model=engine.model_id, embedding="cached" if cached else "computed",
                             valid_fraction=float(record.valid.mean()),
                             elapsed_ms=round((time.perf_counter() - start) * 1000, 3))

    # ------------------------------------------------------------------ prompts

    def segment(self, record: ImageRecord, prompt: Prompt, options: SegmentOptions,
                cancel: CancelToken | None = None) -> SegmentReply:
        """Segment ``prompt`` on a registered tile and vectorise the mask (the reply the
        service sends as it is)."""
        timings: dict[str, float] = {}
        task = str(prompt.task)  # never None: Prompt fills in the default task
        engine_name = options.engine or default_engine(task, self.engines.available())
        self.engines.check_task(engine_name, task)
        engine = self.engines.get(engine_name)
        output_crs = parse_crs(options.output_crs) if options.output_crs else record.grid.crs
        tile_prompt = to_tile_prompt(prompt, record.grid, options.multimask)
        object_key = (record.image_id, engine.model_id, prompt.object_key)
        feedback = engine.capabilities.mask_feedback and bool(prompt.object_key)
        if feedback:
            tile_prompt = replace(tile_prompt, mask_input=self._object_masks.get(object_key))

        tick = time.perf_counter()
        embedding, cached = self.embedding(record, engine, cancel)
        timings["encode_ms"] = 0.0 if cached else (time.perf_counter() - tick) * 1000
        if cancel is not None:
            cancel.check()

        tick = time.perf_counter()
        prediction = engine.decode(embedding, tile_prompt)
        if feedback:
            logits = prediction.low_res_logits
            self._object_masks.put(object_key, logits, nbytes_of(logits))
        mask = prediction.mask & record.valid
        timings["decode_ms"] = (time.perf_counter() - tick) * 1000
        if cancel is not None:
            cancel.check()

        tick = time.perf_counter()
        polygons = mask_to_polygons(mask, record.grid.transform, simplify=options.simplify,
                                    min_area=options.min_area)
        polygons = reproject_geometries(polygons, record.grid.crs, output_crs)
        properties = {"score": prediction.score, **provenance(engine, prompt)}
        features = feature_collection(polygons, properties, output_crs)
        timings["polygonize_ms"] = (time.perf_counter() - tick) * 1000
        return SegmentReply(image_id=record.image_id, features=features, score=prediction.score,
                            engine=engine.name, model=engine.model_id,
                            mask=mask.astype(np.uint8) if options.return_mask else None,
                            timings_ms={k: round(v, 3) for k, v in timings.items()},
                            message=prediction.message or None)


def to_tile_prompt(prompt: Prompt, grid: TileGrid | None = None,
                   multimask: bool = True) -> TilePrompt:
    """The prompt as engines receive it: points and box in continuous pixel coordinates of
    ``grid``, the tile's (checked against it), task and text as they are. The one conversion
    of a ``Prompt``, for the Segmenter's tiles and the whole-raster pipeline's text prompt.

    Raises:
        ValueError: points or a box without a grid to place them on.
        OutOfBoundsError: a point outside the tile, or a box that misses it.
    """
    points_px = labels = box_px = None
    if grid is None:
        if prompt.points or prompt.box is not None:
            raise ValueError("points and boxes need the tile's grid")
    else:
        src_crs = parse_crs(prompt.crs) if prompt.crs else None
        if prompt.points:
            points_px = grid.map_to_pixel(np.asarray(prompt.points, dtype=np.float64), src_crs)
            grid.check_inside(points_px)
            labels = np.asarray(prompt.labels, dtype=np.int64)
        if prompt.box is not None:
            c0, r0, c1, r1 = grid.box_to_pixel(prompt.box, src_crs)
            clipped = (max(c0, 0.0), max(r0, 0.0), min(c1, grid.width), min(r1, grid.height))
            if clipped[0] >= clipped[2] or clipped[1] >= clipped[3]:
                raise OutOfBoundsError(f"the box {list(prompt.box)} does not overlap the tile",
                                       {"box": list(prompt.box)})
            box_px = np.asarray(clipped, dtype=np.float64)
    return TilePrompt(task=str(prompt.task), text=prompt.text, points=points_px, labels=labels,
                      box=box_px, multimask=multimask)


def provenance(engine: Engine, prompt: Prompt) -> dict[str, Any]:
    """The attributes every output polygon carries besides its score: which engine and model
    answered which prompt, and when."""
    return {"engine": engine.name, "model": engine.model_id, "task": prompt.task,
            "prompt": describe_prompt(prompt),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def describe_prompt(prompt: Prompt) -> str:
    """Short human-readable provenance for the ``prompt`` attribute."""
    if prompt.text:
        return prompt.text
    parts = []
    if prompt.points:
        positive = sum(prompt.labels)
        parts.append(f"{positive} positive, {len(prompt.labels) - positive} negative points")
    if prompt.box is not None:
        parts.append("box " + ",".join(f"{v:.6g}" for v in prompt.box))
    return "; ".join(parts)
