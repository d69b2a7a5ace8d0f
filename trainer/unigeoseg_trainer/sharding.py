"""FSDP2 (``distributed.fsdp = true``): parameters, gradients and optimizer state sharded
over the processes with ``torch.distributed.fsdp.fully_shard``.

What is sharded (:func:`wrapping_plan`): each Phi decoder layer on its own (its parameters
are gathered just before the layer runs and freed after it), then the whole model (the rest:
Swin, the connector, the embeddings, ``lm_head``, the decoders and the heads, gathered
together at the start of the forward). On CUDA with ``model.precision = "bf16"`` the
gathered parameters are bf16 and gradients are reduced in float32 (the sharded master
weights stay float32); elsewhere everything is float32.

Checkpoints hold the same files as unsharded runs: the full state dicts are gathered on rank
0 (``torch.distributed.checkpoint.state_dict`` with ``full_state_dict=True,
cpu_offload=True``) and written by the same safetensors writer, so a checkpoint of a sharded
run resumes an unsharded one and back. On resume every process reads the full tensors and
keeps its shard.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from unigeoseg_backend.model.unigeoseg import UniGeoSeg

from . import checkpointing


def mixed_precision(device: torch.device, precision: str) -> MixedPrecisionPolicy:
    """bf16 parameters for compute with float32 gradient reduction on CUDA with
    ``precision = "bf16"``; float32 otherwise (the CPU always trains in float32)."""
    if device.type == "cuda" and precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def wrapping_plan(model: UniGeoSeg) -> list[str]:
    """The names of the modules :func:`shard` wraps, in wrapping order (``""``: the model)."""
    return [f"model.layers.{i}" for i in range(len(model.model.layers))] + [""]


def shard(model: UniGeoSeg, device: torch.device, precision: str) -> None:
    """Apply ``fully_shard`` to the modules of :func:`wrapping_plan` (in place; the model's
    parameters become DTensors). Call after freezing, LoRA and gradient checkpointing are
    set, and before the optimizer is built."""
    policy = mixed_precision(device, precision)
    modules = dict(model.named_modules())
    for name in wrapping_plan(model):
        fully_shard(modules[name], mp_policy=policy)


def full_model_state(model: torch.nn.Module, *, on_rank0_cpu: bool) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict; every process must call it. ``on_rank0_cpu``: only
    rank 0 gets the tensors, in CPU memory (checkpoints); otherwise every process gets them
    on the model's device (a plain copy of the model for validation and export)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=on_rank0_cpu)
    return get_model_state_dict(model, options=options)


def checkpoint_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer
                       ) -> checkpointing.CheckpointTensors:
    """The model's and optimizer's full state gathered on rank 0 (every process calls it;
    the other ranks get empty dicts), in the form :mod:`.checkpointing` writes."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    by_name = get_optimizer_state_dict(model, optimizer, options=options)
    if not by_name:                                     # not rank 0
        return checkpointing.CheckpointTensors(model={}, optimizer={}, param_names=[])
    names = [list(group["params"]) for group in by_name["param_groups"]]
    position = {name: i for i, name in enumerate(n for group in names for n in group)}
    optimizer_state = {
        "state": {position[name]: entries for name, entries in by_name["state"].items()},
        "param_groups": [{**group, "params": [position[n] for n in group["params"]]}
                         for group in by_name["param_groups"]],
    }
    return checkpointing.CheckpointTensors(model=model_state, optimizer=optimizer_state,
                                           param_names=names)


def load_checkpoint(folder: str | Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer) -> checkpointing.TrainingState:
    """:func:`.checkpointing.load_checkpoint` for a sharded model: every process reads the
    full tensors and keeps its shards (strict on the model's names, the optimizer checked
    by parameter names and order)."""
    folder = Path(folder)
    state = checkpointing.read_training_state(folder)     # checks the folder first
    set_model_state_dict(model, load_file(str(folder / "model.safetensors")),
                         options=StateDictOptions(full_state_dict=True, strict=True))
    saved = checkpointing.read_optimizer_state(folder)
    names = checkpointing.parameter_names(model, optimizer)   # sharding keeps the names
    checkpointing.check_parameter_names(folder, names)
    flat = [name for group in names for name in group]
    by_name: dict[str, Any] = {
        "state": {flat[position]: entries for position, entries in saved["state"].items()},
        "param_groups": [{**group, "params": [flat[p] for p in group["params"]]}
                         for group in saved["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name,
                             options=StateDictOptions(full_state_dict=True))
    return state
