"""Load and save UniGeoSeg checkpoints in the released Hugging Face layout.

The released model (HF ``nishuo1999/UniGeoSeg``) is a folder holding ``config.json``
(``model_type: llava_phi``, the Phi-1.5 fields, ``mm_projector_type``, ...), the weights
(``model.safetensors``, or shards with ``model.safetensors.index.json``, or the same as
``pytorch_model.bin[.index.json]``) and the tokenizer files. Its tensor names are those of
``shared/reference``'s manifests: transformers-4.36 Phi with one fused
``self_attn.query_key_value`` per layer, which :func:`~.language.convert_phi_state_dict`
splits into the ``q_proj``/``k_proj``/``v_proj`` of :class:`~.unigeoseg.UniGeoSeg`.

Public API:
    load_released(path, device="cpu", dtype=None) -> LoadedModel   (cached per process)
    save_released(loaded_or_model, tokenizer, path, *, max_shard_bytes, connector_shard) -> Path
    read_release_config(path) -> (UniGeoSegConfig, name)
    fuse_qkv(q, k, v, num_heads) -> fused                 (inverse of split_fused_qkv)
    to_release_state_dict(state, num_heads) -> dict       (model names -> released names)
    clear_cache(path=None)

Loading is strict: the checkpoint's tensor names and shapes are compared with the model's
(in the checkpoint's naming) before any weight is read, and any missing, unexpected or
mis-shaped tensor raises :class:`~unigeoseg_backend.errors.WeightsError` naming them. The
model is built with its parameters on the meta device (its buffers computed for real), then
each parameter is allocated empty on the target device and filled tensor by tensor, one
shard at a time: peak memory is about the model itself plus one tensor, never two copies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InvalidInputError, WeightsError
from .language import OPTIONAL_FIELDS, REQUIRED_FIELDS, convert_phi_state_dict
from .prompting import SEG_TOKEN, seg_token_id
from .registry import MODEL_CONFIGS, get_config, official_config
from .unigeoseg import UniGeoSeg, UniGeoSegConfig

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
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
_MAX_LISTED = 5  # names quoted per category in an error message

_LANGUAGE_KEY = re.compile(r"model\.(embed_tokens|layers|final_layernorm)\.|lm_head\.")
_FUSED_KEY = re.compile(r"model\.layers\.(\d+)\.self_attn\.query_key_value\.(weight|bias)")
_SPLIT_KEY = re.compile(r"model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj)\.(weight|bias)")

_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass
class LoadedModel:
    """A loaded checkpoint: the model (eval mode), its tokenizer and where it came from."""

    model: UniGeoSeg
    tokenizer: Any
    config: UniGeoSegConfig
    name: str
    path: Path


# ====================================================================== names and layouts


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, num_heads: int) -> Tensor:
    """transformers-4.36 ``query_key_value`` from q/k/v (weights D x D_in or biases D).

    The inverse of :func:`~.language.split_fused_qkv`: rows interleaved per head,
    ``h0:q, h0:k, h0:v, h1:q, ...`` (head_dim rows each). Works on meta tensors too.
    """
    if not (q.shape == k.shape == v.shape) or q.shape[0] % num_heads:
        raise ValueError(f"q/k/v shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} "
                         f"cannot be fused with num_heads={num_heads}")
    head_dim = q.shape[0] // num_heads
    rest = tuple(q.shape[1:])
    parts = [t.reshape(num_heads, head_dim, *rest) for t in (q, k, v)]
    return torch.stack(parts, dim=1).reshape(3 * q.shape[0], *rest)


def to_release_state_dict(state: Mapping[str, Tensor], num_heads: int) -> dict[str, Tensor]:
    """Model names (split q/k/v) -> released names (fused ``query_key_value``), in order.

    The fused tensor takes the place of the layer's ``q_proj`` tensor; everything else keeps
    its name and object. Raises ValueError if a layer lacks one of q/k/v.
    """
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        m = _SPLIT_KEY.fullmatch(name)
        if m is None:
            out[name] = tensor
            continue
        layer, proj, kind = m.groups()
        if proj != "q_proj":
            continue
        base = f"model.layers.{layer}.self_attn."
        try:
            parts = [state[f"{base}{p}.{kind}"] for p in ("q_proj", "k_proj", "v_proj")]
        except KeyError as exc:
            raise ValueError(f"layer {layer} lacks {exc.args[0]}") from None
        out[f"{base}query_key_value.{kind}"] = fuse_qkv(*parts, num_heads=num_heads)
    for name in state:
        m = _SPLIT_KEY.fullmatch(name)
        if m and f"model.layers.{m.group(1)}.self_attn.query_key_value.{m.group(3)}" not in out:
            raise ValueError(f"{name} has no q_proj partner")
    return out


def _dtype_name(dtype: torch.dtype) -> str:
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


# ====================================================================== config.json


def _read_json(file: Path, what: str) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightsError(f"{file.parent}: no {file.name} ({what})",
                           {"path": str(file.parent), "missing_file": file.name}) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"cannot read {file}: {exc}", {"path": str(file)}) from exc


def read_release_config(path: str | os.PathLike[str],
                        header: Mapping[str, tuple[tuple[int, ...], Any]] | None = None
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
    raw = _read_json(folder / CONFIG_FILE, "the checkpoint's config")
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


def _detect_connector(header: Mapping[str, tuple[tuple[int, ...], Any]]) -> str | None:
    fc = header.get(CONNECTOR_PREFIX + "fc.weight")
    if fc is not None and len(fc[0]) == 4:
        return "SparseConv_1"
    if fc is not None and len(fc[0]) == 2:
        return "MSCC"
    if CONNECTOR_PREFIX + "global_tokens" in header:
        return "MSCC"
    return None


# ====================================================================== weight files


@dataclass(frozen=True)
class _Weights:
    """The weight files of a folder: format, shard files, and the index if any."""

    kind: str  # "safetensors" | "bin"
    files: tuple[Path, ...]
    index: Path | None
    weight_map: Mapping[str, str] | None

    def fingerprint_files(self) -> tuple[Path, ...]:
        return self.files + ((self.index,) if self.index else ())


def _find_weights(folder: Path) -> _Weights:
    for kind, index_name, single in (("safetensors", SAFETENSORS_INDEX, SAFETENSORS_FILE),
                                     ("bin", BIN_INDEX, BIN_FILE)):
        index = folder / index_name
        if index.is_file():
            data = _read_json(index, "the weight index")
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise WeightsError(f"{index} has no weight_map")
            names = list(dict.fromkeys(weight_map.values()))
            bad = [n for n in names
                   if not isinstance(n, str) or n in ("", ".", "..") or Path(n).name != n]
            if bad:  # shards live in the folder itself: no paths
                raise WeightsError(f"{index}: bad shard name(s) {bad[:_MAX_LISTED]}")
            absent = [n for n in names if not (folder / n).is_file()]
            if absent:
                raise WeightsError(f"{index} lists shard(s) that are not there: {absent}",
                                   {"path": str(folder), "missing_files": absent})
            return _Weights(kind, tuple(folder / n for n in sorted(names)), index, weight_map)
        if (folder / single).is_file():
            return _Weights(kind, (folder / single,), None, None)
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


def _read_headers(weights: _Weights) -> tuple[dict[str, tuple[tuple[int, ...], Any]],
                                              dict[str, Path]]:
    """All tensors' (shape, dtype) and the file holding each; checks the index against them."""
    header: dict[str, tuple[tuple[int, ...], Any]] = {}
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
                           f"{duplicates[:_MAX_LISTED]}", {"duplicate_keys": duplicates})
    if weights.weight_map is not None:
        wrong = sorted(name for name, shard in weights.weight_map.items()
                       if name not in where or where[name].name != shard)
        if wrong:
            raise WeightsError(f"{weights.index}: {len(wrong)} tensor(s) are not in the shard "
                               f"it names: {wrong[:_MAX_LISTED]}",
                               {"path": str(weights.index), "index_mismatch": wrong})
    return header, where


def _iter_tensors(file: Path, kind: str) -> Iterator[tuple[str, Tensor]]:
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


# ====================================================================== building the model


_BUILD = threading.local()
_BUILD_LOCK = threading.Lock()


def _register_parameter_on_meta(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
    if param is not None and getattr(_BUILD, "meta_params", False) and not param.is_meta:
        param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
    _ORIGINAL_REGISTER_PARAMETER(self, name, param)


_ORIGINAL_REGISTER_PARAMETER = nn.Module.register_parameter


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built in this thread inside the block get meta parameters; buffers stay real.

    (Parameters already on meta are kept as they are, so a Parameter registered twice, as
    UniGeoSeg does with the heads', stays one object.)
    """
    with _BUILD_LOCK:
        nn.Module.register_parameter = _register_parameter_on_meta  # type: ignore[method-assign]
        _BUILD.meta_params = True
        try:
            yield
        finally:
            _BUILD.meta_params = False
            nn.Module.register_parameter = _ORIGINAL_REGISTER_PARAMETER  # type: ignore[method-assign]


def _all_modules(model: nn.Module) -> list[nn.Module]:
    """The registered modules, plus modules held in plain attributes (``UniGeoSeg.heads``)."""
    seen: dict[int, nn.Module] = {}
    todo = [model]
    while todo:
        module = todo.pop()
        if id(module) in seen:
            continue
        seen[id(module)] = module
        todo.extend(m for m in module._modules.values() if m is not None)
        todo.extend(v for v in vars(module).values() if isinstance(v, nn.Module))
    return list(seen.values())


def _build_meta(config: UniGeoSegConfig) -> UniGeoSeg:
    """UniGeoSeg with its parameters on the meta device and its buffers computed for real
    (the non-persistent rotary ``inv_freq`` is never in a checkpoint). Costs no memory and
    leaves the global RNG as it was."""
    with torch.random.fork_rng(devices=[]), _parameters_on_meta():
        return UniGeoSeg(config)


def _materialize(model: UniGeoSeg, device: torch.device, dtype: torch.dtype) -> UniGeoSeg:
    """Give every meta parameter uninitialised storage on ``device`` (floating ones in
    ``dtype``) and move the buffers there (persistent floating ones in ``dtype``).

    Shared Parameter objects stay shared: the unregistered ``model.heads`` keeps pointing at
    the very parameters the model registers (checked).
    """
    memo: dict[int, tuple[Tensor, Tensor]] = {}  # id(old) -> (old kept alive, new)
    for module in _all_modules(model):
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in memo:
                target = dtype if param.is_floating_point() else param.dtype
                new = nn.Parameter(torch.empty(param.shape, dtype=target, device=device),
                                   requires_grad=param.requires_grad)
                memo[id(param)] = (param, new)
            module._parameters[name] = memo[id(param)][1]  # type: ignore[assignment]
        for name, buf in list(module._buffers.items()):
            if buf is None:
                continue
            if id(buf) not in memo:
                persistent = name not in module._non_persistent_buffers_set
                target = dtype if (persistent and buf.is_floating_point()) else buf.dtype
                memo[id(buf)] = (buf, buf.to(device=device, dtype=target))
            module._buffers[name] = memo[id(buf)][1]
    _check_shared_parameters(model)
    return model


def _check_shared_parameters(model: UniGeoSeg) -> None:
    """Every parameter of an unregistered container must be one the model registers."""
    registered = {id(p) for p in model.parameters()}
    stray = [f"heads.{n}" for n, p in model.heads.named_parameters() if id(p) not in registered]
    if stray or model.heads.global_latents is not model.global_latents:
        raise RuntimeError(f"model.heads lost its link to the model's parameters: {stray[:5]}")


# ====================================================================== strict comparison


def _expected_release_layout(model: UniGeoSeg, header: Mapping[str, Any]
                             ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) the checkpoint must hold, in its own naming: fused q/k/v unless
    it stores split ``q_proj``/``k_proj``/``v_proj`` (transformers >= 4.37 exports)."""
    meta = {name: torch.empty(t.shape, dtype=t.dtype, device="meta")
            for name, t in model.state_dict().items()}
    split_format = (any(_SPLIT_KEY.fullmatch(n) for n in header)
                    and not any(_FUSED_KEY.fullmatch(n) for n in header))
    layout = meta if split_format else to_release_state_dict(
        meta, model.config.language["num_attention_heads"])
    return {name: (tuple(t.shape), t.dtype) for name, t in layout.items()}


def _ignorable(name: str, num_heads: int) -> bool:
    """Tensors that old exports carry and the converter drops (rotary ``inv_freq``)."""
    if not _LANGUAGE_KEY.match(name):
        return False
    try:
        return convert_phi_state_dict({name: torch.empty(0, device="meta")},
                                      num_heads=num_heads) == {}
    except WeightsError:
        return False


def _listing(names: list[str]) -> str:
    more = f", ... (+{len(names) - _MAX_LISTED})" if len(names) > _MAX_LISTED else ""
    return ", ".join(names[:_MAX_LISTED]) + more


def _compare(folder: Path, name: str, header: Mapping[str, tuple[tuple[int, ...], Any]],
             expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]], num_heads: int) -> None:
    missing = sorted(set(expected) - set(header))
    unexpected = sorted(n for n in set(header) - set(expected) if not _ignorable(n, num_heads))
    shapes = {n: {"checkpoint": list(header[n][0]), "expected": list(expected[n][0])}
              for n in sorted(set(header) & set(expected)) if header[n][0] != expected[n][0]}
    dtypes = {n: {"checkpoint": _dtype_name(header[n][1]) if header[n][1] else "unknown",
                  "expected": _dtype_name(expected[n][1])}
              for n in sorted(set(header) & set(expected))
              if n not in shapes and not _compatible(header[n][1], expected[n][1])}
    if not (missing or unexpected or shapes or dtypes):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({_listing(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_listing(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} with the wrong shape (" + _listing(
            [f"{n}: {v['checkpoint']} instead of {v['expected']}" for n, v in shapes.items()])
            + ")")
    if dtypes:
        parts.append(f"{len(dtypes)} with the wrong dtype (" + _listing(
            [f"{n}: {v['checkpoint']} instead of {v['expected']}" for n, v in dtypes.items()])
            + ")")
    raise WeightsError(f"checkpoint {folder} does not match {name}: " + "; ".join(parts),
                       {"path": str(folder), "model": name, "missing_keys": missing,
                        "unexpected_keys": unexpected, "mismatched_shapes": shapes,
                        "mismatched_dtypes": dtypes})


# ====================================================================== filling the weights


def _fill(model: UniGeoSeg, weights: _Weights, expected: Mapping[str, Any]) -> None:
    """Copy every checkpoint tensor into the model, one tensor (or fused group) at a time."""
    num_heads = model.config.language["num_attention_heads"]
    targets = model.state_dict(keep_vars=True)
    filled: set[str] = set()
    pending: dict[str, dict[str, Tensor]] = {}  # layer -> fused weight/bias seen so far

    def put(converted: Mapping[str, Tensor]) -> None:
        with torch.no_grad():
            for target_name, tensor in converted.items():
                target = targets[target_name]
                if target_name.endswith("relative_position_index"):
                    _check_position_index(target_name, tensor, target, targets)
                target.copy_(tensor)
                filled.add(target_name)

    for file in weights.files:
        for name, tensor in _iter_tensors(file, weights.kind):
            if name not in expected:
                continue  # ignorable (checked by _compare)
            fused = _FUSED_KEY.fullmatch(name)
            if fused:
                layer, kind = fused.groups()
                group = pending.setdefault(layer, {})
                group[kind] = tensor
                base = f"model.layers.{layer}.self_attn.query_key_value."
                if all(k in group for k in ("weight", "bias") if base + k in expected):
                    put(convert_phi_state_dict({base + k: t for k, t in group.items()},
                                               num_heads=num_heads))
                    del pending[layer]
            elif _LANGUAGE_KEY.match(name):
                put(convert_phi_state_dict({name: tensor}, num_heads=num_heads))
            else:
                put({name: tensor})
            del tensor
    unfilled = sorted(set(targets) - filled)
    if pending or unfilled:  # _compare makes this unreachable, short of a racing writer
        raise WeightsError(f"checkpoint left {len(unfilled)} tensor(s) unset: "
                           f"{_listing(unfilled)}", {"missing_keys": unfilled})


def _check_position_index(name: str, loaded: Tensor, computed: Tensor,
                          targets: Mapping[str, Tensor]) -> None:
    """A Swin ``relative_position_index`` must index its bias table; the model's own value
    is the standard one, so a different one is worth a warning."""
    table = targets.get(name.replace("relative_position_index", "relative_position_bias_table"))
    if table is not None and loaded.numel() and (
            int(loaded.min()) < 0 or int(loaded.max()) >= table.shape[0]):
        raise WeightsError(f"{name} indexes outside its bias table "
                           f"([{int(loaded.min())}, {int(loaded.max())}] vs {table.shape[0]} rows)",
                           {"bad_tensor": name})
    if not torch.equal(loaded.to(computed.device), computed):
        logger.warning("%s differs from the standard Swin index; using the checkpoint's", name)


# ====================================================================== load_released


_CACHE: dict[tuple[str, str, torch.dtype], tuple[tuple, LoadedModel]] = {}
_CACHE_LOCK = threading.RLock()


def _resolve_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}")
        dtype = resolved
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    return dtype


def _fingerprint(folder: Path, weights: _Weights) -> tuple:
    stats = []
    for file in (folder / CONFIG_FILE, *weights.fingerprint_files()):
        st = file.stat()
        stats.append((file.name, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(stats)


def clear_cache(path: str | os.PathLike[str] | None = None) -> None:
    """Forget the cached models (of ``path`` only, if given), so their memory can be freed."""
    with _CACHE_LOCK:
        if path is None:
            _CACHE.clear()
            return
        resolved = str(Path(path).resolve())
        for key in [k for k in _CACHE if k[0] == resolved]:
            del _CACHE[key]


def load_released(path: str | os.PathLike[str], device: str | torch.device = "cpu",
                  dtype: torch.dtype | str | None = None) -> LoadedModel:
    """Load a release folder strictly (cached: once per (path, device, dtype) per process).

    Args:
        path: folder with config.json, weights and tokenizer files (the HF layout).
        device: where the parameters go.
        dtype: floating dtype of the parameters; default bfloat16 on CUDA, float32 elsewhere.
            Integer buffers keep theirs.

    Raises:
        WeightsError: no/unreadable config.json, weights or tokenizer; a tokenizer without
            ``[SEG]`` or with more tokens than embedding rows; any missing, unexpected,
            mis-shaped or wrongly typed tensor (``details`` lists them all, in the
            checkpoint's naming).
    """
    folder = Path(path).resolve()
    if not folder.is_dir():
        raise WeightsError(f"checkpoint folder {folder} does not exist", {"path": str(folder)})
    device = _resolve_device(device)
    dtype = _resolve_dtype(dtype, device)
    key = (str(folder), str(device), dtype)
    with _CACHE_LOCK:
        if not (folder / CONFIG_FILE).is_file():
            raise WeightsError(f"{folder}: no {CONFIG_FILE}", {"path": str(folder),
                                                                "missing_file": CONFIG_FILE})
        weights = _find_weights(folder)
        fingerprint = _fingerprint(folder, weights)
        cached = _CACHE.get(key)
        if cached is not None and cached[0] == fingerprint:
            return cached[1]
        _CACHE.pop(key, None)  # the files changed: let the stale model go before loading
        cached = None
        loaded = _load(folder, weights, device, dtype)
        _CACHE[key] = (fingerprint, loaded)
        return loaded


def _load(folder: Path, weights: _Weights, device: torch.device,
          dtype: torch.dtype) -> LoadedModel:
    start = time.perf_counter()
    header, _ = _read_headers(weights)
    config, name = read_release_config(folder, header)
    tokenizer = _load_tokenizer(folder, config)
    model = _build_meta(config)
    expected = _expected_release_layout(model, header)
    _compare(folder, name, header, expected, config.language["num_attention_heads"])
    model = _materialize(model, device, dtype)  # only now is memory taken
    _fill(model, weights, expected)
    model.eval()
    _check_shared_parameters(model)
    logger.info("loaded %s from %s (%d tensors, %s on %s) in %.1f s", name, folder,
                len(header), _dtype_name(dtype), device, time.perf_counter() - start)
    return LoadedModel(model=model, tokenizer=tokenizer, config=config, name=name, path=folder)


def _load_tokenizer(folder: Path, config: UniGeoSegConfig) -> Any:
    from transformers import AutoTokenizer, PretrainedConfig

    try:
        # A blank config: the llava_phi config.json is no transformers model type, and reading
        # it would only log warnings (the tokenizer class comes from tokenizer_config.json).
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                                  config=PretrainedConfig())
    except Exception as exc:  # OSError, ValueError, ...: no or broken tokenizer files
        raise WeightsError(f"{folder}: cannot load the tokenizer: {exc}",
                           {"path": str(folder)}) from exc
    try:
        seg = _checked_seg_id(tokenizer)
    except InvalidInputError as exc:
        raise WeightsError(f"{folder}: the tokenizer has no {SEG_TOKEN} token ({exc.message})",
                           {"path": str(folder)}) from exc
    vocab = config.language["vocab_size"]
    if len(tokenizer) > vocab or seg >= vocab:
        raise WeightsError(f"{folder}: the tokenizer has {len(tokenizer)} tokens ([SEG]={seg}) "
                           f"but the embeddings only {vocab} rows", {"path": str(folder)})
    return tokenizer


def _checked_seg_id(tokenizer: Any) -> int:
    """seg_token_id, also refusing a ``[SEG]`` that is merely one unknown-token id."""
    seg = seg_token_id(tokenizer)
    unk = getattr(tokenizer, "unk_token_id", None)
    if seg == unk or tokenizer.convert_tokens_to_ids(SEG_TOKEN) != seg:
        raise InvalidInputError(f"{SEG_TOKEN} is not a token of the vocabulary (it encodes to "
                                f"the unknown token {seg}); call add_special_tokens(tokenizer)")
    return seg


# ====================================================================== save_released


def _registry_name(config: UniGeoSegConfig) -> str | None:
    """The registry entry with this architecture (language widths aside), if any."""
    fields = [f.name for f in dataclasses.fields(config) if f.name != "language"]
    for name in MODEL_CONFIGS:
        candidate = get_config(name)
        if all(getattr(candidate, f) == getattr(config, f) for f in fields):
            return name
    return None


def _release_config(model: UniGeoSeg, arch: str, original: Path | None,
                    weight_dtype: torch.dtype) -> dict[str, Any]:
    config = model.config
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
    data["torch_dtype"] = _dtype_name(weight_dtype)
    return data


def _plan_shards(sizes: Mapping[str, int], max_shard_bytes: int,
                 separate: Callable[[str], bool]) -> list[list[str]]:
    """Greedy shards in order; names for which ``separate`` holds get one shard of their own
    (last). A tensor larger than ``max_shard_bytes`` gets a shard alone."""
    shards: list[list[str]] = []
    current: list[str] = []
    current_bytes = 0
    for name, size in sizes.items():
        if separate(name):
            continue
        if current and current_bytes + size > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += size
    if current:
        shards.append(current)
    tail = [name for name in sizes if separate(name)]
    if tail:
        shards.append(tail)
    return shards


def save_released(loaded_or_model: LoadedModel | UniGeoSeg, tokenizer: Any,
                  path: str | os.PathLike[str], *, max_shard_bytes: int = 2 << 30,
                  connector_shard: bool = True) -> Path:
    """Write a model in the released layout that :func:`load_released` (and the official
    transformers-4.36 loader) reads.

    Writes config.json (``mm_projector_type``, the language fields, ``unigeoseg_arch``),
    safetensors shards of at most ``max_shard_bytes`` with ``model.safetensors.index.json``
    (one ``model.safetensors`` when everything fits one shard and ``connector_shard`` is
    False), fused 4.36 ``query_key_value`` tensors, and the tokenizer files. With
    ``connector_shard`` the ``model.mm_projector.*`` tensors get a shard of their own, so
    folders differing only in the connector can share the other shards. Tensors keep the
    model's dtypes. The folder appears at once (written beside it, then renamed); an
    existing one is replaced.

    Args:
        loaded_or_model: a LoadedModel, or a UniGeoSeg whose config is a registry one.
        tokenizer: with ``[SEG]``; None takes the LoadedModel's.
        path: the folder to write.

    Returns:
        The folder written.
    """
    if isinstance(loaded_or_model, LoadedModel):
        model, original = loaded_or_model.model, loaded_or_model.path / CONFIG_FILE
        tokenizer = loaded_or_model.tokenizer if tokenizer is None else tokenizer
    else:
        model, original = loaded_or_model, None
    if tokenizer is None:
        raise ValueError("a release folder needs a tokenizer")
    _checked_seg_id(tokenizer)  # raises InvalidInputError without [SEG]
    if len(tokenizer) > model.config.language["vocab_size"]:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the embeddings only "
                         f"{model.config.language['vocab_size']} rows")
    arch = _registry_name(model.config)
    if arch is None:
        raise ValueError("the model's architecture is no registry configuration; "
                         "config.json could not describe it")
    num_heads = model.config.language["num_attention_heads"]
    release = to_release_state_dict(model.state_dict(), num_heads)
    sizes = {name: t.numel() * t.element_size() for name, t in release.items()}
    floating = [t.dtype for t in release.values() if t.is_floating_point()]
    weight_dtype = max(set(floating), key=floating.count) if floating else torch.float32
    shards = _plan_shards(sizes, max_shard_bytes,
                          (lambda n: n.startswith(CONNECTOR_PREFIX)) if connector_shard
                          else (lambda n: False))

    target = Path(path).absolute()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = target.parent / f".{target.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        from safetensors.torch import save_file

        if len(shards) == 1 and not connector_shard:
            files = [SAFETENSORS_FILE]
        else:
            files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                     for i in range(len(shards))]
        weight_map: dict[str, str] = {}
        for names, file in zip(shards, files, strict=True):
            tensors = {n: release[n].detach().to("cpu").contiguous() for n in names}
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(names, file))
            del tensors
        if files != [SAFETENSORS_FILE]:
            index = {"metadata": {"total_size": sum(sizes.values())},
                     "weight_map": dict(sorted(weight_map.items()))}
            (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n",
                                                 encoding="utf-8")
        config = _release_config(model, arch, original, weight_dtype)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        tokenizer.save_pretrained(str(tmp))
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{tag}"
            os.rename(target, old)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    clear_cache(target)
    logger.info("saved %s to %s (%d shard(s))", arch, target, len(shards))
    return target
