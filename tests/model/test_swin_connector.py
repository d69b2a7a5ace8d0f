"""Swin-B vision tower and connectors: checkpoint names/shapes, output shapes, window maths."""

from __future__ import annotations

import itertools

import pytest
import torch

from unigeoseg_backend.model.connector import (
    CompressionConnector,
    MultiScaleCompressionConnector,
    build_connector,
)
from unigeoseg_backend.model.manifest import manifest_tensors
from unigeoseg_backend.model.swin import (
    MASK_FILL,
    DropPath,
    SwinBackbone,
    SwinConfig,
    relative_position_index,
    shifted_window_mask,
    window_merge,
    window_partition,
)

VARIANTS = ("SparseConv_1", "MSCC")
TINY = SwinConfig(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4)


def _manifest(variant: str, prefix: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name without ``prefix``: (shape, dtype)} of the released checkpoint's tensors."""
    return {
        name[len(prefix) :]: (shape, dtype)
        for name, (shape, dtype, _kind) in manifest_tensors(variant, prefix).items()
    }


def _layout(module: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], str]]:
    return {
        name: (tuple(t.shape), str(t.dtype).removeprefix("torch."))
        for name, t in module.state_dict().items()
    }


# --- (a) state dict layout equals the released checkpoint's -----------------------------------


@pytest.mark.parametrize("kind", VARIANTS)
def test_swin_b_state_dict_matches_checkpoint(kind):
    expected = _manifest(kind, "model.vision_tower.")
    with torch.device("meta"):
        model = SwinBackbone(SwinConfig())
    assert _layout(model) == expected
    assert len(expected) == 357  # 345 in layers.*, 8 output norms, 4 in patch_embed
    buffers = {name for name, _ in model.named_buffers()}
    assert buffers == {n for n in expected if n.endswith("relative_position_index")}
    assert len(buffers) == 24


@pytest.mark.parametrize("kind", VARIANTS)
def test_connector_state_dict_matches_checkpoint(kind):
    expected = _manifest(kind, "model.mm_projector.")
    with torch.device("meta"):
        connector = build_connector(kind)
    assert _layout(connector) == expected


# --- (b) backbone output shapes -----------------------------------------------------------------


def test_swin_b_output_shapes_for_512_input():
    with torch.device("meta"):
        model = SwinBackbone(SwinConfig())
        out = model(torch.empty(2, 3, 512, 512))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "res2": (2, 128, 128, 128),
        "res3": (2, 256, 64, 64),
        "res4": (2, 512, 32, 32),
        "res5": (2, 1024, 16, 16),
    }
    assert model.out_strides == {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


@pytest.mark.parametrize("size", [(64, 64), (70, 90)])
def test_tiny_swin_forward_shapes(size):
    torch.manual_seed(0)
    model = SwinBackbone(TINY).eval()
    h, w = size
    with torch.no_grad():
        out = model(torch.randn(1, 3, h, w))
    assert list(out) == ["res2", "res3", "res4", "res5"]
    for name, feat in out.items():
        stride = model.out_strides[name]
        expected = (1, model.out_channels[name], -(-h // stride), -(-w // stride))
        assert tuple(feat.shape) == expected, name
        assert torch.isfinite(feat).all()


def test_eval_forward_is_deterministic_and_batch_independent():
    torch.manual_seed(0)
    model = SwinBackbone(TINY).eval()
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        both = model(x)["res5"]
        first = model(x[:1])["res5"]
    torch.testing.assert_close(both[:1], first, rtol=1e-5, atol=1e-5)


def test_out_indices_select_stages():
    config = SwinConfig(
        embed_dim=16, depths=(1, 1, 1), num_heads=(1, 1, 2), window_size=2, out_indices=(2,)
    )
    model = SwinBackbone(config).eval()
    assert not hasattr(model, "norm0") and hasattr(model, "norm2")
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"res4": (1, 64, 2, 2)}


@pytest.mark.parametrize("shape", [(3, 64, 64), (1, 1, 64, 64)])
def test_swin_rejects_bad_input(shape):
    model = SwinBackbone(TINY)
    with pytest.raises(ValueError, match=r"B x 3 x H x W"):
        model(torch.zeros(shape))


def test_drop_path_is_identity_in_eval():
    torch.manual_seed(0)
    x = torch.randn(8, 5, 3)
    drop = DropPath(0.5).eval()
    assert torch.equal(drop(x), x)
    drop.train()
    y = drop(x)
    kept = (y != 0).flatten(1).all(1)
    assert 0 < kept.sum() < 8
    torch.testing.assert_close(y[kept], 2 * x[kept])


# --- (c) relative position index ----------------------------------------------------------------


def test_relative_position_index_window_3():
    ws = 3
    expected = torch.empty(ws * ws, ws * ws, dtype=torch.int64)
    for i, j in itertools.product(range(ws * ws), repeat=2):
        (yi, xi), (yj, xj) = divmod(i, ws), divmod(j, ws)
        expected[i, j] = (yi - yj + ws - 1) * (2 * ws - 1) + (xi - xj + ws - 1)
    index = relative_position_index(ws)
    assert index.dtype == torch.int64
    assert torch.equal(index, expected)
    # every offset in the (2ws-1)^2 table is used, and the diagonal is offset (0, 0)
    assert set(index.flatten().tolist()) == set(range((2 * ws - 1) ** 2))
    assert (index.diagonal() == (ws - 1) * (2 * ws - 1) + ws - 1).all()


# --- (d) shifted-window mask --------------------------------------------------------------------


def _brute_force_mask(height: int, width: int, ws: int, shift: int) -> torch.Tensor:
    """Pairs in a shifted window may attend iff neither or both came round the same edge."""
    n_wy, n_wx = height // ws, width // ws
    mask = torch.zeros(n_wy * n_wx, ws * ws, ws * ws)
    for wy, wx in itertools.product(range(n_wy), range(n_wx)):
        # position (y, x) of the rolled map holds source pixel ((y + shift) % H, (x + shift) % W)
        tokens = [(wy * ws + dy, wx * ws + dx) for dy in range(ws) for dx in range(ws)]
        wrapped = [(y + shift >= height, x + shift >= width) for y, x in tokens]
        for i, j in itertools.product(range(ws * ws), repeat=2):
            if wrapped[i] != wrapped[j]:
                mask[wy * n_wx + wx, i, j] = MASK_FILL
    return mask


@pytest.mark.parametrize("height,width,ws", [(8, 8, 4), (8, 12, 4), (6, 9, 3), (24, 24, 12)])
def test_shifted_window_mask_matches_brute_force(height, width, ws):
    mask = shifted_window_mask(height, width, ws, ws // 2)
    assert torch.equal(mask, _brute_force_mask(height, width, ws, ws // 2))


def test_window_partition_round_trip():
    x = torch.randn(2, 8, 12, 5)
    windows = window_partition(x, 4)
    assert windows.shape == (2 * 2 * 3, 4, 4, 5)
    torch.testing.assert_close(windows[4], x[0, 4:8, 4:8])  # image 0, window row 1, col 1
    assert torch.equal(window_merge(windows, 8, 12), x)


# --- (e) connectors -----------------------------------------------------------------------------


def test_full_size_connectors_token_shapes():
    with torch.device("meta"):
        res5 = torch.empty(2, 1024, 16, 16)
        assert build_connector("SparseConv_1")(res5).shape == (2, 64, 2048)
        assert build_connector("MSCC")(res5).shape == (2, 68, 2048)


def test_compression_connector_small_dims():
    torch.manual_seed(0)
    connector = CompressionConnector(in_dim=16, out_dim=32).eval()
    with torch.no_grad():
        tokens = connector(torch.randn(2, 16, 16, 16))
    assert tokens.shape == (2, connector.num_tokens, 32) == (2, 64, 32)


def test_mscc_connector_small_dims():
    torch.manual_seed(0)
    connector = MultiScaleCompressionConnector(in_dim=16, out_dim=32).eval()
    with torch.no_grad():
        tokens = connector(torch.randn(2, 16, 16, 16))
        assert tokens.shape == (2, connector.num_tokens(16, 16), 32) == (2, 68, 32)
        # the last four tokens are the learned global tokens, identical for every image
        expected = connector.fc(connector.global_tokens)
        torch.testing.assert_close(tokens[:, 64:], expected.expand(2, -1, -1))


@pytest.mark.parametrize(
    "connector,shape",
    [
        (CompressionConnector(16, 32), (1, 16, 32, 32)),
        (CompressionConnector(16, 32), (1, 8, 16, 16)),
        (CompressionConnector(16, 32), (16, 16, 16)),
        (MultiScaleCompressionConnector(16, 32), (1, 8, 16, 16)),
        (MultiScaleCompressionConnector(16, 32), (16, 16, 16)),
    ],
)
def test_connectors_reject_wrong_shape(connector, shape):
    with pytest.raises(ValueError, match=r"expected res5 features B x 16 x .* got"):
        connector(torch.zeros(shape))


def test_unknown_connector_kind():
    with pytest.raises(ValueError, match="unknown connector"):
        build_connector("mlp2x_gelu")
