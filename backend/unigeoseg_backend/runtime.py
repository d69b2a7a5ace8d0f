"""Choosing the compute device and assembling the engines a process offers."""

from __future__ import annotations

from typing import Any

import torch

from .engines.base import Engine, EngineSettings
from .engines.default_engine import DefaultEngine
from .engines.sam import SamEngine
from .engines.unigeoseg_engine import UniGeoSegEngine
from .errors import EngineUnavailableError, InvalidInputError
from .segmenter import EngineOffer, EngineRegistry

#: Every engine the backend knows, in the order ``hello`` lists them. A new engine is a module
#: with an ``engines.base.Engine`` subclass and one line here.
ENGINE_CLASSES: tuple[type[Engine], ...] = (
    SamEngine,
    UniGeoSegEngine,
    DefaultEngine,
)


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks the first CUDA GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise InvalidInputError(f"unknown device {name!r}: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("--device cuda was asked for, but torch sees no CUDA GPU")
    return device


def device_info(device: torch.device) -> dict[str, Any]:
    """What ``hello`` reports: the device, and the GPU's name and memory when there is one."""
    info: dict[str, Any] = {"device": str(device), "gpu": None,
                            "torch_version": torch.__version__}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = {"name": props.name, "memory_bytes": int(props.total_memory)}
    return info


def build_engines(settings: EngineSettings) -> EngineRegistry:
    """The engines of this process. An engine the settings cannot offer (no weights, no model)
    is listed as unavailable, with the reason.

    Raises:
        WeightsError: weights or a model were named but cannot be found; a model that is
            found but cannot be loaded raises when its engine is first used.
    """
    offers = []
    for kind in ENGINE_CLASSES:
        try:
            offers.append(EngineOffer(kind, load=kind.loader(settings),
                                      about=kind.about(settings)))
        except EngineUnavailableError as exc:
            offers.append(EngineOffer(kind, unavailable=exc.message))
    return EngineRegistry(offers)
