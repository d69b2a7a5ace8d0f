"""The ``config.json`` of a release folder: which architecture it holds, and writing one.

The released ``config.json`` has ``model_type: llava_phi``, the Phi-1.5 fields and the
multimodal ones (``mm_projector_type``, ``swin_type``, ...). Folders this package writes also
carry ``unigeoseg_arch``, a registry name (the tiny test models have no other description).

Public API:
    read_release_config(path, header=None) -> (UniGeoSegConfig, registry name)
    registry_name(config) -> str | None
    release_config_json(config, arch, original, weight_dtype) -> dict
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import WeightsError
from .language import OPTIONAL_FIELDS, REQUIRED_FIELDS
from .registry import MODEL_CONFIGS, get_config, official_config
from .unigeoseg import UniGeoSegConfig
from .weight_files import TensorSpec, read_json

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
#: Our own config.json key: a registry name whose architecture the folder holds.
ARCH_KEY = "unigeoseg_arch"
CONNECTOR_KEY = "mm_projector_type"
CONNECTOR_PREFIX = "model.mm_projector."
#: Language-model fields taken from config.json (besides REQUIRED/OPTIONAL_FIELDS).
_ROPE_FIELDS = ("rope_theta", "partial_rotary_factor", "rope_scaling", "rope_parameters",
                "tie_word_embeddings")
#: Multimodal fields of the released config.json (manifest ``config``), written by
#: save_released when it has no original config.json to start from.
_RELEASED_MM_FIELDS: dict[str, Any] = {
    "mm_vision_tower": "pre_trained/Swin_base/model_final_54b88a.pkl",
    "swin_type": "base",
    "use_mm_proj": True,
    "mm_hidden_size": 256,
    "with_norm": True,
    "with_layernorm": False,
    "mask_decode_train": True,
    "mm_use_im_start_end": False,
    "mm_use_im_patch_token": False,
    "tune_mm_mlp_adapter": False,
    "freeze_mm_mlp_adapter": False,
    "image_aspect_ratio": "square",
    "image_grid_pinpoints": None,
}


def read_release_config(path: str | os.PathLike[str],
                        header: Mapping[str, TensorSpec] | None = None
                        ) -> tuple[UniGeoSegConfig, str]:
    """The architecture a release folder holds, from its ``config.json``.

    ``unigeoseg_arch`` (ours) selects a registry configuration; otherwise the official Swin-B /
    Mask2Former shapes are used. The language fields (vocab_size, hidden_size, ...) come from
    config.json. The connector is ``mm_projector_type``, or, when that is absent, detected
    from the ``model.mm_projector.*`` tensors of ``header`` (name -> (shape, dtype)).

    Returns:
        (config, name): name is the registry name of the architecture.
    """
    folder = Path(path)
    raw = read_json(folder / CONFIG_FILE, "the checkpoint's config")
    if not isinstance(raw, dict):
        raise WeightsError(f"{folder / CONFIG_FILE} is not a JSON object")
    arch = raw.get(ARCH_KEY)
    connector = raw.get(CONNECTOR_KEY)
    if connector is None and header is not None:
        connector = _detect_connector(header)
        if connector is not None:
            logger.info("%s: no %s in config.json; detected %s from the tensors",
                        folder, CONNECTOR_KEY, connector)
    if arch is not None:
        if arch not in MODEL_CONFIGS:
            raise WeightsError(f"{folder / CONFIG_FILE}: unknown {ARCH_KEY} {arch!r}; known: "
                               f"{sorted(MODEL_CONFIGS)}", {"unigeoseg_arch": arch})
        base = get_config(arch)
        if connector is not None and connector != base.connector:
            raise WeightsError(f"{folder / CONFIG_FILE}: {CONNECTOR_KEY}={connector!r} "
                               f"contradicts {ARCH_KEY}={arch!r} ({base.connector})")
        name = arch
    else:
        if connector is None:
            raise WeightsError(f"{folder}: config.json has no {CONNECTOR_KEY} and the "
                               "connector cannot be told from the tensors")
        if connector not in ("SparseConv_1", "MSCC"):
            raise WeightsError(f"{folder}: unsupported {CONNECTOR_KEY} {connector!r} "
                               "(SparseConv_1 or MSCC)", {CONNECTOR_KEY: connector})
        swin_type = raw.get("swin_type", "base")
        if swin_type != "base":
            raise WeightsError(f"{folder}: swin_type {swin_type!r}; only the released Swin-B "
                               "('base') is supported")
        base = official_config(connector)
        name = ("unigeoseg-official-sparseconv" if connector == "SparseConv_1"
                else "unigeoseg-official-mscc")
    language = dict(base.language)
    for key in (*REQUIRED_FIELDS, *OPTIONAL_FIELDS, *_ROPE_FIELDS):
        # null fields mean "the default"; use_cache is a generation setting, not architecture
        if key in raw and key != "use_cache" and (key in language or raw[key] is not None):
            language[key] = raw[key]
    try:
        config = dataclasses.replace(base, language=language)
    except ValueError as exc:  # language widths that do not fit the architecture
        raise WeightsError(f"{folder / CONFIG_FILE} does not fit {name}: {exc}") from exc
    return config, name


def _detect_connector(header: Mapping[str, TensorSpec]) -> str | None:
    fc = header.get(CONNECTOR_PREFIX + "fc.weight")
    if fc is not None and len(fc[0]) == 4:
        return "SparseConv_1"
    if fc is not None and len(fc[0]) == 2:
        return "MSCC"
    if CONNECTOR_PREFIX + "global_tokens" in header:
        return "MSCC"
    return None


def registry_name(config: UniGeoSegConfig) -> str | None:
    """The registry entry with this architecture (language widths aside), if any."""
    fields = [f.name for f in dataclasses.fields(config) if f.name != "language"]
    for name in MODEL_CONFIGS:
        candidate = get_config(name)
        if all(getattr(candidate, f) == getattr(config, f) for f in fields):
            return name
    return None


def release_config_json(config: UniGeoSegConfig, arch: str, original: Path | None,
                        weight_dtype: torch.dtype) -> dict[str, Any]:
    """The config.json of a saved folder: ``original``'s fields (a loaded release's own
    config.json) or the released multimodal defaults, updated with this architecture."""
    data: dict[str, Any] = {}
    if original is not None:
        with contextlib.suppress(OSError, ValueError):
            loaded = json.loads(original.read_text(encoding="utf-8"))
            if isinstance(loaded, dict):
                data = loaded
    if not data:
        data = {"architectures": ["UniGeoSeg"], "model_type": "llava_phi",
                "num_key_value_heads": None, "use_cache": True, "rope_scaling": None,
                **_RELEASED_MM_FIELDS}
    data.update(config.language)
    data["tie_word_embeddings"] = False
    data["projector_outdim"] = config.language["hidden_size"]
    data[CONNECTOR_KEY] = config.connector
    data[ARCH_KEY] = arch
    data["torch_dtype"] = str(weight_dtype).removeprefix("torch.")
    return data
