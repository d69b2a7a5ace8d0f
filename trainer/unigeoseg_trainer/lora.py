"""LoRA on the language model (``[lora] enabled = true``), through ``peft``.

The recipe of the LISA family (LISA, SegEarth-R1, on whose code UniGeoSeg's is built):
Phi-1.5's decoder layers stay frozen and get rank-``r`` adapters (``r = 8``,
``alpha = 16``, dropout 0.05) on the attention projections ``q_proj``, ``k_proj``,
``v_proj`` and ``dense``; the token embeddings and ``lm_head`` (which hold the new
``[SEG]`` / ``[PAD]`` tokens) train fully, as do the connector, the pixel decoder, the mask
decoder and the task heads (unless ``model.freeze`` names them); Swin stays frozen.

The adapters are injected in place (``peft.inject_adapter_in_model``): an adapted
projection becomes a ``peft`` LoRA layer holding the original ``Linear`` as ``base_layer``
and the adapter as ``lora_A.default`` / ``lora_B.default``, so the training state dict (and
a trainer checkpoint, which must hold the adapter exactly for resume) has those names. The
model that leaves the trainer (validation, the released-layout export) is
:func:`merged_model`: a plain ``UniGeoSeg`` whose projections are ``W + (alpha / r) B A``,
which ``unigeoseg serve``, ``predict`` and ``eval`` load like any released model.
"""

from __future__ import annotations

import re

import torch

from unigeoseg_backend.model.unigeoseg import UniGeoSeg

from .config import ConfigError, LoraSettings
from .models import plain_model

ADAPTER = "default"                 #: peft's adapter name
#: The language model's decoder (frozen under LoRA, apart from its adapters).
DECODER = ("model.layers.", "model.final_layernorm.")


def target_pattern(settings: LoraSettings) -> str:
    """peft's ``target_modules`` regex (matched against whole module names): the named
    projections of every Phi decoder layer (attention's in ``self_attn``, the MLP's in
    ``mlp``)."""
    names = "|".join(re.escape(name) for name in settings.target_modules)
    return rf"model\.layers\.\d+\.(self_attn|mlp)\.({names})"


def is_lora_parameter(name: str) -> bool:
    return ".lora_" in name


def add_lora(model: UniGeoSeg, settings: LoraSettings) -> None:
    """Inject the adapters and set what trains (module docstring).

    Call after ``models.freeze``: the components it froze stay frozen. The adapters'
    ``lora_A`` are drawn from torch's global generator (the caller seeds it: every process
    must draw the same); ``lora_B`` starts at zero, so the model's outputs are unchanged.

    Raises:
        ConfigError: peft is not installed.
    """
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ModuleNotFoundError as exc:
        raise ConfigError("lora.enabled", "LoRA needs peft: pip install 'unigeoseg[train]'"
                          ) from exc
    trained_before = {name for name, p in model.named_parameters() if p.requires_grad}
    peft_config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha,
                             lora_dropout=settings.dropout, bias="none",
                             target_modules=target_pattern(settings))
    inject_adapter_in_model(peft_config, model, adapter_name=ADAPTER)
    for name, parameter in model.named_parameters():
        if is_lora_parameter(name):
            trains = True
        elif name.startswith(DECODER):
            trains = False
        else:                       # peft froze everything else: restore models.freeze's choice
            trains = base_name(name) in trained_before
        parameter.requires_grad_(trains)


def base_name(name: str) -> str:
    """The plain model's name of a tensor of an adapted model (``base_layer.`` dropped)."""
    return name.replace(".base_layer.", ".")


@torch.no_grad()
def merge_adapters(state: dict[str, torch.Tensor], settings: LoraSettings
                   ) -> dict[str, torch.Tensor]:
    """The plain model's state dict from an adapted model's (full) one: each adapted weight
    merged as peft merges it, ``W + (B @ A) * alpha / r`` (in float32, stored in W's dtype),
    the adapters dropped, every other tensor passed on as it is (not copied)."""
    scale = settings.alpha / settings.rank
    plain = {}
    for name, tensor in state.items():
        if is_lora_parameter(name):
            continue
        if name.endswith(".base_layer.weight"):
            prefix = name[:-len(".base_layer.weight")]
            a = state[f"{prefix}.lora_A.{ADAPTER}.weight"].float()
            b = state[f"{prefix}.lora_B.{ADAPTER}.weight"].float()
            tensor = (tensor.float() + (b @ a) * scale).to(tensor.dtype)
        plain[base_name(name)] = tensor
    return plain


def merged_model(model: UniGeoSeg, settings: LoraSettings) -> UniGeoSeg:
    """A plain ``UniGeoSeg`` with the adapters of ``model`` (unsharded) merged, in eval
    mode, sharing its unadapted tensors; ``model`` is not changed."""
    return plain_model(model.config, merge_adapters(model.state_dict(), settings), model)
