"""Checkpoints: safetensors + JSON, atomic, bit-exact round trip of model, AdamW and RNGs."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from unigeoseg_trainer import checkpointing
from unigeoseg_trainer.checkpointing import (
    CheckpointError,
    TrainingState,
    capture_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(3, 4)
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)
        self.register_buffer("scale", torch.tensor([2.0, 0.5]))
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.head(torch.relu(self.body(self.frozen(x)))) * self.scale


def _build(seed: int = 0):
    torch.manual_seed(seed)
    model = TinyModel()
    optimizer = torch.optim.AdamW([
        {"params": list(model.body.parameters()), "lr": 1e-2, "weight_decay": 0.1},
        {"params": list(model.head.parameters()), "lr": 3e-3, "betas": (0.8, 0.95)},
    ])
    return model, optimizer


def _train(model, optimizer, steps: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(5, 3, generator=generator)
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _state(step: int = 3) -> TrainingState:
    return TrainingState(step=step, sampler={"next_index": step, "consumed": {"a": 4}},
                         lr_schedule={"lr": 1e-4}, rng=[capture_rng_state()],
                         extra={"note": "x"})


def _assert_same_optimizer_state(a: dict, b: dict):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for index in a["state"]:
        assert a["state"][index].keys() == b["state"][index].keys()
        for name, value in a["state"][index].items():
            assert torch.equal(value, b["state"][index][name]), (index, name)
            assert value.dtype == b["state"][index][name].dtype


def test_round_trip_restores_model_and_adamw_bit_exactly(tmp_path):
    model, optimizer = _build()
    _train(model, optimizer, 3)
    folder = save_checkpoint(tmp_path, model, optimizer, _state())
    assert folder.name == "step_00000003"
    assert sorted(p.name for p in folder.iterdir()) == [
        "model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"]

    restored_model, restored_optimizer = _build(seed=99)          # other weights
    state = load_checkpoint(folder, restored_model, restored_optimizer)
    assert state.step == 3 and state.sampler == {"next_index": 3, "consumed": {"a": 4}}
    assert state.lr_schedule == {"lr": 1e-4} and state.extra == {"note": "x"}
    for (name, a), (_, b) in zip(model.state_dict().items(),
                                 restored_model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    _assert_same_optimizer_state(optimizer.state_dict(), restored_optimizer.state_dict())
    # training on continues identically
    _train(model, optimizer, 2, seed=5)
    _train(restored_model, restored_optimizer, 2, seed=5)
    for a, b in zip(model.parameters(), restored_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_no_pickle_in_a_checkpoint(tmp_path):
    model, optimizer = _build()
    _train(model, optimizer, 1)
    folder = save_checkpoint(tmp_path, model, optimizer, _state())
    for path in folder.iterdir():
        head = path.read_bytes()[:2]
        assert head != b"\x80\x04" and head != b"\x80\x02", path    # pickle protocol marks


def test_rng_states_round_trip(tmp_path):
    model, optimizer = _build()
    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    folder = save_checkpoint(tmp_path, model, optimizer, _state())
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    state = load_checkpoint(folder, model, optimizer)
    restore_rng_state(state.rng[0])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0])
    assert np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_a_failed_write_leaves_the_last_good_checkpoint(tmp_path, monkeypatch):
    model, optimizer = _build()
    _train(model, optimizer, 1)
    good = save_checkpoint(tmp_path, model, optimizer, _state(step=1))
    good_bytes = (good / "model.safetensors").read_bytes()

    _train(model, optimizer, 1)
    real_save_file = checkpointing.save_file

    def torn_save_file(tensors, filename, *args, **kwargs):
        real_save_file(tensors, filename, *args, **kwargs)
        with open(filename, "r+b") as f:          # half the file, then the "crash"
            f.truncate(f.seek(0, 2) // 2)
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpointing, "save_file", torn_save_file)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, model, optimizer, _state(step=2))
    assert latest_checkpoint(tmp_path) == good
    assert (good / "model.safetensors").read_bytes() == good_bytes
    assert [p.name for p in tmp_path.iterdir()] == [good.name]     # no partial folder left


def test_a_partial_folder_of_a_killed_process_is_ignored_and_cleared(tmp_path):
    model, optimizer = _build()
    good = save_checkpoint(tmp_path, model, optimizer, _state(step=1))
    partial = tmp_path / ".step_00000002.partial"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    assert latest_checkpoint(tmp_path) == good
    save_checkpoint(tmp_path, model, optimizer, _state(step=2))
    assert not partial.exists()


def test_a_damaged_newest_checkpoint_is_skipped(tmp_path):
    model, optimizer = _build()
    good = save_checkpoint(tmp_path, model, optimizer, _state(step=1))
    newer = save_checkpoint(tmp_path, model, optimizer, _state(step=2))
    with open(newer / "optimizer.safetensors", "r+b") as f:
        f.truncate(10)
    assert latest_checkpoint(tmp_path) == good
    with pytest.raises(CheckpointError):
        load_checkpoint(newer, model, optimizer)


def test_only_the_newest_are_kept(tmp_path):
    model, optimizer = _build()
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, model, optimizer, _state(step=step), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]


def test_an_optimizer_over_other_parameters_is_refused(tmp_path):
    model, optimizer = _build()
    _train(model, optimizer, 1)
    folder = save_checkpoint(tmp_path, model, optimizer, _state())
    other_model, _ = _build()
    swapped = torch.optim.AdamW([{"params": list(other_model.head.parameters())},
                                 {"params": list(other_model.body.parameters())}])
    with pytest.raises(CheckpointError):
        load_checkpoint(folder, other_model, swapped)


def test_a_model_with_other_tensors_is_refused(tmp_path):
    model, optimizer = _build()
    folder = save_checkpoint(tmp_path, model, optimizer, _state())
    with pytest.raises(CheckpointError):
        load_checkpoint(folder, nn.Linear(3, 4))
