"""Multi-scale deformable attention (Zhu et al., Deformable DETR, 2021), as Mask2Former uses it.

Written for UniGeoSeg's pixel decoder after reading the Deformable DETR / Mask2Former
``MSDeformAttn`` (https://github.com/fundamentalvision/Deformable-DETR,
https://github.com/facebookresearch/Mask2Former); parameter names follow that module so the
released checkpoint loads strictly.

Frames used throughout:

* sampling locations and reference points are ``(X, Y)`` in ``[0, 1]`` of a level's extent,
  (0, 0) = top-left corner of the top-left pixel, (1, 1) = bottom-right corner of the
  bottom-right pixel; a pixel centre is at ``((j + 0.5) / W, (i + 0.5) / H)``;
* ``spatial_shapes`` is ``L x 2`` int64 with rows ``(H_l, W_l)``, and the flattened inputs
  concatenate the levels in that order, each level row-major.

The computation is pure PyTorch (``F.grid_sample``). If the compiled
``MultiScaleDeformableAttention`` extension of Deformable DETR happens to be importable, it is
used for CUDA tensors; it is never required and gives the same result up to rounding.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
from collections.abc import Sequence
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

#: Batch chunk the compiled extension processes at once (Deformable DETR's default).
FUSED_IM2COL_STEP = 128


def ms_deform_attn_core(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    shapes: Sequence[tuple[int, int]] | None = None,
) -> Tensor:
    """Weighted sum of bilinearly sampled values, per head, over levels and points.

    Args:
        value: ``B x S x M x D`` values of all levels (S = sum of H_l * W_l, M heads, D per head).
        spatial_shapes: ``L x 2`` int64, ``(H_l, W_l)`` per level.
        level_start_index: ``L`` int64, offset of each level in the S axis. The pure-PyTorch
            path derives the split from ``spatial_shapes``; the index is kept in the signature
            because the compiled op needs it.
        sampling_locations: ``B x Q x M x L x P x 2``, ``(X, Y)`` in ``[0, 1]`` per level.
            Points outside read zeros (the same as zero padding around each level).
        attention_weights: ``B x Q x M x L x P``; normally softmax-normalised over ``L * P``.
        shapes: ``spatial_shapes`` as Python ints, when the caller has them: reading them
            back from a CUDA tensor synchronises with the device, which CUDA graph capture
            forbids.

    Returns:
        ``B x Q x (M * D)``, heads concatenated along the last axis.
    """
    del level_start_index  # the split sizes follow from spatial_shapes
    batch, _, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    if shapes is None:
        shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    value_per_level = value.split([h * w for h, w in shapes], dim=1)
    # grid_sample wants [-1, 1]; with align_corners=False, -1 and 1 are the outer pixel edges,
    # which is exactly the [0, 1] frame above.
    grids = 2 * sampling_locations - 1

    sampled = []
    for level, (height, width) in enumerate(shapes):
        # B x HW x M x D -> B x M x D x HW -> (B*M) x D x H x W
        level_value = value_per_level[level].permute(0, 2, 3, 1)
        level_value = level_value.reshape(batch * num_heads, head_dim, height, width)
        # B x Q x M x P x 2 -> B x M x Q x P x 2 -> (B*M) x Q x P x 2
        level_grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        # (B*M) x D x Q x P
        sampled.append(F.grid_sample(level_value, level_grid.to(level_value.dtype),
                                     mode="bilinear", padding_mode="zeros", align_corners=False))

    # (B*M) x D x Q x L x P -> (B*M) x D x Q x (L*P)
    stacked = torch.stack(sampled, dim=-2).flatten(-2)
    # B x Q x M x L x P -> B x M x Q x L x P -> (B*M) x 1 x Q x (L*P)
    weights = attention_weights.transpose(1, 2).reshape(
        batch * num_heads, 1, num_queries, num_levels * num_points)
    output = (stacked * weights.to(stacked.dtype)).sum(-1)  # (B*M) x D x Q
    # (B*M) x D x Q -> B x (M*D) x Q -> B x Q x (M*D)
    return output.view(batch, num_heads * head_dim, num_queries).transpose(1, 2).contiguous()


@functools.cache
def load_fused_op() -> ModuleType | None:
    """The compiled ``MultiScaleDeformableAttention`` extension, or None if it isn't installed.

    Looked up once per process; the pure-PyTorch path needs nothing from it.
    """
    try:
        module = importlib.import_module("MultiScaleDeformableAttention")
    except ImportError:
        return None
    logger.info("using the compiled MultiScaleDeformableAttention op for CUDA tensors")
    return module


class _FusedMSDeformAttn(torch.autograd.Function):
    """Autograd wrapper of the compiled extension (float32 in, float32 out)."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations,
                attention_weights, op):
        ctx.op = op
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations,
                              attention_weights)
        return op.ms_deform_attn_forward(value, spatial_shapes, level_start_index,
                                         sampling_locations, attention_weights,
                                         FUSED_IM2COL_STEP)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, locations, weights = ctx.saved_tensors
        grad_value, grad_locations, grad_weights = ctx.op.ms_deform_attn_backward(
            value, spatial_shapes, level_start_index, locations, weights,
            grad_output.contiguous(), FUSED_IM2COL_STEP)
        return grad_value, None, None, grad_locations, grad_weights, None


def _fused_ms_deform_attn(op: ModuleType, value: Tensor, spatial_shapes: Tensor,
                          level_start_index: Tensor, sampling_locations: Tensor,
                          attention_weights: Tensor) -> Tensor:
    # The extension's kernels are float32 only; cast there and back as Mask2Former does.
    output = _FusedMSDeformAttn.apply(
        value.float().contiguous(), spatial_shapes.contiguous(),
        level_start_index.contiguous(), sampling_locations.float().contiguous(),
        attention_weights.float().contiguous(), op)
    return output.to(value.dtype)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention: each query samples ``n_points`` per head and level.

    Args:
        d_model: channels of queries and values (divisible by ``n_heads``).
        n_levels: number of feature levels.
        n_heads: attention heads.
        n_points: sampling points per head and level.
        allow_fused_op: use the compiled extension for CUDA inputs when it is importable.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 3, n_heads: int = 8,
                 n_points: int = 4, allow_fused_op: bool = True) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.allow_fused_op = allow_fused_op

        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Deformable DETR's start: zero offset weights, and biases that put head h's points
        on a ray at angle 2*pi*h/M at distances 1..P (in pixels of each level), uniform
        attention."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], dim=-1)  # M x 2, (X, Y)
        # Scale so the larger component is 1: the first point lands on a neighbouring pixel.
        directions = directions / directions.abs().max(dim=-1, keepdim=True).values
        distances = torch.arange(1, self.n_points + 1, dtype=torch.float32)
        # M x L x P x 2, flattened in the order sampling_offsets' output is viewed in forward.
        grid = directions[:, None, None, :] * distances[None, None, :, None]
        grid = grid.expand(self.n_heads, self.n_levels, self.n_points, 2)
        self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        input_padding_mask: Tensor | None = None,
        shapes: Sequence[tuple[int, int]] | None = None,
    ) -> Tensor:
        """Attend from each query to points around its reference point on every level.

        Args:
            query: ``B x Q x C`` (C = d_model), positional embedding already added.
            reference_points: ``B x Q x L x 2``, ``(X, Y)`` in ``[0, 1]`` per level.
            input_flatten: ``B x S x C`` values of all levels, S = sum of H_l * W_l.
            spatial_shapes: ``L x 2`` int64, ``(H_l, W_l)``.
            level_start_index: ``L`` int64, start of each level in S.
            input_padding_mask: optional ``B x S`` bool, True where the input is padding.
            shapes: ``spatial_shapes`` as Python ints, if known (see :func:`ms_deform_attn_core`).

        Returns:
            ``B x Q x C``.
        """
        batch, num_queries, _ = query.shape
        _, num_values, _ = input_flatten.shape
        if reference_points.shape[-1] != 2:
            raise ValueError("reference_points must be (X, Y) points, last dim 2; "
                             f"got shape {tuple(reference_points.shape)}")
        if spatial_shapes.shape[0] != self.n_levels:
            raise ValueError(f"expected {self.n_levels} levels, got {spatial_shapes.shape[0]}")

        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        head_dim = self.d_model // self.n_heads
        value = value.view(batch, num_values, self.n_heads, head_dim)

        offsets = self.sampling_offsets(query).view(
            batch, num_queries, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(
            batch, num_queries, self.n_heads, self.n_levels * self.n_points)
        weights = weights.softmax(-1).view(
            batch, num_queries, self.n_heads, self.n_levels, self.n_points)

        # Offsets are in pixels of each level; spatial_shapes rows are (H, W) but the points
        # are (X, Y), hence the flip.
        normalizer = spatial_shapes.flip(-1).to(offsets.dtype)  # L x 2, (W, H)
        locations = (reference_points[:, :, None, :, None, :]
                     + offsets / normalizer[None, None, None, :, None, :])

        op = load_fused_op() if self.allow_fused_op and value.is_cuda else None
        if op is not None:
            output = _fused_ms_deform_attn(op, value, spatial_shapes, level_start_index,
                                           locations, weights)
        else:
            output = ms_deform_attn_core(value, spatial_shapes, level_start_index, locations,
                                         weights, shapes)
        return self.output_proj(output)
