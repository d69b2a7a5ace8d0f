"""The 512 letterbox: official geometry, exact coordinate round trips, masks back on the tile."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from unigeoseg_backend.model.preprocess import (
    PIXEL_MEAN,
    PIXEL_STD,
    Letterbox,
    letterbox_image,
    letterbox_tensor,
    logits_to_tile,
    resize_linear_uint8,
)

CV2_TABLE = Path(__file__).parent / "data" / "cv2_inter_linear.npz"


@pytest.mark.parametrize("height, width, expected", [
    (800, 800, (512, 512, 0, 0)),
    (600, 800, (384, 512, 64, 0)),    # landscape: padded above and below
    (800, 517, (512, 330, 0, 91)),    # int() truncation: 517 * 512 / 800 = 330.88
    (100, 1000, (51, 512, 230, 0)),   # odd padding: the extra pixel goes below
])
def test_letterbox_geometry_follows_the_official_code(height, width, expected):
    box = Letterbox.for_tile(height, width)
    assert (box.new_height, box.new_width, box.top, box.left) == expected


def test_coordinates_round_trip_exactly():
    box = Letterbox.for_tile(600, 800)
    cols = np.array([0.0, 0.5, 399.25, 800.0])
    rows = np.array([0.0, 300.5, 599.0, 600.0])
    back = box.input_to_tile(*box.tile_to_input(cols, rows))
    np.testing.assert_allclose(back[0], cols, rtol=0, atol=1e-9)
    np.testing.assert_allclose(back[1], rows, rtol=0, atol=1e-9)
    assert box.tile_to_input(0.0, 0.0) == (0.0, 64.0)
    assert box.tile_to_input(800.0, 600.0) == (512.0, 448.0)


def test_padding_is_zero_before_normalisation_and_content_is_in_the_middle():
    rgb = np.full((600, 800, 3), 200, np.uint8)
    image, box = letterbox_image(rgb)
    assert image.shape == (3, 512, 512)
    pad = (torch.zeros(3) - torch.tensor(PIXEL_MEAN)) / torch.tensor(PIXEL_STD)
    torch.testing.assert_close(image[:, 10, 10], pad)                # top padding
    torch.testing.assert_close(image[:, 500, 10], pad)               # bottom padding
    content = (torch.full((3,), 200.0) - torch.tensor(PIXEL_MEAN)) / torch.tensor(PIXEL_STD)
    torch.testing.assert_close(image[:, 256, 256], content)


def test_a_mask_drawn_in_the_input_frame_lands_on_the_right_tile_pixels():
    box = Letterbox.for_tile(600, 800)
    logits = torch.full((512, 512), -5.0)
    # Tile rectangle cols 200..400, rows 150..300 drawn in input coordinates.
    c0, r0 = box.tile_to_input(200, 150)
    c1, r1 = box.tile_to_input(400, 300)
    logits[int(r0):int(r1), int(c0):int(c1)] = 5.0
    mask = (logits_to_tile(logits, box) > 0).numpy()
    assert mask.shape == (600, 800)
    rows, cols = np.nonzero(mask)
    assert abs(rows.min() - 150) <= 1 and abs(rows.max() - 299) <= 1
    assert abs(cols.min() - 200) <= 1 and abs(cols.max() - 399) <= 1


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError):
        letterbox_image(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError):
        Letterbox.for_tile(0, 10)
    with pytest.raises(ValueError):
        logits_to_tile(torch.zeros(1, 1, 512, 512), Letterbox.for_tile(10, 10))


def test_batched_letterbox_and_logits_equal_one_tile_at_a_time():
    rng = np.random.default_rng(3)
    tiles = (rng.random((3, 90, 140, 3)) * 255).astype(np.uint8)
    batch, box = letterbox_tensor(torch.from_numpy(tiles), size=128)
    assert batch.shape == (3, 3, 128, 128)
    for i in range(3):
        one, one_box = letterbox_image(tiles[i], size=128)
        assert one_box == box
        torch.testing.assert_close(batch[i], one, rtol=0, atol=0)
    logits = torch.randn(3, 32, 32)
    mapped = logits_to_tile(logits, box)
    assert mapped.shape == (3, 90, 140)
    for i in range(3):
        torch.testing.assert_close(mapped[i], logits_to_tile(logits[i], box), rtol=0, atol=0)



def test_resize_is_bit_exact_with_cv2_inter_linear():
    """Against ``cv2.resize(src, (w, h), interpolation=cv2.INTER_LINEAR)``, stored because CI
    has no OpenCV. Odd sizes, 1-pixel sides, up and down, exact 2x (cv2's INTER_AREA route),
    a 33 x 32 -> 32 x 31 near-identity. The table was written by (opencv-python-headless
    5.0.0; 4.10.0 writes the same bytes)::

        import cv2, numpy as np
        rng = np.random.default_rng(2024)
        cases = [((7, 11), (13, 5)), ((5, 9), (3, 17)), ((1, 6), (4, 3)), ((9, 1), (2, 5)),
                 ((16, 10), (8, 5)), ((12, 19), (7, 11)), ((3, 4), (10, 9)),
                 ((23, 17), (9, 14)), ((10, 100), (5, 51)), ((33, 32), (32, 31))]
        arrays = {}
        for i, ((h, w), (dh, dw)) in enumerate(cases):
            src = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            arrays[f"src{i}"] = src
            arrays[f"dst{i}"] = cv2.resize(src, (dw, dh), interpolation=cv2.INTER_LINEAR)
        np.savez_compressed("cv2_inter_linear.npz", cv2_version=cv2.__version__, **arrays)
    """
    table = np.load(CV2_TABLE)
    count = sum(name.startswith("src") for name in table.files)
    assert count == 10
    for i in range(count):
        src, expected = table[f"src{i}"], table[f"dst{i}"]
        ours = resize_linear_uint8(torch.from_numpy(src).permute(2, 0, 1), *expected.shape[:2])
        np.testing.assert_array_equal(ours.permute(1, 2, 0).numpy(), expected,
                                      err_msg=f"{src.shape} -> {expected.shape}")


def test_letterbox_content_is_the_cv2_resize():
    table = np.load(CV2_TABLE)
    src, expected = table["src9"], table["dst9"]          # 33 x 32 -> 32 x 31
    image, box = letterbox_image(src, size=32)
    assert (box.new_height, box.new_width, box.top, box.left) == (32, 31, 0, 0)
    mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(3, 1, 1)
    want = (torch.from_numpy(expected).permute(2, 0, 1).float() - mean) / std
    torch.testing.assert_close(image[:, :, :31], want, rtol=0, atol=0)


def test_resize_to_the_same_size_is_the_identity():
    rng = np.random.default_rng(7)
    for shape in [(1, 1), (5, 9), (40, 23)]:
        image = torch.from_numpy(rng.integers(0, 256, (3, *shape), dtype=np.uint8))
        out = resize_linear_uint8(image, *shape)
        assert out.dtype == torch.uint8
        torch.testing.assert_close(out, image, rtol=0, atol=0)
    tile = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    image, box = letterbox_image(tile, size=32)
    mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(3, 1, 1)
    want = (torch.from_numpy(tile).permute(2, 0, 1).float() - mean) / std
    torch.testing.assert_close(image, want, rtol=0, atol=0)


@pytest.mark.parametrize("shape, size", [((3, 17), (8, 40)), ((29, 30), (11, 7)),
                                         ((1, 9), (6, 1))])
def test_resize_of_a_batch_equals_one_image_at_a_time(shape, size):
    rng = np.random.default_rng(11)
    batch = torch.from_numpy(rng.integers(0, 256, (4, 3, *shape), dtype=np.uint8))
    out = resize_linear_uint8(batch, *size)
    assert out.shape == (4, 3, *size) and out.dtype == torch.uint8
    for i in range(4):
        torch.testing.assert_close(out[i], resize_linear_uint8(batch[i], *size), rtol=0, atol=0)
        for c in range(3):
            torch.testing.assert_close(out[i, c], resize_linear_uint8(batch[i, c], *size),
                                       rtol=0, atol=0)


def test_resize_keeps_constant_images_constant():
    for value in (0, 1, 128, 254, 255):
        image = torch.full((3, 7, 13), value, dtype=torch.uint8)
        for size in [(1, 1), (5, 29), (14, 6)]:
            assert torch.equal(resize_linear_uint8(image, *size),
                               torch.full((3, *size), value, dtype=torch.uint8))
