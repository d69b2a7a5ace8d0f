"""Dataset readers: every layout on tiny fixture trees (tests/dataset_trees.py) with the traps
real downloads and the official loaders hold (listed there; docs/datasets.md describes the
layouts), the COCO RLE decoder, the refs pickle guard and the GeoTIFF chip conversion."""

from __future__ import annotations

import json
import pickle
import shutil

import dataset_trees as dt  # tests/ is on sys.path (rootdir conftest, prepend import mode)
import numpy as np
import pytest
from PIL import Image

from unigeoseg_backend.datasets import (
    DATASETS,
    DatasetError,
    SampleReadError,
    open_dataset,
)
from unigeoseg_backend.datasets import rrsis_d as rrsis_d_module
from unigeoseg_backend.datasets.coco_mask import (
    SegmentationError,
    counts_to_mask,
    encode_rle,
    rle_counts_from_string,
    segmentation_to_mask,
)
from unigeoseg_backend.datasets.images import read_mask_values, read_rgb
from unigeoseg_backend.datasets.rrsis_d import load_refs_pickle
from unigeoseg_backend.model.prompting import PromptTemplate

TREE_KEYS = ("geoseg-bench", "geoseg-bench-B", "rrsis-d", "refsegrs", "earthreason", "local")


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, dt.FixtureTree]:
    return dt.build_all(tmp_path_factory.mktemp("datasets"))


def _open(tree: dt.FixtureTree, **kwargs):
    return open_dataset(tree.dataset, tree.root, tree.split, **kwargs)


# -- every layout -------------------------------------------------------------------------

@pytest.mark.parametrize("key", TREE_KEYS)
def test_listing_has_the_expected_ids_texts_and_problems(trees, key):
    tree = trees[key]
    listing = _open(tree)
    assert [s.sample_id for s in listing.samples] == list(tree.samples)
    for sample in listing.samples:
        expected = tree.samples[sample.sample_id]
        assert (sample.task, sample.template, sample.instruction, sample.answer) == (
            expected.task, expected.template, expected.instruction, expected.answer)
    assert [p.where for p in listing.problems] == tree.problems


@pytest.mark.parametrize("key", TREE_KEYS)
def test_masks_equal_what_the_builder_wrote(trees, key):
    tree = trees[key]
    for sample in _open(tree).samples:
        mask = sample.read_mask()
        assert mask.dtype == np.bool_
        np.testing.assert_array_equal(mask, tree.samples[sample.sample_id].mask,
                                      err_msg=sample.sample_id)


@pytest.mark.parametrize("key", TREE_KEYS)
def test_images_are_rgb_uint8_equal_to_the_lossless_originals(trees, key):
    tree = trees[key]
    for sample in _open(tree).samples:
        if sample.sample_id in tree.unreadable:
            continue
        expected = tree.samples[sample.sample_id]
        image = sample.read_image()
        assert image.dtype == np.uint8 and image.shape == (*expected.image_shape, 3)
        if expected.rgb is not None:
            np.testing.assert_array_equal(image, expected.rgb, err_msg=sample.sample_id)


@pytest.mark.parametrize("key", ["geoseg-bench", "refsegrs", "local"])
def test_corrupt_image_raises_sample_read_error_naming_the_file(trees, key):
    tree = trees[key]
    samples = {s.sample_id: s for s in _open(tree).samples}
    assert tree.unreadable
    for sample_id, file_name in tree.unreadable.items():
        with pytest.raises(SampleReadError, match=file_name):
            samples[sample_id].read_image()


@pytest.mark.parametrize("key", ["geoseg-bench", "refsegrs"])
def test_robust_mask_rule_counts_values_over_127(trees, key):
    tree = trees[key]
    for sample in _open(tree, mask_rule="robust").samples:
        np.testing.assert_array_equal(sample.read_mask(),
                                      tree.samples[sample.sample_id].robust_mask)


def test_samples_pickle_for_data_loader_workers(trees):
    for key in TREE_KEYS:
        sample = _open(trees[key]).samples[0]
        clone = pickle.loads(pickle.dumps(sample))
        np.testing.assert_array_equal(clone.read_mask(), sample.read_mask())


def test_open_dataset_rejects_unknown_names_rules_and_tasks(trees, tmp_path):
    with pytest.raises(DatasetError) as info:
        open_dataset("coco", tmp_path)
    assert all(name in str(info.value) for name in DATASETS)
    with pytest.raises(DatasetError, match="mask_rule"):
        _open(trees["refsegrs"], mask_rule="otsu")
    with pytest.raises(DatasetError, match="unknown task"):
        _open(trees["local"], task="segment")
    with pytest.raises(DatasetError, match="referring samples only"):
        _open(trees["rrsis-d"], task="reasoning")
    with pytest.raises(DatasetError, match="not a directory"):
        open_dataset("local", tmp_path / "nowhere")


# -- GeoSeg-Bench -------------------------------------------------------------------------

def test_geoseg_bench_interactive_folder_gives_the_interactive_task(trees):
    listing = _open(trees["geoseg-bench"], task="interactive")
    assert {s.task for s in listing.samples} == {"interactive"}
    # Kept verbatim: the model's official regexes decide (and log) that it does not parse.
    assert listing.samples[2].instruction == dt.INTERACTIVE_POINT_UNPARSEABLE


def test_geoseg_bench_root_may_be_one_task_folder_or_its_split_folder(trees):
    root = trees["geoseg-bench-B"].root
    for folder in (root / "ref", root / "ref" / "test"):
        listing = open_dataset("geoseg-bench", folder)
        assert [s.sample_id for s in listing.samples] == [
            "referring/0:ref_0000", "referring/1:ref_0001", "referring/2:ref_0002"]
        assert [p.where for p in listing.problems] == ["referring/3:ref_0003"]


def test_geoseg_bench_unknown_folder_name_needs_the_task(trees, tmp_path):
    folder = tmp_path / "sior_subset"
    shutil.copytree(trees["geoseg-bench"].root / "interactive", folder)
    with pytest.raises(DatasetError, match="cannot tell the task"):
        open_dataset("geoseg-bench", folder)
    listing = open_dataset("geoseg-bench", folder, task="intera")
    assert {s.task for s in listing.samples} == {"interactive"}
    with pytest.raises(DatasetError, match="interactive folder, not referring"):
        open_dataset("geoseg-bench", trees["geoseg-bench"].root / "interactive", task="ref")


def test_geoseg_bench_task_folder_without_the_split_is_a_problem(trees, tmp_path):
    root = tmp_path / "bench"
    shutil.copytree(trees["geoseg-bench"].root, root)
    (root / "reason" / "test.json").rename(root / "reason" / "val.json")
    listing = open_dataset("geoseg-bench", root)
    assert {s.task for s in listing.samples} == {"interactive", "referring"}
    assert listing.problems[0].where == str(root / "reason")
    with pytest.raises(DatasetError, match="no test.json"):
        open_dataset("geoseg-bench", root, task="reasoning")


# -- RRSIS-D ------------------------------------------------------------------------------

def test_rrsisd_mask_keeps_its_rle_size_when_the_jpeg_is_shorter(trees):
    sample = next(s for s in _open(trees["rrsis-d"]).samples if s.sample_id == "15324")
    assert sample.read_mask().shape == (64, 64)
    assert sample.read_image().shape == (64 - 13, 64, 3)


def test_rrsisd_finds_the_image_by_image_id_and_unions_segments(trees):
    sample = next(s for s in _open(trees["rrsis-d"]).samples if s.sample_id == "13")
    assert sample.image_path.name == "00020.jpg"
    assert sample.read_mask().sum() == trees["rrsis-d"].samples["13"].mask.sum()


def test_rrsisd_split_selection_and_lazy_decoding(trees, monkeypatch):
    calls = []
    real = rrsis_d_module.segmentation_to_mask
    monkeypatch.setattr(rrsis_d_module, "segmentation_to_mask",
                        lambda *a: calls.append(a) or real(*a))
    listing = _open(trees["rrsis-d"])
    assert calls == []  # listing decodes nothing
    listing.samples[0].read_mask()
    assert len(calls) == 1
    for split, ids in (("train", ["2934"]), ("val", ["6000"])):
        listing = open_dataset("rrsis-d", trees["rrsis-d"].root, split)
        assert [s.sample_id for s in listing.samples] == ids


def test_refs_pickle_loader_refuses_any_class_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    # A hand-written protocol-0 pickle: os.system("touch <marker>").
    payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    path = tmp_path / "refs(unc).p"
    path.write_bytes(payload)
    with pytest.raises(DatasetError, match="refusing to load os.system"):
        load_refs_pickle(path)
    assert not marker.exists()

    path.write_bytes(pickle.dumps([{"ref_id": 1, "when": (1, 2)}], protocol=4))
    with pytest.raises(DatasetError, match="plain"):  # a tuple is not in the allowed set
        load_refs_pickle(path)
    refs = [{"ref_id": 1, "split": "test", "x": [1.5, None, True, "s"]}]
    path.write_bytes(pickle.dumps(refs, protocol=2))
    assert load_refs_pickle(path) == refs


# -- COCO RLE -----------------------------------------------------------------------------

def test_rle_decoder_on_hand_encoded_cases():
    # [[0, 1], [1, 1]] column-major is 0 1 1 1: runs [1, 3] -> "1" "3".
    np.testing.assert_array_equal(counts_to_mask(rle_counts_from_string("13"), 2, 2),
                                  [[False, True], [True, True]])
    # Runs [0, 40]: 40 = 8 + (1 << 5) -> "8" | 0x20 = "X", then "1".
    assert rle_counts_from_string("0X1") == [0, 40]
    assert counts_to_mask([0, 40], 5, 8).all()
    # From the fourth run on a value is stored as a difference to the run two earlier:
    # [3, 5, 1, 2] stores 3, 5, 1, 2 - 5 = -3 (5-bit two's complement 0b11101 = 29 -> "M",
    # its sign bit 0x10 set, so no more characters).
    assert rle_counts_from_string("351M") == [3, 5, 1, 2]
    assert encode_rle(counts_to_mask([3, 5, 1, 2], 11, 1))["counts"] == "351M"
    with pytest.raises(SegmentationError, match="cover"):
        counts_to_mask([1, 2], 2, 2)
    with pytest.raises(SegmentationError):
        rle_counts_from_string("X")  # a value that never ends


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs numpy 2 copy=
def test_rle_and_polygons_match_pycocotools():
    mask_utils = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = (int(v) for v in rng.integers(1, 50, 2))
        mask = rng.random((h, w)) < 0.3
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert encode_rle(mask)["counts"] == rle["counts"].decode()
        decoded = segmentation_to_mask([{"size": [h, w], "counts": rle["counts"].decode()}],
                                       None, None)
        np.testing.assert_array_equal(decoded, mask)
        k = int(rng.integers(3, 9))
        xy = (rng.random(2 * k) * np.tile([w + 4, h + 4], k) - 2).round(1).tolist()
        expected = mask_utils.decode(mask_utils.frPyObjects([xy], h, w))[:, :, 0]
        np.testing.assert_array_equal(segmentation_to_mask([xy], h, w), expected.astype(bool))


# -- RefSegRS, EarthReason ----------------------------------------------------------------

def test_refsegrs_crlf_line_is_clean_and_other_splits_list(trees):
    samples = {s.sample_id: s for s in _open(trees["refsegrs"]).samples}
    assert samples["3"].instruction == "low vegetation near the parking lot"
    for split, ids in (("train", ["0"]), ("val", ["1"])):
        listing = open_dataset("refsegrs", trees["refsegrs"].root, split)
        assert [s.sample_id for s in listing.samples] == ids


@pytest.mark.parametrize("nest", ["nested", "flat"])
def test_earthreason_accepts_nested_and_flat_split_folders(tmp_path, nest):
    tree = dt.build_earthreason(tmp_path, nest=nest)
    listing = _open(tree)
    assert [s.sample_id for s in listing.samples] == list(tree.samples)
    assert [p.where for p in listing.problems] == ["lonely_3"]


def test_earthreason_empty_target_has_no_answer_and_an_empty_mask(trees):
    sample = next(s for s in _open(trees["earthreason"]).samples if s.sample_id == "airport_1")
    assert sample.answer is None and sample.template is PromptTemplate.EARTHREASON
    assert not sample.read_mask().any()


# -- local layout and image conversion ----------------------------------------------------

def test_local_problems_name_their_line_numbers(trees):
    listing = _open(trees["local"])
    messages = {p.where: p.message for p in listing.problems}
    assert "test.jsonl:6" in messages["test.jsonl:6"] and "mask" in messages["test.jsonl:6"]
    assert "unknown task 'segment'" in messages["test.jsonl:7"]
    assert "instruction" in messages["test.jsonl:8"]
    assert "test.jsonl:10" in messages["missing-image"]
    assert "line 1" in messages["test.jsonl:11"]
    only = _open(trees["local"], task="reasoning")
    assert [s.sample_id for s in only.samples] == ["7"]


def test_16bit_multiband_chip_becomes_deterministic_rgb(trees):
    path = trees["local"].root / "images" / "chip16.tif"
    first, second = read_rgb(path), read_rgb(path)
    _bands, expected = dt.chip_16bit()
    np.testing.assert_array_equal(first, expected)
    assert first.tobytes() == second.tobytes()


def test_float_chip_with_nan_is_nan_safe(tmp_path):
    bands = np.stack([np.linspace(0, 1, 48, dtype=np.float32).reshape(6, 8)] * 3)
    bands[:, 2, 3] = np.nan
    path = tmp_path / "float.tif"
    dt._write_geotiff(path, bands, nodata=None)
    rgb = read_rgb(path)
    assert rgb.dtype == np.uint8 and (rgb[2, 3] == 0).all()
    assert rgb[0, 0, 0] == 0 and rgb[5, 7, 0] == 255


def test_grey_png_repeats_and_missing_file_names_itself(tmp_path):
    grey = dt.image_pixels(5, 7, 1)[:, :, 1]
    Image.fromarray(grey).save(tmp_path / "grey.png")
    np.testing.assert_array_equal(read_rgb(tmp_path / "grey.png"),
                                  np.repeat(grey[:, :, None], 3, axis=2))
    with pytest.raises(SampleReadError, match="absent.png"):
        read_rgb(tmp_path / "absent.png")
    with pytest.raises(SampleReadError, match="absent.tif"):
        read_mask_values(tmp_path / "absent.tif")


def test_geoseg_bench_unreadable_sample_json_is_a_problem(trees, tmp_path):
    root = tmp_path / "bench"
    shutil.copytree(trees["geoseg-bench"].root / "ref", root / "ref")
    (root / "ref" / "test" / "jsons" / "ref_0001.json").write_text(json.dumps({"q": []}))
    listing = open_dataset("geoseg-bench", root)
    assert [p.where for p in listing.problems] == ["referring/1:ref_0001",
                                                   "referring/3:ref_0003"]
    assert "ref_0001.json" in listing.problems[0].message
