"""The text engine: UniGeoSeg (referring, reasoning and interactive segmentation).

The image side (Swin, connector, pixel decoder) runs once per tile in :meth:`encode`; its
features are cached by the segmenter exactly like SAM's embedding, so every further prompt on
the tile runs only Phi-1.5 and the mask decoder (:meth:`predict_prompt`).

Tiles are letterboxed to the model's square input as the official evaluation does
(``model/preprocess.py``) and the mask logits are mapped back onto the tile grid, so a mask
always has the tile's ``H x W`` whatever its aspect ratio.

Interactive prompts use the official normalised-coordinate instruction
(``prompting.interactive_instruction``): UniGeoSeg knows foreground points (1 to 3) or one box,
nothing else. Background points are dropped (the model has no way to express them); a prompt
with no foreground point, or with more than three, is refused with a typed error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from unigeoseg_protocol.params import Prompt

from ..errors import EmptyPromptError, InvalidInputError
from ..model.preprocess import Letterbox, letterbox_image, letterbox_tensor, logits_to_tile
from ..model.prompting import MAX_POINTS, build_prompt, interactive_instruction
from ..model.unigeoseg import VisionFeatures

logger = logging.getLogger(__name__)

TASKS = ("referring", "reasoning", "interactive")


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


@dataclass
class UniGeoSegPrediction:
    """One mask.

    Attributes:
        mask: H x W bool on the tile grid (logits > 0).
        score: mean sigmoid of the tile-grid logits inside ``mask``, 0.0 for an empty mask.
            UniGeoSeg has no score head; this is the model's mean confidence over the pixels
            it selected, not a predicted IoU like SAM's.
        low_res_logits: 1 x 1 x S/4 x S/4 decoder logits (kept for parity with SAM; UniGeoSeg
            takes no mask feedback).
    """

    mask: np.ndarray
    score: float
    low_res_logits: torch.Tensor


class UniGeoSegEngine:
    """Encode a tile once, then answer text (and point / box) prompts on it.

    Args:
        loaded: a ``model.checkpoint.LoadedModel`` (model, tokenizer, config, name, path);
            the model should already be in :func:`model_dtype` for ``device``.
        device: where to run; the model is moved there if it is elsewhere.
        use_cuda_graphs: on CUDA, replay each stage as a CUDA graph captured per shape.
    """

    name = "unigeoseg"
    tasks = TASKS

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

    def segment_tiles(self, tiles: list[np.ndarray], prompt: Prompt
                      ) -> list[UniGeoSegPrediction]:
        """One text prompt on several H x W x 3 uint8 tiles, as one batch on the device.

        For whole-raster runs: tiles of one size travel to the device as one block of bytes
        and are letterboxed there; the prompt is tokenised and embedded once; the language
        model and decoder run on the batch; masks and scores come back in one transfer per
        tile size.
        """
        if not tiles:
            return []
        if prompt.task not in ("referring", "reasoning") or not prompt.text:
            raise InvalidInputError("batched tiles take a referring or reasoning text prompt")
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
            predictions: list[UniGeoSegPrediction | None] = [None] * len(tiles)
            for shape, indexes in groups.items():
                group_logits = logits[indexes]
                masks, scores = self._masks_and_scores(group_logits[:, 0], boxes[shape])
                for j, i in enumerate(indexes):
                    predictions[i] = UniGeoSegPrediction(mask=masks[j], score=float(scores[j]),
                                                         low_res_logits=group_logits[j:j + 1])
        return predictions

    @staticmethod
    def _masks_and_scores(logits: torch.Tensor, box: Letterbox) -> tuple[np.ndarray, np.ndarray]:
        """B x S/4 x S/4 logits of tiles of one letterbox -> B x H x W bool masks on the tile
        grid and each mask's mean sigmoid (0 for an empty mask), in one transfer."""
        tile_logits = logits_to_tile(logits, box)  # B H W float32
        masks = tile_logits > 0
        inside = (torch.sigmoid(tile_logits) * masks).sum(dim=(-2, -1))
        scores = inside / masks.sum(dim=(-2, -1)).clamp(min=1)
        return masks.cpu().numpy(), scores.cpu().numpy()

    def instruction(self, embedding: UniGeoSegEmbedding, prompt: Prompt,
                    points_px: np.ndarray | None, labels: np.ndarray | None,
                    box_px: np.ndarray | None) -> tuple[str, str]:
        """(task, instruction text) for ``prompt`` on this tile; raises when it cannot be asked."""
        task = prompt.task
        if task in ("referring", "reasoning"):
            if not prompt.text:
                raise EmptyPromptError(f"a {task} prompt needs a text instruction")
            return task, prompt.text
        if task != "interactive":
            raise InvalidInputError(f"unknown task {task!r}; UniGeoSeg does {list(TASKS)}")
        width, height = embedding.letterbox.width, embedding.letterbox.height
        # Coordinates are fractions of the tile's width and height (the official code
        # normalises by the original image's size, not by the letterboxed input's).
        if box_px is not None:
            c0, r0, c1, r1 = (float(v) for v in box_px)
            text = interactive_instruction(box_norm=np.clip(
                [c0 / width, r0 / height, c1 / width, r1 / height], 0.0, 1.0))
        else:
            if points_px is None or not len(points_px):
                raise EmptyPromptError("an interactive prompt needs points or a box")
            labels = np.ones(len(points_px), np.int64) if labels is None else np.asarray(labels)
            positive = np.asarray(points_px, dtype=np.float64)[labels == 1]
            if not len(positive):
                raise InvalidInputError(
                    "UniGeoSeg takes foreground points only (1 to 3) or a box; background "
                    "points alone cannot be asked: add a foreground point, or use the sam engine",
                    {"engine": self.name, "positive_points": 0})
            if len(positive) > MAX_POINTS:
                raise InvalidInputError(
                    f"UniGeoSeg takes at most {MAX_POINTS} foreground points (got "
                    f"{len(positive)}); use a box, fewer points, or the sam engine",
                    {"engine": self.name, "positive_points": int(len(positive))})
            if len(positive) < len(labels):
                logger.info("unigeoseg ignores %d background point(s)",
                            len(labels) - len(positive))
            norm = np.clip(positive / np.array([width, height]), 0.0, 1.0)
            text = interactive_instruction(points_norm=norm.tolist())
        if prompt.text:
            # Brackets in free text would be read back as extra coordinates by the official
            # parser (parse_interactive_coords); keep them out of the instruction.
            extra = prompt.text.replace("[", "(").replace("]", ")")
            text = f"{text} {extra}"
        return task, text

    def predict_prompt(self, embedding: UniGeoSegEmbedding, prompt: Prompt,
                       points_px: np.ndarray | None = None, labels: np.ndarray | None = None,
                       box_px: np.ndarray | None = None) -> UniGeoSegPrediction:
        """One mask for ``prompt`` on an encoded tile.

        Args:
            embedding: from :meth:`encode`.
            prompt: its ``task`` selects the head; ``text`` is the instruction (referring,
                reasoning) or extra wording after the coordinates (interactive).
            points_px: N x 2 (col, row), continuous tile pixel coordinates (interactive).
            labels: N ints, 1 foreground, 0 background (background points are dropped).
            box_px: (col_min, row_min, col_max, row_max), same frame; wins over points.
        """
        task, text = self.instruction(embedding, prompt, points_px, labels, box_px)
        tokenised = build_prompt(task, text, self.tokenizer)
        with torch.inference_mode():
            logits = self.model.segment(embedding.vision, [tokenised])  # 1 1 S/4 S/4
            masks, scores = self._masks_and_scores(logits[:, 0], embedding.letterbox)
        return UniGeoSegPrediction(mask=masks[0], score=float(scores[0]), low_res_logits=logits)
