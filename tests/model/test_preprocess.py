"""The 512 letterbox: official geometry, exact coordinate round trips, masks back on the tile."""

from __future__ import annotations

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
)


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

