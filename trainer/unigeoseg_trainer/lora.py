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
from torch import nn

from unigeoseg_backend.model.unigeoseg import UniGeoSeg

from .config import ConfigError, LoraSettings

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


def has_lora(model: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(isinstance(module, LoraLayer) for module in model.modules())


@torch.no_grad()
def merged_state_dict(model: UniGeoSeg) -> dict[str, torch.Tensor]:
    """The plain model's state dict of an adapted model: every adapted weight merged
    (``W + scale * B A``, computed in float32 and stored in W's dtype), the adapters
    dropped, every other tensor shared, not copied. The adapted model is not changed."""
    from peft.tuners.lora import LoraLayer

    merged: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            weight = module.get_base_layer().weight
            delta = module.get_delta_weight(ADAPTER)
            merged[f"{prefix}.weight"] = (weight.float() + delta.float()).to(weight.dtype)
    state = {}
    for name, tensor in model.state_dict().items():
        if is_lora_parameter(name):
            continue
        plain = base_name(name)
        state[plain] = merged.get(plain, tensor)
    return state


def merged_model(model: UniGeoSeg) -> UniGeoSeg:
    """A plain ``UniGeoSeg`` with the adapters merged (see :func:`merged_state_dict`), in
    eval mode, on the adapted model's device, sharing its unadapted tensors."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):   # no draw, no memory
        plain = UniGeoSeg(model.config)
    plain.load_state_dict(merged_state_dict(model), strict=True, assign=True)
    buffers = dict(model.named_buffers(remove_duplicate=False))
    for prefix, module in plain.named_modules():   # the buffers no state dict holds
        for name in module._non_persistent_buffers_set:
            module._buffers[name] = buffers[f"{prefix}.{name}" if prefix else name]
    return plain.eval()
