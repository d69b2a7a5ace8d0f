"""Training checkpoints: safetensors and JSON only, written atomically.

A checkpoint is a folder ``<root>/step_<step:08d>/``::

    model.safetensors       the model's full state dict (gathered from the shards under FSDP)
    optimizer.safetensors   every tensor of the optimizer state, as ``state.<i>.<name>`` and
                            ``param_groups.<g>.<name>``
    rng.safetensors         the torch / CUDA / numpy generator states of every process,
                            as ``rank<r>.<generator>``
    state.json              step, sampler position, learning-rate schedule, the optimizer's
                            scalars and hyperparameters (with its parameters' names), the
                            rest of the generator states, caller extras, and each file's size

Nothing is pickled, so loading a checkpoint cannot run code. The folder is written under a
temporary name (``.step_<step>.partial``), every file and the folder are fsynced, and only
then is it renamed into place: a checkpoint folder either is complete or does not exist, so
a crash while saving (or a full disk) leaves the previous checkpoint as the latest one.
:func:`latest_checkpoint` also checks the sizes in ``state.json``, so a folder damaged later
is skipped, not loaded.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_NAME = re.compile(r"^step_(\d{8,})$")
_STATE_FILE = "state.json"


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, damaged, or does not fit the model or optimizer."""


# --- generator states ----------------------------------------------------------------------

@dataclass
class RngState:
    """One process's generator states: tensors for safetensors, the rest JSON-able."""

    tensors: dict[str, torch.Tensor]
    scalars: dict[str, Any]


def capture_rng_state() -> RngState:
    """The torch, CUDA (if initialised), numpy and Python ``random`` generators of this
    process."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, words, gauss = random.getstate()
    scalars = {"numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss),
                         "cached_gaussian": float(cached)},
               "python": {"version": version, "state": list(words), "gauss": gauss}}
    return RngState(tensors=tensors, scalars=scalars)


def restore_rng_state(state: RngState) -> None:
    """Set this process's generators to ``state`` (CUDA ones only where both have them)."""
    torch.set_rng_state(state.tensors["torch"])
    cuda = sorted((k for k in state.tensors if k.startswith("cuda.")),
                  key=lambda k: int(k.split(".")[1]))
    if cuda and torch.cuda.is_available():
        devices = torch.cuda.device_count()
        torch.cuda.set_rng_state_all([state.tensors[k] for k in cuda][:devices])
    np_scalars = state.scalars["numpy"]
    keys = state.tensors["numpy"].numpy().astype(np.uint32)
    np.random.set_state((np_scalars["kind"], keys, np_scalars["pos"],
                         np_scalars["has_gauss"], np_scalars["cached_gaussian"]))
    py = state.scalars["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))


# --- optimizer state as tensors + JSON -----------------------------------------------------

def _to_json(value: Any) -> Any:
    """JSON form of an optimizer hyperparameter (tuples tagged so they come back as tuples)."""
    if isinstance(value, tuple):
        return {"tuple": [_to_json(v) for v in value]}
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise CheckpointError(f"optimizer value {value!r} ({type(value).__name__}) has no JSON form")


def _from_json(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"tuple"}:
        return tuple(_from_json(v) for v in value["tuple"])
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def parameter_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """The name of every parameter of each optimizer group, in the optimizer's order."""
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    try:
        return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    except KeyError as exc:
        raise CheckpointError("the optimizer holds a parameter the model does not") from exc


def flatten_optimizer(full: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An ``optimizer.state_dict()`` as (tensors, JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in full["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = _to_json(value)
    groups = []
    for g, group in enumerate(full["param_groups"]):
        plain = {}
        for name, value in group.items():
            if isinstance(value, torch.Tensor):       # e.g. a tensor lr
                tensors[f"param_groups.{g}.{name}"] = value.detach().contiguous()
            else:
                plain[name] = _to_json(value)
        groups.append(plain)
    return tensors, {"state_scalars": scalars, "param_groups": groups}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict[str, Any]
                        ) -> dict[str, Any]:
    """The ``optimizer.state_dict()`` that :func:`flatten_optimizer` took apart."""
    state: dict[int, dict[str, Any]] = {}
    groups = [{k: _from_json(v) for k, v in g.items()} for g in rest["param_groups"]]
    for key, value in tensors.items():
        kind, index, name = key.split(".", 2)
        if kind == "state":
            state.setdefault(int(index), {})[name] = value
        else:
            groups[int(index)][name] = value
    for index, entries in rest["state_scalars"].items():
        state.setdefault(int(index), {}).update({k: _from_json(v) for k, v in entries.items()})
    return {"state": dict(sorted(state.items())), "param_groups": groups}


# --- the checkpoint folder -----------------------------------------------------------------

@dataclass
class CheckpointTensors:
    """The model and optimizer side of a checkpoint, as plain (unsharded) values.

    Attributes:
        model: the model's full state dict.
        optimizer: the optimizer's state in ``optimizer.state_dict()`` form (parameters as
            integer positions, in group order).
        param_names: the name of every parameter of each optimizer group, in that order.
    """

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    param_names: list[list[str]]

    @classmethod
    def of(cls, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> CheckpointTensors:
        """The tensors of an unsharded model and its optimizer."""
        return cls(model=model.state_dict(), optimizer=optimizer.state_dict(),
                   param_names=parameter_names(model, optimizer))


@dataclass
class TrainingState:
    """Everything a checkpoint holds besides the model and optimizer tensors.

    Attributes:
        step: optimizer steps done.
        sampler: ``TaskBatchSampler.state_dict()``.
        lr_schedule: the schedule's fields (``dataclasses.asdict``), to check on resume.
        rng: one generator state per process, by rank.
        extra: anything else JSON-able (the config, the best metric so far).
    """

    step: int
    sampler: dict[str, Any]
    lr_schedule: dict[str, Any] = field(default_factory=dict)
    rng: list[RngState] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_files(folder: Path, tensors: CheckpointTensors, state: TrainingState) -> None:
    """The four files of a checkpoint into ``folder`` (state.json last), each fsynced."""
    save_file({name: t.detach().contiguous() for name, t in tensors.model.items()},
              str(folder / "model.safetensors"))
    optimizer_tensors, optimizer_rest = flatten_optimizer(tensors.optimizer)
    optimizer_rest["param_names"] = tensors.param_names
    save_file(optimizer_tensors, str(folder / "optimizer.safetensors"))
    rng_tensors = {f"rank{r}.{k}": v.contiguous()
                   for r, s in enumerate(state.rng) for k, v in s.tensors.items()}
    save_file(rng_tensors, str(folder / "rng.safetensors"))
    files = {}
    for name in ("model.safetensors", "optimizer.safetensors", "rng.safetensors"):
        _fsync_file(folder / name)
        files[name] = (folder / name).stat().st_size
    manifest = {
        "format_version": FORMAT_VERSION, "step": state.step, "sampler": state.sampler,
        "lr_schedule": state.lr_schedule, "optimizer": optimizer_rest,
        "rng": [s.scalars for s in state.rng], "extra": state.extra, "files": files,
    }
    with open(folder / _STATE_FILE, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(root: str | Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, state: TrainingState,
                    keep: int | None = None) -> Path:
    """Write ``<root>/step_<state.step>/`` atomically; then keep only the ``keep`` newest.

    Call on one process (rank 0) with the unwrapped model; ``state.rng`` holds every
    process's generators (gathered by the caller).

    Returns:
        The checkpoint folder.
    """
    return save_checkpoint_tensors(root, CheckpointTensors.of(model, optimizer), state, keep)


def save_checkpoint_tensors(root: str | Path, tensors: CheckpointTensors,
                            state: TrainingState, keep: int | None = None) -> Path:
    """:func:`save_checkpoint` of tensors already gathered (a sharded model's full state)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(state.step)
    partial = root / f".{final.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)      # left by a process killed while saving
    partial.mkdir()
    try:
        _write_files(partial, tensors, state)
        _fsync_dir(partial)
        if final.exists():                          # saving the same step again
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if keep is not None:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """The complete-looking checkpoint folders under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := _NAME.match(p.name)) and (p / _STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def _read_manifest(folder: Path) -> dict[str, Any]:
    """``state.json`` of ``folder``, with every listed file present at its listed size."""
    try:
        manifest = json.loads((folder / _STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}: unreadable {_STATE_FILE}: {exc}") from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{folder}: format version {manifest.get('format_version')}, "
                              f"this trainer reads {FORMAT_VERSION}")
    for name, size in manifest["files"].items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            raise CheckpointError(f"{folder}: {name} is missing or not {size} bytes")
    return manifest


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest intact checkpoint under ``root`` (damaged ones are logged and skipped)."""
    for folder in reversed(list_checkpoints(root)):
        try:
            _read_manifest(folder)
        except CheckpointError as exc:
            logger.warning("skipping checkpoint: %s", exc)
            continue
        return folder
    return None


def load_checkpoint(folder: str | Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> TrainingState:
    """Load a checkpoint's model (strict) and optimizer state; return the rest.

    The optimizer must have been built over the same parameters, in the same groups and
    order, as the saved one (checked by name). Generators are returned, not restored: each
    process restores its own (:func:`restore_rng_state`).

    Raises:
        CheckpointError: damaged folder, or a model / optimizer that does not fit.
    """
    folder = Path(folder)
    manifest = _read_manifest(folder)
    missing, unexpected = load_model(model, str(folder / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{folder}: model tensors missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")
    if optimizer is not None:
        check_parameter_names(folder, parameter_names(model, optimizer))
        optimizer.load_state_dict(read_optimizer_state(folder))
    return _training_state(folder, manifest)


def check_parameter_names(folder: str | Path, names: list[list[str]]) -> None:
    """Raise CheckpointError unless the checkpoint's optimizer was saved over ``names``
    (per group, in order)."""
    if _read_manifest(Path(folder))["optimizer"]["param_names"] != names:
        raise CheckpointError(f"{folder}: the optimizer was saved over other parameters "
                              f"(groups or order differ)")


def read_optimizer_state(folder: str | Path) -> dict[str, Any]:
    """The checkpoint's optimizer state in ``optimizer.state_dict()`` form."""
    folder = Path(folder)
    tensors = load_file(str(folder / "optimizer.safetensors"))
    return unflatten_optimizer(tensors, _read_manifest(folder)["optimizer"])


def read_training_state(folder: str | Path) -> TrainingState:
    """Everything of a checkpoint but the model and optimizer tensors."""
    return _training_state(Path(folder), _read_manifest(Path(folder)))


def _training_state(folder: Path, manifest: dict[str, Any]) -> TrainingState:
    rng_tensors = load_file(str(folder / "rng.safetensors"))
    rng = []
    for r, scalars in enumerate(manifest["rng"]):
        prefix = f"rank{r}."
        rng.append(RngState(tensors={k[len(prefix):]: v for k, v in rng_tensors.items()
                                     if k.startswith(prefix)}, scalars=scalars))
    return TrainingState(step=manifest["step"], sampler=manifest["sampler"],
                         lr_schedule=manifest["lr_schedule"], rng=rng, extra=manifest["extra"])
