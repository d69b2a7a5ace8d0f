"""Load and save UniGeoSeg in the released Hugging Face layout.

The released model (HF ``nishuo1999/UniGeoSeg``) is a folder holding ``config.json``
(:mod:`.release_config`), the weights (:mod:`.weight_files`) and the tokenizer files. Its
tensor names are converted to this model's by :mod:`.conversion`.

Public API:
    load_released(path, device="cpu", dtype=None) -> LoadedModel   (cached per process)
    save_released(loaded_or_model, tokenizer, path, *, max_shard_bytes, connector_shard) -> Path
    clear_cache(path=None)

Loading is strict: the checkpoint's tensor names and shapes are compared with the model's
(in the checkpoint's naming) before any weight is read, and any missing, unexpected or
mis-shaped tensor raises :class:`~unigeoseg_backend.errors.WeightsError` naming them. The
model is built on the meta device, then each parameter is allocated empty on the target
device and filled tensor by tensor, one shard at a time: peak memory is about the model
itself plus one tensor, never two copies.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InvalidInputError, WeightsError
from .conversion import convert_phi_state_dict, model_to_released, released_to_model
from .prompting import SEG_TOKEN, seg_token_id
from .release_config import (
    CONFIG_FILE,
    CONNECTOR_PREFIX,
    read_release_config,
    registry_name,
    release_config_json,
)
from .unigeoseg import UniGeoSeg, UniGeoSegConfig
from .weight_files import (
    SAFETENSORS_FILE,
    SAFETENSORS_INDEX,
    WeightFiles,
    check_layout,
    dtype_name,
    find_weight_files,
    iter_tensors,
    listing,
    read_headers,
)

logger = logging.getLogger(__name__)

_SPLIT_KEY_PART = ".self_attn.q_proj."
_FUSED_KEY_PART = ".self_attn.query_key_value."


@dataclass
class LoadedModel:
    """A loaded checkpoint: the model (eval mode), its tokenizer and where it came from."""

    model: UniGeoSeg
    tokenizer: Any
    config: UniGeoSegConfig
    name: str
    path: Path


# ====================================================================== building the model


def _build_meta(config: UniGeoSegConfig) -> UniGeoSeg:
    """UniGeoSeg with its parameters and buffers on the meta device: costs no memory and
    leaves the global RNG as it was."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return UniGeoSeg(config)


def _materialize(model: UniGeoSeg, device: torch.device, dtype: torch.dtype) -> UniGeoSeg:
    """Give every parameter and buffer uninitialised storage on ``device`` (floating
    parameters and persistent floating buffers in ``dtype``), then compute the buffers that
    follow from the config (the checkpoint overwrites the persistent ones)."""
    memo: dict[int, Tensor] = {}  # a tensor held by two modules stays one tensor
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in memo:
                target = dtype if param.is_floating_point() else param.dtype
                memo[id(param)] = nn.Parameter(
                    torch.empty(param.shape, dtype=target, device=device),
                    requires_grad=param.requires_grad)
            module._parameters[name] = memo[id(param)]  # type: ignore[assignment]
        for name, buf in list(module._buffers.items()):
            if buf is None:
                continue
            if id(buf) not in memo:
                persistent = name not in module._non_persistent_buffers_set
                target = dtype if (persistent and buf.is_floating_point()) else buf.dtype
                memo[id(buf)] = torch.empty(buf.shape, dtype=target, device=device)
            module._buffers[name] = memo[id(buf)]
    model.compute_buffers()
    return model


# ====================================================================== strict comparison


def _expected_release_layout(model: UniGeoSeg, header: Mapping[str, Any]
                             ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) the checkpoint must hold, in its own naming: fused q/k/v unless
    it stores split ``q_proj``/``k_proj``/``v_proj`` (transformers >= 4.37 exports)."""
    meta = {name: torch.empty(t.shape, dtype=t.dtype, device="meta")
            for name, t in model.state_dict().items()}
    split_format = (any(_SPLIT_KEY_PART in n for n in header)
                    and not any(_FUSED_KEY_PART in n for n in header))
    layout = model_to_released(meta, model.config.language["num_attention_heads"],
                               fused_qkv=not split_format)
    return {name: (tuple(t.shape), t.dtype) for name, t in layout.items()}


def _ignorable(name: str, num_heads: int) -> bool:
    """Tensors that old exports carry and the converter drops (rotary ``inv_freq``)."""
    try:
        return convert_phi_state_dict({name: torch.empty(0, device="meta")},
                                      num_heads=num_heads) == {}
    except WeightsError:
        return False


# ====================================================================== filling the weights


def _fill(model: UniGeoSeg, weights: WeightFiles, expected: Mapping[str, Any]) -> None:
    """Copy every checkpoint tensor into the model, one tensor at a time."""
    num_heads = model.config.language["num_attention_heads"]
    targets = model.state_dict(keep_vars=True)
    filled: set[str] = set()
    for file in weights.files:
        for name, tensor in iter_tensors(file, weights.kind):
            if name not in expected:
                continue  # ignorable (checked by check_layout)
            with torch.no_grad():
                for target_name, value in released_to_model({name: tensor}, num_heads).items():
                    target = targets[target_name]
                    if target_name.endswith("relative_position_index"):
                        _check_position_index(target_name, value, target, targets)
                    target.copy_(value)
                    filled.add(target_name)
            del tensor
    unfilled = sorted(set(targets) - filled)
    if unfilled:  # check_layout makes this unreachable, short of a racing writer
        raise WeightsError(f"checkpoint left {len(unfilled)} tensor(s) unset: "
                           f"{listing(unfilled)}", {"missing_keys": unfilled})


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


def _fingerprint(folder: Path, weights: WeightFiles) -> tuple:
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
        weights = find_weight_files(folder)
        fingerprint = _fingerprint(folder, weights)
        cached = _CACHE.get(key)
        if cached is not None and cached[0] == fingerprint:
            return cached[1]
        _CACHE.pop(key, None)  # the files changed: let the stale model go before loading
        cached = None
        loaded = _load(folder, weights, device, dtype)
        _CACHE[key] = (fingerprint, loaded)
        return loaded


def _load(folder: Path, weights: WeightFiles, device: torch.device,
          dtype: torch.dtype) -> LoadedModel:
    start = time.perf_counter()
    header = read_headers(weights)
    config, name = read_release_config(folder, header)
    tokenizer = _load_tokenizer(folder, config)
    model = _build_meta(config)
    expected = _expected_release_layout(model, header)
    num_heads = config.language["num_attention_heads"]
    check_layout(folder, name, header, expected, lambda n: _ignorable(n, num_heads))
    model = _materialize(model, device, dtype)  # only now is memory taken
    _fill(model, weights, expected)
    model.eval()
    logger.info("loaded %s from %s (%d tensors, %s on %s) in %.1f s", name, folder,
                len(header), dtype_name(dtype), device, time.perf_counter() - start)
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
    arch = registry_name(model.config)
    if arch is None:
        raise ValueError("the model's architecture is no registry configuration; "
                         "config.json could not describe it")
    num_heads = model.config.language["num_attention_heads"]
    release = model_to_released(model.state_dict(), num_heads)
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
        config = release_config_json(model.config, arch, original, weight_dtype)
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
