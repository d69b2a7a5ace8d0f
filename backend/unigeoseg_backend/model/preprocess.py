"""The 512 letterbox the released UniGeoSeg model sees, and the way back to the tile grid.

The official evaluation (``RS_val_dataset.preprocess_image``) resizes the longest side to 512
with bilinear interpolation (the other side truncated with ``int()``), pads the rest with zeros
*centred* (``top = pad // 2``), then normalises with ImageNet statistics in 0-255 space, so the
padding becomes ``-mean / std``, not 0. Masks come back 512 x 512 in that frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

#: ImageNet statistics in 0-255 space (RGB), as the official code uses them.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
INPUT_SIZE = 512


@dataclass(frozen=True)
class Letterbox:
    """Where a ``height x width`` tile sits inside the square model input.

    Attributes:
        size: side of the model input (512).
        height, width: the tile, pixels.
        new_height, new_width: the resized tile inside the input.
        top, left: padding before the resized tile (centred, floor of half the padding).
    """

    size: int
    height: int
    width: int
    new_height: int
    new_width: int
    top: int
    left: int

    @classmethod
    def for_tile(cls, height: int, width: int, size: int = INPUT_SIZE) -> Letterbox:
        if height <= 0 or width <= 0:
            raise ValueError(f"a tile needs a positive size, got {height} x {width}")
        # Same arithmetic as the official code, truncation included.
        if width > height:
            new_width, new_height = size, int(height * (size / width))
        else:
            new_height, new_width = size, int(width * (size / height))
        new_height, new_width = max(new_height, 1), max(new_width, 1)
        return cls(size, height, width, new_height, new_width,
                   (size - new_height) // 2, (size - new_width) // 2)

    def tile_to_input(self, cols: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Continuous tile pixel coordinates to continuous input coordinates."""
        return (self.left + np.asarray(cols) * (self.new_width / self.width),
                self.top + np.asarray(rows) * (self.new_height / self.height))

    def input_to_tile(self, cols: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The inverse of :meth:`tile_to_input`."""
        return ((np.asarray(cols) - self.left) * (self.width / self.new_width),
                (np.asarray(rows) - self.top) * (self.height / self.new_height))


def letterbox_image(rgb: np.ndarray, size: int = INPUT_SIZE) -> tuple[torch.Tensor, Letterbox]:
    """An ``H x W x 3`` uint8 RGB tile as the normalised ``3 x size x size`` model input."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected H x W x 3 uint8 RGB, got {rgb.shape} {rgb.dtype}")
    return letterbox_tensor(torch.from_numpy(np.ascontiguousarray(rgb)), size)


def letterbox_tensor(rgb: torch.Tensor, size: int = INPUT_SIZE) -> tuple[torch.Tensor, Letterbox]:
    """:func:`letterbox_image` for an ``H x W x 3`` or ``B x H x W x 3`` (tiles of one size)
    uint8 tensor, computed on its device: a batch of tiles sent to the GPU as bytes is
    letterboxed there. Returns ``3 x size x size`` or ``B x 3 x size x size``."""
    if rgb.ndim not in (3, 4) or rgb.shape[-1] != 3 or rgb.dtype != torch.uint8:
        raise ValueError(f"expected [B x] H x W x 3 uint8 RGB, got {tuple(rgb.shape)} "
                         f"{rgb.dtype}")
    box = Letterbox.for_tile(rgb.shape[-3], rgb.shape[-2], size)
    batch = rgb if rgb.ndim == 4 else rgb[None]
    image = batch.permute(0, 3, 1, 2).float()
    if (box.new_height, box.new_width) != (box.height, box.width):
        # Bilinear with half-pixel centres and no antialiasing, like cv2.INTER_LINEAR;
        # rounded back to 8 bits as cv2 returns uint8 for uint8 input. (At the same size
        # this is the identity, so it is skipped.)
        image = F.interpolate(image, size=(box.new_height, box.new_width), mode="bilinear",
                              align_corners=False).round().clamp(0, 255)
    canvas = image.new_zeros(image.shape[0], 3, size, size)
    canvas[..., box.top:box.top + box.new_height, box.left:box.left + box.new_width] = image
    mean = torch.tensor(PIXEL_MEAN, device=rgb.device).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD, device=rgb.device).view(3, 1, 1)
    normalised = (canvas - mean) / std
    return (normalised if rgb.ndim == 4 else normalised[0]), box


def logits_to_tile(logits: torch.Tensor, box: Letterbox) -> torch.Tensor:
    """Mask logits on the model input (``size x size``, or the 1/4 decoder grid) to the tile.

    The logits are first brought to the input size (bilinear, as the official inference does),
    the padding is cropped, and the rest is resized to the tile's ``height x width``.
    ``h x w`` in, ``H x W`` float32 out; ``B x h x w`` (tiles of one letterbox) gives
    ``B x H x W``.
    """
    if logits.ndim not in (2, 3):
        raise ValueError(f"expected [B x] h x w logits, got shape {tuple(logits.shape)}")
    grid = (logits if logits.ndim == 3 else logits[None])[:, None].float()
    if grid.shape[-2:] != (box.size, box.size):
        grid = F.interpolate(grid, size=(box.size, box.size), mode="bilinear",
                             align_corners=False)
    crop = grid[..., box.top:box.top + box.new_height, box.left:box.left + box.new_width]
    tile = F.interpolate(crop, size=(box.height, box.width), mode="bilinear",
                         align_corners=False)[:, 0]
    return tile if logits.ndim == 3 else tile[0]
