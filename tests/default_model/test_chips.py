"""The default model's training chips: a local-layout dataset that the project's reader loads
whole, cut only from training windows, with the stretch, masks and prompts it records, and
the same files for the same seed."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image
from rasterio.windows import Window

from unigeoseg_backend.datasets import open_dataset
from unigeoseg_backend.default_model import chips as chips_module
from unigeoseg_backend.default_model.chips import (
    PASTES,
    REASONING_PHRASINGS,
    build_chip_dataset,
    training_scenes,
)
from unigeoseg_backend.default_model.radiometry import rgb_band_names, to_model_rgb
from unigeoseg_backend.default_model.references import (
    SCENE_LABELS,
    component_sizes,
    scene_reference,
)
from unigeoseg_backend.default_model.regions import (
    REGIONS,
    evaluation_window,
    train_windows,
    window_contains,
    windows_intersect,
)
from unigeoseg_backend.default_model.sources import SCENES, read_scene
from unigeoseg_backend.default_model.text_encoder import (
    DEFAULT_CLASSES,
    PhraseMatch,
    PhraseVocabulary,
    default_text_encoder,
    instruction_core,
)
from unigeoseg_backend.model.prompting import parse_interactive_coords

CHIP_PX = 64
SMALL = {"chip_px": CHIP_PX, "chips_per_scene": 10, "val_chips_per_scene": 3}


@pytest.fixture(scope="module")
def windows_read(tmp_path_factory):
    """Every (scene, window) the build reads bands over, recorded around ``read_scene``."""
    return []


@pytest.fixture(scope="module")
def built(tmp_path_factory, windows_read):
    monkeypatch = pytest.MonkeyPatch()

    def spy(scene, bands=None, window=None):
        windows_read.append((scene.name, window))
        return read_scene(scene, bands, window)

    monkeypatch.setattr(chips_module, "read_scene", spy)
    root = tmp_path_factory.mktemp("chips") / "set"
    try:
        summary = build_chip_dataset(root, seed=5, **SMALL)
    finally:
        monkeypatch.undo()
    records = {split: [json.loads(line) for line in (root / f"{split}.jsonl").open()]
               for split in ("train", "val")}
    return root, summary, records


def _all_records(built):
    _, _, records = built
    return records["train"] + records["val"]


def _read_mask(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)) > 0


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_every_sample_loads_through_the_local_reader_with_the_mask_written(built):
    root, summary, records = built
    for split in ("train", "val"):
        listing = open_dataset("local", root, split)
        assert listing.problems == []
        assert [s.sample_id for s in listing.samples] == [r["id"] for r in records[split]]
        assert summary["splits"][split]["samples"] == len(records[split])
        for sample, record in zip(listing.samples, records[split], strict=True):
            assert sample.task == record["task"] and sample.instruction == record["instruction"]
            image = sample.read_image()
            assert image.shape == (CHIP_PX, CHIP_PX, 3) and image.dtype == np.uint8
            np.testing.assert_array_equal(image, np.asarray(Image.open(root / record["image"])))
            mask = sample.read_mask()
            np.testing.assert_array_equal(mask, _read_mask(root / record["mask"]))
    assert summary["splits"]["train"]["chips"] == SMALL["chips_per_scene"] * 3
    assert summary["splits"]["val"]["chips"] == SMALL["val_chips_per_scene"] * 3


def test_no_chip_pixel_comes_from_an_evaluation_region(built, windows_read):
    evaluation_only = {r.scene for r in REGIONS if r.role == "evaluation"} \
        - {r.scene for r in REGIONS if r.role == "train"}
    pasted = 0
    for record in _all_records(built):
        chip = record["chip"]
        for source in (chip, chip["pasted"]):   # the chip, and where its pasted objects are from
            if source is None:
                continue
            pasted += source is not chip
            assert source["scene"] not in evaluation_only
            held_out = evaluation_window(source["scene"])
            for key in ("window", "stretch_window"):
                window = Window(*source[key])
                assert any(window_contains(t, window) for t in train_windows(source["scene"]))
                assert held_out is None or not windows_intersect(window, held_out)
            assert window_contains(Window(*source["stretch_window"]), Window(*source["window"]))
    assert pasted
    # the bands are read only over training windows, never over a whole scene
    assert windows_read and all(window in train_windows(scene) for scene, window in windows_read)


def test_each_class_mask_is_its_reference_resampled_and_negatives_are_empty(built):
    root, _, _ = built
    references: dict[tuple[str, str], np.ndarray] = {}

    def reference(where: dict, label: str) -> np.ndarray:
        key = (where["scene"], label)
        if key not in references:
            references[key] = scene_reference(SCENES[where["scene"]], label)
        col, row, width, height = where["window"]
        source = references[key][row:row + height, col:col + width]
        if width == CHIP_PX:
            return source
        return np.asarray(Image.fromarray(source.astype(np.uint8) * 255).resize(
            (CHIP_PX, CHIP_PX), Image.Resampling.BILINEAR)) >= 128

    def pasted_mask(chip: dict) -> np.ndarray:
        """The bright part of the donor's class mask, where the pasted objects are."""
        pasted, paste = chip["pasted"], PASTES[chip["scene"]]
        if pasted is None:
            return np.zeros((CHIP_PX, CHIP_PX), dtype=bool)
        return reference(pasted, paste.label) \
            & (_stretched_cut(pasted).mean(axis=-1) >= paste.min_brightness)

    for record in _all_records(built):
        chip, label = record["chip"], record["prompt"]["class"]
        if label in SCENE_LABELS[chip["scene"]]:
            expected = reference(chip, label)
            if chip["pasted"] is not None:    # hidden under the pasted objects
                expected &= ~pasted_mask(chip)
        else:   # a class pasted onto this scene's chips
            assert label == PASTES[chip["scene"]].label
            expected = pasted_mask(chip)
        mask = _read_mask(root / record["mask"])
        if record["target"] == "class":
            np.testing.assert_array_equal(mask, expected)
            assert mask.any() and label in chip["classes_present"]
        elif record["target"] == "empty":
            assert not mask.any() and not expected.any()
            assert label not in chip["classes_present"]
        else:   # one 4-connected component of the class mask
            assert mask.any() and not (mask & ~expected).any()
            assert component_sizes(mask).max() == mask.sum()
            assert component_sizes(expected)[mask].min() == mask.sum()


def test_clicks_and_boxes_are_on_their_component_and_written_in_the_benchmark_wording(built):
    root, _, _ = built
    kinds = set()
    for record in _all_records(built):
        prompt = record["prompt"]
        kinds.add((record["task"], prompt["kind"], record["target"]))
        if prompt["kind"] == "text":
            continue
        mask = _read_mask(root / record["mask"])
        coords = parse_interactive_coords(record["instruction"]).numpy()
        if prompt["kind"] == "click":
            (col, row), labels = prompt["points"][0], prompt["labels"]
            assert labels[0] == 1 and mask[int(row), int(col)]
            np.testing.assert_allclose(coords, [[col / CHIP_PX, row / CHIP_PX]], atol=6e-4)
            for (c, r), label in zip(prompt["points"][1:], labels[1:], strict=True):
                assert label == 0 and not mask[int(r), int(c)]
        else:
            rows, cols = np.nonzero(mask)
            box = [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
            assert prompt["box"] == box
            np.testing.assert_allclose(coords, [np.array(box) / CHIP_PX], atol=6e-4)
    assert kinds >= {("referring", "text", "class"), ("reasoning", "text", "class"),
                     ("interactive", "click", "component"), ("interactive", "box", "component"),
                     ("referring", "text", "empty")}


def test_chips_record_their_scale_ground_sample_distance_and_transform(built):
    for record in _all_records(built):
        chip = record["chip"]
        scene = SCENES[chip["scene"]]
        col, row, width, height = chip["window"]
        assert width == height and chip["scale"] == width / CHIP_PX
        shorter = min(min(t.width, t.height) for t in train_windows(scene.name)
                      if window_contains(t, Window(*chip["window"])))
        assert 0.5 * CHIP_PX - 1 <= width <= min(3.5 * CHIP_PX + 1, shorter)
        assert chip["gsd_m"] == pytest.approx(scene.gsd_m * chip["scale"])
        a, b, c, d, e, f = chip["transform"]
        source = read_scene(scene, rgb_band_names(scene)[:1], Window(col, row, 1, 1)).transform
        assert (c, f) == pytest.approx((source.c, source.f))
        assert (a, e) == pytest.approx((source.a * chip["scale"], source.e * chip["scale"]))
    scales = [r["chip"]["scale"] for r in _all_records(built)]
    assert min(scales) < 1 < max(scales)


def _stretched_cut(where: dict) -> np.ndarray:
    """The RGB of a recorded ``window`` out of its ``stretch_window`` stretched whole with
    ``to_model_rgb``, resampled to the chip size: the documented way a chip is made."""
    scene = SCENES[where["scene"]]
    tile = read_scene(scene, rgb_band_names(scene), Window(*where["stretch_window"]))
    rgb, _valid = to_model_rgb(tile.pixels, tile.nodata)
    col, row, size, _ = where["window"]
    t_col, t_row = where["stretch_window"][:2]
    cut = rgb[row - t_row:row - t_row + size, col - t_col:col - t_col + size]
    if size == CHIP_PX:
        return cut
    return np.asarray(Image.fromarray(np.ascontiguousarray(cut)).resize(
        (CHIP_PX, CHIP_PX), Image.Resampling.BILINEAR))


def test_the_image_is_the_stretched_tile_cut_and_resampled(built):
    root, _, _ = built
    for record in [r for r in _all_records(built) if r["chip"]["pasted"] is None][::7]:
        np.testing.assert_array_equal(np.asarray(Image.open(root / record["image"])),
                                      _stretched_cut(record["chip"]))


def test_pasted_objects_replace_the_chip_pixels_where_their_mask_is(built):
    root, _, _ = built
    checked = 0
    for record in _all_records(built):
        chip = record["chip"]
        if chip["pasted"] is None or record["target"] != "class" \
                or record["prompt"]["class"] != chip["pasted"]["class"]:
            continue
        mask = _read_mask(root / record["mask"])
        # fully opaque: the whole 3 x 3 neighbourhood (edges repeated) is pasted
        inner = sliding_window_view(np.pad(mask, 1, mode="edge"), (3, 3)).all(axis=(-2, -1))
        image = np.asarray(Image.open(root / record["image"]))
        np.testing.assert_array_equal(image[inner], _stretched_cut(chip["pasted"])[inner])
        checked += 1
    assert checked


def test_to_model_rgb_stretches_wide_bands_and_keeps_8_bit():
    wide = np.arange(3 * 10 * 10, dtype=np.uint16).reshape(3, 10, 10) * 100
    rgb, valid = to_model_rgb(wide)
    assert rgb.shape == (10, 10, 3) and valid.all()
    assert rgb[..., 0].min() == 0 and rgb[..., 0].max() == 255
    narrow = (np.arange(300) % 200).astype(np.uint8).reshape(3, 10, 10)
    np.testing.assert_array_equal(to_model_rgb(narrow)[0], np.moveaxis(narrow, 0, -1))
    with pytest.raises(ValueError, match="3 x H x W"):
        to_model_rgb(wide[:2])


def test_the_same_seed_gives_byte_identical_files_and_another_seed_does_not(tmp_path):
    tiny = {"chip_px": 32, "chips_per_scene": 3, "val_chips_per_scene": 1}
    first = _files(_built_into(tmp_path / "a", seed=11, **tiny))
    again = _files(_built_into(tmp_path / "b", seed=11, **tiny))
    other = _files(_built_into(tmp_path / "c", seed=12, **tiny))
    assert first == again
    assert first["train.jsonl"] != other["train.jsonl"]
    assert first["images/train/sentinel2_coast/00000.png"] \
        != other["images/train/sentinel2_coast/00000.png"]


def _built_into(root: Path, **kwargs) -> Path:
    build_chip_dataset(root, **kwargs)
    return root


def test_a_folder_with_files_or_bad_scales_is_refused(tmp_path):
    (tmp_path / "stale.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        build_chip_dataset(tmp_path, chips_per_scene=1)
    with pytest.raises(ValueError, match="scales"):
        build_chip_dataset(tmp_path / "new", scales=(2.0, 1.0))


def test_the_training_scenes_are_those_with_a_training_window_and_a_label():
    assert [s.name for s in training_scenes()] == [
        "sentinel2_coast", "landsat8_cloudy", "yell_528000_4978000"]
    for scene in training_scenes():
        assert set(SCENE_LABELS[scene.name]) <= set(REASONING_PHRASINGS)


def _evaluated_wordings() -> set[str]:
    """Every string literal of the text-encoder tests (their unseen paraphrases, reasoning
    wordings and unrelated subjects), as instruction cores."""
    source = Path(__file__).with_name("test_text_encoder.py").read_text()
    return {instruction_core(node.value) for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def test_reasoning_wordings_are_none_of_the_evaluated_paraphrases_or_class_phrasings():
    evaluated = _evaluated_wordings()
    assert {"lagoon", "areas where people could swim"} <= evaluated   # the file was read
    phrasings = {instruction_core(p) for c in DEFAULT_CLASSES for p in c.phrases}
    for wordings in REASONING_PHRASINGS.values():
        for wording in wordings:
            assert instruction_core(wording) not in evaluated | phrasings, wording


def test_reasoning_wordings_are_understood_as_their_class_by_the_phrase_vocabulary():
    vocabulary = PhraseVocabulary(default_text_encoder())
    wrong = {}
    for name, wordings in REASONING_PHRASINGS.items():
        for wording in wordings:
            result = vocabulary.match(wording)
            if not (isinstance(result, PhraseMatch) and result.class_name == name):
                wrong[wording] = result
    assert not wrong
