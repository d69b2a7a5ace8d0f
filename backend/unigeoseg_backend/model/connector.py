"""Vision-language connectors: Swin res5 feature map -> visual tokens for the language model.

UniGeoSeg (``multimodal_projector/builder.py``) has two candidates; the checkpoint's
``config.json`` field ``mm_projector_type`` says which one it was trained with:

* ``"SparseConv_1"`` (:class:`CompressionConnector`): B x 1024 x 16 x 16 -> B x 64 x 2048.
  Its LayerNorms have fixed spatial shapes, so it only accepts res5 of a 512 x 512 input.
* ``"MSCC"`` (:class:`MultiScaleCompressionConnector`): B x 1024 x H x W ->
  B x (ceil(H/2) * ceil(W/2) + 4) x 2048, i.e. B x 68 x 2048 for 16 x 16.

Parameter names match ``model.mm_projector.*`` in the released checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _check_feature_map(x: torch.Tensor, channels: int, grid: tuple[int, int] | None) -> None:
    """Raise ValueError unless ``x`` is B x channels x H x W (and H x W == grid if given)."""
    expected = f"B x {channels} x " + (f"{grid[0]} x {grid[1]}" if grid else "H x W")
    ok = x.ndim == 4 and x.shape[1] == channels and (grid is None or tuple(x.shape[2:]) == grid)
    if not ok:
        raise ValueError(f"expected res5 features {expected}, got {tuple(x.shape)}")


class CompressionConnector(nn.Module):
    """``SparseConv_1``: conv3x3 -> LN -> conv3x3/2 -> LN -> conv1x1, no activations.

    B x in_dim x S x S -> B x (S/2)^2 x out_dim (S = ``grid_size``, 16 for a 512 input).
    """

    def __init__(self, in_dim: int = 1024, out_dim: int = 2048, grid_size: int = 16) -> None:
        super().__init__()
        if grid_size % 2:
            raise ValueError(f"grid_size must be even, got {grid_size}")
        self.in_dim = in_dim
        self.grid_size = grid_size
        self.proj1 = nn.Conv2d(in_dim, out_dim, kernel_size=3, stride=1, padding=1)
        self.norm1 = nn.LayerNorm([out_dim, grid_size, grid_size])
        self.proj2 = nn.Conv2d(out_dim, out_dim, kernel_size=3, stride=2, padding=1)
        self.norm2 = nn.LayerNorm([out_dim, grid_size // 2, grid_size // 2])
        self.fc = nn.Conv2d(out_dim, out_dim, kernel_size=1)

    @property
    def num_tokens(self) -> int:
        """Visual tokens per image: (grid_size / 2)^2 = 64."""
        return (self.grid_size // 2) ** 2

    def forward(self, res5: torch.Tensor) -> torch.Tensor:
        """B x in_dim x grid x grid -> B x num_tokens x out_dim (row-major over the 8 x 8 grid)."""
        _check_feature_map(res5, self.in_dim, (self.grid_size, self.grid_size))
        x = self.norm1(self.proj1(res5))
        x = self.fc(self.norm2(self.proj2(x)))
        return x.flatten(2).transpose(1, 2).contiguous()  # B C h w -> B (h w) C


class MultiScaleCompressionConnector(nn.Module):
    """``MSCC``: two strided conv branches fused at 1/2 resolution, plus learned global tokens.

    branch1: conv3x3/2 -> GroupNorm(1) gives out_dim/2 channels at ceil(H/2) x ceil(W/2);
    branch2: conv5x5/4 -> GroupNorm(1) gives out_dim/2 channels at ceil(H/4) x ceil(W/4),
    upsampled bilinearly (align_corners=False) to branch1's size. The concatenated map is
    flattened row-major, the ``num_global_tokens`` learned tokens are appended, and one Linear
    maps every token. B x in_dim x H x W -> B x (ceil(H/2) * ceil(W/2) + G) x out_dim.
    """

    def __init__(self, in_dim: int = 1024, out_dim: int = 2048, num_global_tokens: int = 4) -> None:
        super().__init__()
        if out_dim % 2:
            raise ValueError(f"out_dim must be even, got {out_dim}")
        self.in_dim = in_dim
        half = out_dim // 2
        self.branch1 = nn.Conv2d(in_dim, half, kernel_size=3, stride=2, padding=1)
        self.branch2 = nn.Conv2d(in_dim, half, kernel_size=5, stride=4, padding=2)
        self.norm1 = nn.GroupNorm(1, half)
        self.norm2 = nn.GroupNorm(1, half)
        self.global_tokens = nn.Parameter(torch.randn(num_global_tokens, out_dim))
        self.fc = nn.Linear(out_dim, out_dim)

    def num_tokens(self, height: int = 16, width: int = 16) -> int:
        """Visual tokens per image for an H x W res5 (68 for 16 x 16)."""
        return -(-height // 2) * -(-width // 2) + self.global_tokens.shape[0]

    def forward(self, res5: torch.Tensor) -> torch.Tensor:
        """B x in_dim x H x W -> B x num_tokens(H, W) x out_dim (grid tokens, then global)."""
        _check_feature_map(res5, self.in_dim, None)
        fine = self.norm1(self.branch1(res5))  # B C/2 H/2 W/2
        coarse = self.norm2(self.branch2(res5))  # B C/2 H/4 W/4
        # the reference upsamples in float32 whatever the model dtype
        coarse = F.interpolate(
            coarse.float(), size=fine.shape[-2:], mode="bilinear", align_corners=False
        ).to(coarse.dtype)
        tokens = torch.cat([fine, coarse], dim=1).flatten(2).transpose(1, 2)  # B (h w) C
        glob = self.global_tokens.unsqueeze(0).expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        return self.fc(torch.cat([tokens, glob], dim=1))


#: ``mm_projector_type`` value of the checkpoint config -> connector class.
CONNECTORS: dict[str, type[nn.Module]] = {
    "SparseConv_1": CompressionConnector,
    "MSCC": MultiScaleCompressionConnector,
}


def build_connector(kind: str, in_dim: int = 1024, out_dim: int = 2048) -> nn.Module:
    """Build the connector named by ``mm_projector_type`` (random weights).

    Args:
        kind: "SparseConv_1" or "MSCC".
        in_dim: channels of the res5 input (1024 for Swin-B).
        out_dim: channels of the visual tokens (2048, Phi-1.5's hidden size).
    """
    if kind not in CONNECTORS:
        raise ValueError(f"unknown connector {kind!r}; expected one of {sorted(CONNECTORS)}")
    return CONNECTORS[kind](in_dim, out_dim)
