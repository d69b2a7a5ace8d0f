"""The model a run starts from, and what of it trains.

Starting points (``[model]``):

- ``init = "DIR"``: a released-layout folder (the released model, or one this trainer
  exported), loaded with the backend's strict loader (every missing, unexpected or
  mis-shaped tensor is reported by name) in float32: fine-tuning;
- ``architecture = "NAME"``: a registry configuration with random weights (the tiny ones
  for tests and CPU runs bring their own tokenizer; others need ``tokenizer = "DIR"``);
- ``architecture`` with pretrained parts, as the official recipe starts: ``swin = "FILE"``
  (a Mask2Former checkpoint: Swin from ``backbone.*``), ``mask2former = "FILE"`` (the pixel
  and mask decoders from ``sem_seg_head.*``; officially the same file), ``language = "DIR"``
  (a transformers Phi-1.5 folder: its tokenizer with ``[PAD]`` and ``[SEG]`` sets the
  vocabulary size); loaded strictly by the backend's ``build_from_components``, which names
  every missing or unexpected tensor and logs what stays random.

A trainer checkpoint is the third starting point: it is picked up from ``run.output_dir``
(``train.resume``), on top of either of these.

Freezing (``model.freeze``): ``UniGeoSeg.set_trainable`` leaves trainable exactly what the
released forward reads (the heads it never uses stay frozen, so DDP needs no
unused-parameter search); the named components are frozen on top (``swin``, the recipe's
default, is the vision tower).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import torch

from unigeoseg_backend.model.checkpoint import clear_cache, load_released
from unigeoseg_backend.model.components import build_from_components
from unigeoseg_backend.model.prompting import add_special_tokens
from unigeoseg_backend.model.registry import get_config, tiny_tokenizer
from unigeoseg_backend.model.unigeoseg import UniGeoSeg, UniGeoSegConfig

from .config import ModelConfig

logger = logging.getLogger(__name__)

#: ``model.freeze`` names -> groups of ``UniGeoSeg.trainable_parameter_groups``.
_GROUP_OF = {"swin": "vision_tower"}


def build_model(config: ModelConfig, device: torch.device) -> tuple[UniGeoSeg, Any]:
    """The float32 model on ``device`` and its tokenizer; the caller seeds torch first (the
    random initialisation of ``architecture`` must be the same on every process)."""
    if config.init:
        loaded = load_released(config.init, device=device, dtype=torch.float32)
        clear_cache(config.init)       # the run owns (and changes) this copy
        logger.info("starting from %s (%s)", config.init, loaded.name)
        return loaded.model, loaded.tokenizer
    architecture = get_config(config.architecture)
    tokenizer = (_tokenizer(config.language or config.tokenizer)
                 if config.language or config.tokenizer else tiny_tokenizer())
    if not (config.swin or config.mask2former or config.language):
        logger.info("starting from a random %s", config.architecture)
        return UniGeoSeg(architecture).to(device), tokenizer
    if config.language:             # the vocabulary is Phi's tokenizer with [PAD] and [SEG]
        architecture = replace(architecture, language={**architecture.language,
                                                       "vocab_size": len(tokenizer)})
    build = build_from_components(architecture, swin_path=config.swin or None,
                                  mask2former_path=config.mask2former or None,
                                  language_dir=config.language or None)
    return build.model.to(device), build.tokenizer or tokenizer


def _tokenizer(folder: str) -> Any:
    """A transformers tokenizer folder's tokenizer with ``[PAD]`` and ``[SEG]`` added."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    add_special_tokens(tokenizer)
    return tokenizer


def freeze(model: UniGeoSeg, components: Iterable[str]) -> None:
    """Trainable: what the forward reads, minus ``components`` (``model.freeze`` names)."""
    groups = {_GROUP_OF.get(name, name) for name in components}
    model.set_trainable(vision_tower="vision_tower" not in groups)
    for name, params in model.trainable_parameter_groups().items():
        if name in groups:
            for parameter in params.values():
                parameter.requires_grad_(False)


def plain_model(config: UniGeoSegConfig, state: dict[str, torch.Tensor],
                buffers_of: torch.nn.Module) -> UniGeoSeg:
    """A ``UniGeoSeg`` holding ``state`` (a full state dict with the plain model's names:
    assigned, not copied) and the buffers no state dict holds taken from ``buffers_of`` (a
    model of the same architecture: sharded, adapted, or trained), in eval mode. Validation
    and the export see the trained model through it."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):   # no draw, no memory
        model = UniGeoSeg(config)
    model.load_state_dict(state, strict=True, assign=True)
    buffers = dict(buffers_of.named_buffers(remove_duplicate=False))
    for prefix, module in model.named_modules():
        for name in module._non_persistent_buffers_set:
            module._buffers[name] = buffers[f"{prefix}.{name}" if prefix else name]
    return model.eval()
