"""The default model's network on random weights: the shapes each part gives, prompts decoded
on cached image features without running the image encoder again, prompt maps where the
clicks and the box are, and each prompt kind changing the answer."""

from __future__ import annotations

import pytest
import torch

from unigeoseg_backend.default_model.network import (
    DEFAULT_MODEL_CONFIGS,
    PAD_LABEL,
    PromptBatch,
    build_default_model,
    parameter_count,
    render_prompt_maps,
)

#: The shipped weights may take at most 25 MB as float32.
MAX_SHIPPED_PARAMETERS = 25_000_000 // 4


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_default_model("default-v1")


def _image(height: int = 64, width: int = 96, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, height, width, generator=generator) * 255


def _prompts(batch: int, text_dim: int = 384) -> PromptBatch:
    """B prompts of mixed kinds: text, two clicks (one padded), a box."""
    torch.manual_seed(1)
    return PromptBatch(
        task=torch.tensor([1, 0, 0][:batch]),
        text=torch.nn.functional.normalize(torch.randn(batch, text_dim), dim=1),
        has_text=torch.tensor([True, False, True][:batch]),
        points=torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[20.5, 30.5], [70.0, 10.0]],
                             [[40.0, 40.0], [0.0, 0.0]]][:batch]),
        labels=torch.tensor([[PAD_LABEL, PAD_LABEL], [1, 0], [1, PAD_LABEL]][:batch]),
        boxes=torch.tensor([[0.0, 0, 0, 0], [0, 0, 0, 0], [10, 20, 60, 50]][:batch]),
        has_box=torch.tensor([False, False, True][:batch]))


@pytest.mark.parametrize("name", sorted(DEFAULT_MODEL_CONFIGS))
def test_each_configuration_gives_features_logits_and_scores_of_the_documented_shapes(name):
    config = DEFAULT_MODEL_CONFIGS[name]
    model = build_default_model(name)
    with torch.inference_mode():
        features = model.encode_image(_image())
        logits, scores = model.decode(features, _prompts(3, config.text_dim))
    d16, d8, d4 = config.decoder_channels
    assert features.stride16.shape == (1, d16, 4, 6)
    assert features.stride8.shape == (1, d8, 8, 12)
    assert features.stride4.shape == (1, d4, 16, 24)
    assert features.image_size == (64, 96)
    assert logits.shape == (3, 1, 16, 24) and scores.shape == (3,)
    assert torch.isfinite(logits).all() and torch.isfinite(scores).all()


def test_default_v1_fits_the_shipped_size_budget(model):
    assert parameter_count(model) <= MAX_SHIPPED_PARAMETERS


def test_image_sides_that_are_not_multiples_of_16_are_refused(model):
    with pytest.raises(ValueError, match="multiples of 16"):
        model.encode_image(_image(60, 96))


def test_prompts_decode_on_cached_features_without_the_image_encoder(model):
    calls = []
    handle = model.image_encoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        with torch.inference_mode():
            features = model.encode_image(_image())
            first = model.decode(features, _prompts(1))
            second = model.decode(features, _prompts(2))
    finally:
        handle.remove()
    assert len(calls) == 1
    # the same prompt alone and in a batch sharing the tile's features: the same answer
    torch.testing.assert_close(first[0][0], second[0][0], rtol=1e-4, atol=1e-4)


def test_the_prompt_maps_put_clicks_and_the_box_where_they_are():
    prompts = _prompts(3)
    maps = render_prompt_maps(prompts, size=(16, 24), stride=4, sigma_px=2.0)
    assert maps.shape == (3, 3, 16, 24)
    # prompt 1: a foreground click at pixel (20.5, 30.5) is in cell (col 5, row 7)
    fg = maps[1, 0]
    assert divmod(int(fg.argmax()), 24) == (7, 5) and float(fg.max()) > 0.7
    bg = maps[1, 1]
    assert divmod(int(bg.argmax()), 24) == (2, 17)
    # padding points draw nothing; no box draws nothing
    assert float(maps[0].abs().sum()) == 0.0
    assert float(maps[2, 1].abs().sum()) == 0.0
    # prompt 2: box cols 10-60, rows 20-50: the cells whose centre 4k + 2 is inside
    box = maps[2, 2]
    rows, cols = torch.nonzero(box, as_tuple=True)
    assert (int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())) == (5, 11, 2, 14)


def test_a_coarse_stage_still_sees_a_click_between_cell_centres():
    prompts = PromptBatch.single("interactive", points=torch.tensor([[8.0, 8.0]]),
                                 labels=torch.tensor([1]))
    maps = render_prompt_maps(prompts, size=(4, 6), stride=16, sigma_px=1.0)
    assert float(maps[0, 0].max()) > 0.7  # the sigma grows to half a cell


def test_text_points_and_box_each_change_the_mask(model):
    with torch.inference_mode():
        features = model.encode_image(_image())
        text_a = PromptBatch.single("referring", text=torch.randn(384))
        text_b = PromptBatch.single("referring", text=torch.randn(384))
        click_a = PromptBatch.single("interactive", points=torch.tensor([[10.0, 10.0]]),
                                     labels=torch.tensor([1]))
        click_b = PromptBatch.single("interactive", points=torch.tensor([[80.0, 50.0]]),
                                     labels=torch.tensor([1]))
        box = PromptBatch.single("interactive", box=torch.tensor([5.0, 5.0, 40.0, 40.0]))
        outputs = [model.decode(features, p)[0] for p in (text_a, text_b, click_a, click_b, box)]
    for i in range(len(outputs)):
        for j in range(i + 1, len(outputs)):
            assert not torch.allclose(outputs[i], outputs[j]), (i, j)


def test_unknown_configuration_names_list_the_known_ones():
    with pytest.raises(KeyError, match="default-v1"):
        build_default_model("huge")
