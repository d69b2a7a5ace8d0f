"""The 512 letterbox the released UniGeoSeg model sees, and the way back to the tile grid.

The official evaluation (``RS_val_dataset.preprocess_image``) resizes the longest side to 512
with bilinear interpolation (the other side truncated with ``int()``), pads the rest with zeros
*centred* (``top = pad // 2``), then normalises with ImageNet statistics in 0-255 space, so the
padding becomes ``-mean / std``, not 0. Masks come back 512 x 512 in that frame.

The resize is ``cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_LINEAR)`` on uint8,
reproduced bit for bit by :func:`resize_linear_uint8` (torch integer ops, on the tile's device).
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
#: cv2's INTER_RESIZE_COEF_SCALE: 8-bit bilinear weights are integers summing to about this.
_COEF_SCALE = 2048


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
    image = batch.permute(0, 3, 1, 2)
    if (box.new_height, box.new_width) != (box.height, box.width):
        # cv2.INTER_LINEAR on the bytes, exactly (at the same size cv2 copies; so do we).
        image = resize_linear_uint8(image, box.new_height, box.new_width)
    image = image.float()
    canvas = image.new_zeros(image.shape[0], 3, size, size)
    canvas[..., box.top:box.top + box.new_height, box.left:box.left + box.new_width] = image
    mean = torch.tensor(PIXEL_MEAN, device=rgb.device).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD, device=rgb.device).view(3, 1, 1)
    normalised = (canvas - mean) / std
    return (normalised if rgb.ndim == 4 else normalised[0]), box


def _linear_taps(src: int, dst: int, horizontal: bool) -> tuple[np.ndarray, np.ndarray,
                                                                   np.ndarray]:
    """cv2's INTER_LINEAR source indices and 11-bit weights along one axis.

    Returns ``(i0, i1, w)``: each output pixel reads source pixels ``i0`` and ``i1`` (already
    clamped to the image) with int32 weights ``w[:, 0]`` and ``w[:, 1]``.

    Everything is reproduced in cv2's own precision because the weights are rounded to
    integers: a float rounding anywhere upstream moves a weight by one unit and, on some
    pixels, the output by one grey level. So: the scale is ``1 / (dst / src)`` in double (not
    ``src / dst``, which can differ in the last bit), the position ``(d + 0.5) * scale - 0.5``
    is computed in double then stored as float32, the fraction and ``1 - fraction`` are
    float32, and each weight is rounded half to even on its own (``saturate_cast<short>``), so
    the pair need not sum to exactly 2048.

    Past the borders the two axes differ, as in cv2: horizontally a position left of the
    first pixel or at/past the last one takes that pixel whole (cv2 zeroes the fraction, so
    the weights are 2048 and 0); vertically only the row indices are clamped and the
    weights keep the fraction, which matters because the vertical pass truncates each term
    separately.
    """
    scale = 1.0 / (dst / src)
    pos = ((np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    start = np.floor(pos)
    frac = (pos - start).astype(np.float32)
    start = start.astype(np.int64)
    # Out of the image on either side: the border pixel with all the weight.
    if horizontal:
        frac[(start < 0) | (start >= src - 1)] = 0
    ends = np.clip(start + 1, 0, src - 1)
    start = np.clip(start, 0, src - 1)
    one = np.float32(_COEF_SCALE)
    weights = np.stack([np.rint((np.float32(1) - frac) * one), np.rint(frac * one)], axis=1)
    return start, ends, weights.astype(np.int32)


def resize_linear_uint8(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``cv2.resize(..., interpolation=cv2.INTER_LINEAR)`` of uint8 images, bit-exact.

    ``... x H x W`` uint8 (any leading dimensions, e.g. ``B x 3``), on any device, to
    ``... x height x width`` uint8 on the same device.

    cv2 does not interpolate 8-bit images in floating point: it quantises the weights to
    ``INTER_RESIZE_COEF_SCALE = 2048`` (11 bits), runs a horizontal pass into int32 rows
    (``HResizeLinear``: ``pixel * weight``, exact, up to 255 * 2048), then a vertical pass
    (``VResizeLinear<uchar, int, short, ...>``) that, to keep to 16-bit SIMD lanes, drops the
    4 low bits of each row value, keeps the high half of the 16 x 16-bit product with the
    vertical weight (``>> 16``), adds the two terms and rounds the last 2 bits away
    (``(a + b + 2) >> 2``): 4 + 16 + 2 = 22 = 2 * 11 bits in all, but with two truncations
    on the way, so neither float bilinear nor a single rounded fixed-point sum reproduces it.
    The scalar remainder loop uses the same formula as the SIMD one, so every pixel follows
    it. (Exact 2x downscaling is routed by cv2 to INTER_AREA; with weights 1024/1024 the
    formula above gives the same ``(a + b + c + d + 2) >> 2``, so it needs no branch.)

    Verified byte for byte against cv2 on x86-64, 3-channel uint8 (random noise, or
    gradients): opencv-python-headless 5.0.0 on 4,882 source/target size pairs (1.07e9
    output values), 4.10.0 on 2,982 pairs, with IPP on and off; no value differed. The pairs:
    the letterbox targets (512 and 128) of 712x450, 800x787, 801x800, 100x1000, 513x512,
    their transposes and 1-pixel sides; ~1,200 random tiles up to 1100 px; ~1,500 random
    pairs up to 700 px either way; sides in {1..5, 7, 8, 9, 16, 17, 31, 33}; integer ratios
    2-4 both ways; 3000x4000 and 2048x2048 down to 512. (The float bilinear it replaces
    differed on ~12.5 % of values for 712x450, 800x787, 801x800 and 1000x100.)
    """
    if image.dtype != torch.uint8 or image.ndim < 2:
        raise ValueError(f"expected ... x H x W uint8, got {tuple(image.shape)} {image.dtype}")
    src_h, src_w = image.shape[-2:]
    if height <= 0 or width <= 0:
        raise ValueError(f"a resize needs a positive size, got {height} x {width}")
    if (height, width) == (src_h, src_w):
        return image.clone()
    device = image.device
    y0, y1, beta = (torch.from_numpy(a).to(device) for a in _linear_taps(src_h, height, False))
    x0, x1, alpha = (torch.from_numpy(a).to(device) for a in _linear_taps(src_w, width, True))
    pixels = image.to(torch.int32)
    # Only the rows the vertical pass reads are resampled horizontally (each row is
    # independent, so gathering first changes nothing but the work).
    rows = []
    for ys in (y0, y1):
        src = pixels.index_select(-2, ys)
        rows.append(src.index_select(-1, x0) * alpha[:, 0] + src.index_select(-1, x1)
                    * alpha[:, 1])
    b0, b1 = beta[:, 0, None], beta[:, 1, None]
    out = (((rows[0] >> 4) * b0) >> 16) + (((rows[1] >> 4) * b1) >> 16)
    # cv2 casts with uchar(), not saturate_cast; the value never exceeds 255 anyway.
    return ((out + 2) >> 2).to(torch.uint8)


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
