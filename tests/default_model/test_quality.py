"""Quality of the shipped default model on the evaluation regions, one test per acceptance
criterion, each printing its numbers (``pytest -s``): water, vegetation, clouds and lakes
from text (unseen paraphrases and reasoning wordings included), a click in Lake Granby, tree
boxes against the box itself, and subjects that are not in the scene marking (almost)
nothing. These need the trained weights in ``default_model/weights/`` and fail, saying so,
while that folder has no model card.

The harness itself is checked on random tiny weights (numbers near 0, rows as they should
be), and the wordings on being absent from every training phrasing."""

from __future__ import annotations

import numpy as np
import pytest

from unigeoseg_backend.default_model.chips import REASONING_PHRASINGS
from unigeoseg_backend.default_model.quality import (
    ABSENT_WORDINGS,
    CLICK_MIN_IOU,
    CLOUD_MIN_IOU,
    CLOUD_PARAPHRASES,
    CLOUD_WORDINGS,
    LAKE_GRANBY_CLICK,
    LAKE_GRANBY_CLICK_CRS,
    LAKE_MIN_IOU,
    LAKE_WORDINGS,
    VEGETATION_MIN_IOU,
    VEGETATION_WORDINGS,
    WATER_MIN_IOU,
    WATER_WORDINGS,
    EncodedRegion,
    QualityReport,
    QualityRow,
    absent_rows,
    box_rows,
    click_rows,
    encode_region,
    iou,
    marked_fraction,
    quality_summary,
    random_weights_folder,
    text_rows,
)
from unigeoseg_backend.default_model.sources import LANDSAT8, OSBS_029, RMNP, SENTINEL2
from unigeoseg_backend.default_model.text_encoder import DEFAULT_CLASSES, instruction_core
from unigeoseg_backend.default_model.weights_io import MODEL_CARD_FILE, shipped_weights_dir
from unigeoseg_backend.engines.default_engine import DefaultEngine


def _assert_rows_pass(rows: list[QualityRow]) -> None:
    print()
    for row in rows:
        print(row.describe())
    failed = [row.describe() for row in rows if row.passed is False]
    assert not failed, "below the acceptance threshold:\n" + "\n".join(failed)


# ------------------------------------------------------------------ the shipped weights

@pytest.fixture(scope="module")
def shipped() -> DefaultEngine:
    folder = shipped_weights_dir()
    if not (folder / MODEL_CARD_FILE).is_file():
        pytest.fail(f"the shipped default model is missing: {folder} has no {MODEL_CARD_FILE}. "
                    f"Its quality is measured on the trained weights that ship in the "
                    f"package; export them there (the trainer's default family writes the "
                    f"folder) and run these tests again.", pytrace=False)
    return DefaultEngine.from_folder(folder)


@pytest.fixture(scope="module")
def regions(shipped):
    """Each evaluation region encoded once for the whole module, on first use."""
    encoded: dict[str, EncodedRegion] = {}

    def region(scene_name: str) -> EncodedRegion:
        if scene_name not in encoded:
            encoded[scene_name] = encode_region(shipped, scene_name)
        return encoded[scene_name]

    return region


def not_reached(measured: str) -> pytest.MarkDecorator:
    """A criterion the shipped model does not reach yet: the test runs, prints its numbers
    and must still fail (strict), so the day it passes the mark has to go."""
    return pytest.mark.xfail(strict=True, reason=f"default-v1 1.0.0 measures {measured} "
                                                 f"(docs/default-model.md, Quality)")


TEXT_CRITERIA = [
    pytest.param(SENTINEL2.name, "water", WATER_WORDINGS, WATER_MIN_IOU,
                 id="sentinel2-water-every-wording-at-least-0.95"),
    pytest.param(SENTINEL2.name, "vegetation", VEGETATION_WORDINGS, VEGETATION_MIN_IOU,
                 id="sentinel2-vegetation-every-wording-at-least-0.80",
                 marks=not_reached("0.74-0.75")),
    pytest.param(LANDSAT8.name, "cloud", CLOUD_WORDINGS, CLOUD_MIN_IOU,
                 id="landsat8-clouds-vs-bqa-at-least-0.65", marks=not_reached("0.44")),
    pytest.param(LANDSAT8.name, "cloud", CLOUD_PARAPHRASES, None,
                 id="landsat8-cloud-paraphrases-reported"),
    pytest.param(RMNP.name, "lake", LAKE_WORDINGS, LAKE_MIN_IOU,
                 id="rmnp-lakes-native-resolution-at-least-0.70", marks=not_reached("0.52")),
]


@pytest.mark.slow
@pytest.mark.parametrize(("scene", "label", "wordings", "threshold"), TEXT_CRITERIA)
def test_text_prompts_reach_their_iou_on_the_evaluation_regions(shipped, regions, scene, label,
                                                                  wordings, threshold):
    _assert_rows_pass(text_rows(shipped, regions(scene), label, wordings, threshold))


@pytest.mark.slow
def test_a_click_in_lake_granby_gives_the_lake_with_iou_at_least_0_70(shipped, regions):
    rmnp = regions(RMNP.name)
    _assert_rows_pass(click_rows(shipped, rmnp, "lake", LAKE_GRANBY_CLICK,
                                 LAKE_GRANBY_CLICK_CRS, CLICK_MIN_IOU))


@pytest.mark.slow
def test_tree_boxes_give_a_better_mask_than_the_boxes_themselves(shipped, regions):
    osbs = regions(OSBS_029.name)
    _assert_rows_pass(box_rows(shipped, osbs))


@pytest.mark.slow
def test_subjects_not_in_the_scene_mark_at_most_one_percent_of_it(shipped, regions):
    coast = regions(SENTINEL2.name)
    _assert_rows_pass(absent_rows(shipped, coast, ABSENT_WORDINGS))


# ------------------------------------------------------------------ the harness itself

def test_the_paraphrases_and_reasoning_wordings_were_never_trained_on():
    trained = {instruction_core(p) for c in DEFAULT_CLASSES for p in c.phrases}
    trained |= {instruction_core(p) for wordings in REASONING_PHRASINGS.values()
                for p in wordings}
    unseen = WATER_WORDINGS[1:] + VEGETATION_WORDINGS[1:] + CLOUD_PARAPHRASES
    assert {"greenery", "foliage", "the lagoon"} <= {w.text for w in unseen}
    assert {w.task for w in unseen} == {"referring", "reasoning"}
    assert [w.text for w in unseen if instruction_core(w.text) in trained] == []


def test_iou_and_the_marked_share_count_valid_pixels_only():
    predicted = np.array([[1, 1, 0, 0]], bool)
    reference = np.array([[1, 0, 0, 1]], bool)
    valid = np.array([[1, 1, 1, 0]], bool)  # the last pixel is nodata
    assert iou(predicted, reference, valid) == pytest.approx(1 / 2)
    assert iou(predicted & False, reference & False, valid) == 1.0
    assert marked_fraction(predicted, valid) == pytest.approx(2 / 3)


def test_the_harness_on_random_tiny_weights_gives_a_row_per_check(tmp_path):
    engine = DefaultEngine.from_folder(random_weights_folder(tmp_path / "tiny", "tiny"))
    region = encode_region(engine, RMNP.name)
    assert region.valid.shape == (RMNP.height, RMNP.width) and len(region.tiles) == 1
    assert 0 < np.count_nonzero(~region.valid) < region.valid.size  # the file's nodata
    rows = [*text_rows(engine, region, "lake", LAKE_WORDINGS, LAKE_MIN_IOU),
            *absent_rows(engine, region, ABSENT_WORDINGS[:1]),
            *click_rows(engine, region, "lake", LAKE_GRANBY_CLICK, LAKE_GRANBY_CLICK_CRS,
                        CLICK_MIN_IOU)]
    report = QualityReport(engine.model_id, rows, seconds=1.0,
                           encode_seconds={RMNP.name: region.encode_seconds})
    table = report.format_table()
    print("\n" + table)

    assert [(r.scene, r.metric) for r in rows] == [
        (RMNP.name, "iou"), (RMNP.name, "marked_fraction"), (RMNP.name, "iou")]
    assert all(0.0 <= r.value <= 1.0 and isinstance(r.passed, bool) for r in rows)
    assert "did not understand 'the airplanes'" in rows[1].note and rows[1].value == 0.0
    assert len(table.splitlines()) == len(rows) + 3  # header, rule, rows, summary
    assert all(r.prompt in table for r in rows) and engine.model_id in table
    summary = quality_summary(report)
    assert list(summary) == [r.name for r in rows]
    assert all(isinstance(v, float) for v in summary.values())
