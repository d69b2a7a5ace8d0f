"""Mask2Former's multi-scale deformable-attention pixel decoder, as UniGeoSeg configures it.

Written after reading Mask2Former's ``MSDeformAttnPixelDecoder``
(https://github.com/facebookresearch/Mask2Former, modeling/pixel_decoder/msdeformattn.py) and
UniGeoSeg's copy of it. Module names follow the released checkpoint
(``pixel_decoder.*`` in the manifests of ``manifests/``).

Data flow for a 512 x 512 input and Swin-B features (B = batch):

* res3, res4, res5 (B x 256/512/1024 x 64/32/16 px) are projected to ``conv_dim`` channels and
  refined jointly by a deformable-attention transformer encoder (levels ordered res5, res4,
  res3: coarse to fine, the order ``input_proj`` and ``level_embed`` rows are stored in);
* res2 (B x 128 x 128 x 128) is fused with the upsampled finest encoder level by one FPN step;
* ``mask_features`` is a 1x1 conv of that stride-4 map.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ms_deform_attn import MSDeformAttn

#: Backbone feature names, fine to coarse, with their strides in input pixels.
FEATURE_STRIDES: dict[str, int] = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


@dataclass(frozen=True)
class PixelDecoderConfig:
    """Shape of the pixel decoder. Defaults are UniGeoSeg's (Swin-B backbone, 512 px input)."""

    #: Channels of the backbone features res2, res3, res4, res5.
    in_channels: tuple[int, int, int, int] = (128, 256, 512, 1024)
    #: Channels inside the decoder (encoder width, FPN width).
    conv_dim: int = 256
    #: Channels of ``mask_features``.
    mask_dim: int = 256
    #: Deformable transformer encoder depth, heads, FFN width and points per head and level.
    num_encoder_layers: int = 6
    num_heads: int = 8
    ffn_dim: int = 1024
    num_points: int = 4
    #: Groups of every GroupNorm (must divide ``conv_dim``).
    num_groups: int = 32

    @property
    def encoder_in_channels(self) -> tuple[int, int, int]:
        """Channels of the encoder levels in storage order: res5, res4, res3."""
        return self.in_channels[3], self.in_channels[2], self.in_channels[1]


def sine_position_embedding(x: Tensor, num_pos_feats: int, temperature: float = 10000.0
                            ) -> Tensor:
    """DETR's normalised 2-D sine positional embedding for an unpadded feature map.

    Row and column indices are counted from 1, scaled to ``(0, 2*pi]``, and encoded with
    interleaved sin/cos at ``num_pos_feats`` frequencies each; Y channels come first.

    Args:
        x: ``B x C x H x W``; only its shape, device and dtype are used.
        num_pos_feats: channels per axis (the output has ``2 * num_pos_feats``).
        temperature: base of the geometric frequency progression.

    Returns:
        ``B x (2 * num_pos_feats) x H x W`` in ``x``'s dtype.
    """
    batch, _, height, width = x.shape
    eps, scale = 1e-6, 2 * math.pi  # DETR's constants; they matter at the 1e-6 level
    y_embed = torch.arange(1, height + 1, dtype=torch.float32, device=x.device)
    x_embed = torch.arange(1, width + 1, dtype=torch.float32, device=x.device)
    y_embed = y_embed / (height + eps) * scale
    x_embed = x_embed / (width + eps) * scale

    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=x.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    pos_y = y_embed[:, None] / dim_t  # H x F
    pos_x = x_embed[:, None] / dim_t  # W x F
    # Even channels take sin, odd channels cos, interleaved: (sin f0, cos f1, sin f2, ...).
    pos_y = torch.stack((pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()), dim=2).flatten(1)
    pos_x = torch.stack((pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()), dim=2).flatten(1)
    pos = torch.cat((pos_y[:, None, :].expand(height, width, num_pos_feats),
                     pos_x[None, :, :].expand(height, width, num_pos_feats)), dim=2)
    # H x W x 2F -> B x 2F x H x W
    return pos.permute(2, 0, 1)[None].expand(batch, -1, -1, -1).to(x.dtype)


def _filled_long(rows: Sequence[Sequence[int]], device: torch.device) -> Tensor:
    """An R x K int64 tensor of Python ints, written on the device element by element.

    ``torch.as_tensor(rows, device=cuda)`` copies from host memory, which CUDA graph capture
    forbids; ``fill_`` with a Python scalar launches a kernel only (``out[i, j] = value``
    would wrap the value in a host tensor first)."""
    out = torch.zeros(len(rows), len(rows[0]), dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        for j, value in enumerate(row):
            out[i, j].fill_(value)
    return out


def _c2_xavier_fill(conv: nn.Conv2d) -> None:
    # Detectron2's default conv init (what the Mask2Former weights were trained from).
    nn.init.kaiming_uniform_(conv.weight, a=1)
    nn.init.zeros_(conv.bias)


def _conv_gn(in_channels: int, out_channels: int, kernel_size: int, num_groups: int
             ) -> nn.Sequential:
    """Conv + GroupNorm, stored as ``.0`` / ``.1`` as the checkpoint expects."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
    return nn.Sequential(conv, nn.GroupNorm(num_groups, out_channels))


class MSDeformAttnEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention, then a ReLU FFN."""

    def __init__(self, d_model: int, ffn_dim: int, n_levels: int, n_heads: int, n_points: int
                 ) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor,
                spatial_shapes: Tensor, level_start_index: Tensor,
                shapes: Sequence[tuple[int, int]]) -> Tensor:
        """``src``, ``pos``: B x S x C; ``reference_points``: B x S x L x 2. Returns B x S x C.

        ``shapes`` repeats ``spatial_shapes`` as Python ints (no device read-back)."""
        attended = self.self_attn(src + pos, reference_points, src, spatial_shapes,
                                  level_start_index, shapes=shapes)
        src = self.norm1(src + attended)
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class MSDeformAttnEncoder(nn.Module):
    """A stack of :class:`MSDeformAttnEncoderLayer` (kept as its own module for the key names
    ``transformer.encoder.layers.N``)."""

    def __init__(self, layers: Sequence[MSDeformAttnEncoderLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor,
                spatial_shapes: Tensor, level_start_index: Tensor,
                shapes: Sequence[tuple[int, int]]) -> Tensor:
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, level_start_index, shapes)
        return src


class MSDeformAttnTransformer(nn.Module):
    """Flattens the levels, adds level embeddings, runs the encoder and unflattens again."""

    def __init__(self, config: PixelDecoderConfig, num_levels: int) -> None:
        super().__init__()
        layers = [MSDeformAttnEncoderLayer(config.conv_dim, config.ffn_dim, num_levels,
                                           config.num_heads, config.num_points)
                  for _ in range(config.num_encoder_layers)]
        self.encoder = MSDeformAttnEncoder(layers)
        #: One learned vector per level, added to the positional embedding (L x C).
        self.level_embed = nn.Parameter(torch.empty(num_levels, config.conv_dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for name, param in self.named_parameters():
            if param.dim() > 1 and ".self_attn." not in name:
                nn.init.xavier_uniform_(param)
        for module in self.modules():
            if isinstance(module, MSDeformAttn):
                module.reset_parameters()
        nn.init.normal_(self.level_embed)

    @staticmethod
    def reference_points(spatial_shapes: Sequence[tuple[int, int]], num_levels: int,
                         device: torch.device) -> Tensor:
        """Pixel centres of every level, ``1 x S x L x 2`` as ``(X, Y)`` in ``[0, 1]``.

        Each query's reference point is its own pixel centre, used on all levels (nothing is
        padded, so no valid-ratio rescaling is needed)."""
        points = []
        for height, width in spatial_shapes:
            ys = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) / height
            xs = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) / width
            grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
            points.append(torch.stack((grid_x.flatten(), grid_y.flatten()), dim=-1))
        return torch.cat(points, dim=0)[None, :, None, :].expand(-1, -1, num_levels, -1)

    def forward(self, srcs: Sequence[Tensor], pos_embeds: Sequence[Tensor]) -> list[Tensor]:
        """Encode the levels jointly.

        Args:
            srcs: per level ``B x C x H_l x W_l``, in ``level_embed`` order.
            pos_embeds: per level ``B x C x H_l x W_l`` positional embeddings.

        Returns:
            The encoded levels, same shapes and order as ``srcs``.
        """
        shapes = [(src.shape[2], src.shape[3]) for src in srcs]
        # B x C x H x W -> B x HW x C, levels concatenated along HW
        src_flat = torch.cat([src.flatten(2).transpose(1, 2) for src in srcs], dim=1)
        pos_flat = torch.cat([pos.flatten(2).transpose(1, 2) + self.level_embed[level]
                              for level, pos in enumerate(pos_embeds)], dim=1)
        sizes = [h * w for h, w in shapes]
        spatial_shapes = _filled_long(shapes, src_flat.device)
        level_start_index = _filled_long([[0], *([n] for n in sizes[:-1])],
                                         src_flat.device)[:, 0].cumsum(0)
        reference = self.reference_points(shapes, len(srcs), src_flat.device)
        reference = reference.to(src_flat.dtype).expand(src_flat.shape[0], -1, -1, -1)

        memory = self.encoder(src_flat, pos_flat, reference, spatial_shapes, level_start_index,
                              shapes)
        # B x S x C -> per level B x C x H x W
        return [level.transpose(1, 2).reshape(level.shape[0], -1, h, w)
                for level, (h, w) in zip(memory.split(sizes, dim=1), shapes, strict=True)]


class MSDeformAttnPixelDecoder(nn.Module):
    """Backbone features res2..res5 -> stride-4 mask features plus three multi-scale maps.

    Submodules (checkpoint names): ``input_proj.{0,1,2}`` for res5, res4, res3; ``transformer``;
    ``adapter_1`` (res2 lateral) and ``layer_1`` (FPN output); ``mask_features``.
    """

    #: Encoder levels, in storage order (coarse to fine).
    encoder_features: tuple[str, ...] = ("res5", "res4", "res3")

    def __init__(self, config: PixelDecoderConfig) -> None:
        super().__init__()
        if config.conv_dim % config.num_groups != 0:
            raise ValueError(f"num_groups ({config.num_groups}) must divide conv_dim "
                             f"({config.conv_dim})")
        self.config = config
        dim, groups = config.conv_dim, config.num_groups
        self.input_proj = nn.ModuleList(
            _conv_gn(channels, dim, 1, groups) for channels in config.encoder_in_channels)
        self.transformer = MSDeformAttnTransformer(config, len(self.encoder_features))
        self.mask_features = nn.Conv2d(dim, config.mask_dim, kernel_size=1)
        # One FPN level: the encoder's finest stride is 8, the mask features' stride 4.
        self.adapter_1 = _conv_gn(config.in_channels[0], dim, 1, groups)
        self.layer_1 = _conv_gn(dim, dim, 3, groups)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight)
            nn.init.zeros_(proj[0].bias)
        _c2_xavier_fill(self.mask_features)
        _c2_xavier_fill(self.adapter_1[0])
        _c2_xavier_fill(self.layer_1[0])

    def forward(self, features: Mapping[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Decode backbone features.

        Args:
            features: ``"res2"`` .. ``"res5"`` maps, ``B x C_k x H/s x W/s`` for strides
                s = 4, 8, 16, 32 and channels ``config.in_channels``.

        Returns:
            ``mask_features``: ``B x mask_dim x H/4 x W/4``;
            ``multi_scale_features``: three ``B x conv_dim`` maps at H/32, H/16, H/8 (coarse
            to fine), the memory the transformer decoder cross-attends to.
        """
        missing = [name for name in FEATURE_STRIDES if name not in features]
        if missing:
            raise KeyError(f"pixel decoder needs backbone features {missing}")
        srcs, pos = [], []
        for proj, name in zip(self.input_proj, self.encoder_features, strict=True):
            x = features[name]
            srcs.append(proj(x))
            pos.append(sine_position_embedding(x, self.config.conv_dim // 2))
        encoded = self.transformer(srcs, pos)

        res2 = features["res2"]
        lateral = F.relu(self.adapter_1(res2))
        # Upsample in float32 (as Mask2Former does) so half-precision runs round the same way.
        top_down = F.interpolate(encoded[-1].float(), size=lateral.shape[-2:], mode="bilinear",
                                 align_corners=False).to(lateral.dtype)
        fpn = F.relu(self.layer_1(lateral + top_down))
        return self.mask_features(fpn), encoded
