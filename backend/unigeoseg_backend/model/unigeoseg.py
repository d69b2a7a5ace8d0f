"""UniGeoSeg assembled: Swin-B + connector + Phi-1.5 + TATE/LKM/SEG heads + Mask2Former.

The module tree follows the released checkpoint's names (``model.vision_tower``,
``model.mm_projector``, ``model.layers``, ``lm_head``, ``pixel_decoder``, ``predictor``),
except that the task heads, top-level there, are one ``heads`` module here; ``conversion.py``
maps the names both ways, so a released state dict loads with ``strict=True``.

Inference is split in two, so that several prompts on one tile run the image side once (the
official code runs Swin twice per forward):

* :meth:`UniGeoSeg.encode_images`: Swin features, visual tokens and pixel-decoder features of
  B letterboxed tiles (everything that depends on the image only);
* :meth:`UniGeoSeg.segment`: one prompt per tile through Phi-1.5 and the mask decoder.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers.models.phi.modeling_phi import PhiRotaryEmbedding

from .connector import CompressionConnector, MultiScaleCompressionConnector
from .cuda_graphs import CudaGraphCache
from .heads import HeadsConfig, UniGeoSegHeads
from .language import build_language_model, phi_config_from_official
from .mask_decoder import MaskDecoderConfig, SingleQueryMaskDecoder
from .pixel_decoder import MSDeformAttnPixelDecoder, PixelDecoderConfig
from .prompting import (
    ANSWER_TOKEN_INDEX,
    IMAGE_TOKEN_INDEX,
    REFER_TOKEN_INDEX,
    SEG_TOKEN_INDEX,
    Prompt,
)
from .swin import SwinBackbone, SwinConfig, WindowAttention, relative_position_index

#: Phi-1.5 as UniGeoSeg's checkpoint config.json describes it (vocabulary with [PAD], [SEG]).
PHI_1_5 = {"vocab_size": 50297, "hidden_size": 2048, "intermediate_size": 8192,
           "num_hidden_layers": 24, "num_attention_heads": 32, "hidden_act": "gelu_new",
           "max_position_embeddings": 2048, "layer_norm_eps": 1e-5, "rope_theta": 10000.0,
           "partial_rotary_factor": 0.5, "qk_layernorm": False, "tie_word_embeddings": False,
           "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attention_dropout": 0.0,
           "initializer_range": 0.02}


@dataclass(frozen=True)
class UniGeoSegConfig:
    """Every shape of the model. The defaults are the released model's."""

    language: dict = field(default_factory=lambda: dict(PHI_1_5))
    connector: str = "SparseConv_1"          # the checkpoint's mm_projector_type
    swin: SwinConfig = field(default_factory=SwinConfig)
    pixel_decoder: PixelDecoderConfig = field(default_factory=PixelDecoderConfig)
    mask_decoder: MaskDecoderConfig = field(default_factory=MaskDecoderConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    image_size: int = 512                    # letterbox side

    def __post_init__(self) -> None:
        if self.connector not in ("SparseConv_1", "MSCC"):
            raise ValueError(f"unknown connector {self.connector!r} (SparseConv_1 or MSCC)")
        res5 = self.swin.num_features[-1]
        if self.pixel_decoder.in_channels != tuple(self.swin.num_features):
            raise ValueError("pixel_decoder.in_channels must equal the Swin stage widths")
        if self.heads.hidden != self.language["hidden_size"] or self.heads.vision_dim != res5:
            raise ValueError("heads.hidden / vision_dim must match the LM width and res5")
        if self.heads.seg_dim != self.mask_decoder.hidden_dim:
            raise ValueError("heads.seg_dim must equal mask_decoder.hidden_dim")


@dataclass
class VisionFeatures:
    """The image side of B tiles, computed once and reused for every prompt.

    Attributes:
        res5: B x C5 x S/32 x S/32 Swin features (the SEG projector attends to them).
        visual_tokens: B x N x d tokens for the language model (N = 64 for SparseConv_1).
        mask_features: B x mask_dim x S/4 x S/4 from the pixel decoder.
        multi_scale: 3 maps, B x hidden x S/32, S/16, S/8, for the masked attention.
    """

    res5: Tensor
    visual_tokens: Tensor
    mask_features: Tensor
    multi_scale: list[Tensor]

    def select(self, index: int) -> VisionFeatures:
        """The features of tile ``index`` alone (batch of 1)."""
        one = slice(index, index + 1)
        return VisionFeatures(self.res5[one], self.visual_tokens[one], self.mask_features[one],
                              [level[one] for level in self.multi_scale])

    @property
    def nbytes(self) -> int:
        tensors = [self.res5, self.visual_tokens, self.mask_features, *self.multi_scale]
        return sum(t.numel() * t.element_size() for t in tensors)


class UniGeoSeg(nn.Module):
    """The full model; see the module docstring for the two-step inference."""

    def __init__(self, config: UniGeoSegConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or UniGeoSegConfig()
        language = build_language_model(phi_config_from_official(config.language))
        self.model = language.model  # embed_tokens, layers, final_layernorm (+ rotary buffers)
        self.model.vision_tower = SwinBackbone(config.swin)
        res5, hidden = config.swin.num_features[-1], config.language["hidden_size"]
        if config.connector == "SparseConv_1":
            self.model.mm_projector = CompressionConnector(
                res5, hidden, grid_size=config.image_size // 32)
        else:
            self.model.mm_projector = MultiScaleCompressionConnector(res5, hidden)
        self.lm_head = language.lm_head
        self.pixel_decoder = MSDeformAttnPixelDecoder(config.pixel_decoder)
        self.predictor = SingleQueryMaskDecoder(config.mask_decoder)
        self.heads = UniGeoSegHeads(config.heads)
        self._graphs: CudaGraphCache | None = None  # enable_cuda_graphs()

    @torch.no_grad()
    def compute_buffers(self) -> None:
        """Recompute the buffers that follow from the config: Swin's relative position
        indices and Phi's rotary frequencies. A model built on the meta device (as the loader
        builds it, to take no memory before the weights are read) has no values for them."""
        for module in self.modules():
            if isinstance(module, WindowAttention):
                module.relative_position_index.copy_(relative_position_index(module.window_size))
            elif isinstance(module, PhiRotaryEmbedding):
                with torch.device("cpu"):
                    fresh = PhiRotaryEmbedding(module.config)  # a few numbers, on the CPU
                module.inv_freq.copy_(fresh.inv_freq)
                module.original_inv_freq.copy_(fresh.original_inv_freq)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    # ------------------------------------------------------------------ CUDA graphs

    def enable_cuda_graphs(self, max_graphs: int = 16) -> None:
        """Replay the image side, the language model and the mask decoder as CUDA graphs,
        one captured per input shape (see ``cuda_graphs.py``). Needs the model on CUDA."""
        self._graphs = CudaGraphCache(self.device, max_graphs)

    def disable_cuda_graphs(self) -> None:
        self._graphs = None

    @property
    def cuda_graphs(self) -> CudaGraphCache | None:
        return self._graphs

    def _maybe_graphed(self, key: tuple, fn, inputs: list[Tensor]) -> tuple[Tensor, ...]:
        graphs = self.cuda_graphs
        if graphs is None or not inputs[0].is_cuda:
            return tuple(fn(*inputs))
        return graphs.run((*key, self.dtype), fn, inputs)

    # ------------------------------------------------------------------ image side

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> VisionFeatures:
        """B x 3 x S x S letterboxed, normalised tiles -> :class:`VisionFeatures`."""
        size = self.config.image_size
        if images.ndim != 4 or images.shape[1:] != (3, size, size):
            raise ValueError(f"expected B x 3 x {size} x {size} images, got {tuple(images.shape)}")
        images = images.to(device=self.device, dtype=self.dtype)
        res5, visual_tokens, mask_features, *multi_scale = self._maybe_graphed(
            ("vision", images.shape[0]), self._encode_flat, [images])
        return VisionFeatures(res5, visual_tokens, mask_features, multi_scale)

    def _encode_flat(self, images: Tensor) -> tuple[Tensor, ...]:
        features = self.model.vision_tower(images)
        visual_tokens = self.model.mm_projector(features["res5"])
        mask_features, multi_scale = self.pixel_decoder(features)
        return (features["res5"], visual_tokens, mask_features, *multi_scale)

    # ------------------------------------------------------------------ prompt side

    @torch.no_grad()
    def segment(self, vision: VisionFeatures, prompts: list[Prompt],
                timings: dict[str, float] | None = None) -> Tensor:
        """One prompt per tile -> final mask logits, B x 1 x S/4 x S/4 (threshold at 0).

        The same :class:`Prompt` object may be passed for every tile (a whole-raster run):
        its text side is then embedded once. With ``timings``, the seconds spent in the
        language model and in the mask decoder (SEG query + masked-attention decoder) are
        added to it (device-synchronised).
        """
        batch = vision.res5.shape[0]
        if len(prompts) != batch:
            raise ValueError(f"{len(prompts)} prompts for {batch} tiles")
        clock = _StageClock(self.device, timings)
        texts = {id(p): self._embed_text(p) for p in prompts}  # each distinct prompt once
        sequences = [texts[id(p)].with_image(vision.visual_tokens[i])
                     for i, p in enumerate(prompts)]
        hidden = self._run_language_model(sequences)
        clock.lap("language_s")
        refer_states = [hidden[i, texts[id(p)].refer_span(len(sequences[i]))]
                        for i, p in enumerate(prompts)]
        tasks = [p.task.value for p in prompts]
        if len(set(tasks)) == 1:
            queries = self.heads.build_seg_query(refer_states, tasks, vision.res5)
        else:
            # One SEG query per tile with its own task's LKM weight. (The official code applies
            # the first sample's weight to the whole batch; its eval batches are one task.)
            queries = torch.cat([self.heads.build_seg_query([refer_states[i]], [tasks[i]],
                                                            vision.res5[i:i + 1])
                                 for i in range(batch)])
        (logits,) = self._maybe_graphed(
            ("decoder", batch), self._decode_last,
            [queries, vision.mask_features, *vision.multi_scale])
        clock.lap("decoder_s")
        return logits

    def _decode_last(self, queries: Tensor, mask_features: Tensor,
                     *multi_scale: Tensor) -> tuple[Tensor]:
        return (self.predictor(list(multi_scale), mask_features, queries)[-1],)

    def _embed_text(self, prompt: Prompt) -> _TextSide:
        """The text side of one prompt's input embeddings, and its ``<refer>`` span.

        Follows the official ``concat_image_seg_embeds``: ``<image>`` becomes the visual
        tokens, the text chunk right after it goes through TATE, ``<refer>`` becomes the
        instruction tokens plus ``[SEG]``, ``<seg>`` is dropped. The sequence stops after
        ``<refer>``: the language model is causal, so later tokens cannot change the states
        the SEG query is read from.
        """
        embed = self.model.embed_tokens
        device = self.device
        before: list[Tensor] = []   # pieces before <image>
        after: list[Tensor] = []    # pieces after it
        seen_image = enhance_next = False
        for chunk in _chunks(prompt.input_ids):
            if chunk == [IMAGE_TOKEN_INDEX]:
                seen_image = enhance_next = True
                continue
            pieces = after if seen_image else before
            if chunk == [REFER_TOKEN_INDEX]:
                if not seen_image:
                    raise ValueError("the prompt has no <image> before <refer>")
                refer = embed(torch.tensor(prompt.refer_ids, device=device))
                pieces.append(refer)
                return _TextSide(before, after, refer.shape[0])
            if chunk in ([SEG_TOKEN_INDEX], [ANSWER_TOKEN_INDEX]):
                enhance_next = False
                continue
            piece = embed(torch.tensor(chunk, device=device))
            if enhance_next:
                coords = prompt.intera_coords
                piece = self.heads.enhance_template(
                    piece, prompt.task.value,
                    None if coords is None else coords.to(device=device, dtype=piece.dtype))
                enhance_next = False
            pieces.append(piece)
        raise ValueError("the prompt has no <refer> placeholder")

    def _run_language_model(self, embeds: list[Tensor]) -> Tensor:
        """B sequences (L_i x d) through Phi -> last hidden states (after the final norm).

        Equal lengths (one prompt for the whole batch) need no padding and no attention mask,
        and run as a CUDA graph when enabled; otherwise the batch is right-padded.
        """
        if len({e.shape[0] for e in embeds}) == 1:
            batch = torch.stack(embeds)
            (hidden,) = self._maybe_graphed(("language", *batch.shape[:2]),
                                            self._language_flat, [batch])
            return hidden
        longest = max(e.shape[0] for e in embeds)
        batch = embeds[0].new_zeros(len(embeds), longest, embeds[0].shape[1])
        attention = torch.zeros(len(embeds), longest, dtype=torch.long, device=self.device)
        for i, e in enumerate(embeds):
            batch[i, :e.shape[0]] = e
            attention[i, :e.shape[0]] = 1
        return self.model(inputs_embeds=batch, attention_mask=attention,
                          use_cache=False).last_hidden_state

    def _language_flat(self, inputs_embeds: Tensor) -> tuple[Tensor]:
        return (self.model(inputs_embeds=inputs_embeds, use_cache=False).last_hidden_state,)


@dataclass
class _TextSide:
    """One prompt's embedded text around the image: ``before + [visual tokens] + after``;
    the last ``refer_length`` tokens of ``after`` are the ``<refer>`` span."""

    before: list[Tensor]
    after: list[Tensor]
    refer_length: int

    def with_image(self, visual_tokens: Tensor) -> Tensor:
        """N x d visual tokens -> the whole input sequence, L x d."""
        return torch.cat([*self.before, visual_tokens, *self.after])

    def refer_span(self, sequence_length: int) -> slice:
        """Where the ``<refer>`` states are in a sequence of ``sequence_length`` tokens."""
        return slice(sequence_length - self.refer_length, sequence_length)


class _StageClock:
    """Adds device-synchronised stage durations to a dict (a no-op without one)."""

    def __init__(self, device: torch.device, timings: dict[str, float] | None) -> None:
        self.device, self.timings = device, timings
        self.last = self._now() if timings is not None else 0.0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self, name: str) -> None:
        if self.timings is None:
            return
        now = self._now()
        self.timings[name] = self.timings.get(name, 0.0) + now - self.last
        self.last = now


def _chunks(input_ids: list[int]) -> list[list[int]]:
    """Runs of ordinary token ids, with each placeholder (negative id) a chunk of its own."""
    chunks: list[list[int]] = []
    run: list[int] = []
    for token in input_ids:
        if token >= 0:
            run.append(token)
            continue
        if run:
            chunks.append(run)
            run = []
        chunks.append([token])
    if run:
        chunks.append(run)
    return chunks
