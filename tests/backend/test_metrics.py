"""The official metrics on hand-computed cases: mask letterbox, IoU, gIoU, cIoU, Pr@t."""

from __future__ import annotations

import numpy as np
import pytest

from unigeoseg_backend.evaluation.metrics import (
    THRESHOLDS,
    intersection_union,
    letterbox_mask,
    nearest_indices,
    resize_nearest,
    sample_iou,
    summarize,
    summarize_by_task,
)

# ---------------------------------------------------------------- cv2.INTER_NEAREST, letterbox


def test_nearest_indices_are_opencv_floor_not_pixel_centres():
    # 3 -> 5: step 1 / (5 / 3) = 0.6; floor(0, .6, 1.2, 1.8, 2.4). Pixel centres would give
    # 0, 0, 1, 2, 2.
    assert nearest_indices(3, 5).tolist() == [0, 0, 1, 1, 2]
    # 5 -> 3: step 5 / 3; floor(0, 1.67, 3.33). Pixel centres would give 0, 2, 4.
    assert nearest_indices(5, 3).tolist() == [0, 1, 3]
    assert nearest_indices(4, 4).tolist() == [0, 1, 2, 3]
    assert nearest_indices(1, 3).tolist() == [0, 0, 0]
    with pytest.raises(ValueError):
        nearest_indices(0, 3)


def test_resize_nearest_picks_rows_and_columns():
    grid = np.arange(15).reshape(3, 5)
    assert resize_nearest(grid, 5, 3).tolist() == [[0, 1, 3], [0, 1, 3], [5, 6, 8],
                                                   [5, 6, 8], [10, 11, 13]]


def test_letterbox_mask_wide_is_centred_vertically():
    mask = np.array([[1, 0, 0, 1],
                     [0, 1, 1, 0]], dtype=bool)
    # 2 x 4 into 4: new width 4, new height int(2 * 4 / 4) = 2, top (4 - 2) // 2 = 1.
    out = letterbox_mask(mask, 4)
    assert out.dtype == bool and out.shape == (4, 4)
    assert out.astype(int).tolist() == [[0, 0, 0, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 0, 0, 0]]


def test_letterbox_mask_tall_truncates_the_short_side():
    mask = np.array([[1, 0], [0, 1], [1, 1]], dtype=np.uint8)
    # 3 x 2 into 4: new height 4, new width int(2 * 4 / 3) = 2, left (4 - 2) // 2 = 1.
    # Rows read 0, 0, 1, 2 (step 0.75); columns 0, 1.
    out = letterbox_mask(mask, 4)
    assert out.astype(int).tolist() == [[0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 1, 1, 0]]


def test_letterbox_mask_odd_sizes_keep_the_image_placement():
    from unigeoseg_backend.model.preprocess import Letterbox

    mask = np.ones((1, 7), dtype=bool)  # one row: int(1 * 5 / 7) = 0 -> clamped to 1
    box = Letterbox.for_tile(1, 7, 5)
    out = letterbox_mask(mask, 5)
    assert out.sum() == box.new_height * box.new_width == 5
    assert out[box.top].all()
    with pytest.raises(ValueError):
        letterbox_mask(np.ones((2, 2, 1), dtype=bool), 4)


# ---------------------------------------------------------------- per sample


def _masks(pred_pixels, gt_pixels, shape=(4, 4)):
    pred, gt = np.zeros(shape, bool), np.zeros(shape, bool)
    for r, c in pred_pixels:
        pred[r, c] = True
    for r, c in gt_pixels:
        gt[r, c] = True
    return pred, gt


def test_intersection_and_union_count_foreground_pixels():
    pred, gt = _masks([(0, 0), (0, 1), (1, 1), (3, 3)], [(0, 1), (1, 1), (2, 2), (3, 3),
                                                        (3, 2), (2, 3)])
    assert intersection_union(pred, gt) == (3, 7)
    assert sample_iou(3, 7) == 3 / (7 + 1e-5)


@pytest.mark.parametrize("pred_pixels, gt_pixels, expected", [
    ([], [], (0, 0)),                      # empty target, empty prediction
    ([(1, 1), (2, 2)], [], (0, 2)),        # empty target, something predicted
    ([], [(0, 0), (0, 1), (0, 2)], (0, 3)),  # target missed entirely
])
def test_empty_cases(pred_pixels, gt_pixels, expected):
    pred, gt = _masks(pred_pixels, gt_pixels)
    assert intersection_union(pred, gt) == expected


def test_iou_is_one_only_when_both_are_empty():
    assert sample_iou(0, 0) == 1.0
    assert sample_iou(0, 2) == 0.0
    assert sample_iou(4, 4) == 4 / 4.00001 < 1.0  # the epsilon stays in, as officially


def test_shapes_must_match():
    with pytest.raises(ValueError):
        intersection_union(np.zeros((4, 4), bool), np.zeros((4, 5), bool))


# ---------------------------------------------------------------- aggregates


def test_summary_by_hand():
    counts = [(3, 7), (0, 0), (5, 5), (0, 4), None, (1, 2)]
    ious = [3 / 7.00001, 1.0, 5 / 5.00001, 0.0, 1 / 2.00001]
    s = summarize(counts)
    assert (s.count, s.failed) == (5, 1)
    assert s.giou == pytest.approx(sum(ious) / 5, abs=0, rel=1e-15)
    assert (s.intersection, s.union) == (9, 18)
    assert s.ciou == 9 / (18 + 1e-10)
    # Strictly greater: 1 / 2.00001 = 0.4999975 is not above 0.5, and 1.0 > 0.9.
    assert s.precision == {0.5: 2 / 5, 0.6: 2 / 5, 0.7: 2 / 5, 0.8: 2 / 5, 0.9: 2 / 5}
    assert tuple(s.precision) == THRESHOLDS
    doc = s.as_dict()
    assert doc["Pr@0.5"] == 0.4 and doc["gIoU"] == s.giou and doc["failed"] == 1


def test_giou_is_the_sequential_running_mean():
    ious = [(1, 3), (2, 3), (7, 9), (1, 1)]
    total = 0.0
    for i, u in ious:
        total += i / (u + 1e-5)
    assert summarize(ious).giou == total / 4  # bit for bit, same order


def test_summary_of_nothing():
    s = summarize([None, None])
    assert (s.count, s.failed, s.giou, s.ciou) == (2 - 2, 2, None, None)
    assert all(v is None for v in s.precision.values())


def test_precision_threshold_is_strict():
    # I / (U + 1e-5) with U = 10^6 and I = 0.9 U + 1: just above 0.9 despite the epsilon.
    assert summarize([(900_001, 1_000_000)]).precision[0.9] == 1.0
    assert summarize([(900_000, 1_000_000)]).precision[0.9] == 0.0


def test_by_task_keeps_order_and_adds_overall():
    tasks = ["reasoning", "referring", "reasoning", "interactive", "other"]
    counts = [(1, 2), (2, 2), None, (0, 0), (0, 3)]
    out = summarize_by_task(tasks, counts, ("referring", "reasoning", "interactive"))
    assert list(out) == ["referring", "reasoning", "interactive", "other", "overall"]
    assert (out["reasoning"].count, out["reasoning"].failed) == (1, 1)
    assert out["overall"].count == 4 and out["overall"].intersection == 3
    assert out["overall"].union == 7
    with pytest.raises(ValueError):
        summarize_by_task(["a"], [], ())


def test_rsvg_boxes_the_largest_8_connected_component_like_the_official_code():
    from unigeoseg_backend.evaluation.metrics import largest_component_box

    mask = np.zeros((12, 14), bool)
    mask[1:3, 1:4] = True                      # 6 px
    mask[5, 5] = mask[6, 6] = mask[7, 7] = True  # a diagonal: one 8-connected component of 3
    mask[8:12, 9:11] = True                    # 8 px, the largest
    mask[4, 12] = True
    box = largest_component_box(mask)
    expected = np.zeros_like(mask)
    expected[8:12, 9:11] = True
    assert np.array_equal(box, expected)

    diagonal = np.zeros((6, 6), bool)
    diagonal[[1, 2, 3], [1, 2, 3]] = True      # 8-connected: one component, box 3 x 3
    assert largest_component_box(diagonal)[1:4, 1:4].all()
    assert largest_component_box(diagonal).sum() == 9

    tie = np.zeros((6, 8), bool)
    tie[4:6, 0:2] = True                       # 4 px, first pixel at row 4
    tie[0:2, 6:8] = True                       # 4 px, first pixel at row 0: labelled first
    assert np.array_equal(np.argwhere(largest_component_box(tie)),
                          np.argwhere(tie & (np.arange(8) >= 6)[None, :]))
    assert not largest_component_box(np.zeros((5, 5), bool)).any()
