"""Phi-1.5, the language model of UniGeoSeg, on the installed transformers (5.x).

UniGeoSeg was trained with transformers 4.36.2, whose ``PhiAttention`` keeps one fused
``self_attn.query_key_value`` Linear. transformers >= 4.37 splits it into ``q_proj`` /
``k_proj`` / ``v_proj`` and has no load hook for the old name, so a 4.36 checkpoint loaded
non-strictly would leave q/k/v random. This module rebuilds the network from the checkpoint's
``config.json``; ``conversion.py`` renames its tensors with an explicit table, so that it
loads with ``strict=True``.

Public API:
    phi_config_from_official(config) -> PhiConfig
    build_language_model(config) -> PhiForCausalLM      (lm_head without bias, as UniGeoSeg)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn
from transformers import PhiConfig, PhiForCausalLM

from ..errors import WeightsError

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
