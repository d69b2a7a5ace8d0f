"""Swin Transformer backbone of UniGeoSeg: Swin-B/384 as in Mask2Former's ``D2SwinTransformer``.

UniGeoSeg (``multimodal_encoder/swin_trans.py: build_swin_b``) uses the detectron2 flavour of
Swin (Liu et al., 2021, https://arxiv.org/abs/2103.14030), whose differences from the
classification model matter for numerics:

* inputs of any size: the image is zero-padded to a multiple of the patch size, and every
  block zero-pads its (normalised) tokens to a multiple of the window; the padded tokens take
  part in attention as keys, they are not masked;
* the window is never shrunk for small feature maps, so a 16 x 16 res5 is padded to 24 x 24
  and still uses shifted windows (shift ``window_size // 2``) with the -100 region mask;
* one LayerNorm per returned stage (``norm0`` .. ``norm3``).

Parameter and buffer names match the ``model.vision_tower.`` part of the released checkpoint
(``relative_position_index`` is a persistent int64 buffer; the attention mask is rebuilt in
every forward and is not in the state dict).

Written from the paper and from reading Mask2Former's ``D2SwinTransformer``
(https://github.com/facebookresearch/Mask2Former, ``mask2former/modeling/backbone/swin.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .recompute import maybe_checkpoint

#: Value the shifted-window mask adds to logits of token pairs from different regions.
MASK_FILL = -100.0


@dataclass(frozen=True)
class SwinConfig:
    """Shape of a Swin backbone. The defaults are UniGeoSeg's Swin-B (Mask2Former Swin-B/384)."""

    embed_dim: int = 128
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)
    window_size: int = 12
    patch_size: int = 4
    in_chans: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    #: Only sizes the absolute position embedding, which exists when ``ape`` is True.
    pretrain_img_size: int = 384
    drop_path_rate: float = 0.3
    ape: bool = False
    patch_norm: bool = True
    out_indices: tuple[int, ...] = (0, 1, 2, 3)

    def __post_init__(self) -> None:
        if len(self.depths) != len(self.num_heads):
            raise ValueError(
                f"depths and num_heads need one entry per stage, got {len(self.depths)} "
                f"and {len(self.num_heads)}"
            )
        for i, heads in enumerate(self.num_heads):
            if self.num_features[i] % heads:
                raise ValueError(f"stage {i}: {self.num_features[i]} channels, {heads} heads")
        if any(not 0 <= i < len(self.depths) for i in self.out_indices):
            raise ValueError(f"out_indices {self.out_indices} outside 0..{len(self.depths) - 1}")

    @property
    def num_features(self) -> tuple[int, ...]:
        """Channels of each stage: ``embed_dim * 2**i`` (128, 256, 512, 1024 for Swin-B)."""
        return tuple(self.embed_dim * 2**i for i in range(len(self.depths)))

    @property
    def strides(self) -> tuple[int, ...]:
        """Stride of each stage's output in input pixels (4, 8, 16, 32)."""
        return tuple(self.patch_size * 2**i for i in range(len(self.depths)))


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """Cut B x H x W x C (H, W multiples of ``window_size``) into (B*nW) x ws x ws x C.

    Windows are ordered row-major over the grid, batch-major overall.
    """
    b, h, w, c = x.shape
    x = x.view(b, h // window_size, window_size, w // window_size, window_size, c)
    # B nH ws nW ws C -> B nH nW ws ws C
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, c)


def window_merge(windows: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B*nW) x ws x ws x C -> B x H x W x C."""
    ws = windows.shape[1]
    c = windows.shape[-1]
    x = windows.view(-1, height // ws, width // ws, ws, ws, c)
    # B nH nW ws ws C -> B nH ws nW ws C
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, c)


def relative_position_index(window_size: int) -> torch.Tensor:
    """N x N int64 index into the (2ws-1)^2 bias table, N = ws*ws tokens in row-major order.

    Entry (i, j) encodes the offset of token i from token j:
    ``(dy + ws - 1) * (2ws - 1) + (dx + ws - 1)``.
    """
    ys, xs = torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # 2 x N
    delta = coords[:, :, None] - coords[:, None, :] + (window_size - 1)  # 2 x N x N, >= 0
    return delta[0] * (2 * window_size - 1) + delta[1]


def shifted_window_mask(
    height: int, width: int, window_size: int, shift_size: int, device: torch.device | None = None
) -> torch.Tensor:
    """Additive mask nW x N x N for attention in cyclically shifted windows.

    ``height`` and ``width`` are the padded sizes (multiples of ``window_size``). After rolling
    by ``-shift_size``, the last row/column band of windows holds tokens that came from
    opposite edges; pairs whose source regions differ get :data:`MASK_FILL`, others 0.
    """
    labels = torch.zeros(height, width, device=device)
    bands = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
    for i, rows in enumerate(bands):
        for j, cols in enumerate(bands):
            labels[rows, cols].fill_(3 * i + j)  # fill_: no host tensor (graph capture)
    windows = window_partition(labels[None, :, :, None], window_size).flatten(1)  # nW x N
    differ = windows[:, None, :] != windows[:, :, None]
    return torch.zeros(differ.shape, device=device).masked_fill(differ, MASK_FILL)


class DropPath(nn.Module):
    """Stochastic depth: drops whole residual branches per sample in training, identity in eval."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep) / keep


class Mlp(nn.Module):
    """Linear -> GELU -> Linear on the last dimension."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a learned relative position bias."""

    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads)
        )
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend within each window.

        Args:
            x: (B*nW) x N x C tokens, N = window_size**2, windows batch-major.
            mask: nW x N x N additive mask (0 or :data:`MASK_FILL`), or None.

        Returns:
            (B*nW) x N x C.
        """
        bw, n, c = x.shape
        # (B*nW) N 3C -> 3 (B*nW) heads N head_dim
        qkv = self.qkv(x).view(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, self.num_heads).permute(2, 0, 1)  # heads x N x N
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        else:
            # The same nW x N x N mask applies to every image: fold windows into the head axis,
            # (B*nW) heads N d -> B (nW*heads) N d, so a 1 x (nW*heads) x N x N bias broadcasts.
            nw = mask.shape[0]
            q, k, v = (t.reshape(bw // nw, nw * self.num_heads, n, -1) for t in (q, k, v))
            attn_bias = bias.unsqueeze(0) + mask.unsqueeze(1).to(bias.dtype)  # nW heads N N
            attn_bias = attn_bias.reshape(1, nw * self.num_heads, n, n).to(q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)
            out = out.reshape(bw, self.num_heads, n, -1)
        # (B*nW) heads N head_dim -> (B*nW) N C
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class SwinBlock(nn.Module):
    """Pre-norm (shifted-)window attention and MLP, each with a residual connection."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shift_size: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop_path: float,
    ) -> None:
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size must be in [0, {window_size}), got {shift_size}")
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size, qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, shift_mask: torch.Tensor | None) -> torch.Tensor:
        """B x H x W x C -> B x H x W x C. ``shift_mask`` is used only if this block shifts."""
        b, h, w, c = x.shape
        ws = self.window_size
        y = self.norm1(x)
        # pad the normalised tokens with zeros up to a multiple of the window (right, bottom)
        pad_h, pad_w = (-h) % ws, (-w) % ws
        y = F.pad(y, (0, 0, 0, pad_w, 0, pad_h))
        hp, wp = h + pad_h, w + pad_w
        if self.shift_size:
            y = torch.roll(y, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        windows = window_partition(y, ws).view(-1, ws * ws, c)
        windows = self.attn(windows, shift_mask if self.shift_size else None)
        y = window_merge(windows.view(-1, ws, ws, c), hp, wp)
        if self.shift_size:
            y = torch.roll(y, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        x = x + self.drop_path(y[:, :h, :w, :])
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2 x 2 neighbourhood concat -> LayerNorm(4C) -> Linear(4C, 2C): halves H and W."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x H x W x C -> B x ceil(H/2) x ceil(W/2) x 2C (odd sizes zero-padded)."""
        h, w = x.shape[1:3]
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        # channel order (row, col) offsets: (0,0), (1,0), (0,1), (1,1)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """``depth`` blocks alternating plain and shifted windows, then optional patch merging."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop_path: list[float],
        downsample: bool,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.blocks = nn.ModuleList(
            SwinBlock(
                dim,
                num_heads,
                window_size,
                0 if i % 2 == 0 else self.shift_size,
                mlp_ratio,
                qkv_bias,
                drop_path[i],
            )
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """B x H x W x C -> (B x H x W x C stage output, B x H/2 x W/2 x 2C merged or None)."""
        h, w = x.shape[1:3]
        ws = self.window_size
        mask = shifted_window_mask(
            math.ceil(h / ws) * ws, math.ceil(w / ws) * ws, ws, self.shift_size, x.device
        )
        for block in self.blocks:
            x = block(x, mask)
        return x, (self.downsample(x) if self.downsample is not None else None)


class PatchEmbed(nn.Module):
    """Non-overlapping patch_size x patch_size conv, then optional LayerNorm."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, norm: bool) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x C_in x H x W -> B x H/p x W/p x embed_dim; H, W zero-padded to multiples of p."""
        p = self.patch_size
        h, w = x.shape[-2:]
        x = F.pad(x, (0, (-w) % p, 0, (-h) % p))
        x = self.proj(x).permute(0, 2, 3, 1)  # B C H W -> B H W C
        return self.norm(x) if self.norm is not None else x


class SwinBackbone(nn.Module):
    """Swin Transformer returning normalised multi-scale features ``res2`` .. ``res5``.

    For Swin-B and a B x 3 x H x W input: res2 B x 128 x H/4 x W/4, res3 B x 256 x H/8 x W/8,
    res4 B x 512 x H/16 x W/16, res5 B x 1024 x H/32 x W/32 (sizes rounded up when H, W are
    not multiples of 32). Only the stages in ``config.out_indices`` are returned.

    With ``gradient_checkpointing`` set (``UniGeoSeg.set_gradient_checkpointing``), each
    stage's activations are recomputed in the backward while training (``recompute.py``).
    """

    def __init__(self, config: SwinConfig) -> None:
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        self.patch_embed = PatchEmbed(
            config.patch_size, config.in_chans, config.embed_dim, config.patch_norm
        )
        if config.ape:
            side = config.pretrain_img_size // config.patch_size
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, config.embed_dim, side, side))
        n_blocks = sum(config.depths)
        rates = [config.drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]
        self.layers = nn.ModuleList()
        for i, depth in enumerate(config.depths):
            start = sum(config.depths[:i])
            self.layers.append(
                SwinStage(
                    dim=config.num_features[i],
                    depth=depth,
                    num_heads=config.num_heads[i],
                    window_size=config.window_size,
                    mlp_ratio=config.mlp_ratio,
                    qkv_bias=config.qkv_bias,
                    drop_path=rates[start : start + depth],
                    downsample=i < len(config.depths) - 1,
                )
            )
        for i in config.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(config.num_features[i]))
        self.apply(_init_weights)
        if config.ape:
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)

    @property
    def out_channels(self) -> dict[str, int]:
        """Channels of each returned feature, e.g. {"res2": 128, ..., "res5": 1024}."""
        return {f"res{i + 2}": self.config.num_features[i] for i in self.config.out_indices}

    @property
    def out_strides(self) -> dict[str, int]:
        """Stride in input pixels of each returned feature, e.g. {"res2": 4, ..., "res5": 32}."""
        return {f"res{i + 2}": self.config.strides[i] for i in self.config.out_indices}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Encode normalised images.

        Args:
            images: B x in_chans x H x W, any H and W.

        Returns:
            {"res{i+2}": B x num_features[i] x H_i x W_i} for i in ``out_indices``, where
            H_0 = ceil(H / patch_size) and each later stage has ceil(H_{i-1} / 2).
        """
        if images.ndim != 4 or images.shape[1] != self.config.in_chans:
            raise ValueError(
                f"expected images B x {self.config.in_chans} x H x W, got {tuple(images.shape)}"
            )
        x = self.patch_embed(images)  # B H W C
        if self.config.ape:
            pos = F.interpolate(self.absolute_pos_embed, size=x.shape[1:3], mode="bicubic")
            x = x + pos.permute(0, 2, 3, 1)
        features = {}
        for i, stage in enumerate(self.layers):
            out, merged = maybe_checkpoint(self.gradient_checkpointing and self.training,
                                           stage, x)
            if i in self.config.out_indices:
                out = getattr(self, f"norm{i}")(out)
                features[f"res{i + 2}"] = out.permute(0, 3, 1, 2).contiguous()  # B H W C -> B C H W
            if merged is not None:
                x = merged
        return features


def _init_weights(module: nn.Module) -> None:
    """Random init as in the reference (truncated normal 0.02); checkpoints overwrite it."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, WindowAttention):
        nn.init.trunc_normal_(module.relative_position_bias_table, std=0.02)


def build_swin_b(config: SwinConfig | None = None) -> SwinBackbone:
    """UniGeoSeg's vision tower (Swin-B, window 12) with random weights."""
    return SwinBackbone(config or SwinConfig())
