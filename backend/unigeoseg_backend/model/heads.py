"""UniGeoSeg's task-aware heads: TATE, SEG pooling with LKM, and the SEG query builder.

Written after reading UniGeoSeg's ``llava_phi.py`` and ``language_model/projector.py``
(https://github.com/MiliLab/UniGeoSeg @73abc28). Where the paper and the released code differ,
this follows the code, because that is what the released checkpoint was trained with:

* TATE acts on the template chunk right after ``<image>`` (not on the user instruction); its
  referring branch scales each token instead of pooling, its reasoning branch broadcasts one
  pooled vector over the chunk, and all three branches run for every sample.
* LKM mixes the memory into the pooled SEG vector only (not the whole sequence), with a weight
  taken from the first sample's task, and is a no-op for interactive prompts.
* ``ref_attn.query`` is shared by TATE's referring branch and the SEG pooling.

Shapes use ``d`` = LLM width (2048), ``P`` = projector width (512), ``B`` = batch. Parameter names
follow the released checkpoint: its top-level names that are not under ``model.``, ``lm_head``,
``pixel_decoder.`` or ``predictor.`` (``UniGeoSeg`` registers this container as ``heads``;
``conversion.py`` adds and removes that prefix).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unigeoseg_protocol.vocabulary import TASKS

#: Row of each task (the vocabulary's names) in the official one-hot code and ``task_embed``:
#: ``'ref'`` 0, ``'reason'`` 1, ``'intera'`` 2. The checkpoint fixes this order, which is not
#: the vocabulary's.
TASK_ONE_HOT: Mapping[str, int] = {"referring": 0, "reasoning": 1, "interactive": 2}
if set(TASK_ONE_HOT) != set(TASKS) or sorted(TASK_ONE_HOT.values()) != list(range(len(TASKS))):
    raise RuntimeError(f"TASK_ONE_HOT must number exactly the tasks {TASKS} from 0, "
                       f"got {dict(TASK_ONE_HOT)}")


def _lkm_lambda_default() -> dict[str, float]:
    return {"referring": 0.2, "reasoning": 0.2, "interactive": 0.0}


@dataclass(frozen=True)
class HeadsConfig:
    """Widths of the heads. Defaults are the released UniGeoSeg (Phi-1.5, Swin-B, Mask2Former)."""

    #: LLM hidden width ``d``.
    hidden: int = 2048
    #: Channels of the Swin res5 map that the description projector attends to.
    vision_dim: int = 1024
    #: Width of the SEG query handed to the mask decoder.
    seg_dim: int = 256
    #: Width ``P`` of the description projector (and of its text and vision projections).
    proj_dim: int = 512
    #: LKM memory slots (``global_latents`` rows).
    n_latents: int = 4
    #: Learned queries of TATE's reasoning branch.
    reason_queries: int = 4
    #: Dropout of TATE's reasoning branch (active in train mode only).
    reason_dropout: float = 0.1
    #: LKM mixing weight per task.
    lkm_lambda: Mapping[str, float] = field(default_factory=_lkm_lambda_default)
    #: Description projector: depth, heads, width per head, MLP expansion.
    dproj_depth: int = 1
    dproj_heads: int = 8
    dproj_dim_head: int = 64
    dproj_ff_mult: int = 1
    #: Rows of the unused ``seg_query`` (Mask2Former's NUM_OBJECT_QUERIES).
    n_seg_queries: int = 100
    #: dtype the official ``__init__`` hard-codes for ``intera_coord_project``, ``intera_fuse``
    #: and ``reason_norm``; None gives torch's default dtype.
    legacy_dtype: torch.dtype | None = torch.bfloat16
    #: Std of the N(0, std) init of Linear and Embedding weights (Phi's ``initializer_range``).
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if set(self.lkm_lambda) != set(TASKS):
            raise ValueError(f"lkm_lambda needs exactly the keys {TASKS}, "
                             f"got {sorted(self.lkm_lambda)}")
        if not all(0.0 <= v <= 1.0 for v in self.lkm_lambda.values()):
            raise ValueError(f"lkm_lambda values must lie in [0, 1], got {dict(self.lkm_lambda)}")


def task_index(task: str) -> int:
    """Position of ``task`` in the official one-hot code; raises ValueError for unknown tasks."""
    if task not in TASK_ONE_HOT:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    return TASK_ONE_HOT[task]


def _check_tokens(x: Tensor, width: int, what: str) -> None:
    if x.dim() != 2 or x.shape[1] != width or x.shape[0] == 0:
        raise ValueError(f"{what} must be N x {width} with N >= 1, got {tuple(x.shape)}")


class AttentionPooling(nn.Module):
    """One learned query attends over N token states: ``softmax(q Xᵀ / sqrt(d)) X``.

    ``proj`` is never used by the forward pass; it exists because the checkpoint holds it.
    """

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, hidden))
        self.proj = nn.Linear(hidden, hidden)

    def weights(self, x: Tensor) -> Tensor:
        """N x d -> attention weights (N,), summing to 1."""
        scores = self.query.to(x.dtype) @ x.transpose(0, 1) / x.shape[-1] ** 0.5  # 1 x N
        return torch.softmax(scores, dim=-1).squeeze(0)

    def forward(self, x: Tensor) -> Tensor:
        """N x d -> pooled (d,)."""
        return self.weights(x) @ x


class EnhancedAttentionPooling(nn.Module):
    """TATE's reasoning pooling: mean of h query poolings, fused with a projected token mean.

    ``r = layer_norm(dropout(fusion([m ; f])))`` with ``m = mean_i softmax(q_i Xᵀ / sqrt(d)) X``
    (i over the ``multi_query`` rows) and ``f = mean_t functional_proj(X)_t``.
    """

    def __init__(self, hidden: int, num_queries: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        self.multi_query = nn.Parameter(torch.randn(num_queries, hidden) * 0.01)
        self.functional_proj = nn.Linear(hidden, hidden)
        self.fusion = nn.Linear(2 * hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(hidden)

    def forward(self, x: Tensor) -> Tensor:
        """N x d -> pooled (d,)."""
        scores = self.multi_query.to(x.dtype) @ x.transpose(0, 1) / x.shape[-1] ** 0.5  # h x N
        attended = (torch.softmax(scores, dim=-1) @ x).mean(dim=0)  # h x d -> d
        functional = self.functional_proj(x).mean(dim=0)  # N x d -> d
        fused = self.fusion(torch.cat([attended, functional], dim=-1))
        return self.layer_norm(self.dropout(fused))


def _linear_in_input_dtype(layer: nn.Linear, x: Tensor) -> Tensor:
    """``layer(x)`` computed in ``x``'s dtype (``intera_*`` are bf16 as constructed).

    The official code only ever runs these layers with everything in one dtype (fp32 eval,
    bf16 training), where this equals ``layer(x)``.
    """
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return F.linear(x, layer.weight.to(x.dtype), bias)


def pad_coords(coords: Tensor | None, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Interactive prompt coordinates as the n x 4 rows TATE projects.

    Args:
        coords: normalised image coordinates in [0, 1], (X, Y) order: a box ``XYXY`` (4,) or
            (1, 4), or n points (2,) or (n, 2); None or empty when there are none.

    Returns:
        n x 4: boxes as given, points zero-padded to ``[x, y, 0, 0]``, ``zeros(1, 4)`` for none.
    """
    if coords is None or coords.numel() == 0:
        return torch.zeros(1, 4, device=device, dtype=dtype)
    coords = coords.to(device=device, dtype=dtype)
    if coords.dim() == 1:
        coords = coords.unsqueeze(0)
    if coords.dim() != 2 or coords.shape[1] not in (2, 4):
        raise ValueError(f"coords must be n x 2 points or n x 4 boxes, got {tuple(coords.shape)}")
    if coords.shape[1] == 2:
        coords = torch.cat([coords, torch.zeros_like(coords)], dim=1)
    return coords


class TaskAwareTextEnhancement(nn.Module):
    """TATE on the template chunk E (L x d) that follows ``<image>`` in the prompt.

    * referring: ``E * a[:, None]`` with ``a = softmax(q_ref Eᵀ / sqrt(d))`` (per-token scaling,
      not a pooled sum);
    * reasoning: ``r = enhanced_reasoning_pooling(E)`` repeated on all L rows;
    * interactive: ``intera_fuse([E ; Z])``, Z = L x d zeros whose first n rows are
      ``intera_coord_project(C)`` (C = :func:`pad_coords`; n clipped to L). With no coordinates
      C = ``zeros(1, 4)``, so row 0 of Z is the projection's bias.

    All three branches run every time and are combined with the one-hot task code
    (``ref * is_ref + reason * is_reason + intera * is_intera + E * (1 - sum)``), as the official
    code does to keep every parameter in the autograd graph (and the dropout RNG in step).
    """

    def __init__(self, ref_attn: AttentionPooling,
                 enhanced_reasoning_pooling: EnhancedAttentionPooling,
                 intera_coord_project: nn.Linear, intera_fuse: nn.Linear) -> None:
        super().__init__()
        self.ref_attn = ref_attn
        self.enhanced_reasoning_pooling = enhanced_reasoning_pooling
        self.intera_coord_project = intera_coord_project
        self.intera_fuse = intera_fuse

    @classmethod
    def from_config(cls, cfg: HeadsConfig) -> TaskAwareTextEnhancement:
        """Fresh parameters (for standalone use; :class:`UniGeoSegHeads` injects its own)."""
        return cls(AttentionPooling(cfg.hidden),
                   EnhancedAttentionPooling(cfg.hidden, cfg.reason_queries, cfg.reason_dropout),
                   nn.Linear(4, cfg.hidden, dtype=cfg.legacy_dtype),
                   nn.Linear(2 * cfg.hidden, cfg.hidden, dtype=cfg.legacy_dtype))

    def forward(self, embeds: Tensor, task: str, coords: Tensor | None = None) -> Tensor:
        """Enhance one sample's template chunk.

        Args:
            embeds: L x d token embeddings of the chunk.
            task: ``referring``, ``reasoning`` or ``interactive``.
            coords: interactive prompt coordinates, see :func:`pad_coords`.

        Returns:
            L x d, in ``embeds``' dtype.
        """
        _check_tokens(embeds, self.intera_fuse.out_features, "embeds")
        index = task_index(task)
        is_ref, is_reason, is_intera = (float(index == i) for i in range(3))
        length = embeds.shape[0]

        ref = embeds * self.ref_attn.weights(embeds).unsqueeze(-1)
        reason = self.enhanced_reasoning_pooling(embeds).unsqueeze(0).expand(length, -1)

        points = _linear_in_input_dtype(
            self.intera_coord_project, pad_coords(coords, embeds.device, embeds.dtype))  # n x d
        n = min(points.shape[0], length)
        z = torch.zeros_like(embeds)
        z[:n] = points[:n]
        intera = _linear_in_input_dtype(self.intera_fuse, torch.cat([embeds, z], dim=-1))

        return (reason * is_reason + ref * is_ref + intera * is_intera
                + embeds * (1.0 - is_reason - is_ref - is_intera))

    def forward_batch(self, embeds: Sequence[Tensor], tasks: Sequence[str],
                      coords: Sequence[Tensor | None] | None = None) -> list[Tensor]:
        """Per-sample :meth:`forward` over B chunks of lengths L_i; returns B tensors L_i x d."""
        if len(tasks) != len(embeds) or (coords is not None and len(coords) != len(embeds)):
            raise ValueError(f"{len(embeds)} chunks, {len(tasks)} tasks, "
                             f"{None if coords is None else len(coords)} coords")
        coords = [None] * len(embeds) if coords is None else coords
        return [self(e, t, c) for e, t, c in zip(embeds, tasks, coords, strict=True)]


class LatentKnowledgeMemory(nn.Module):
    """LKM on a pooled SEG vector p: ``p' = (1 - λ) p + λ Σ_k softmax_k(G p) G_k``.

    G = ``global_latents`` (n_latents x d); the slot weights use no scaling or temperature.
    λ = ``lkm_lambda[task]`` (0.2 referring/reasoning, 0 interactive by default). The formula is
    evaluated even when λ is 0, so ``global_latents`` stays in the graph (with zero gradient).
    """

    def __init__(self, global_latents: nn.Parameter, lkm_lambda: Mapping[str, float]) -> None:
        super().__init__()
        self.global_latents = global_latents
        self.lkm_lambda = dict(lkm_lambda)

    @classmethod
    def from_config(cls, cfg: HeadsConfig) -> LatentKnowledgeMemory:
        return cls(nn.Parameter(torch.randn(cfg.n_latents, cfg.hidden) * 0.01), cfg.lkm_lambda)

    def forward(self, pooled: Tensor, task: str) -> Tensor:
        """(..., d) -> (..., d)."""
        task_index(task)
        lam = self.lkm_lambda[task]
        latents = self.global_latents.to(device=pooled.device, dtype=pooled.dtype)
        weights = torch.softmax(latents @ pooled.unsqueeze(-1), dim=-2)  # ... x n x 1
        recalled = (latents * weights).sum(dim=-2)  # ... x d
        return (1 - lam) * pooled + lam * recalled


class SegPooling(nn.Module):
    """Pools each sample's ``<refer>`` states S (instruction tokens + ``[SEG]``) into p', then
    returns ``[p'; S]``.

    ``p = ref_attn(S)`` (the query shared with TATE), ``p' = lkm(p, tasks[0])``: the official
    code takes λ from the **first sample's task for the whole batch**, so mixed-task batches
    use that one λ. A sample with no ``<refer>`` states gets p' = 0 and no LKM.
    """

    def __init__(self, ref_attn: AttentionPooling, lkm: LatentKnowledgeMemory) -> None:
        super().__init__()
        self.ref_attn = ref_attn
        self.lkm = lkm

    def forward(self, states: Sequence[Tensor], tasks: Sequence[str]) -> list[Tensor]:
        """B tensors S_i (N_i x d) -> B tensors ``[p'_i; S_i]`` ((N_i + 1) x d)."""
        if len(states) != len(tasks) or not tasks:
            raise ValueError(f"need one task per sample, got {len(states)} samples and "
                             f"{len(tasks)} tasks")
        width = self.ref_attn.query.shape[-1]
        out = []
        for s in states:
            if s.dim() != 2 or s.shape[-1] != width:
                raise ValueError(f"refer states must be N x {width}, got {tuple(s.shape)}")
            if s.shape[0] == 0:
                pooled = s.new_zeros(width)
            else:
                pooled = self.lkm(self.ref_attn(s), tasks[0])
            out.append(torch.cat([pooled.unsqueeze(0), s], dim=0))
        return out


class PerceiverAttention(nn.Module):
    """Latents attend to the media tokens plus latent 0 (no latent-to-latent attention)."""

    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8) -> None:
        super().__init__()
        inner = dim_head * heads
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, media: Tensor, latents: Tensor) -> Tensor:
        """media B x V x D, latents B x n x D -> B x n x D (the residual is the caller's)."""
        media, latents = self.norm_media(media), self.norm_latents(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([media, latents[:, :1]], dim=1)).chunk(2, dim=-1)
        # B N (H C) -> B H N C
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        attn = torch.softmax((q * self.scale) @ k.transpose(-2, -1), dim=-1)
        return self.to_out((attn @ v).transpose(1, 2).flatten(2))  # B H n C -> B n (H C)


class DescriptionProjector(nn.Module):
    """SegEarth-R1's D_Projector: Perceiver blocks, returning latent 0 only.

    Each block is ``x = attn(media, x) + x; x = MLP(LN(x)) + x`` (MLP D -> ff_mult*D -> D, GELU,
    no biases); a final LayerNorm follows. Queries are all latents but keys/values are the
    media and latent 0, so the output depends on latent 0 and the media only.
    """

    def __init__(self, dim: int = 512, depth: int = 1, dim_head: int = 64, heads: int = 8,
                 ff_mult: int = 1) -> None:
        super().__init__()
        inner = ff_mult * dim
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads),
                           nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False),
                                         nn.GELU(), nn.Linear(inner, dim, bias=False))])
            for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, latents: Tensor, media: Tensor) -> Tensor:
        """latents B x n x D, media B x V x D -> B x 1 x D (latent 0)."""
        for attn, ff in self.layers:
            latents = attn(media, latents) + latents
            latents = ff(latents) + latents
        return self.norm(latents[:, :1])


class SegQueryBuilder(nn.Module):
    """The single mask-decoder query from p' and the res5 map.

    ``SEG = SEG_token_projector([origin_SEG_token_projector(p'); d_layers(text_projector(p'),
    local_project(res5 tokens))])``. The official code feeds ``text_projector([p'; S])`` to
    ``d_layers`` and keeps only latent 0's output, which depends on p' alone (see
    :class:`DescriptionProjector`), so only p' is projected here: same result, less work.
    """

    def __init__(self, origin_SEG_token_projector: nn.Linear, text_projector: nn.Linear,
                 local_project: nn.Linear, d_layers: DescriptionProjector,
                 SEG_token_projector: nn.Linear) -> None:
        super().__init__()
        self.origin_SEG_token_projector = origin_SEG_token_projector
        self.text_projector = text_projector
        self.local_project = local_project
        self.d_layers = d_layers
        self.SEG_token_projector = SEG_token_projector

    @classmethod
    def from_config(cls, cfg: HeadsConfig) -> SegQueryBuilder:
        return cls(nn.Linear(cfg.hidden, cfg.proj_dim), nn.Linear(cfg.hidden, cfg.proj_dim),
                   nn.Linear(cfg.vision_dim, cfg.proj_dim),
                   DescriptionProjector(cfg.proj_dim, cfg.dproj_depth, cfg.dproj_dim_head,
                                        cfg.dproj_heads, cfg.dproj_ff_mult),
                   nn.Linear(2 * cfg.proj_dim, cfg.seg_dim))

    def forward(self, seg_states: Sequence[Tensor], res5: Tensor) -> Tensor:
        """
        Args:
            seg_states: B tensors ``[p'; S]`` ((N_i + 1) x d, from :class:`SegPooling`), or a
                B x N x d tensor; row 0 (p') is what is used.
            res5: B x C5 x H x W Swin res5 features (C5 = 1024, 16 x 16 for a 512 px input).

        Returns:
            B x 1 x seg_dim.
        """
        if res5.dim() != 4 or res5.shape[0] != len(seg_states) \
                or res5.shape[1] != self.local_project.in_features:
            raise ValueError(f"res5 must be {len(seg_states)} x {self.local_project.in_features} "
                             f"x H x W, got {tuple(res5.shape)}")
        pooled = torch.stack([s[0] for s in seg_states])  # B x d
        origin = self.origin_SEG_token_projector(pooled).unsqueeze(1)  # B x 1 x P
        vision = self.local_project(res5.flatten(2).transpose(1, 2))  # B C H W -> B HW C -> B HW P
        described = self.d_layers(self.text_projector(pooled).unsqueeze(1), vision)  # B x 1 x P
        return self.SEG_token_projector(torch.cat([origin, described], dim=-1))


class UniGeoSegHeads(nn.Module):
    """Every head parameter of the released checkpoint, under its checkpoint name (relative to
    this module).

    The components (:attr:`text_enhancement`, :attr:`latent_memory`, :attr:`seg_pooling`,
    :attr:`seg_query_builder`) are views built on access around the modules registered here,
    so each parameter has one state_dict name and ``ref_attn`` is shared as in the official
    model. These exist in the checkpoint but are never used at inference:

    ====================== ================= ==================================================
    name                   shape             why it is unused
    ====================== ================= ==================================================
    ``ref_attn.proj``      Linear d -> d     AttentionPooling never applies ``proj``
    ``refer_pooling``      AttentionPooling  created, never called (superseded by ``ref_attn``)
    ``reason_norm``        LayerNorm(d) bf16 created, never called
    ``task_embed``         Embedding(3, d)   created (twice), never called; fp32 (2nd wins)
    ``global_projector``   Linear d -> P     created for LKM, never called
    ``seg_query``          100 x d, zeros    only read when ``use_seg_query=True`` (not released)
    ====================== ================= ==================================================

    ``intera_coord_project``, ``intera_fuse`` and ``reason_norm`` are constructed in bfloat16
    (``cfg.legacy_dtype``), as the official ``__init__`` does.
    """

    def __init__(self, cfg: HeadsConfig | None = None) -> None:
        super().__init__()
        cfg = HeadsConfig() if cfg is None else cfg
        self.cfg = cfg
        d, p = cfg.hidden, cfg.proj_dim
        # TATE and SEG pooling
        self.ref_attn = AttentionPooling(d)
        self.enhanced_reasoning_pooling = EnhancedAttentionPooling(d, cfg.reason_queries,
                                                                   cfg.reason_dropout)
        self.intera_coord_project = nn.Linear(4, d, dtype=cfg.legacy_dtype)
        self.intera_fuse = nn.Linear(2 * d, d, dtype=cfg.legacy_dtype)
        self.global_latents = nn.Parameter(torch.randn(cfg.n_latents, d) * 0.01)
        # SEG query
        self.origin_SEG_token_projector = nn.Linear(d, p)
        self.text_projector = nn.Linear(d, p)
        self.local_project = nn.Linear(cfg.vision_dim, p)
        self.d_layers = DescriptionProjector(p, cfg.dproj_depth, cfg.dproj_dim_head,
                                             cfg.dproj_heads, cfg.dproj_ff_mult)
        self.SEG_token_projector = nn.Linear(2 * p, cfg.seg_dim)
        # unused, kept so the checkpoint loads strictly
        self.refer_pooling = AttentionPooling(d)
        self.reason_norm = nn.LayerNorm(d, dtype=cfg.legacy_dtype)
        self.task_embed = nn.Embedding(len(TASK_ONE_HOT), d)
        self.global_projector = nn.Linear(d, p)
        self.seg_query = nn.Parameter(torch.zeros(cfg.n_seg_queries, d))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official fresh init: HF ``post_init`` draws every Linear and Embedding weight from
        N(0, initializer_range) and zeroes Linear biases; the bare parameters keep their own
        init (``query`` N(0, 1), ``multi_query`` and ``global_latents`` N(0, 0.01²),
        ``seg_query`` zeros)."""
        std = self.cfg.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    @property
    def text_enhancement(self) -> TaskAwareTextEnhancement:
        return TaskAwareTextEnhancement(self.ref_attn, self.enhanced_reasoning_pooling,
                                        self.intera_coord_project, self.intera_fuse)

    @property
    def latent_memory(self) -> LatentKnowledgeMemory:
        return LatentKnowledgeMemory(self.global_latents, self.cfg.lkm_lambda)

    @property
    def seg_pooling(self) -> SegPooling:
        return SegPooling(self.ref_attn, self.latent_memory)

    @property
    def seg_query_builder(self) -> SegQueryBuilder:
        return SegQueryBuilder(self.origin_SEG_token_projector, self.text_projector,
                               self.local_project, self.d_layers, self.SEG_token_projector)

    def enhance_template(self, embeds: Tensor, task: str, coords: Tensor | None = None) -> Tensor:
        """TATE on one sample's post-``<image>`` template chunk: L x d -> L x d."""
        return self.text_enhancement(embeds, task, coords)

    def build_seg_query(self, refer_states: Sequence[Tensor], tasks: Sequence[str],
                        res5: Tensor) -> Tensor:
        """B tensors of ``<refer>`` hidden states (N_i x d), B tasks and res5 (B x C5 x H x W)
        -> the mask decoder's query, B x 1 x seg_dim."""
        return self.seg_query_builder(self.seg_pooling(refer_states, tasks), res5)
