"""Tensor names: the released checkpoint's and this model's, converted both ways.

The released UniGeoSeg (transformers 4.36) and :class:`~.unigeoseg.UniGeoSeg` differ in two
ways, each described by one table here:

* **Module layout** (:data:`PREFIX_TABLE`): the released model keeps its task heads
  (``ref_attn``, ``global_latents``, ``d_layers``, ...) at the top level of the state dict;
  this model registers them under one ``heads`` module. Every other prefix is the same.
* **Phi attention** (:data:`ORIGINAL_TO_CONVERTED_KEY_MAPPING`): transformers 4.36 keeps one
  fused ``self_attn.query_key_value`` Linear per layer, rows interleaved per head;
  transformers >= 4.37 (installed here) splits it into ``q_proj`` / ``k_proj`` / ``v_proj``
  and has no load hook for the old name.

Public API:
    released_to_model(state, num_heads) -> dict        (released names -> this model's)
    model_to_released(state, num_heads, *, fused_qkv=True) -> dict      (the inverse)
    released_name(name) -> str                         (one name, q/k/v left split)
    convert_phi_state_dict(state, prefix="model.", *, num_heads) -> dict (Phi tensors only)
    extract_language_state(state, prefix="model.") -> dict
    split_fused_qkv(weight, bias, num_heads) / fuse_qkv(q, k, v, num_heads)

Every function works on meta tensors too (names and shapes without storage).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import torch
from torch import Tensor

from ..errors import WeightsError

logger = logging.getLogger(__name__)

#: The task heads' top-level names in the released checkpoint (modules and bare parameters).
HEAD_NAMES = (
    "ref_attn", "enhanced_reasoning_pooling", "intera_coord_project", "intera_fuse",
    "global_latents", "origin_SEG_token_projector", "text_projector", "local_project",
    "d_layers", "SEG_token_projector", "refer_pooling", "reason_norm", "task_embed",
    "global_projector", "seg_query",
)

#: (released prefix, model prefix), one row per top-level module or bare parameter. A name
#: belongs to a row when it equals the prefix or continues it after a dot. The language rows
#: hold the fused/split q/k/v difference, which ORIGINAL_TO_CONVERTED_KEY_MAPPING resolves.
PREFIX_TABLE: tuple[tuple[str, str], ...] = (
    ("model.embed_tokens", "model.embed_tokens"),
    ("model.layers", "model.layers"),
    ("model.final_layernorm", "model.final_layernorm"),
    ("lm_head", "lm_head"),
    ("model.vision_tower", "model.vision_tower"),
    ("model.mm_projector", "model.mm_projector"),
    ("pixel_decoder", "pixel_decoder"),
    ("predictor", "predictor"),
    *((name, f"heads.{name}") for name in HEAD_NAMES),
)

#: Marks the fused projection in the key table: one source tensor becomes three.
SPLIT_QKV = "<split q/k/v>"

#: Phi source key (with the body prefix removed) -> PhiForCausalLM key. Tried in order; the
#: first full match wins. ``None`` drops the key; ``SPLIT_QKV`` routes it to the q/k/v split.
#: Already-split names map to themselves, so converting a >= 4.37 checkpoint changes nothing.
ORIGINAL_TO_CONVERTED_KEY_MAPPING: tuple[tuple[str, str | None], ...] = (
    (r"embed_tokens\.weight", r"model.embed_tokens.weight"),
    (r"final_layernorm\.(weight|bias)", r"model.final_layernorm.\1"),
    (r"layers\.(\d+)\.input_layernorm\.(weight|bias)", r"model.layers.\1.input_layernorm.\2"),
    (r"layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"model.layers.\1.mlp.\2.\3"),
    (r"layers\.(\d+)\.self_attn\.dense\.(weight|bias)", r"model.layers.\1.self_attn.dense.\2"),
    (r"layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj)\.(weight|bias)",
     r"model.layers.\1.self_attn.\2.\3"),
    (r"layers\.(\d+)\.self_attn\.(q_layernorm|k_layernorm)\.(weight|bias)",
     r"model.layers.\1.self_attn.\2.\3"),
    (r"layers\.(\d+)\.self_attn\.query_key_value\.(weight|bias)", SPLIT_QKV),
    # Persistent in some pre-4.36 exports; recomputed from the config since.
    (r"layers\.(\d+)\.self_attn\.rotary_emb\.inv_freq", None),
)

#: The output projection sits outside the body prefix in UniGeoSeg (``lm_head.weight``).
LM_HEAD_MAPPING: tuple[tuple[str, str | None], ...] = (
    (r"lm_head\.(weight|bias)", r"lm_head.\1"),
)

_COMPILED_BODY = tuple((re.compile(src), dst) for src, dst in ORIGINAL_TO_CONVERTED_KEY_MAPPING)
_COMPILED_HEAD = tuple((re.compile(src), dst) for src, dst in LM_HEAD_MAPPING)
_QKV_KEY = re.compile(r"layers\.(\d+)\.self_attn\.query_key_value\.(weight|bias)")
_SPLIT_KEY = re.compile(r"model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj)\.(weight|bias)")
_LANGUAGE_PREFIXES = ("model.embed_tokens", "model.layers", "model.final_layernorm", "lm_head")


# ====================================================================== q/k/v rows


def _split_rows(fused: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """A fused weight ((3*D) x D_in) or bias (3*D) -> q, k, v (D x D_in or D), contiguous."""
    if fused.shape[0] % (3 * num_heads) != 0:
        raise WeightsError(f"fused query_key_value must have 3*num_heads*head_dim rows with "
                           f"num_heads={num_heads}; got {tuple(fused.shape)}")
    head_dim = fused.shape[0] // (3 * num_heads)
    rest = tuple(fused.shape[1:])
    rows = fused.reshape(num_heads, 3, head_dim, *rest)  # (h, q|k|v, hd, ...)
    q, k, v = (rows[:, j].reshape(num_heads * head_dim, *rest).contiguous() for j in range(3))
    return q, k, v


def split_fused_qkv(
    weight: Tensor, bias: Tensor | None, num_heads: int
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None, Tensor, Tensor | None]:
    """Split transformers-4.36 Phi ``query_key_value`` into q/k/v projections.

    4.36's ``PhiAttention._split_heads`` (copied from BLOOM) views the fused output as
    ``[..., num_heads, 3, head_dim]``, so the 3*D rows are interleaved per head:
    ``h0:q, h0:k, h0:v, h1:q, ...`` (each block head_dim rows), not ``[Q | K | V]``.

    Args:
        weight: (3*D) x D_in fused weight, D = num_heads * head_dim.
        bias: (3*D) fused bias, or None.
        num_heads: attention heads (32 for Phi-1.5).

    Returns:
        q_w, q_b, k_w, k_b, v_w, v_b: D x D_in weights and (D) biases (None without bias).
    """
    if weight.dim() != 2:
        raise WeightsError(f"fused query_key_value weight must be (3*num_heads*head_dim)xD_in; "
                           f"got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise WeightsError(f"fused query_key_value bias must be ({weight.shape[0]},); "
                           f"got {tuple(bias.shape)}")
    q_w, k_w, v_w = _split_rows(weight, num_heads)
    q_b, k_b, v_b = (None, None, None) if bias is None else _split_rows(bias, num_heads)
    return q_w, q_b, k_w, k_b, v_w, v_b


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, num_heads: int) -> Tensor:
    """transformers-4.36 ``query_key_value`` from q/k/v (weights D x D_in or biases D).

    The inverse of :func:`split_fused_qkv`: rows interleaved per head,
    ``h0:q, h0:k, h0:v, h1:q, ...`` (head_dim rows each).
    """
    if not (q.shape == k.shape == v.shape) or q.shape[0] % num_heads:
        raise ValueError(f"q/k/v shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} "
                         f"cannot be fused with num_heads={num_heads}")
    head_dim = q.shape[0] // num_heads
    rest = tuple(q.shape[1:])
    parts = [t.reshape(num_heads, head_dim, *rest) for t in (q, k, v)]
    return torch.stack(parts, dim=1).reshape(3 * q.shape[0], *rest)


# ====================================================================== Phi tensors


def _match(key: str, table: tuple[tuple[re.Pattern[str], str | None], ...]
           ) -> tuple[bool, str | None]:
    for pattern, dst in table:
        m = pattern.fullmatch(key)
        if m:
            return True, (dst if dst in (None, SPLIT_QKV) else m.expand(dst))
    return False, None


def convert_phi_state_dict(
    state: Mapping[str, Tensor], prefix: str = "model.", *, num_heads: int
) -> dict[str, Tensor]:
    """Rename a Phi state dict to the installed PhiForCausalLM layout.

    Args:
        state: language-model tensors only: the Phi body under ``prefix`` and ``lm_head.*``
            (see extract_language_state for a full UniGeoSeg checkpoint). Fused 4.36
            ``query_key_value`` tensors are split (a weight and its bias independently);
            already-split tensors pass unchanged.
        prefix: where the Phi body sits in ``state`` (``"model."`` in UniGeoSeg).
        num_heads: attention heads; the fused layout cannot be split without it.

    Returns:
        A new dict keyed ``model.*`` / ``lm_head.*``, ready for ``load_state_dict(strict=True)``.

    Raises:
        WeightsError: keys the table cannot map (all named in ``details["unmapped_keys"]``),
            or a target written twice (fused and split q/k/v for one layer).
    """
    out: dict[str, Tensor] = {}
    unmapped: list[str] = []
    duplicates: list[str] = []
    split_layers: set[str] = set()

    def put(dst: str, tensor: Tensor) -> None:
        if dst in out:
            duplicates.append(dst)
        out[dst] = tensor

    for key, tensor in state.items():
        ok, dst = (False, None)
        if key.startswith(prefix):
            ok, dst = _match(key[len(prefix):], _COMPILED_BODY)
        if not ok:
            ok, dst = _match(key, _COMPILED_HEAD)
        if not ok:
            unmapped.append(key)
        elif dst == SPLIT_QKV:
            m = _QKV_KEY.fullmatch(key[len(prefix):])
            assert m is not None  # the table routed it here
            layer, kind = m.groups()
            split_layers.add(layer)
            base = f"model.layers.{layer}.self_attn."
            for name, part in zip(("q_proj", "k_proj", "v_proj"), _split_rows(tensor, num_heads),
                                  strict=True):
                put(f"{base}{name}.{kind}", part)
        elif dst is None:
            logger.debug("dropping %s (recomputed from the config)", key)
        else:
            put(dst, tensor)
    if unmapped:
        raise WeightsError(f"{len(unmapped)} checkpoint key(s) match no Phi name: "
                           f"{sorted(unmapped)[:10]}", {"unmapped_keys": sorted(unmapped)})
    if duplicates:
        raise WeightsError(f"checkpoint writes {sorted(set(duplicates))[:10]} more than once "
                           "(both fused and split q/k/v?)", {"duplicate_keys": duplicates})
    if split_layers:
        logger.debug("split fused query_key_value in %d layer(s)", len(split_layers))
    return out


def extract_language_state(
    state: Mapping[str, Tensor], prefix: str = "model."
) -> dict[str, Tensor]:
    """The language-model tensors of a full UniGeoSeg state dict (others stay behind).

    Selects ``{prefix}embed_tokens.*``, ``{prefix}layers.*``, ``{prefix}final_layernorm.*``
    and ``lm_head.*``; ``{prefix}mm_projector.*`` / ``{prefix}vision_tower.*`` are not taken.
    """
    body = re.compile(re.escape(prefix) + r"(embed_tokens|layers|final_layernorm)\.")
    return {k: v for k, v in state.items() if body.match(k) or k.startswith("lm_head.")}


def _fuse_language(state: Mapping[str, Tensor], num_heads: int) -> dict[str, Tensor]:
    """Split q/k/v -> fused ``query_key_value`` (in the place of ``q_proj``), in order."""
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        m = _SPLIT_KEY.fullmatch(name)
        if m is None:
            out[name] = tensor
            continue
        layer, proj, kind = m.groups()
        base = f"model.layers.{layer}.self_attn."
        try:
            parts = [state[f"{base}{p}.{kind}"] for p in ("q_proj", "k_proj", "v_proj")]
        except KeyError as exc:
            raise ValueError(f"layer {layer} lacks {exc.args[0]}") from None
        if proj == "q_proj":
            out[f"{base}query_key_value.{kind}"] = fuse_qkv(*parts, num_heads=num_heads)
    return out


# ====================================================================== whole model


def _renamed(name: str, table: tuple[tuple[str, str], ...]) -> str:
    for source, target in table:
        if name == source or name.startswith(source + "."):
            return target + name[len(source):]
    raise WeightsError(f"{name} belongs to no module of UniGeoSeg", {"unmapped_keys": [name]})


_INVERSE_TABLE = tuple((ours, released) for released, ours in PREFIX_TABLE)


def released_name(name: str) -> str:
    """This model's tensor name in the released module naming (q/k/v stay split):
    ``heads.ref_attn.query`` -> ``ref_attn.query``."""
    return _renamed(name, _INVERSE_TABLE)


def released_to_model(state: Mapping[str, Tensor], num_heads: int) -> dict[str, Tensor]:
    """A released checkpoint's tensors (all or some) in this model's names, in order.

    Fused ``query_key_value`` tensors are split (a weight or a bias may come alone); split
    q/k/v (transformers >= 4.37 exports) pass as they are. Tensors keep their objects
    except the split ones.

    Raises:
        WeightsError: a name that belongs to no module (``details["unmapped_keys"]``), or a
            tensor written twice (fused and split q/k/v of one layer).
    """
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        renamed = _renamed(name, PREFIX_TABLE)
        if renamed.startswith(_LANGUAGE_PREFIXES):
            converted = convert_phi_state_dict({name: tensor}, num_heads=num_heads)
        else:
            converted = {renamed: tensor}
        twice = sorted(set(converted) & set(out))
        if twice:
            raise WeightsError(f"checkpoint writes {twice} more than once (both fused and "
                               "split q/k/v?)", {"duplicate_keys": twice})
        out.update(converted)
    return out


def model_to_released(state: Mapping[str, Tensor], num_heads: int, *,
                      fused_qkv: bool = True) -> dict[str, Tensor]:
    """This model's tensors in the released checkpoint's names, in order.

    Args:
        state: ``UniGeoSeg.state_dict()`` (or part of it).
        fused_qkv: fuse q/k/v into 4.36's ``query_key_value`` (in the place of ``q_proj``),
            as the released files have it; False keeps them split (a >= 4.37 export).

    Raises:
        ValueError: a layer lacks one of q/k/v.
        WeightsError: a name that belongs to no module.
    """
    renamed = {released_name(name): tensor for name, tensor in state.items()}
    return _fuse_language(renamed, num_heads) if fused_qkv else renamed
