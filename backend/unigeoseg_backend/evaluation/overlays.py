"""PNG pictures of the worst samples: the model input with target and prediction drawn on it.

Each picture is the S x S letterboxed input the model saw (padding black), the ground truth
tinted green with a green outline, the prediction tinted magenta with a magenta outline (both
together read as grey-white), and a caption strip with the sample id, task and IoU.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

TARGET_RGB = np.array([0, 220, 0], dtype=np.float32)
PREDICTION_RGB = np.array([255, 0, 255], dtype=np.float32)
TINT = 0.35
CAPTION_PX = 16
MIN_SIDE_PX = 384
OVERLAY_DIR = "overlays"
_PREFIX = "worst-"


def outline(mask: np.ndarray) -> np.ndarray:
    """The pixels of ``mask`` with a 4-neighbour outside it (image border counts as outside)."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    return mask & ~interior


def render(image: np.ndarray, target: np.ndarray, prediction: np.ndarray,
           caption: str) -> Image.Image:
    """S x S x 3 uint8 image, S x S bool target and prediction -> RGB picture with a caption."""
    canvas = image.astype(np.float32)
    for mask, colour in ((target, TARGET_RGB), (prediction, PREDICTION_RGB)):
        canvas[mask] = (1 - TINT) * canvas[mask] + TINT * colour
    for mask, colour in ((target, TARGET_RGB), (prediction, PREDICTION_RGB)):
        canvas[outline(mask)] = colour
    drawn = Image.fromarray(canvas.round().astype(np.uint8))
    # Small inputs (test models) are enlarged so that the caption fits and pixels show.
    scale = max(1, -(-MIN_SIDE_PX // max(image.shape[:2])))
    if scale > 1:
        drawn = drawn.resize((drawn.width * scale, drawn.height * scale), Image.NEAREST)
    picture = Image.new("RGB", (drawn.width, drawn.height + CAPTION_PX))
    picture.paste(drawn, (0, CAPTION_PX))
    ImageDraw.Draw(picture).text((2, 2), caption, fill=(255, 255, 255))
    return picture


def file_name(rank: int, sample_id: str) -> str:
    """``worst-RR-<id>.png``, RR the place in the worst list, the id made file-name safe."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", sample_id).strip("._")[:80] or "sample"
    return f"{_PREFIX}{rank:02d}-{safe}.png"


def clear(folder: Path) -> None:
    """Remove the pictures an earlier run of the evaluation left in ``folder``."""
    for path in folder.glob(f"{_PREFIX}*.png"):
        path.unlink(missing_ok=True)
