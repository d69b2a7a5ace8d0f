"""Choosing the compute device and assembling the engines a process offers."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from .errors import InvalidInputError, WeightsError
from .segmenter import EngineRegistry

logger = logging.getLogger(__name__)

NO_TEXT_MODEL = ("no UniGeoSeg model was given, so text prompts cannot be answered: pass "
                 "--model PATH_OR_NAME (a released-layout model directory, or a model name "
                 "under the weights cache's models/ folder); point and box prompts work with "
                 "the sam engine")


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


#: Environment variable naming the default UniGeoSeg model (a directory or a cached name).
MODEL_ENV = "UNIGEOSEG_MODEL"


def configured_model(explicit: str | Path | None) -> str | Path | None:
    """The model to use: the one given, else ``$UNIGEOSEG_MODEL``, else None (no text engine)."""
    return explicit or os.environ.get(MODEL_ENV) or None


def resolve_model(model: str | Path) -> Path:
    """The directory of a UniGeoSeg model: ``model`` itself when it is a path that exists, else
    a model name looked up as ``<weights cache>/models/<name>``.

    Raises:
        WeightsError: neither exists (the message names where it looked).
    """
    from .weights import cache_dir

    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise WeightsError(f"UniGeoSeg model {path} is not a directory (the released "
                               f"layout is a folder with config.json, weights and tokenizer)")
        return path
    text = str(model)
    if "/" in text or "\\" in text or path.is_absolute() or text.startswith("."):
        raise WeightsError(f"UniGeoSeg model directory {path} does not exist")
    cached = cache_dir() / "models" / text
    if not cached.is_dir():
        raise WeightsError(f"no UniGeoSeg model {text!r}: {path} is not a directory here and "
                           f"{cached} does not exist; pass --model with a model directory")
    return cached


def load_text_engine(model_dir: Path, device: torch.device):
    """Load the UniGeoSeg model in ``model_dir`` (once per process) as an engine.

    Raises:
        WeightsError: the directory does not hold a loadable model (the message says why).
    """
    from .engines.unigeoseg_engine import UniGeoSegEngine, model_dtype
    from .model.checkpoint import load_released

    try:
        loaded = load_released(model_dir, device=device, dtype=model_dtype(device))
    except WeightsError:
        raise
    except Exception as exc:  # transformers / safetensors raise many types for bad files
        raise WeightsError(f"cannot load UniGeoSeg model {model_dir}: "
                           f"{type(exc).__name__}: {exc}") from exc
    return UniGeoSegEngine(loaded, device)


def build_engines(sam_checkpoint: Path | None, sam_type: str, device: torch.device,
                  model: str | Path | None = None) -> EngineRegistry:
    """Engines for this process. Missing weights make an engine unavailable, with the reason.

    Args:
        model: the UniGeoSeg model (directory or cached name, see :func:`resolve_model`); None
            leaves the text engine unavailable. A model that cannot be found raises
            WeightsError here; one that cannot be loaded raises when the engine is created.
    """
    from .engines.sam import SamEngine

    factories: dict[str, Any] = {}
    unavailable: dict[str, str] = {}
    tasks: dict[str, tuple[str, ...]] = {"sam": SamEngine.tasks}
    checkpoint, reason = find_sam_checkpoint(sam_checkpoint, sam_type)
    if checkpoint is None:
        unavailable["sam"] = reason
    else:
        factories["sam"] = lambda: SamEngine.from_checkpoint(checkpoint, sam_type, device)
    if model is None:
        unavailable["unigeoseg"] = NO_TEXT_MODEL
    else:
        from .engines.unigeoseg_engine import TASKS

        model_dir = resolve_model(model)
        factories["unigeoseg"] = lambda: load_text_engine(model_dir, device)
        tasks["unigeoseg"] = TASKS
    return EngineRegistry(factories, unavailable, tasks)
