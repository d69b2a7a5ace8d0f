"""UniGeoSeg's mask decoder: Mask2Former's masked-attention transformer decoder, one query.

Written after reading Mask2Former's ``MultiScaleMaskedTransformerDecoder``
(https://github.com/facebookresearch/Mask2Former, modeling/transformer_decoder/
mask2former_transformer_decoder.py) and UniGeoSeg's variant of it
(``MultiScaleMaskedTransformerDecoderForOPTPreTrain.forward_woconcat``, which the released
model runs: ``seg_concat`` and ``use_seg_query`` are both off).

What differs from Mask2Former: there are no learned object queries and no class head. The
only query is the [SEG] embedding computed from the language model (B x 1 x C), its positional
embedding is zero, and the output is mask logits only.

The module also owns parameters that the released forward never reads (``query_feat``,
``query_embed``, ``SEG_query_embed``, ``new_query_embed``, ``SEG_proj``, ``CLASS_proj``). They
exist so that the checkpoint's ``predictor.*`` tensors load strictly, one to one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .pixel_decoder import sine_position_embedding
from .recompute import maybe_checkpoint


@dataclass(frozen=True)
class MaskDecoderConfig:
    """Shape of the mask decoder. Defaults are UniGeoSeg's (Mask2Former Swin-B yaml)."""

    #: Width of queries and memory; equals the pixel decoder's ``conv_dim``.
    hidden_dim: int = 256
    #: Attention heads (cross and self).
    num_heads: int = 8
    #: FFN width.
    ffn_dim: int = 2048
    #: Decoder layers: the yaml's DEC_LAYERS (10) minus one, as UniGeoSeg builds it.
    num_layers: int = 9
    #: Channels of the pixel decoder's ``mask_features``.
    mask_dim: int = 256
    #: Memory levels the layers cycle through (layer i reads level i % num_feature_levels).
    num_feature_levels: int = 3
    #: Rows of the unused learned-query tables (the yaml's NUM_OBJECT_QUERIES).
    num_queries: int = 100


class MLP(nn.Module):
    """Linear layers with ReLU between them (none after the last); ``layers.N`` keys."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int
                 ) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out,
                                                                      strict=True))

    def forward(self, x: Tensor) -> Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = F.relu(x)
        return x


def _add_pos(x: Tensor, pos: Tensor | None) -> Tensor:
    return x if pos is None else x + pos


class CrossAttentionLayer(nn.Module):
    """Post-norm masked cross-attention from the queries to one memory level."""

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, query: Tensor, memory: Tensor, memory_mask: Tensor | None,
                memory_pos: Tensor | None, query_pos: Tensor | None) -> Tensor:
        """``query``: B x Q x C; ``memory``: B x S x C; ``memory_mask``: (B*heads) x Q x S bool,
        True = may not attend. Returns B x Q x C."""
        attended = self.multihead_attn(_add_pos(query, query_pos), _add_pos(memory, memory_pos),
                                       memory, attn_mask=memory_mask, need_weights=False)[0]
        return self.norm(query + attended)


class SelfAttentionLayer(nn.Module):
    """Post-norm self-attention among the queries (a no-op mixing step with one query, but the
    weights still transform it: softmax over one key is 1, so the output is out_proj(v))."""

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, query: Tensor, query_pos: Tensor | None) -> Tensor:
        """``query``: B x Q x C. Returns B x Q x C."""
        q = k = _add_pos(query, query_pos)
        attended = self.self_attn(q, k, query, need_weights=False)[0]
        return self.norm(query + attended)


class FFNLayer(nn.Module):
    """Post-norm ReLU feed-forward block."""

    def __init__(self, d_model: int, ffn_dim: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.linear2(F.relu(self.linear1(x))))


def attention_mask_from_logits(mask_logits: Tensor, size: tuple[int, int], num_heads: int
                               ) -> Tensor:
    """Masked-attention mask for the next layer from the current mask prediction.

    A query may attend only where its resized predicted mask has ``sigmoid >= 0.5``. Where that
    leaves a query nothing to attend to (the prediction is all background at this level), the
    whole row is unmasked instead: attention over an empty set is undefined (NaN in softmax).

    Args:
        mask_logits: ``B x Q x H x W`` mask logits (stride 4).
        size: ``(H_l, W_l)`` of the memory level the next layer reads.
        num_heads: attention heads; the mask is repeated per head.

    Returns:
        ``(B * num_heads) x Q x (H_l * W_l)`` bool, True = may not attend, batch-major
        (row ``b * num_heads + h``), as ``nn.MultiheadAttention`` expects.
    """
    # Resize in float32 as Mask2Former does, then threshold in the prediction's dtype.
    resized = F.interpolate(mask_logits.float(), size=size, mode="bilinear",
                            align_corners=False).to(mask_logits.dtype)
    blocked = resized.sigmoid().flatten(2) < 0.5  # B x Q x HW
    blocked = blocked & ~blocked.all(dim=-1, keepdim=True)
    # B x Q x HW -> B x heads x Q x HW -> (B*heads) x Q x HW
    blocked = blocked[:, None].expand(-1, num_heads, -1, -1).flatten(0, 1)
    return blocked.detach()


class SingleQueryMaskDecoder(nn.Module):
    """Refines the [SEG] query against multi-scale memory and predicts a mask after each layer.

    Checkpoint names (``predictor.*``): ``transformer_{cross,self}_attention_layers.N``,
    ``transformer_ffn_layers.N``, ``decoder_norm``, ``mask_embed``, ``level_embed``, plus the
    unused tables listed in the module docstring. Mask2Former's ``input_proj`` is an empty
    ``nn.Sequential`` per level here (memory width equals ``hidden_dim``), which has no tensors,
    so it is left out.

    With ``gradient_checkpointing`` set, each layer's activations (cross-attention,
    self-attention, FFN) are recomputed in the backward while training (``recompute.py``).
    """

    def __init__(self, config: MaskDecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        dim = config.hidden_dim
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(dim, config.num_heads) for _ in range(config.num_layers))
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(dim, config.num_heads) for _ in range(config.num_layers))
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(dim, config.ffn_dim) for _ in range(config.num_layers))
        self.decoder_norm = nn.LayerNorm(dim)
        self.level_embed = nn.Embedding(config.num_feature_levels, dim)
        self.mask_embed = MLP(dim, dim, config.mask_dim, 3)

        # Unused by the released forward (learned-query, concat and class-score paths that
        # UniGeoSeg has switched off); kept so the checkpoint loads strictly.
        self.query_feat = nn.Embedding(config.num_queries, dim)
        self.query_embed = nn.Embedding(config.num_queries, dim)
        self.SEG_query_embed = nn.Embedding(config.num_queries + 1, dim)
        self.new_query_embed = nn.Embedding(1, dim)
        self.SEG_proj = MLP(dim, dim, dim, 2)
        self.CLASS_proj = MLP(dim, dim, dim, 2)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mask2Former's start: Xavier for the attention and FFN matrices, defaults elsewhere."""
        for layers in (self.transformer_self_attention_layers,
                       self.transformer_cross_attention_layers, self.transformer_ffn_layers):
            for param in layers.parameters():
                if param.dim() > 1:
                    nn.init.xavier_uniform_(param)

    def _predict(self, query: Tensor, mask_features: Tensor, next_size: tuple[int, int]
                 ) -> tuple[Tensor, Tensor]:
        """Mask logits ``B x Q x H/4 x W/4`` and the attention mask for the next layer."""
        embedding = self.mask_embed(self.decoder_norm(query))  # B x Q x mask_dim
        mask_logits = torch.einsum("bqc,bchw->bqhw", embedding, mask_features)
        return mask_logits, attention_mask_from_logits(mask_logits, next_size,
                                                       self.config.num_heads)

    def forward(self, multi_scale_features: Sequence[Tensor], mask_features: Tensor,
                seg_embedding: Tensor) -> list[Tensor]:
        """Predict the [SEG] mask.

        Args:
            multi_scale_features: ``num_feature_levels`` maps ``B x hidden_dim x H_l x W_l``,
                coarse to fine (the pixel decoder's second output: H/32, H/16, H/8).
            mask_features: ``B x mask_dim x H/4 x W/4`` (the pixel decoder's first output).
            seg_embedding: ``B x 1 x hidden_dim``, the [SEG] query (``B x Q x hidden_dim``
                also works; UniGeoSeg always passes one query).

        Returns:
            ``num_layers + 1`` mask-logit maps ``B x Q x H/4 x W/4``: the prediction from the
            initial query, then one after each layer. The last one is the model's output;
            the others are for deep supervision.
        """
        levels = self.config.num_feature_levels
        if len(multi_scale_features) != levels:
            raise ValueError(f"expected {levels} memory levels, got {len(multi_scale_features)}")
        if seg_embedding.dim() != 3 or seg_embedding.shape[-1] != self.config.hidden_dim:
            raise ValueError("seg_embedding must be B x Q x hidden_dim "
                             f"({self.config.hidden_dim}); got {tuple(seg_embedding.shape)}")
        sizes = [(feature.shape[-2], feature.shape[-1]) for feature in multi_scale_features]
        memory, memory_pos = [], []
        for level, feature in enumerate(multi_scale_features):
            # B x C x H x W -> B x HW x C
            memory_pos.append(sine_position_embedding(feature, self.config.hidden_dim // 2)
                              .flatten(2).transpose(1, 2))
            memory.append(feature.flatten(2).transpose(1, 2) + self.level_embed.weight[level])

        # UniGeoSeg's query positional embedding is all zeros; adding zeros changes nothing,
        # so _layer passes none.
        query = seg_embedding
        mask_logits, attn_mask = self._predict(query, mask_features, sizes[0])
        predictions = [mask_logits]
        for index in range(self.config.num_layers):
            level = index % levels
            query = maybe_checkpoint(self.gradient_checkpointing and self.training,
                                     self._layer, index, query, memory[level], attn_mask,
                                     memory_pos[level])
            mask_logits, attn_mask = self._predict(query, mask_features,
                                                   sizes[(index + 1) % levels])
            predictions.append(mask_logits)
        return predictions

    def _layer(self, index: int, query: Tensor, memory: Tensor, attn_mask: Tensor,
               memory_pos: Tensor) -> Tensor:
        """Decoder layer ``index``: masked cross-attention, self-attention, FFN (B x Q x C)."""
        query = self.transformer_cross_attention_layers[index](
            query, memory, attn_mask, memory_pos, None)
        query = self.transformer_self_attention_layers[index](query, None)
        return self.transformer_ffn_layers[index](query)
