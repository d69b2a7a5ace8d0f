"""UniGeoSeg mask decoder: checkpoint names, deformable-attention maths, shapes, masking rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unigeoseg_backend.model.mask_decoder import (
    MaskDecoderConfig,
    SingleQueryMaskDecoder,
    attention_mask_from_logits,
)
from unigeoseg_backend.model.ms_deform_attn import MSDeformAttn, ms_deform_attn_core
from unigeoseg_backend.model.pixel_decoder import MSDeformAttnPixelDecoder, PixelDecoderConfig


@pytest.fixture(scope="module")
def manifest_tensors(manifest) -> list[list]:
    return manifest["tensors"]


def _expected(tensors: list[list], prefix: str) -> dict[str, tuple[tuple[int, ...], str, str]]:
    return {name[len(prefix):]: (tuple(shape), dtype, kind)
            for name, shape, dtype, kind in tensors if name.startswith(prefix)}


def _actual(module: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], str, str]]:
    params = dict(module.named_parameters())
    return {name: (tuple(t.shape), str(t.dtype).removeprefix("torch."),
                   "param" if name in params else "buffer")
            for name, t in module.state_dict().items()}


@pytest.mark.parametrize(("prefix", "build"), [
    ("pixel_decoder.", lambda: MSDeformAttnPixelDecoder(PixelDecoderConfig())),
    ("predictor.", lambda: SingleQueryMaskDecoder(MaskDecoderConfig())),
])
def test_state_dict_matches_released_checkpoint(manifest_tensors, prefix, build):
    with torch.device("meta"):
        module = build()
    expected, actual = _expected(manifest_tensors, prefix), _actual(module)
    assert sorted(set(expected) - set(actual)) == []  # missing here
    assert sorted(set(actual) - set(expected)) == []  # extra here
    assert {k: v for k, v in actual.items() if expected[k] != v} == {}


def _naive_deform_attn(value, shapes, locations, weights):
    """Deformable attention by explicit loops: bilinear interpolation in the pixel-centre frame
    (pixel (i, j) centred at ((j + 0.5) / W, (i + 0.5) / H)), zero outside the level."""
    batch, _, heads, dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    starts = np.cumsum([0] + [h * w for h, w in shapes])
    out = np.zeros((batch, queries, heads, dim))
    for b in range(batch):
        for q in range(queries):
            for m in range(heads):
                for lvl, (height, width) in enumerate(shapes):
                    grid = value[b, starts[lvl]:starts[lvl + 1], m].reshape(height, width, dim)
                    for p in range(points):
                        x = locations[b, q, m, lvl, p, 0] * width - 0.5
                        y = locations[b, q, m, lvl, p, 1] * height - 0.5
                        x0, y0 = int(np.floor(x)), int(np.floor(y))
                        sample = np.zeros(dim)
                        for yi, xi in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
                            if 0 <= yi < height and 0 <= xi < width:
                                sample += (1 - abs(x - xi)) * (1 - abs(y - yi)) * grid[yi, xi]
                        out[b, q, m] += weights[b, q, m, lvl, p] * sample
    return out.reshape(batch, queries, heads * dim)


def test_ms_deform_attn_core_matches_naive_bilinear():
    rng = np.random.default_rng(0)
    shapes = [(4, 5), (2, 3)]
    batch, queries, heads, points, dim = 2, 3, 2, 2, 4
    value = rng.standard_normal((batch, sum(h * w for h, w in shapes), heads, dim))
    # [-0.3, 1.3): a good share of points fall partly or wholly outside the level
    locations = rng.uniform(-0.3, 1.3, (batch, queries, heads, len(shapes), points, 2))
    weights = rng.uniform(0, 1, (batch, queries, heads, len(shapes), points))

    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    level_start_index = torch.tensor([0, shapes[0][0] * shapes[0][1]], dtype=torch.long)
    got = ms_deform_attn_core(torch.tensor(value, dtype=torch.float32), spatial_shapes,
                              level_start_index, torch.tensor(locations, dtype=torch.float32),
                              torch.tensor(weights, dtype=torch.float32))
    want = _naive_deform_attn(value, shapes, locations, weights)
    assert got.shape == (batch, queries, heads * dim)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5, rtol=0)


def test_ms_deform_attn_initial_offsets_point_along_head_rays():
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=3)
    bias = attn.sampling_offsets.bias.view(4, 2, 3, 2)
    # head 1 points up (+Y), head 2 left (-X); point p sits p + 1 pixels out on every level
    torch.testing.assert_close(bias[1, :, :, 1], torch.tensor([[1.0, 2.0, 3.0]] * 2))
    torch.testing.assert_close(bias[2, :, :, 0], torch.tensor([[-1.0, -2.0, -3.0]] * 2))


TINY_PIXEL = PixelDecoderConfig(in_channels=(8, 16, 24, 32), conv_dim=32, mask_dim=16,
                                num_encoder_layers=2, num_heads=4, ffn_dim=64, num_points=2,
                                num_groups=8)
TINY_DECODER = MaskDecoderConfig(hidden_dim=32, num_heads=4, ffn_dim=64, num_layers=9,
                                 mask_dim=16, num_queries=5)


def test_tiny_pixel_and_mask_decoder_shapes():
    torch.manual_seed(0)
    batch, size = 2, 64
    features = {name: torch.randn(batch, channels, size // stride, size // stride)
                for (name, stride), channels in zip({"res2": 4, "res3": 8, "res4": 16,
                                                     "res5": 32}.items(),
                                                    TINY_PIXEL.in_channels, strict=True)}
    pixel_decoder = MSDeformAttnPixelDecoder(TINY_PIXEL).eval()
    decoder = SingleQueryMaskDecoder(TINY_DECODER).eval()
    seg_embedding = torch.randn(batch, 1, TINY_DECODER.hidden_dim)
    with torch.no_grad():
        mask_features, multi_scale = pixel_decoder(features)
        predictions = decoder(multi_scale, mask_features, seg_embedding)

    assert mask_features.shape == (batch, 16, 16, 16)
    assert [tuple(f.shape) for f in multi_scale] == [(batch, 32, 2, 2), (batch, 32, 4, 4),
                                                     (batch, 32, 8, 8)]
    assert len(predictions) == 10
    assert all(p.shape == (batch, 1, 16, 16) for p in predictions)
    assert all(torch.isfinite(p).all() for p in predictions)
    # every layer changes the query, so consecutive predictions differ
    assert not torch.allclose(predictions[0], predictions[-1])


def test_fully_masked_row_is_unmasked():
    # sample 0: all background (every logit < 0) -> nothing to attend to -> row unmasked;
    # sample 1: foreground in the left half only -> the right half stays blocked.
    logits = torch.full((2, 1, 8, 8), -3.0)
    logits[1, 0, :, :4] = 3.0
    mask = attention_mask_from_logits(logits, size=(4, 4), num_heads=2)

    assert mask.shape == (2 * 2, 1, 16) and mask.dtype == torch.bool
    assert not mask[0:2].any()  # both heads of sample 0
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[:, 2:] = True
    for head in (2, 3):
        assert torch.equal(mask[head, 0].view(4, 4), expected)


def test_all_background_prediction_attends_everywhere():
    # The mask embedding is forced to about all ones (bias 1, tiny query-dependent weights),
    # so the logits are about -16 everywhere for mask_features = -1 (every memory position
    # blocked, so the rule unmasks them all) and +16 for mask_features = +1 (nothing blocked).
    # Memory and query don't depend on mask_features, so both runs must attend identically and
    # give exactly opposite logits. Without the rule the first run would attend to nothing
    # (NaN, or zeros from torch's SDPA path).
    torch.manual_seed(0)
    decoder = SingleQueryMaskDecoder(TINY_DECODER).eval()
    with torch.no_grad():
        decoder.mask_embed.layers[-1].weight.mul_(0.01)
        decoder.mask_embed.layers[-1].bias.fill_(1.0)
        memory = [torch.randn(1, 32, s, s) for s in (1, 2, 4)]
        query = torch.randn(1, 1, 32)
        background = decoder(memory, torch.full((1, 16, 8, 8), -1.0), query)
        foreground = decoder(memory, torch.full((1, 16, 8, 8), 1.0), query)
    assert all((p < 0).all() for p in background)
    for neg, pos in zip(background, foreground, strict=True):
        torch.testing.assert_close(neg, -pos)
