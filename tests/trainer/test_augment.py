"""Flips keep image, mask, coordinates and words consistent, or are not applied."""

from __future__ import annotations

import numpy as np
import pytest

from unigeoseg_backend.model.prompting import interactive_instruction, parse_interactive_coords
from unigeoseg_trainer.augment import Example, flip_example, flip_text, random_flips


def test_horizontal_flip_swaps_left_and_right_keeping_case():
    assert flip_text("The LEFT building, west of the road; Leftmost pond on the upper-left",
                     "horizontal") == \
        "The RIGHT building, east of the road; Rightmost pond on the upper-right"
    assert flip_text("north-east of the lake, turning clockwise", "horizontal") == \
        "north-west of the lake, turning counterclockwise"


def test_vertical_flip_swaps_top_and_bottom():
    assert flip_text("the top field, north of the upper road and above the river",
                     "vertical") == "the bottom field, south of the lower road and below the river"


def test_words_inside_other_words_are_not_touched():
    assert flip_text("a leftover lot by the brightest roof", "horizontal") == \
        "a leftover lot by the brightest roof"


@pytest.mark.parametrize("text, flip", [
    ("the building with a right angle", "horizontal"),
    ("All right, the field", "horizontal"),
    ("the tank on top of the building", "vertical"),
    ("the point [1.5,0.2]", "horizontal"),             # not normalised
])
def test_unmirrorable_text_blocks_the_flip(text, flip):
    assert flip_text(text, flip) is None


def test_box_coordinates_mirror_and_stay_ordered():
    text = interactive_instruction(box_norm=(0.434, 0.113, 0.717, 0.287))
    flipped = flip_text(text, "horizontal")
    assert parse_interactive_coords(flipped).flatten().tolist() == pytest.approx(
        [1 - 0.717, 0.113, 1 - 0.434, 0.287])
    flipped = flip_text(text, "vertical")
    assert parse_interactive_coords(flipped).flatten().tolist() == pytest.approx(
        [0.434, 1 - 0.287, 0.717, 1 - 0.113])


def test_point_coordinates_mirror_with_their_format():
    text = interactive_instruction(points_norm=[(0.1, 0.2), (0.3, 0.4)])
    coords = parse_interactive_coords(flip_text(text, "horizontal"))
    assert coords.flatten().tolist() == pytest.approx([0.9, 0.2, 0.7, 0.4])
    # the spacing the official parser rejects is kept, so the flip does not change that
    assert flip_text("the point [0.49, 0.828].", "vertical") == "the point [0.49, 0.172]."


def _example(instruction: str, answer: str | None = None) -> Example:
    image = np.zeros((4, 6, 3), np.uint8)
    image[:, :2] = 255                       # bright left columns
    mask = np.zeros((4, 6), bool)
    mask[0, 0] = True                        # top-left pixel
    return Example(image=image, mask=mask, instruction=instruction, answer=answer)


def test_flipped_example_is_consistent():
    point = interactive_instruction(points_norm=[(1 / 12, 1 / 8)])   # centre of pixel (0, 0)
    flipped = flip_example(_example(point, "It lies at the left edge."), "horizontal")
    assert flipped.mask[0, 5] and flipped.mask.sum() == 1
    assert (flipped.image[:, 4:] == 255).all() and (flipped.image[:, :4] == 0).all()
    x, y = parse_interactive_coords(flipped.instruction)[0].tolist()
    assert flipped.mask[int(y * 4), int(x * 6)]       # the point still lies on the mask
    assert flipped.answer == "It lies at the right edge."
    assert flipped.image.flags["C_CONTIGUOUS"]


def test_an_answer_that_cannot_follow_blocks_the_flip():
    assert flip_example(_example("the left roof", "all right: a roof"), "horizontal") is None


def test_random_flips_follow_their_probabilities():
    example = _example("the left roof")
    rng = np.random.default_rng(0)
    applied = [random_flips(example, 0.5, 0.0, rng)[1] for _ in range(400)]
    share = sum(a == ("horizontal",) for a in applied) / 400
    assert share == pytest.approx(0.5, abs=0.08)
    assert random_flips(example, 0.0, 0.0, rng) == (example, ())
    blocked = _example("the building with a right angle")
    assert random_flips(blocked, 1.0, 0.0, rng) == (blocked, ())
