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
    read_state_file(file) -> name -> CPU tensor     (one .safetensors/.pth/.pkl checkpoint file)
    check_layout(source, target, header, expected, ignorable=None)  (strict names/shapes/dtypes)
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import WeightsError
from ..restricted_pickle import NUMPY_ARRAY_GLOBALS, RestrictedUnpickler

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


def _torch_load(file: Path, *, nested: bool = False) -> Mapping[str, Tensor]:
    """A ``torch.save`` state dict, memory-mapped when possible; never unpickles code.
    With ``nested``, a checkpoint holding it under ``"model"``/``"state_dict"`` is unwrapped."""
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
    if nested:
        state = _unnested(state)
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


#: Where training checkpoints nest the weights (detectron2: ``{"model": {...}, ...}``).
NESTED_STATE_KEYS = ("model", "state_dict")


def _unnested(checkpoint: Any) -> Any:
    if isinstance(checkpoint, Mapping):
        for key in NESTED_STATE_KEYS:
            if isinstance(checkpoint.get(key), Mapping):
                return checkpoint[key]
    return checkpoint


def read_state_file(file: Path) -> dict[str, Tensor]:
    """Every tensor of one checkpoint file, by name, on the CPU; never runs code.

    By suffix: ``.safetensors``; ``.pth``/``.pt``/``.bin`` (``torch.load(weights_only=True)``);
    ``.pkl``, a detectron2 model-zoo pickle of numpy arrays (``model_final_*.pkl``), read with
    :class:`~unigeoseg_backend.restricted_pickle.RestrictedUnpickler`, which rebuilds numpy
    arrays, dtypes and plain containers only. Weights nested under ``"model"`` or
    ``"state_dict"`` are unwrapped.

    Raises:
        WeightsError: unreadable, an unknown suffix, a refused global (named with the
            file), or anything but tensors (numeric arrays) by string names.
    """
    suffix = file.suffix.lower()
    if suffix == ".safetensors":
        return dict(iter_tensors(file, "safetensors"))
    if suffix in (".pth", ".pt", ".bin"):
        return dict(_torch_load(file, nested=True))
    if suffix == ".pkl":
        return _read_numpy_pickle(file)
    raise WeightsError(f"{file}: unknown weight file type {file.suffix!r} (.safetensors, "
                       ".pth, .pt, .bin or a detectron2 .pkl)", {"path": str(file)})


def _read_numpy_pickle(file: Path) -> dict[str, Tensor]:
    try:
        with open(file, "rb") as handle:
            # latin1: Python 2 pickles store array bytes as str (detectron2's own reader too).
            checkpoint = RestrictedUnpickler(
                handle, allowed=NUMPY_ARRAY_GLOBALS, encoding="latin1",
                holds="a weight pickle may only hold numpy arrays and plain containers",
            ).load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise WeightsError(f"cannot load {file}: {exc}", {"path": str(file)}) from exc
    state = _unnested(checkpoint)
    if not isinstance(state, Mapping):
        raise WeightsError(f"{file} holds no dict of arrays", {"path": str(file)})
    tensors: dict[str, Tensor] = {}
    bad: list[str] = []
    for name, array in state.items():
        if not isinstance(name, str) or not isinstance(array, np.ndarray | np.generic) \
                or array.dtype.kind not in "biuf":
            bad.append(str(name))
            continue
        array = np.asarray(array, dtype=array.dtype.newbyteorder("="))  # native byte order
        if not (array.flags.c_contiguous and array.flags.writeable):
            array = array.copy(order="C")
        tensors[name] = torch.from_numpy(array)
    if bad:
        raise WeightsError(f"{file}: {len(bad)} entries are no numeric arrays: "
                           f"{bad[:MAX_LISTED]}", {"path": str(file), "bad_entries": bad})
    return tensors


# ====================================================================== strict comparison


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _compatible(stored: torch.dtype | None, expected: torch.dtype) -> bool:
    """Floating tensors are cast to the load dtype; other kinds must keep theirs."""
    if stored is None:
        return False
    if expected.is_floating_point:
        return stored.is_floating_point
    if expected == torch.bool or stored == torch.bool:
        return stored == expected
    return not stored.is_floating_point and not stored.is_complex


def listing(names: list[str]) -> str:
    """The first MAX_LISTED names, and how many more, for a message."""
    more = f", ... (+{len(names) - MAX_LISTED})" if len(names) > MAX_LISTED else ""
    return ", ".join(names[:MAX_LISTED]) + more


def check_layout(source: Path, target: str, header: Mapping[str, TensorSpec],
                 expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                 ignorable: Callable[[str], bool] | None = None) -> None:
    """The tensors a file holds (``header``) must be exactly those ``expected``.

    Args:
        source: the file or folder, for the message.
        target: what it is loaded into (a model name, a component).
        header: name -> (shape, dtype) in the file (both in the same naming as ``expected``).
        expected: name -> (shape, dtype) the file must hold.
        ignorable: file names that may be there without being expected.

    Raises:
        WeightsError: any missing, unexpected, mis-shaped or wrongly typed tensor; all of
            them are named in ``details`` (``missing_keys``, ``unexpected_keys``,
            ``mismatched_shapes``, ``mismatched_dtypes``), the first few in the message.
    """
    missing = sorted(set(expected) - set(header))
    unexpected = sorted(n for n in set(header) - set(expected)
                        if ignorable is None or not ignorable(n))
    shapes = {n: {"checkpoint": list(header[n][0]), "expected": list(expected[n][0])}
              for n in sorted(set(header) & set(expected)) if header[n][0] != expected[n][0]}
    dtypes = {n: {"checkpoint": dtype_name(header[n][1]) if header[n][1] else "unknown",
                  "expected": dtype_name(expected[n][1])}
              for n in sorted(set(header) & set(expected))
              if n not in shapes and not _compatible(header[n][1], expected[n][1])}
    if not (missing or unexpected or shapes or dtypes):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({listing(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({listing(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} with the wrong shape (" + listing(
            [f"{n}: {v['checkpoint']} instead of {v['expected']}" for n, v in shapes.items()])
            + ")")
    if dtypes:
        parts.append(f"{len(dtypes)} with the wrong dtype (" + listing(
            [f"{n}: {v['checkpoint']} instead of {v['expected']}" for n, v in dtypes.items()])
            + ")")
    raise WeightsError(f"checkpoint {source} does not match {target}: " + "; ".join(parts),
                       {"path": str(source), "model": target, "missing_keys": missing,
                        "unexpected_keys": unexpected, "mismatched_shapes": shapes,
                        "mismatched_dtypes": dtypes})
