"""The assembled model: checkpoint names for both variants, and tiny end-to-end inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unigeoseg_backend.model.conversion import released_to_model
from unigeoseg_backend.model.manifest import manifest_tensors
from unigeoseg_backend.model.preprocess import letterbox_image, logits_to_tile
from unigeoseg_backend.model.prompting import build_prompt, interactive_instruction
from unigeoseg_backend.model.registry import MODEL_CONFIGS, get_config, tiny_tokenizer
from unigeoseg_backend.model.unigeoseg import UniGeoSeg, UniGeoSegConfig


@pytest.mark.parametrize("name, variant", [("unigeoseg-official-sparseconv", "SparseConv_1"),
                                           ("unigeoseg-official-mscc", "MSCC")])
def test_the_released_checkpoint_names_map_exactly_onto_the_model(name, variant):
    """Manifest names, converted like a real checkpoint, equal the model's state dict."""
    with torch.device("meta"):
        model = UniGeoSeg(get_config(name))
        released = {key: torch.empty(shape, dtype=getattr(torch, dtype))
                    for key, (shape, dtype, _) in manifest_tensors(variant).items()}
    converted = released_to_model(released, num_heads=32)
    ours = model.state_dict()
    assert sorted(converted) == sorted(ours)
    mismatched = [k for k in ours if converted[k].shape != ours[k].shape
                  or converted[k].dtype != ours[k].dtype]
    assert mismatched == []


def test_the_heads_are_one_registered_module():
    model = UniGeoSeg(get_config("unigeoseg-tiny-sparseconv"))
    assert dict(model.named_children())["heads"] is model.heads
    names = dict(model.named_parameters())
    assert names["heads.global_latents"] is model.heads.global_latents
    assert names["heads.ref_attn.query"] is model.heads.ref_attn.query


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return UniGeoSeg(get_config("unigeoseg-tiny-sparseconv")).eval(), tiny_tokenizer()


def _tile(height=96, width=128):
    rng = np.random.default_rng(0)
    return (rng.random((height, width, 3)) * 255).astype(np.uint8)


def test_prompts_of_every_task_give_masks_on_the_tile_grid(tiny):
    model, tokenizer = tiny
    image, box = letterbox_image(_tile(), size=model.config.image_size)
    vision = model.encode_images(torch.stack([image, image, image]))
    prompts = [build_prompt("referring", "the red roof next to the river", tokenizer),
               build_prompt("reasoning", "areas where people could swim", tokenizer),
               build_prompt("interactive", interactive_instruction(points_norm=[(0.25, 0.5)]),
                            tokenizer)]
    logits = model.segment(vision, prompts)
    size = model.config.image_size // 4
    assert logits.shape == (3, 1, size, size) and torch.isfinite(logits).all()
    assert prompts[2].intera_coords is not None
    mask = logits_to_tile(logits[0, 0], box) > 0
    assert mask.shape == (96, 128)


def test_several_prompts_reuse_one_image_encoding(tiny, monkeypatch):
    model, tokenizer = tiny
    image, _ = letterbox_image(_tile(), size=model.config.image_size)
    vision = model.encode_images(image[None])

    def refuse(*_args, **_kwargs):
        raise AssertionError("the vision tower ran again")

    monkeypatch.setattr(model.model.vision_tower, "forward", refuse)
    first = model.segment(vision, [build_prompt("referring", "the pond", tokenizer)])
    again = model.segment(vision, [build_prompt("referring", "the pond", tokenizer)])
    other = model.segment(vision, [build_prompt("referring", "the rail yard", tokenizer)])
    torch.testing.assert_close(first, again)
    assert not torch.equal(first, other)


def test_batched_prompts_equal_single_prompts(tiny):
    model, tokenizer = tiny
    image, _ = letterbox_image(_tile(), size=model.config.image_size)
    vision = model.encode_images(torch.stack([image, image]))
    short = build_prompt("referring", "pond", tokenizer)
    long = build_prompt("reasoning", "the warehouse with the blue roof next to the yard", tokenizer)
    batched = model.segment(vision, [short, long])
    torch.testing.assert_close(batched[0:1], model.segment(vision.select(0), [short]),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched[1:2], model.segment(vision.select(1), [long]),
                               atol=1e-5, rtol=1e-5)


def test_one_prompt_shared_by_a_batch_of_tiles_equals_each_tile_alone(tiny):
    # A whole-raster run passes one TokenizedPrompt object for every tile: its text is embedded once
    # and the batch runs unpadded with one SEG-query call.
    model, tokenizer = tiny
    tiles = [letterbox_image(_tile(96 + 8 * i, 128), size=model.config.image_size)[0]
             for i in range(3)]
    vision = model.encode_images(torch.stack(tiles))
    prompt = build_prompt("reasoning", "areas where people could swim", tokenizer)
    batched = model.segment(vision, [prompt] * 3)
    for i in range(3):
        torch.testing.assert_close(batched[i:i + 1], model.segment(vision.select(i), [prompt]),
                                   atol=1e-5, rtol=1e-5)
    assert not torch.equal(batched[0], batched[2])


def test_inconsistent_configs_and_inputs_are_refused(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError):
        UniGeoSegConfig(connector="Linear")
    with pytest.raises(ValueError):
        model.encode_images(torch.zeros(1, 3, 64, 64))
    image, _ = letterbox_image(_tile(), size=model.config.image_size)
    with pytest.raises(ValueError):
        model.segment(model.encode_images(image[None]), [])
    assert set(MODEL_CONFIGS) >= {"unigeoseg-official-sparseconv", "unigeoseg-official-mscc"}
