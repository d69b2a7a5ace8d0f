"""Choosing the compute device and assembling the engines a process offers."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from .errors import InvalidInputError, WeightsError
from .segmenter import EngineRegistry

logger = logging.getLogger(__name__)

TEXT_ENGINE_PENDING = ("the UniGeoSeg text engine is not part of this backend version yet; "
                       "point and box prompts work with the sam engine")


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


def find_sam_checkpoint(sam_checkpoint: Path | None, sam_type: str) -> tuple[Path | None, str]:
    """The checkpoint to use, from the argument or the weights cache; else (None, why not)."""
    if sam_checkpoint is not None:
        if not Path(sam_checkpoint).is_file():
            raise WeightsError(f"SAM checkpoint {sam_checkpoint} does not exist")
        return Path(sam_checkpoint), ""
    from .weights import resolve_checkpoint

    try:
        return resolve_checkpoint(f"sam_{sam_type}"), ""
    except WeightsError as exc:
        return None, (f"no SAM {sam_type} weights: {exc.message} Run `unigeoseg weights download "
                      f"sam_{sam_type}` or pass --sam-checkpoint PATH.")


def build_engines(sam_checkpoint: Path | None, sam_type: str,
                  device: torch.device) -> EngineRegistry:
    """Engines for this process. Missing weights make an engine unavailable, with the reason."""
    from .engines.sam import SamEngine

    factories: dict[str, Any] = {}
    unavailable = {"unigeoseg": TEXT_ENGINE_PENDING}
    checkpoint, reason = find_sam_checkpoint(sam_checkpoint, sam_type)
    if checkpoint is None:
        unavailable["sam"] = reason
    else:
        factories["sam"] = lambda: SamEngine.from_checkpoint(checkpoint, sam_type, device)
    return EngineRegistry(factories, unavailable)
