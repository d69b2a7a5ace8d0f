"""Default-model weights folders the CLI and demo tests point ``--default-model`` at: the tiny
configuration under a card of their own, seeded random weights or a mask of everything."""

from __future__ import annotations

from pathlib import Path

import torch

from unigeoseg_backend.default_model.network import build_default_model
from unigeoseg_backend.default_model.weights_io import (
    ClassCard,
    GsdRange,
    ModelCard,
    save_default_model,
)


def save_tiny_default_model(folder: Path, name: str, gsd: GsdRange, *,
                            everything: bool = False) -> Path:
    """Write a tiny default model whose card, ``name@0.0.0``, knows water at ``gsd`` into
    ``folder``. ``everything``: its mask head says "yes" at every pixel, so every prompt
    gets polygons (seeded random weights give none)."""
    torch.manual_seed(0)
    model = build_default_model("tiny")
    if everything:
        with torch.no_grad():
            model.mask_decoder.mask_head.weight.zero_()
            model.mask_decoder.mask_head.bias.fill_(5.0)
    card = ModelCard(name=name, version="0.0.0", config="tiny",
                     weights_file="weights.safetensors", sha256="",
                     text_encoder={"name": "all-MiniLM-L6-v2"}, gsd=gsd,
                     classes=(ClassCard("water", gsd),), limits=("for tests only",))
    save_default_model(model, card, folder)
    return folder
