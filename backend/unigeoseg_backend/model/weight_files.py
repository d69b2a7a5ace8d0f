"""Reading the weight files of a release folder, one tensor at a time, never running code.

A folder holds ``model.safetensors``, or shards listed by ``model.safetensors.index.json``,
or the same as ``pytorch_model.bin[.index.json]`` (read with ``torch.load(weights_only=True)``,
memory-mapped when possible). Shapes and dtypes come from the headers without reading any
weight; the index is checked against the shards' contents.

Public API:
    find_weight_files(folder) -> WeightFiles
    read_headers(weights) -> name -> (shape, dtype)
    iter_tensors(file, kind) -> (name, CPU tensor), ...
    read_json(file, what) -> Any
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import WeightsError

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
MAX_LISTED = 5  # names quoted in an error message

#: A tensor's (shape, dtype) as a header gives it; dtype None for a kind torch lacks.
TensorSpec = tuple[tuple[int, ...], Any]

_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def read_json(file: Path, what: str) -> Any:
    """A JSON file; a missing or unreadable one is a WeightsError naming ``what`` it is."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightsError(f"{file.parent}: no {file.name} ({what})",
                           {"path": str(file.parent), "missing_file": file.name}) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"cannot read {file}: {exc}", {"path": str(file)}) from exc


@dataclass(frozen=True)
class WeightFiles:
    """The weight files of a folder: format, shard files, and the index if any."""

    kind: str  # "safetensors" | "bin"
    files: tuple[Path, ...]
    index: Path | None
    weight_map: Mapping[str, str] | None

    def fingerprint_files(self) -> tuple[Path, ...]:
        return self.files + ((self.index,) if self.index else ())


def find_weight_files(folder: Path) -> WeightFiles:
    """The weights of a release folder: an index (safetensors first) or one file."""
    for kind, index_name, single in (("safetensors", SAFETENSORS_INDEX, SAFETENSORS_FILE),
                                     ("bin", BIN_INDEX, BIN_FILE)):
        index = folder / index_name
        if index.is_file():
            data = read_json(index, "the weight index")
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise WeightsError(f"{index} has no weight_map")
            names = list(dict.fromkeys(weight_map.values()))
            bad = [n for n in names
                   if not isinstance(n, str) or n in ("", ".", "..") or Path(n).name != n]
            if bad:  # shards live in the folder itself: no paths
                raise WeightsError(f"{index}: bad shard name(s) {bad[:MAX_LISTED]}")
            absent = [n for n in names if not (folder / n).is_file()]
            if absent:
                raise WeightsError(f"{index} lists shard(s) that are not there: {absent}",
                                   {"path": str(folder), "missing_files": absent})
            return WeightFiles(kind, tuple(folder / n for n in sorted(names)), index, weight_map)
        if (folder / single).is_file():
            return WeightFiles(kind, (folder / single,), None, None)
    raise WeightsError(f"{folder}: no weights ({SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, "
                       f"{BIN_FILE} or {BIN_INDEX})", {"path": str(folder)})


def _safetensors_header(file: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """name -> (shape, dtype) from a .safetensors header, without reading any weight."""
    try:
        with open(file, "rb") as fh:
            prefix = fh.read(8)
            size = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if not 0 < size <= 1 << 28:
                raise ValueError("not a safetensors file (bad header length)")
            header = json.loads(fh.read(size))
        header.pop("__metadata__", None)
        return {name: (tuple(int(s) for s in info["shape"]),
                       _SAFETENSORS_DTYPES.get(info["dtype"]))
                for name, info in header.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise WeightsError(f"cannot read the safetensors header of {file}: {exc}",
                           {"path": str(file)}) from exc


def _torch_load(file: Path) -> Mapping[str, Tensor]:
    """A ``torch.save`` state dict, memory-mapped when possible; never unpickles code."""
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError, RuntimeError, EOFError, ...
        raise WeightsError(f"cannot load {file} (weights only): {exc}",
                           {"path": str(file)}) from exc
    if not isinstance(state, Mapping) or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise WeightsError(f"{file} is not a flat state dict of tensors", {"path": str(file)})
    return state


def read_headers(weights: WeightFiles) -> dict[str, TensorSpec]:
    """Every tensor's (shape, dtype), by name; checks the index against the shards."""
    header: dict[str, TensorSpec] = {}
    where: dict[str, Path] = {}
    duplicates: list[str] = []
    for file in weights.files:
        if weights.kind == "safetensors":
            entries = _safetensors_header(file)
        else:
            state = _torch_load(file)
            entries = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
            del state
        for name, entry in entries.items():
            if name in header:
                duplicates.append(name)
            header[name] = entry
            where[name] = file
    if duplicates:
        raise WeightsError(f"{len(duplicates)} tensor(s) stored in more than one shard: "
                           f"{duplicates[:MAX_LISTED]}", {"duplicate_keys": duplicates})
    if weights.weight_map is not None:
        wrong = sorted(name for name, shard in weights.weight_map.items()
                       if name not in where or where[name].name != shard)
        if wrong:
            raise WeightsError(f"{weights.index}: {len(wrong)} tensor(s) are not in the shard "
                               f"it names: {wrong[:MAX_LISTED]}",
                               {"path": str(weights.index), "index_mismatch": wrong})
    return header


def iter_tensors(file: Path, kind: str) -> Iterator[tuple[str, Tensor]]:
    """(name, CPU tensor) for every tensor of one file, one at a time."""
    try:
        if kind == "safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for name in handle.keys():
                    yield name, handle.get_tensor(name)
        else:
            state = _torch_load(file)
            for name in list(state):
                yield name, state[name]
            del state
    except WeightsError:
        raise
    except Exception as exc:  # SafetensorError, OSError, ...
        raise WeightsError(f"cannot read the tensors of {file}: {exc}",
                           {"path": str(file)}) from exc
