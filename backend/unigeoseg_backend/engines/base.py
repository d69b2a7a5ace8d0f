"""The one interface every segmentation engine implements.

An engine encodes a tile once (:meth:`Engine.encode`, cached by the segmenter per tile and
model) and then decodes any number of prompts on it (:meth:`Engine.decode`). A prompt reaches
the engine as a :class:`TilePrompt`: points and box already in the tile's pixel frame, the
text and task as the user gave them. What an engine can be asked is declared in its
:class:`Capabilities`, so that callers refuse an unanswerable prompt with a typed error before
any model runs, and so that the registry can describe an engine whose weights are not loaded.

A new engine is a module with an :class:`Engine` subclass (``name``, ``title``,
``capabilities``, ``loader``, ``model_id``, ``encode``, ``decode``) and one line in
``runtime.ENGINE_CLASSES``.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from unigeoseg_protocol.vocabulary import TEXT_TASKS

from ..errors import EmptyPromptError, EngineUnavailableError, InvalidInputError

if TYPE_CHECKING:
    from ..geo.grid import TileGrid


@dataclass(frozen=True)
class TilePrompt:
    """A prompt in the frame of one tile, as engines receive it.

    Attributes:
        task: ``interactive``, ``referring`` or ``reasoning`` (``unigeoseg_protocol.vocabulary``).
        text: the instruction (referring, reasoning), or extra wording (interactive); None
            for none.
        points: N x 2 float64 (col, row), continuous tile pixel coordinates: pixel (i, j)
            spans [i, i+1) x [j, j+1).
        labels: N int64, 1 foreground, 0 background; given with ``points``.
        box: (col_min, row_min, col_max, row_max) float64 in the same frame, inside the tile.
        mask_input: ``low_res_logits`` of this object's previous prediction on this tile, for
            engines with ``capabilities.mask_feedback`` (the segmenter keeps it per object).
        multimask: let the engine choose among several candidate masks (SAM's ambiguity
            handling); engines with a single output ignore it.
    """

    task: str
    text: str | None = None
    points: np.ndarray | None = None
    labels: np.ndarray | None = None
    box: np.ndarray | None = None
    mask_input: Any = None
    multimask: bool = True

    @property
    def n_foreground(self) -> int:
        return 0 if self.labels is None else int(np.count_nonzero(np.asarray(self.labels) == 1))


@dataclass
class Prediction:
    """One mask decoded on a tile.

    Attributes:
        mask: H x W bool on the tile grid.
        score: the engine's confidence in ``mask`` in [0, 1] (each engine documents which).
        low_res_logits: the decoder's logits in the engine's own frame; an engine with
            ``capabilities.mask_feedback`` takes them back as ``TilePrompt.mask_input``.
        message: a sentence for the analyst about this answer ("" for none): why the mask
            is empty (a prompt the engine does not understand), or an assumption it made.
    """

    mask: np.ndarray
    score: float
    low_res_logits: Any
    message: str = ""


def nbytes_of(value: Any) -> int:
    """Bytes held by an embedding or logits (numpy array, torch tensor, or ``.nbytes``)."""
    if hasattr(value, "element_size") and hasattr(value, "numel"):
        return int(value.numel() * value.element_size())
    return int(getattr(value, "nbytes", 0))


@dataclass(frozen=True)
class Capabilities:
    """What an engine can be asked.

    Attributes:
        tasks: the tasks it answers, in the order ``hello`` lists them.
        points: it takes points (interactive).
        background_points: it can express background points; an engine without dropping them
            needs at least one foreground point.
        max_points: the most foreground points it takes, or None for no limit.
        box: it takes a box (interactive).
        text: it reads a text instruction.
        mask_feedback: it refines an object from its previous ``low_res_logits``.
        reads_georeference: its ``encode(rgb, grid)`` takes the tile's ``TileGrid`` too (to
            resample by the ground pixel size).
    """

    tasks: tuple[str, ...]
    points: bool = False
    background_points: bool = False
    max_points: int | None = None
    box: bool = False
    text: bool = False
    mask_feedback: bool = False
    reads_georeference: bool = False

    def prompt_kinds(self) -> str:
        """The kinds of prompt it takes, in words: ``point and box``."""
        kinds = [word for taken, word in ((self.points, "point"), (self.box, "box"),
                                          (self.text, "text")) if taken]
        return " and ".join(kinds) if len(kinds) < 3 else f"{kinds[0]}, {kinds[1]} and {kinds[2]}"

    def refuse_task(self, task: str, title: str,
                    alternatives: tuple[str, ...] = ()) -> EngineUnavailableError:
        """The error for a ``task`` this engine does not answer; ``alternatives`` are engines
        that do."""
        message = f"{title} answers {self.prompt_kinds()} prompts only"
        if alternatives:
            message += f"; a {task} prompt needs the {' or '.join(alternatives)} engine"
        else:
            message += f", not {task} prompts"
        return EngineUnavailableError(message, {"task": task, "tasks": list(self.tasks)})

    def check(self, prompt: TilePrompt, title: str) -> None:
        """Refuse, with a typed error in the analyst's words, a prompt this engine cannot answer.

        Raises:
            EngineUnavailableError: the engine does not answer ``prompt.task``.
            EmptyPromptError: a text task without text, or an interactive prompt with neither
                points nor a box.
            InvalidInputError: points the engine cannot express (background only, too many).
        """
        if prompt.task not in self.tasks:
            raise self.refuse_task(prompt.task, title)
        if prompt.task in TEXT_TASKS:
            # Guards the engine API, which runs without the protocol (local predict,
            # segment_raster, scripts); requests from the wire were refused by Prompt.from_wire.
            if not prompt.text:
                raise EmptyPromptError(f"a {prompt.task} prompt needs a text instruction")
            return
        has_points = prompt.points is not None and len(prompt.points) > 0
        if not has_points and prompt.box is None:
            raise EmptyPromptError("an interactive prompt needs points or a box")
        if prompt.box is not None or not has_points:
            return  # a box wins over points for engines that take one
        if not self.background_points and prompt.n_foreground == 0:
            raise InvalidInputError(
                f"{title} takes foreground points only (background points alone cannot be "
                f"asked) or a box: add a foreground point, or use the sam engine",
                {"positive_points": 0})
        if self.max_points is not None and prompt.n_foreground > self.max_points:
            raise InvalidInputError(
                f"{title} takes at most {self.max_points} foreground points (got "
                f"{prompt.n_foreground}); use a box, fewer points, or the sam engine",
                {"positive_points": prompt.n_foreground})


@dataclass(frozen=True)
class EngineSettings:
    """What a process was told about its engines (command line, service config, environment).

    Attributes:
        device: where engines run.
        sam_checkpoint: SAM checkpoint file, or None to look in the weights cache.
        sam_type: SAM architecture (``vit_b``, ``vit_l``, ``vit_h``, ``tiny``).
        model: the UniGeoSeg model (a released-layout directory or a name in the weights
            cache), or None for no text engine.
        default_model: the default model's weights folder (model card and safetensors), or
            None for the one shipped in the package.
    """

    device: Any  # torch.device; typed loosely so this module imports no torch
    sam_checkpoint: Path | None = None
    sam_type: str = "vit_b"
    model: str | os.PathLike[str] | None = None
    default_model: Path | None = None


class Engine(ABC):
    """A segmentation engine: encode a tile once, decode prompts on it.

    Class attributes:
        name: the engine's name in requests (``unigeoseg_protocol.vocabulary.ENGINES``).
        title: how messages name it (``SAM``).
        capabilities: what it can be asked (known before any weights load).

    Attributes:
        device: the ``torch.device`` it runs on.
    """

    name: ClassVar[str]
    title: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    device: Any

    @classmethod
    @abstractmethod
    def loader(cls, settings: EngineSettings) -> Callable[[], Engine]:
        """A function that builds the engine (loading weights), from the process settings.

        Called once at startup; the function it returns runs when the engine is first used.

        Raises:
            EngineUnavailableError: the settings offer no such engine (no weights, no model):
                the message says how to get one; the process runs without it.
            WeightsError: weights were named but are wrong (the process stops with it).
        """

    @classmethod
    def about(cls, settings: EngineSettings) -> dict[str, Any] | None:
        """What ``hello`` shows of the model ``settings`` offer, read without loading it
        (name, version, what it finds, its limits); None for nothing beyond ``model``."""
        return None

    @property
    @abstractmethod
    def model_id(self) -> str:
        """The loaded model's name, e.g. ``sam_vit_b``."""

    @abstractmethod
    def encode(self, rgb: np.ndarray) -> Any:
        """The image side of an H x W x 3 uint8 RGB tile (cached; ``nbytes`` says its size).
        An engine with ``capabilities.reads_georeference`` is called ``encode(rgb, grid)``
        (:func:`encode_tile` makes the right call)."""

    def decode(self, embedding: Any, prompt: TilePrompt) -> Prediction:
        """One mask for ``prompt`` on an encoded tile; refuses what the engine cannot answer."""
        self.capabilities.check(prompt, self.title)
        return self._decode(embedding, prompt)

    @abstractmethod
    def _decode(self, embedding: Any, prompt: TilePrompt) -> Prediction:
        """:meth:`decode` for a prompt that passed ``capabilities.check``."""

    def segment_tiles(self, tiles: list[np.ndarray], prompt: TilePrompt,
                      grids: Sequence[TileGrid] | None = None) -> list[Prediction]:
        """One prompt on several H x W x 3 uint8 tiles (whole-raster runs), each on its grid
        in ``grids`` (None: no georeference). This default encodes and decodes tile by tile;
        an engine that can batch overrides it."""
        tile_grids = [None] * len(tiles) if grids is None else list(grids)
        return [self.decode(encode_tile(self, rgb, grid), prompt)
                for rgb, grid in zip(tiles, tile_grids, strict=True)]


def encode_tile(engine: Engine, rgb: np.ndarray, grid: TileGrid | None) -> Any:
    """``engine.encode`` of an H x W x 3 uint8 tile on ``grid``, handing the grid on only to an
    engine that reads the georeference."""
    if engine.capabilities.reads_georeference:
        return engine.encode(rgb, grid)  # type: ignore[call-arg]
    return engine.encode(rgb)
