"""The text engine: UniGeoSeg (referring, reasoning and interactive segmentation).

The image side (Swin, connector, pixel decoder) runs once per tile in :meth:`encode`; its
features are cached by the segmenter exactly like SAM's embedding, so every further prompt on
the tile runs only Phi-1.5 and the mask decoder (:meth:`~.base.Engine.decode`).

Tiles are letterboxed to the model's square input as the official evaluation does
(``model/preprocess.py``) and the mask logits are mapped back onto the tile grid, so a mask
always has the tile's ``H x W`` whatever its aspect ratio.

Interactive prompts use the official normalised-coordinate instruction
(``prompting.interactive_instruction``): UniGeoSeg knows foreground points (1 to 3) or one box,
nothing else. Background points are dropped (the model has no way to express them); a prompt
with no foreground point, or with more than three, is refused with a typed error
(``capabilities``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from unigeoseg_protocol.vocabulary import TEXT_TASKS

from ..errors import EngineUnavailableError, InvalidInputError, WeightsError
from ..model.heads import TASK_ONE_HOT
from ..model.preprocess import Letterbox, letterbox_image, letterbox_tensor, logits_to_tile
from ..model.prompting import MAX_POINTS, build_prompt, interactive_instruction
from .base import Capabilities, Engine, EngineSettings, Prediction, TilePrompt

if TYPE_CHECKING:  # the model (and transformers) load only when an engine is built
    from ..geo.grid import TileGrid
    from ..model.unigeoseg import VisionFeatures

logger = logging.getLogger(__name__)

NO_TEXT_MODEL = ("no UniGeoSeg model was given, so text prompts cannot be answered: pass "
                 "--model PATH_OR_NAME (a released-layout model directory, or a model name "
                 "under the weights cache's models/ folder); point and box prompts work with "
                 "the sam engine")


def _check_rgb(rgb: np.ndarray) -> None:
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an H x W x 3 uint8 tile, got {rgb.shape} {rgb.dtype}")


def model_dtype(device: torch.device) -> torch.dtype:
    """The dtype the engine runs in: bfloat16 on CUDA (as the released model), else float32."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


@dataclass
class UniGeoSegEmbedding:
    """The cached image side of one tile.

    Attributes:
        vision: the model's per-tile features (batch of 1), on the device.
        letterbox: where the tile sits inside the square model input.
    """

    vision: VisionFeatures
    letterbox: Letterbox

    @property
    def nbytes(self) -> int:
        return self.vision.nbytes


class UniGeoSegEngine(Engine):
    """Encode a tile once, then answer text (and point / box) prompts on it.

    A prediction's ``mask`` is logits > 0 on the tile grid; its ``score`` is the mean sigmoid
    of the tile-grid logits inside the mask (0.0 for an empty mask): UniGeoSeg has no score
    head, so this is the model's mean confidence over the pixels it selected, not a predicted
    IoU like SAM's. ``low_res_logits`` are the 1 x 1 x S/4 x S/4 decoder logits (UniGeoSeg
    takes no mask feedback).

    Args:
        loaded: a ``model.checkpoint.LoadedModel`` (model, tokenizer, config, name, path);
            the model should already be in :func:`model_dtype` for ``device``.
        device: where to run; the model is moved there if it is elsewhere.
        use_cuda_graphs: on CUDA, replay each stage as a CUDA graph captured per shape.
    """

    name = "unigeoseg"
    title = "UniGeoSeg"
    # Every task of the vocabulary, which ``hello`` lists in the model's one-hot order.
    capabilities = Capabilities(tasks=tuple(TASK_ONE_HOT), points=True,
                                background_points=False, max_points=MAX_POINTS, box=True,
                                text=True)

    def __init__(self, loaded: Any, device: torch.device | str, use_cuda_graphs: bool = True):
        self.loaded = loaded
        device = torch.device(device)
        self.model = loaded.model
        here = self.model.device
        if here.type != device.type or (device.index is not None and here.index != device.index):
            self.model.to(device)
        self.model.eval()
        self.device = self.model.device
        if self.device.type == "cuda" and use_cuda_graphs:
            # One launch per stage instead of thousands of kernel launches (cuda_graphs.py).
            self.model.enable_cuda_graphs()
        self.tokenizer = loaded.tokenizer
        self.image_size = int(self.model.config.image_size)

    @classmethod
    def from_model_dir(cls, model_dir: Path, device: torch.device) -> UniGeoSegEngine:
        """Load the UniGeoSeg model in ``model_dir`` (in :func:`model_dtype`) as an engine.

        Raises:
            WeightsError: the directory does not hold a loadable model (the message says why).
        """
        from ..model.checkpoint import load_released

        try:
            loaded = load_released(model_dir, device=device, dtype=model_dtype(device))
        except WeightsError:
            raise
        except Exception as exc:  # transformers / safetensors raise many types for bad files
            raise WeightsError(f"cannot load UniGeoSeg model {model_dir}: "
                               f"{type(exc).__name__}: {exc}") from exc
        return cls(loaded, device)

    @classmethod
    def loader(cls, settings: EngineSettings) -> Callable[[], UniGeoSegEngine]:
        from ..weights import resolve_model

        if settings.model is None:
            raise EngineUnavailableError(NO_TEXT_MODEL)
        model_dir = resolve_model(settings.model)  # a model that is not there stops here
        return lambda: cls.from_model_dir(model_dir, settings.device)

    @property
    def model_id(self) -> str:
        return str(self.loaded.name)

    def encode(self, rgb: np.ndarray) -> UniGeoSegEmbedding:
        """Run the image side on an H x W x 3 uint8 RGB tile."""
        _check_rgb(rgb)
        image, box = letterbox_image(rgb, self.image_size)
        with torch.inference_mode():
            vision = self.model.encode_images(image[None].to(self.device))
        return UniGeoSegEmbedding(vision=vision, letterbox=box)

    def segment_tiles(self, tiles: list[np.ndarray], prompt: TilePrompt,
                      grids: Sequence[TileGrid] | None = None) -> list[Prediction]:
        """One text prompt on several H x W x 3 uint8 tiles, as one batch on the device
        (``grids`` are not read: UniGeoSeg takes tiles at their own resolution).

        For whole-raster runs: tiles of one size travel to the device as one block of bytes
        and are letterboxed there; the prompt is tokenised and embedded once; the language
        model and decoder run on the batch; masks and scores come back in one transfer per
        tile size.
        """
        if not tiles:
            return []
        if prompt.task not in TEXT_TASKS:
            raise InvalidInputError("batched tiles take a referring or reasoning text prompt")
        self.capabilities.check(prompt, self.title)
        for rgb in tiles:
            _check_rgb(rgb)
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, rgb in enumerate(tiles):
            groups.setdefault(rgb.shape, []).append(index)
        images: list[torch.Tensor | None] = [None] * len(tiles)
        boxes: dict[tuple[int, ...], Letterbox] = {}
        with torch.inference_mode():
            for shape, indexes in groups.items():
                pixels = torch.from_numpy(np.stack([tiles[i] for i in indexes])).to(self.device)
                batch, boxes[shape] = letterbox_tensor(pixels, self.image_size)
                for i, image in zip(indexes, batch, strict=True):
                    images[i] = image
            tokenised = build_prompt(prompt.task, prompt.text, self.tokenizer)
            vision = self.model.encode_images(torch.stack(images))
            logits = self.model.segment(vision, [tokenised] * len(tiles))  # B 1 S/4 S/4
            by_tile: dict[int, Prediction] = {}
            for shape, indexes in groups.items():
                group_logits = logits[indexes]
                masks, scores = self._masks_and_scores(group_logits[:, 0], boxes[shape])
                for j, i in enumerate(indexes):
                    by_tile[i] = Prediction(mask=masks[j], score=float(scores[j]),
                                            low_res_logits=group_logits[j:j + 1])
        return [by_tile[i] for i in range(len(tiles))]

    @staticmethod
    def _masks_and_scores(logits: torch.Tensor, box: Letterbox) -> tuple[np.ndarray, np.ndarray]:
        """B x S/4 x S/4 logits of tiles of one letterbox -> B x H x W bool masks on the tile
        grid and each mask's mean sigmoid (0 for an empty mask), in one transfer."""
        tile_logits = logits_to_tile(logits, box)  # B H W float32
        masks = tile_logits > 0
        inside = (torch.sigmoid(tile_logits) * masks).sum(dim=(-2, -1))
        scores = inside / masks.sum(dim=(-2, -1)).clamp(min=1)
        return masks.cpu().numpy(), scores.cpu().numpy()

    def instruction(self, embedding: UniGeoSegEmbedding, prompt: TilePrompt) -> str:
        """The instruction text UniGeoSeg is asked for ``prompt`` on this tile: the text of a
        referring / reasoning prompt; for an interactive one the official coordinate
        instruction (the box if there is one, else the foreground points), followed by the
        prompt's text if any."""
        if prompt.task in TEXT_TASKS:
            return str(prompt.text)
        width, height = embedding.letterbox.width, embedding.letterbox.height
        # Coordinates are fractions of the tile's width and height (the official code
        # normalises by the original image's size, not by the letterboxed input's).
        if prompt.box is not None:
            c0, r0, c1, r1 = (float(v) for v in prompt.box)
            text = interactive_instruction(box_norm=np.clip(
                [c0 / width, r0 / height, c1 / width, r1 / height], 0.0, 1.0))
        else:
            points = np.asarray(prompt.points, dtype=np.float64)
            positive = points[np.asarray(prompt.labels) == 1]
            if len(positive) < len(points):
                logger.info("unigeoseg ignores %d background point(s)",
                            len(points) - len(positive))
            norm = np.clip(positive / np.array([width, height]), 0.0, 1.0)
            text = interactive_instruction(points_norm=norm.tolist())
        if prompt.text:
            # Brackets in free text would be read back as extra coordinates by the official
            # parser (parse_interactive_coords); keep them out of the instruction.
            extra = prompt.text.replace("[", "(").replace("]", ")")
            text = f"{text} {extra}"
        return text

    def _decode(self, embedding: UniGeoSegEmbedding, prompt: TilePrompt) -> Prediction:
        """One mask: ``prompt.task`` selects the head, :meth:`instruction` is what is asked."""
        tokenised = build_prompt(prompt.task, self.instruction(embedding, prompt),
                                 self.tokenizer)
        with torch.inference_mode():
            logits = self.model.segment(embedding.vision, [tokenised])  # 1 1 S/4 S/4
            masks, scores = self._masks_and_scores(logits[:, 0], embedding.letterbox)
        return Prediction(mask=masks[0], score=float(scores[0]), low_res_logits=logits)
