"""Fine-tune chips from polygons, without QGIS: exact masks on the raster grid, the checks on
the polygons, a spatially separate held-out split, and a chip set the backend's ``local``
reader reads with prompts inside their masks. The pixel stretch and the interactive wording
are the backend's (the plugin cannot import them, so it writes them out)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from qgis_plugin.core.finetune_chips import (
    MIN_OBJECTS,
    ChipInputError,
    RasterGeoreference,
    TrainingObject,
    interactive_instruction,
    map_to_pixels,
    plan_chips,
    png_bytes,
    prepare_objects,
    rasterise,
    split_held_out,
    tile_rgb8,
    windows_overlap,
    write_chip_set,
)
from qgis_plugin.unigeoseg_protocol.params import RasterOptions

from unigeoseg_backend.datasets import open_dataset
from unigeoseg_backend.geo.pixels import to_rgb8
from unigeoseg_backend.model.prompting import interactive_instruction as backend_wording

GEOTRANSFORM = (500000.0, 0.5, 0.0, 4100000.0, 0.0, -0.5)


def square(col0: float, row0: float, col1: float, row1: float) -> np.ndarray:
    return np.array([[col0, row0], [col1, row0], [col1, row1], [col0, row1], [col0, row0]])


def square_object(feature_id: int, col0: float, row0: float, size: float,
                  class_name: str = "pond") -> TrainingObject:
    return TrainingObject(feature_id, class_name,
                          ((square(col0, row0, col0 + size, row0 + size),),))


def test_a_polygon_on_pixel_edges_gives_exactly_those_pixels():
    mask = rasterise([(square(10, 5, 20, 15),)], (0, 0, 32, 24))
    expected = np.zeros((24, 32), dtype=bool)
    expected[5:15, 10:20] = True
    assert np.array_equal(mask, expected)
    # The same polygon on a window of the grid further on: the same pixels, shifted.
    shifted = rasterise([(square(10, 5, 20, 15),)], (8, 3, 16, 16))
    assert np.array_equal(shifted, expected[3:19, 8:24])


def test_holes_stay_holes_and_shared_edges_give_each_pixel_once():
    ring_with_hole = (square(0, 0, 10, 10), square(3, 3, 6, 6))
    mask = rasterise([ring_with_hole], (0, 0, 12, 12))
    assert mask.sum() == 100 - 9 and not mask[3:6, 3:6].any()
    # Two triangles sharing a diagonal through pixel centres: no pixel in both, none lost.
    left = (np.array([[0.0, 0.0], [8.0, 8.0], [0.0, 8.0]]),)
    right = (np.array([[0.0, 0.0], [8.0, 0.0], [8.0, 8.0]]),)
    a, b = rasterise([left], (0, 0, 8, 8)), rasterise([right], (0, 0, 8, 8))
    assert not (a & b).any() and (a | b).all()


def test_map_points_become_continuous_pixels_of_the_raster():
    xy = np.array([[500000.0, 4100000.0], [500005.25, 4099990.0]])
    assert np.allclose(map_to_pixels(xy, GEOTRANSFORM), [[0.0, 0.0], [10.5, 20.0]])
    with pytest.raises(ChipInputError, match="north-up"):
        map_to_pixels(xy, (0.0, 1.0, 0.2, 0.0, 0.0, -1.0))


def test_bad_polygon_sets_are_refused_in_words():
    with pytest.raises(ChipInputError, match="no polygons"):
        prepare_objects([], 400, 300)
    outside = [square_object(i, 1000 + 20 * i, 10, 8) for i in range(5)]
    with pytest.raises(ChipInputError, match="overlaps the raster"):
        prepare_objects(outside, 400, 300)
    few = [square_object(i, 20 * i, 10, 8) for i in range(MIN_OBJECTS - 1)]
    with pytest.raises(ChipInputError, match=f"at least {MIN_OBJECTS}"):
        prepare_objects(few + outside, 400, 300)


def test_outside_and_subpixel_polygons_are_counted_and_a_huge_layer_sampled():
    inside = [square_object(i, 20 * i, 10, 8) for i in range(10)]
    sliver = TrainingObject(99, "pond", ((square(5.1, 5.1, 5.4, 5.4),),))
    prepared = prepare_objects([*inside, square_object(50, 900, 10, 8), sliver], 400, 300,
                               max_objects=6)
    assert (prepared.outside, prepared.too_small) == (1, 1)
    assert len(prepared.objects) == 10 and len(prepared.centred) == 6
    assert prepared.sampled_from == 10
    assert any("sample of 6" in note for note in prepared.messages())


def grid_of_objects(count_cols: int, count_rows: int, step: int = 60) -> list[TrainingObject]:
    return [square_object(r * count_cols + c, 30 + c * step, 30 + r * step, 12)
            for r in range(count_rows) for c in range(count_cols)]


def test_held_out_chips_never_overlap_training_chips():
    objects = grid_of_objects(12, 4)
    plan = plan_chips(objects, 1400, 300, held_out_share=0.25)
    split = plan.split
    assert split.axis == 0 and plan.chip_px == 256
    assert 0.15 <= len(split.val) / (len(split.val) + len(split.train)) <= 0.35
    train = [c.window for c in plan.chips if c.split == "train"]
    val = [c.window for c in plan.chips if c.split == "val"]
    assert train and val
    assert not any(windows_overlap(t, v) for t in train for v in val)
    assert all(w[0] + w[2] <= split.line for w in train)
    assert all(w[0] >= split.line for w in val)
    by_id = {o.feature_id: o for o in objects}
    assert all(by_id[i].bbox[0] >= split.line for i in split.val)
    # Negatives: windows between the polygons, touching none.
    negatives = [c.window for c in plan.chips if c.feature_id is None]
    assert negatives and all(w[0] >= 30 + 11 * 60 + 12 for w in negatives)


def test_a_split_is_impossible_when_the_polygons_are_bunched_up_at_an_edge():
    # Within a chip's width of the raster's west edge: no line leaves a chip on each side.
    objects = [square_object(i, 10 + 30 * i, 100, 8) for i in range(6)]
    with pytest.raises(ChipInputError, match="held-out area"):
        split_held_out(objects, 800, 300, 0.25, 256)
    with pytest.raises(ChipInputError, match="held-out share"):
        split_held_out(objects, 800, 300, 0.0, 256)


def test_chip_set_is_read_by_the_local_reader_with_prompts_inside_their_masks(tmp_path):
    rng = np.random.default_rng(0)
    width, height = 1400, 300
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    objects = grid_of_objects(12, 4)
    objects.append(TrainingObject(500, "boat", ((square(400, 200, 420, 210),),)))
    plan = plan_chips(objects, width, height, held_out_share=0.25)

    def read_rgb(window):
        col0, row0, w, h = window
        return image[row0:row0 + h, col0:col0 + w], np.ones((h, w), dtype=bool)

    georeference = RasterGeoreference("EPSG:32633", GEOTRANSFORM, 0.5)
    summary = write_chip_set(tmp_path, plan, read_rgb, georeference)
    assert summary.records["train"] > 0 and summary.records["val"] > 0
    assert summary.held_out == plan.split.val

    kinds = set()
    for split in ("train", "val"):
        listing = open_dataset("local", tmp_path, split=split)
        assert not listing.problems
        records = [json.loads(line) for line in (tmp_path / f"{split}.jsonl").open()]
        assert len(listing.samples) == len(records)
        for record in records:
            chip = record["chip"]
            col0, row0, w, h = chip["window"]
            assert chip["scene"] is None and chip["crs"] == "EPSG:32633" and w == h == 256
            assert chip["transform"] == [0.5, 0.0, 500000.0 + 0.5 * col0, 0.0, -0.5,
                                         4100000.0 - 0.5 * row0]
            pixels = np.asarray(Image.open(tmp_path / record["image"]))
            assert np.array_equal(pixels, image[row0:row0 + h, col0:col0 + w])
            mask = np.asarray(Image.open(tmp_path / record["mask"])) > 0
            prompt = record["prompt"]
            kinds.add((prompt["kind"], record["target"]))
            assert prompt["class"] in ("pond", "boat")
            if record["target"] == "empty":
                assert not mask.any() and prompt["kind"] == "text"
            elif prompt["kind"] == "text":
                truth = rasterise([p for o in objects if o.class_name == prompt["class"]
                                   for p in o.parts], tuple(chip["window"]))
                assert np.array_equal(mask, truth)
                assert record["instruction"] == prompt["class"]
            elif prompt["kind"] == "click":
                (col, row), *rest = prompt["points"]
                assert prompt["labels"][0] == 1 and mask[int(row), int(col)]
                assert all(not mask[int(r), int(c)] for c, r in rest)
            else:
                c0, r0, c1, r1 = (int(v) for v in prompt["box"])
                assert mask[r0:r1, c0:c1].sum() == mask.sum()
                assert mask[r0, c0:c1].any() and mask[r1 - 1, c0:c1].any()
    assert {("text", "class"), ("text", "empty"), ("click", "component"),
            ("box", "component")} <= kinds


def test_chips_without_valid_pixels_are_skipped_and_a_set_needs_both_splits(tmp_path):
    plan = plan_chips(grid_of_objects(12, 4), 800, 300)

    def nodata_everywhere(window):
        return np.zeros((window[3], window[2], 3), np.uint8), np.zeros(window[2:][::-1], bool)

    with pytest.raises(ChipInputError, match="valid pixels"):
        write_chip_set(tmp_path, plan, nodata_everywhere,
                       RasterGeoreference("EPSG:32633", GEOTRANSFORM, 0.5))


@pytest.mark.parametrize("dtype, bands, nodata", [
    (np.uint8, 3, None), (np.uint8, 1, 0), (np.uint16, 3, 0), (np.uint16, 3, None),
    (np.int16, 1, -9999), (np.float32, 3, None)])
def test_pixels_become_rgb_as_the_service_makes_them(dtype, bands, nodata):
    rng = np.random.default_rng(3)
    high = 255 if dtype == np.uint8 else 4000
    pixels = rng.integers(0, high, size=(64, 48, bands)).astype(dtype)
    if nodata is not None:
        pixels[:5, :7] = nodata
    if dtype == np.float32:
        pixels[10:12, :] = np.nan
    for stretch in ("auto", "none", "minmax"):
        options = RasterOptions(nodata=nodata, stretch=stretch)
        ours, ours_valid = tile_rgb8(pixels, options)
        theirs, theirs_valid = to_rgb8(pixels, options)
        assert np.array_equal(ours_valid, theirs_valid)
        assert np.array_equal(ours, theirs), stretch


def test_interactive_wording_is_the_backends():
    assert interactive_instruction([(128.5, 64.5)], chip_px=256) == \
        backend_wording(points_norm=[[128.5 / 256, 64.5 / 256]])
    assert interactive_instruction([(1.5, 2.5), (30.5, 40.5)], chip_px=64) == \
        backend_wording(points_norm=[[1.5 / 64, 2.5 / 64], [30.5 / 64, 40.5 / 64]])
    assert interactive_instruction(box=(10, 20, 100, 200), chip_px=256) == \
        backend_wording(box_norm=[10 / 256, 20 / 256, 100 / 256, 200 / 256])


def test_png_files_read_back_as_written():
    rgb = np.random.default_rng(1).integers(0, 256, size=(17, 33, 3), dtype=np.uint8)
    grey = (rgb[:, :, 0] > 127).astype(np.uint8) * np.uint8(255)
    import io

    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png_bytes(rgb)))), rgb)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png_bytes(grey)))), grey)
