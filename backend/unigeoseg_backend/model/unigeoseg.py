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

Training runs :meth:`UniGeoSeg.forward` (both halves with autograd, every decoder stage's
masks, the language model's logits); inference and training call the same stage methods.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.phi.modeling_phi import PhiRotaryEmbedding

from .connector import CompressionConnector, MultiScaleCompressionConnector
from .cuda_graphs import CudaGraphCache
from .heads import HeadsConfig, UniGeoSegHeads
from .language import build_language_model, phi_config_from_official
from .mask_decoder import MaskDecoderConfig, SingleQueryMaskDecoder
from .pixel_decoder import MSDeformAttnPixelDecoder, PixelDecoderConfig
from .prompting import (
    ANSWER_TOKEN_INDEX,
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    REFER_TOKEN_INDEX,
    SEG_TOKEN_INDEX,
    TokenizedPrompt,
)
from .recompute import checkpoint_call
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


#: Parameter-name prefixes that the released forward never reads (the checkpoint holds them,
#: so they exist): see ``heads.UniGeoSegHeads`` and ``mask_decoder.SingleQueryMaskDecoder``.
UNUSED_PARAMETERS = tuple(f"{name}." for name in (
    "heads.ref_attn.proj", "heads.refer_pooling", "heads.reason_norm", "heads.task_embed",
    "heads.global_projector", "predictor.query_feat", "predictor.query_embed",
    "predictor.SEG_query_embed", "predictor.new_query_embed", "predictor.SEG_proj",
    "predictor.CLASS_proj")) + ("heads.seg_query",)

#: Name prefix -> optimizer group of ``UniGeoSeg.trainable_parameter_groups`` (first match).
_COMPONENTS = (("model.vision_tower.", "vision_tower"), ("model.mm_projector.", "connector"),
               ("model.", "language"), ("lm_head.", "language"),
               ("pixel_decoder.", "pixel_decoder"), ("predictor.", "mask_decoder"),
               ("heads.", "heads"))


def component_of(name: str) -> str:
    """The ``trainable_parameter_groups`` group of a parameter name."""
    return next(group for prefix, group in _COMPONENTS if name.startswith(prefix))


#: The official ``dataset_type`` whose response is trained with next-token cross-entropy.
LM_LOSS_DATASET_TYPE = "reason_seg"


@dataclass
class SegmentationOutputs:
    """What the training forward returns.

    Attributes:
        mask_logits: one B x 1 x S/4 x S/4 map per decoder stage (the initial query, then one
            per decoder layer: ``mask_decoder.num_layers + 1``), for deep supervision; the
            last is the prediction. Logits at mask-feature resolution, in letterboxed
            coordinates (the letterbox is not undone).
        lm_logits: B x T x V logits of the language model over the padded input sequence,
            or None when not computed.
        lm_labels: B x T next-token targets aligned with ``lm_logits`` (``lm_labels[b, t]``
            is the token after position t; IGNORE_INDEX = -100 where nothing is learnt:
            prompts without answer text, the user turn, image, ``<refer>`` and padding).
    """

    mask_logits: list[Tensor]
    lm_logits: Tensor | None
    lm_labels: Tensor | None


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

    # ------------------------------------------------------------------ what trains

    def set_trainable(self, *, vision_tower: bool = False) -> None:
        """``requires_grad`` on exactly the parameters that the training forward reads.

        The released recipe freezes Swin (``vision_tower=False``). The parameters in
        :data:`UNUSED_PARAMETERS` are never read and stay frozen, so that every trainable
        parameter gets a gradient each step (DDP needs no unused-parameter search), given
        ``lm_head`` is used too (see ``forward``'s ``compute_lm_logits``). Train/eval
        modes are left as they are.
        """
        for name, parameter in self.named_parameters():
            frozen = name.startswith(UNUSED_PARAMETERS) or (
                not vision_tower and name.startswith("model.vision_tower."))
            parameter.requires_grad_(not frozen)

    def trainable_parameter_groups(self) -> dict[str, dict[str, nn.Parameter]]:
        """The parameters with ``requires_grad``, by component, for optimizer groups.

        Groups: ``language`` (Phi-1.5 and ``lm_head``), ``vision_tower``, ``connector``,
        ``pixel_decoder``, ``mask_decoder`` (``predictor.*``), ``heads``; empty groups are
        left out. Each value maps parameter names (as in ``state_dict``) to parameters.
        """
        groups: dict[str, dict[str, nn.Parameter]] = {}
        for name, parameter in self.named_parameters():
            if parameter.requires_grad:
                groups.setdefault(component_of(name), {})[name] = parameter
        return groups

    def set_gradient_checkpointing(self, language: bool = True, *, vision_tower: bool = False,
                                   mask_decoder: bool = False) -> None:
        """Recompute activations in the backward instead of keeping them (off by default).

        ``language`` checkpoints each Phi decoder layer (transformers' own mechanism,
        ``GradientCheckpointingLayer``, with PyTorch's non-reentrant checkpoint);
        ``vision_tower`` each Swin stage; ``mask_decoder`` each masked-attention decoder layer.
        Each call sets all three. Outputs and gradients are unchanged. A layer checkpoints
        only in training mode with gradients recorded: inference (``no_grad``, CUDA graphs)
        and eval mode run as before.
        """
        for layer in self.model.layers:
            if not isinstance(layer, GradientCheckpointingLayer):
                raise TypeError(f"{type(layer).__name__} is no GradientCheckpointingLayer; "
                                "the installed transformers cannot checkpoint Phi's layers")
            layer.gradient_checkpointing = language
            layer._gradient_checkpointing_func = checkpoint_call
        self.model.vision_tower.gradient_checkpointing = vision_tower
        self.predictor.gradient_checkpointing = mask_decoder

    @property
    def gradient_checkpointing_state(self) -> dict[str, bool]:
        """Which components checkpoint: ``language``, ``vision_tower``, ``mask_decoder``."""
        return {"language": all(layer.gradient_checkpointing for layer in self.model.layers),
                "vision_tower": self.model.vision_tower.gradient_checkpointing,
                "mask_decoder": self.predictor.gradient_checkpointing}

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
        """``fn(*inputs)``, replayed as a CUDA graph when graphs are on. A graph replays under
        inference mode (no autograd), so with gradients enabled (training) it runs eagerly."""
        graphs = self.cuda_graphs
        if graphs is None or not inputs[0].is_cuda or torch.is_grad_enabled():
            return tuple(fn(*inputs))
        return graphs.run((*key, self.dtype), fn, inputs)

    # ------------------------------------------------------------------ image side

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> VisionFeatures:
        """B x 3 x S x S letterboxed, normalised tiles -> :class:`VisionFeatures`."""
        images = self._checked_images(images)
        res5, visual_tokens, mask_features, *multi_scale = self._maybe_graphed(
            ("vision", images.shape[0]), self._encode_flat, [images])
        return VisionFeatures(res5, visual_tokens, mask_features, multi_scale)

    def _checked_images(self, images: Tensor) -> Tensor:
        size = self.config.image_size
        if images.ndim != 4 or images.shape[1:] != (3, size, size):
            raise ValueError(f"expected B x 3 x {size} x {size} images, got {tuple(images.shape)}")
        return images.to(device=self.device, dtype=self.dtype)

    def _encode_flat(self, images: Tensor) -> tuple[Tensor, ...]:
        features = self.model.vision_tower(images)
        visual_tokens = self.model.mm_projector(features["res5"])
        mask_features, multi_scale = self.pixel_decoder(features)
        return (features["res5"], visual_tokens, mask_features, *multi_scale)

    # ------------------------------------------------------------------ prompt side

    @torch.no_grad()
    def segment(self, vision: VisionFeatures, prompts: list[TokenizedPrompt],
                timings: dict[str, float] | None = None) -> Tensor:
        """One prompt per tile -> final mask logits, B x 1 x S/4 x S/4 (threshold at 0).

        The same :class:`TokenizedPrompt` object may be passed for every tile (a whole-raster run):
        its text side is then embedded once. With ``timings``, the seconds spent in the
        language model and in the mask decoder (SEG query + masked-attention decoder) are
        added to it (device-synchronised).
        """
        clock = _StageClock(self.device, timings)
        _, _, refer_states = self._language_side(vision.visual_tokens, prompts, whole=False)
        clock.lap("language_s")
        queries = self._seg_queries(refer_states, prompts, vision.res5)
        (logits,) = self._maybe_graphed(
            ("decoder", len(prompts)), self._decode_last,
            [queries, vision.mask_features, *vision.multi_scale])
        clock.lap("decoder_s")
        return logits

    # ------------------------------------------------------------------ training

    def forward(self, images: Tensor, prompts: list[TokenizedPrompt], *,
                compute_lm_logits: bool | None = None) -> SegmentationOutputs:
        """The training forward: autograd on, no CUDA graphs, the same stages as inference.

        Args:
            images: B x 3 x S x S letterboxed, normalised tiles (``preprocess.py``).
            prompts: one per tile. Prompts of different lengths are right-padded with an
                attention mask; a batch may mix tasks (each tile gets its own LKM weight).
            compute_lm_logits: None: when some prompt carries answer text (``dataset_type``
                ``reason_seg``, whose response the official recipe trains with next-token
                cross-entropy). True: always, so that ``lm_head`` is in every step's graph
                (DDP without an unused-parameter search); prompts without answer text then
                have all-ignored labels. False: never.

        Returns:
            :class:`SegmentationOutputs`: the mask logits of every decoder stage and, when
            computed, the language model's logits with their next-token labels.
        """
        images = self._checked_images(images)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} tiles")
        res5, visual_tokens, mask_features, *multi_scale = self._encode_flat(images)
        trains_lm = [p.dataset_type == LM_LOSS_DATASET_TYPE for p in prompts]
        if compute_lm_logits is None:
            compute_lm_logits = any(trains_lm)
        hidden, texts, refer_states = self._language_side(visual_tokens, prompts,
                                                          whole=compute_lm_logits)
        queries = self._seg_queries(refer_states, prompts, res5)
        mask_logits = self.predictor(multi_scale, mask_features, queries)
        if not compute_lm_logits:
            return SegmentationOutputs(mask_logits, None, None)
        num_visual = visual_tokens.shape[1]
        labels = torch.full(hidden.shape[:2], IGNORE_INDEX, dtype=torch.long)
        for i, (text, trained) in enumerate(zip(texts, trains_lm, strict=True)):
            if trained:
                row = text.labels(num_visual)
                labels[i, :len(row) - 1] = torch.tensor(row[1:])  # position t predicts t + 1
        return SegmentationOutputs(mask_logits, self.lm_head(hidden),
                                   labels.to(self.device, non_blocking=True))

    # ------------------------------------------------------------------ stages

    def _language_side(self, visual_tokens: Tensor, prompts: list[TokenizedPrompt], *,
                       whole: bool) -> tuple[Tensor, list[_TextSide], list[Tensor]]:
        """Prompts and visual tokens (B x N x d) through Phi.

        Returns:
            The last hidden states (B x T x d, right-padded), each tile's text side, and its
            ``<refer>`` states (N_i x d). With ``whole`` the sequences run to the end of the
            conversation (the response the LM is trained on); without, they stop after
            ``<refer>``, which is all the SEG query reads.
        """
        if len(prompts) != visual_tokens.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {visual_tokens.shape[0]} tiles")
        distinct = {id(p): self._embed_text(p, whole=whole) for p in prompts}  # each once
        texts = [distinct[id(p)] for p in prompts]
        sequences = [text.with_image(visual_tokens[i]) for i, text in enumerate(texts)]
        hidden = self._run_language_model(sequences)
        num_visual = visual_tokens.shape[1]
        refer_states = [hidden[i, text.refer_span(num_visual)] for i, text in enumerate(texts)]
        return hidden, texts, refer_states

    def _seg_queries(self, refer_states: list[Tensor], prompts: list[TokenizedPrompt],
                     res5: Tensor) -> Tensor:
        """The mask decoder's queries, B x 1 x seg_dim."""
        tasks = [p.task for p in prompts]
        if len(set(tasks)) == 1:
            return self.heads.build_seg_query(refer_states, tasks, res5)
        # One SEG query per tile with its own task's LKM weight. (The official code applies
        # the first sample's weight to the whole batch; its batches are one task.)
        return torch.cat([self.heads.build_seg_query([refer_states[i]], [tasks[i]],
                                                     res5[i:i + 1])
                          for i in range(len(prompts))])

    def _decode_last(self, queries: Tensor, mask_features: Tensor,
                     *multi_scale: Tensor) -> tuple[Tensor]:
        return (self.predictor(list(multi_scale), mask_features, queries)[-1],)

    def _embed_text(self, prompt: TokenizedPrompt, *, whole: bool) -> _TextSide:
        """The text side of one prompt's input embeddings, its ``<refer>`` span and labels.

        Follows the official ``concat_image_seg_embeds``: ``<image>`` becomes the visual
        tokens, the text chunk right after it goes through TATE, ``<refer>`` becomes the
        instruction tokens plus ``[SEG]``, ``<answer>`` the answer tokens, ``<seg>`` is
        dropped. Labels follow the same expansion: ordinary tokens keep ``prompt.labels``,
        ``<refer>`` and the image are ignored, ``<answer>`` is labelled with its own ids.
        Without ``whole`` the sequence stops after ``<refer>``: the language model is
        causal, so later tokens cannot change the states the SEG query is read from.
        """
        embed = self.model.embed_tokens
        device = self.device
        text = _TextSide()
        seen_image = enhance_next = False
        offset = 0  # of the chunk in prompt.input_ids / prompt.labels
        for chunk in _chunks(prompt.input_ids):
            start, offset = offset, offset + len(chunk)
            if chunk == [IMAGE_TOKEN_INDEX]:
                seen_image = enhance_next = True
                continue
            if chunk == [REFER_TOKEN_INDEX]:
                if not seen_image:
                    raise ValueError("the prompt has no <image> before <refer>")
                text.refer_start = text.after_length
                text.refer_length = len(prompt.refer_ids)
                text.add(True, embed(torch.tensor(prompt.refer_ids, device=device)),
                         [IGNORE_INDEX] * len(prompt.refer_ids))
                if not whole:
                    return text
                enhance_next = False
                continue
            if chunk == [SEG_TOKEN_INDEX]:
                enhance_next = False
                continue
            if chunk == [ANSWER_TOKEN_INDEX]:
                enhance_next = False
                if whole and prompt.answer_ids is not None:
                    text.add(seen_image, embed(torch.tensor(prompt.answer_ids, device=device)),
                             list(prompt.answer_ids))
                continue
            piece = embed(torch.tensor(chunk, device=device))
            if enhance_next:
                coords = prompt.intera_coords
                piece = self.heads.enhance_template(
                    piece, prompt.task,
                    None if coords is None else coords.to(device=device, dtype=piece.dtype))
                enhance_next = False
            text.add(seen_image, piece, prompt.labels[start:offset])
        if text.refer_start is None:
            raise ValueError("the prompt has no <refer> placeholder")
        return text

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
    """One prompt's embedded text around the image: ``before + [visual tokens] + after``,
    with the official labels of the same tokens (the image's are added by :meth:`labels`)."""

    before: list[Tensor] = field(default_factory=list)
    after: list[Tensor] = field(default_factory=list)
    labels_before: list[int] = field(default_factory=list)
    labels_after: list[int] = field(default_factory=list)
    refer_start: int | None = None   # where ``<refer>`` starts in ``after`` (tokens)
    refer_length: int = 0

    @property
    def after_length(self) -> int:
        return len(self.labels_after)

    def add(self, after_image: bool, embeds: Tensor, labels: list[int]) -> None:
        """Append L x d embeddings and their L labels before or after the image."""
        (self.after if after_image else self.before).append(embeds)
        (self.labels_after if after_image else self.labels_before).extend(labels)

    def with_image(self, visual_tokens: Tensor) -> Tensor:
        """N x d visual tokens -> the whole input sequence, L x d."""
        return torch.cat([*self.before, visual_tokens, *self.after])

    def refer_span(self, num_visual: int) -> slice:
        """Where the ``<refer>`` states are in the sequence with ``num_visual`` image tokens."""
        assert self.refer_start is not None
        start = len(self.labels_before) + num_visual + self.refer_start
        return slice(start, start + self.refer_length)

    def labels(self, num_visual: int) -> list[int]:
        """The label of every input token (IGNORE_INDEX where nothing is learnt)."""
        return self.labels_before + [IGNORE_INDEX] * num_visual + self.labels_after


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
