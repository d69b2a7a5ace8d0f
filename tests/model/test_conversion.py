"""Tensor-name conversion, released <-> ours, both directions, as round trips."""

from __future__ import annotations

import pytest
import torch

from unigeoseg_backend.errors import WeightsError
from unigeoseg_backend.model.conversion import (
    model_to_released,
    released_name,
    released_to_model,
)
from unigeoseg_backend.model.manifest import manifest_tensors
from unigeoseg_backend.model.registry import get_config
from unigeoseg_backend.model.unigeoseg import UniGeoSeg


@pytest.mark.parametrize("variant", ["SparseConv_1", "MSCC"])
def test_manifest_names_survive_released_to_ours_to_released(variant):
    released = {name: torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
                for name, (shape, dtype, _) in manifest_tensors(variant).items()}
    back = model_to_released(released_to_model(released, num_heads=32), num_heads=32)
    assert sorted(back) == sorted(released)
    assert all(back[n].shape == released[n].shape and back[n].dtype == released[n].dtype
               for n in released)


def _random_state(name: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = UniGeoSeg(get_config(name)).state_dict()
    return {n: (torch.randn_like(t) if t.is_floating_point() else t.clone())
            for n, t in state.items()}


@pytest.mark.parametrize("name", ["unigeoseg-tiny-sparseconv", "unigeoseg-tiny-mscc"])
def test_tiny_state_survives_both_round_trips(name):
    ours = _random_state(name)
    released = model_to_released(ours, num_heads=4)
    assert "model.layers.0.self_attn.query_key_value.weight" in released
    assert "ref_attn.query" in released and "heads.ref_attn.query" not in released

    again = released_to_model(released, num_heads=4)
    assert sorted(again) == sorted(ours)
    assert all(torch.equal(again[n], ours[n]) for n in ours)

    twice = model_to_released(again, num_heads=4)
    assert list(twice) == list(released)
    assert all(torch.equal(twice[n], released[n]) for n in released)


def test_split_export_keeps_q_k_v_and_only_renames_the_heads():
    ours = _random_state("unigeoseg-tiny-sparseconv")
    split = model_to_released(ours, num_heads=4, fused_qkv=False)
    assert list(split) == [released_name(n) for n in ours]
    assert all(split[released_name(n)] is ours[n] for n in ours)
    assert released_name("heads.global_latents") == "global_latents"
    assert released_name("predictor.mask_embed.layers.0.weight") == \
        "predictor.mask_embed.layers.0.weight"
    assert released_to_model(split, num_heads=4).keys() == ours.keys()


def test_names_outside_the_model_are_refused():
    with pytest.raises(WeightsError) as info:
        released_to_model({"transformer.h.0.ln.weight": torch.zeros(1)}, num_heads=4)
    assert info.value.details["unmapped_keys"] == ["transformer.h.0.ln.weight"]
    with pytest.raises(WeightsError):
        released_name("ref_attn.query")  # a released name is not one of ours
    with pytest.raises(ValueError, match="lacks"):
        model_to_released({"model.layers.0.self_attn.k_proj.weight": torch.zeros(8, 8)}, 4)
