"""Phi-1.5, the language model of UniGeoSeg, on the installed transformers (5.x).

UniGeoSeg was trained with transformers 4.36.2, whose ``PhiAttention`` keeps one fused
``self_attn.query_key_value`` Linear. transformers >= 4.37 splits it into ``q_proj`` /
``k_proj`` / ``v_proj`` and has no load hook for the old name, so a 4.36 checkpoint loaded
non-strictly would leave q/k/v random. This module rebuilds the network from the checkpoint's
``config.json`` and renames its tensors with an explicit table, so that it loads with
``strict=True``.

Public API:
    phi_config_from_official(config) -> PhiConfig
    build_language_model(config) -> PhiForCausalLM      (lm_head without bias, as UniGeoSeg)
    split_fused_qkv(weight, bias, num_heads) -> (q_w, q_b, k_w, k_b, v_w, v_b)
    convert_phi_state_dict(state, prefix="model.", *, num_heads) -> dict
    extract_language_state(state, prefix="model.") -> dict
    load_language_weights(model, state, prefix="model.") -> None
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import PhiConfig, PhiForCausalLM

from ..errors import WeightsError

logger = logging.getLogger(__name__)

#: Fields of the checkpoint's ``config.json`` that fix tensor shapes; they must be present.
REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)

#: Other PhiConfig fields copied as they are when present (PhiConfig's defaults otherwise,
#: which equal transformers 4.36's).
OPTIONAL_FIELDS = (
    "num_key_value_heads",
    "resid_pdrop",
    "embd_pdrop",
    "attention_dropout",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "layer_norm_eps",
    "use_cache",
    "qk_layernorm",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)

#: Marks the fused projection in the key table: one source tensor becomes three.
SPLIT_QKV = "<split q/k/v>"

#: Source key (with the body prefix removed) -> PhiForCausalLM key. Tried in order; the first
#: full match wins. ``None`` drops the key; ``SPLIT_QKV`` routes it to split_fused_qkv.
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


def phi_config_from_official(config: Mapping[str, Any]) -> PhiConfig:
    """PhiConfig for the installed transformers from a UniGeoSeg (4.36-era) ``config.json``.

    The checkpoint writes ``rope_theta``, ``partial_rotary_factor`` and ``rope_scaling`` as
    top-level fields; transformers 5 keeps them in ``rope_parameters``. Multimodal fields
    (``mm_*``, ``swin_type``, ...) and ``model_type: llava_phi`` are ignored here.

    Raises:
        WeightsError: a shape field is missing, ``rope_scaling`` is set (Phi-1.5 has none and
            no scaled variant was ever released for UniGeoSeg), or the embeddings are tied
            (UniGeoSeg keeps a separate lm_head).
    """
    missing = [name for name in REQUIRED_FIELDS if config.get(name) is None]
    if missing:
        raise WeightsError(f"checkpoint config lacks {missing}", {"missing_fields": missing})
    if config.get("rope_scaling") is not None:
        raise WeightsError(f"rope_scaling={config['rope_scaling']!r} is not supported; "
                           "UniGeoSeg's Phi-1.5 uses plain RoPE")
    if config.get("tie_word_embeddings", False):
        raise WeightsError("tie_word_embeddings=True, but UniGeoSeg has an untied lm_head")

    kwargs: dict[str, Any] = {name: config[name] for name in REQUIRED_FIELDS}
    kwargs.update({name: config[name] for name in OPTIONAL_FIELDS if name in config})
    if kwargs.get("num_key_value_heads") is None:
        kwargs["num_key_value_heads"] = config["num_attention_heads"]
    rope = dict(config.get("rope_parameters") or {})
    rope.setdefault("rope_type", "default")
    rope.setdefault("rope_theta", float(config.get("rope_theta", 10000.0)))
    rope.setdefault("partial_rotary_factor", float(config.get("partial_rotary_factor", 0.5)))
    return PhiConfig(tie_word_embeddings=False, rope_parameters=rope, **kwargs)


def build_language_model(config: PhiConfig) -> PhiForCausalLM:
    """PhiForCausalLM whose lm_head has no bias, as ``UniGeoSeg.__init__`` re-creates it.

    Honours an enclosing ``torch.device(...)`` context (``"meta"`` builds no storage). The
    new lm_head is initialised like transformers does (normal, std ``initializer_range``).
    """
    model = PhiForCausalLM(config)
    lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False,
                        device=model.lm_head.weight.device, dtype=model.lm_head.weight.dtype)
    nn.init.normal_(lm_head.weight, mean=0.0, std=config.initializer_range)
    model.lm_head = lm_head
    return model


def split_fused_qkv(
    weight: torch.Tensor, bias: torch.Tensor | None, num_heads: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None,
           torch.Tensor, torch.Tensor | None]:
    """Split transformers-4.36 Phi ``query_key_value`` into q/k/v projections.

    4.36's ``PhiAttention._split_heads`` (copied from BLOOM) views the fused output as
    ``[..., num_heads, 3, head_dim]``, so the 3*D rows are interleaved per head:
    ``h0:q, h0:k, h0:v, h1:q, ...`` (each block head_dim rows), not ``[Q | K | V]``.

    Args:
        weight: (3*D)xD_in fused weight, D = num_heads * head_dim.
        bias: (3*D) fused bias, or None.
        num_heads: attention heads (32 for Phi-1.5).

    Returns:
        q_w, q_b, k_w, k_b, v_w, v_b: DxD_in weights and (D) biases (None without bias),
        each contiguous.
    """
    if weight.dim() != 2 or weight.shape[0] % (3 * num_heads) != 0:
        raise WeightsError(f"fused query_key_value weight must be (3*num_heads*head_dim)xD_in "
                           f"with num_heads={num_heads}; got {tuple(weight.shape)}")
    head_dim = weight.shape[0] // (3 * num_heads)
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise WeightsError(f"fused query_key_value bias must be ({weight.shape[0]},); "
                           f"got {tuple(bias.shape)}")
    w = weight.reshape(num_heads, 3, head_dim, weight.shape[1])  # (h, q|k|v, hd, D_in)
    b = None if bias is None else bias.reshape(num_heads, 3, head_dim)
    out: list[torch.Tensor | None] = []
    for j in range(3):  # 0 = q, 1 = k, 2 = v
        out.append(w[:, j].reshape(num_heads * head_dim, weight.shape[1]).contiguous())
        out.append(None if b is None else b[:, j].reshape(num_heads * head_dim).contiguous())
    q_w, q_b, k_w, k_b, v_w, v_b = out
    return q_w, q_b, k_w, k_b, v_w, v_b  # type: ignore[return-value]


def _match(key: str, table: tuple[tuple[re.Pattern[str], str | None], ...]
           ) -> tuple[bool, str | None]:
    for pattern, dst in table:
        m = pattern.fullmatch(key)
        if m:
            return True, (dst if dst in (None, SPLIT_QKV) else m.expand(dst))
    return False, None


def convert_phi_state_dict(
    state: Mapping[str, torch.Tensor], prefix: str = "model.", *, num_heads: int
) -> dict[str, torch.Tensor]:
    """Rename a Phi state dict to the installed PhiForCausalLM layout.

    Args:
        state: language-model tensors only: the Phi body under ``prefix`` and ``lm_head.*``
            (see extract_language_state for a full UniGeoSeg checkpoint). Fused 4.36
            ``query_key_value`` tensors are split; already-split tensors pass unchanged.
        prefix: where the Phi body sits in ``state`` (``"model."`` in UniGeoSeg).
        num_heads: attention heads; the fused layout cannot be split without it.

    Returns:
        A new dict keyed ``model.*`` / ``lm_head.*``, ready for ``load_state_dict(strict=True)``.

    Raises:
        WeightsError: keys the table cannot map (all named in ``details["unmapped_keys"]``), a
            target written twice (fused and split q/k/v for one layer), or a fused weight
            without its bias partner.
    """
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}  # layer index -> {"weight": .., "bias": ..}
    unmapped: list[str] = []
    duplicates: list[str] = []

    def put(dst: str, tensor: torch.Tensor) -> None:
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
            fused.setdefault(m.group(1), {})[m.group(2)] = tensor
        elif dst is None:
            logger.debug("dropping %s (recomputed from the config)", key)
        else:
            put(dst, tensor)
    if unmapped:
        raise WeightsError(f"{len(unmapped)} checkpoint key(s) match no Phi name: "
                           f"{sorted(unmapped)[:10]}", {"unmapped_keys": sorted(unmapped)})

    for layer, parts in sorted(fused.items(), key=lambda kv: int(kv[0])):
        if "weight" not in parts:
            raise WeightsError(f"layer {layer}: query_key_value.bias without its weight")
        q_w, q_b, k_w, k_b, v_w, v_b = split_fused_qkv(parts["weight"], parts.get("bias"),
                                                        num_heads)
        base = f"model.layers.{layer}.self_attn."
        for name, w, b in (("q_proj", q_w, q_b), ("k_proj", k_w, k_b), ("v_proj", v_w, v_b)):
            put(base + name + ".weight", w)
            if b is not None:
                put(base + name + ".bias", b)
    if duplicates:
        raise WeightsError(f"checkpoint writes {sorted(set(duplicates))[:10]} more than once "
                           "(both fused and split q/k/v?)", {"duplicate_keys": duplicates})
    if fused:
        logger.info("split fused query_key_value in %d layer(s)", len(fused))
    return out


def extract_language_state(
    state: Mapping[str, torch.Tensor], prefix: str = "model."
) -> dict[str, torch.Tensor]:
    """The language-model tensors of a full UniGeoSeg state dict (others stay behind).

    Selects ``{prefix}embed_tokens.*``, ``{prefix}layers.*``, ``{prefix}final_layernorm.*``
    and ``lm_head.*``; ``{prefix}mm_projector.*`` / ``{prefix}vision_tower.*`` are not taken.
    """
    body = re.compile(re.escape(prefix) + r"(embed_tokens|layers|final_layernorm)\.")
    return {k: v for k, v in state.items() if body.match(k) or k.startswith("lm_head.")}


def load_language_weights(
    model: PhiForCausalLM, state: Mapping[str, torch.Tensor], prefix: str = "model."
) -> None:
    """Convert ``state`` (language keys only) and load it into ``model`` with ``strict=True``.

    Raises:
        WeightsError: unmappable keys, or tensors the model lacks / has but were not written
            (named in ``details["missing_keys"]`` / ``details["unexpected_keys"]``), or a shape
            mismatch.
    """
    converted = convert_phi_state_dict(state, prefix, num_heads=model.config.num_attention_heads)
    expected = set(model.state_dict())
    missing = sorted(expected - set(converted))
    unexpected = sorted(set(converted) - expected)
    if missing or unexpected:
        raise WeightsError(f"language weights do not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}",
                           {"missing_keys": missing, "unexpected_keys": unexpected})
    try:
        model.load_state_dict(converted, strict=True)
    except RuntimeError as exc:  # shape mismatches
        raise WeightsError(f"language weights do not fit the model: {exc}") from exc
