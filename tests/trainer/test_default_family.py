"""The trainer's default-model family: the shipped configuration, the region guard, the
chip prompts and their flips, and short real runs on chips built from the registry packages
(tiny configuration) that export a weights folder the engine serves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from training_runs import assert_bit_identical, run_trainer, tensors, write_config

from unigeoseg_backend.datasets import open_dataset
from unigeoseg_backend.default_model import regions
from unigeoseg_backend.default_model.chips import build_chip_dataset
from unigeoseg_backend.default_model.weights_io import load_default_model
from unigeoseg_backend.engines.base import TilePrompt
from unigeoseg_backend.engines.default_engine import DefaultEngine
from unigeoseg_trainer.config import ConfigError, load_config, parse_config
from unigeoseg_trainer.data import Mixture
from unigeoseg_trainer.default_family import (
    ChipPrompt,
    check_chip_regions,
    collate_prompts,
    flip_chip,
)
from unigeoseg_trainer.sampler import Pool

REPO = Path(__file__).resolve().parents[2]
SHIPPED_CONFIG = REPO / "trainer" / "configs" / "default-v1.toml"


def evaluation_windows() -> dict[str, list[int]]:
    return {r.scene: [int(r.window.col_off), int(r.window.row_off), int(r.window.width),
                      int(r.window.height)]
            for r in regions.REGIONS if r.role == "evaluation"}


@pytest.fixture(scope="module")
def chips(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("default-chips") / "chips"
    build_chip_dataset(root, chip_px=64, chips_per_scene=6, val_chips_per_scene=1, seed=3)
    return root


def default_sections(output_dir: Path, **changes) -> dict:
    sections = {
        "run": {"output_dir": output_dir, "seed": 11, "max_steps": 4, "checkpoint_every": 2,
                "keep_checkpoints": 2, "device": "cpu"},
        "model": {"family": "default", "architecture": "tiny", "freeze": []},
        "batch": {"per_device": 4, "accumulation": 1, "global_batch": 4, "num_workers": 0},
        "optim": {"lr": 1e-3, "warmup_ratio": 0.25},
        "loss": {"num_points": 256, "lm_weight": 0.0},
        "augment": {"hflip": 0.5, "vflip": 0.5},
        "metrics": {"tensorboard": False},
        "default_model": {"name": "default-test", "version": "0.0.1",
                          "never_train_on": evaluation_windows()},
    }
    for name, table in changes.items():
        sections[name] = {**sections.get(name, {}), **table}
    return sections


# ------------------------------------------------------------------ configuration

def test_the_shipped_configuration_states_exactly_the_evaluation_regions():
    config = load_config(SHIPPED_CONFIG, check_paths=False)
    stated = {scene: list(w) for scene, w in config.default_model.never_train_on.items()}
    print("never_train_on:", stated)
    assert stated == evaluation_windows()
    assert config.model.family == "default" and config.model.architecture == "default-v1"
    assert config.validation.every == 0


def test_a_configuration_that_leaves_out_an_evaluation_region_is_refused(chips):
    windows = evaluation_windows()
    windows.pop("rmnp_rgb")
    config = parse_config({**_raw(default_sections(Path("/tmp/unused"))),
                           "default_model": {"never_train_on": windows}}, check_paths=False)
    listing = open_dataset("local", chips, "train")
    mixture = Mixture(pools=[Pool("k", "referring", len(listing.samples))],
                      samples={"k": listing.samples})
    with pytest.raises(ConfigError, match="never_train_on"):
        check_chip_regions(config, mixture)


def test_a_chip_from_an_evaluation_region_stops_the_run_before_training(chips):
    config = parse_config(_raw(default_sections(Path("/tmp/unused"))), check_paths=False)
    listing = open_dataset("local", chips, "train")
    check_chip_regions(config, Mixture([Pool("k", "referring", len(listing.samples))],
                                       {"k": listing.samples}))      # the built chips pass
    bad = listing.samples[0]
    bad.extra["chip"] = {**bad.extra["chip"], "scene": "sentinel2_coast",
                         "window": [100, 1390, 64, 64]}              # reaches row 1400
    with pytest.raises(ConfigError, match="not inside a training window"):
        check_chip_regions(config, Mixture([Pool("k", "referring", 1)], {"k": [bad]}))


@pytest.mark.parametrize("changes, key", [
    ({"model": {"family": "default", "architecture": "default-v9", "freeze": []}},
     "model.architecture"),
    ({"model": {"family": "default", "architecture": "tiny", "freeze": ["swin"]}},
     "model.freeze"),
    ({"lora": {"enabled": True}}, "lora.enabled"),
    ({"default_model": {"gsd_m": [2.0, 1.0]}}, "default_model.gsd_m"),
])
def test_default_model_configuration_errors_name_their_key(changes, key):
    sections = default_sections(Path("/tmp/unused"), **changes)
    with pytest.raises(ConfigError) as raised:
        parse_config(_raw(sections), check_paths=False)
    assert raised.value.key == key


def _raw(sections: dict) -> dict:
    raw = {name: {k: (str(v) if isinstance(v, Path) else v) for k, v in table.items()}
           for name, table in sections.items()}
    raw["datasets"] = [{"name": "local", "root": "/tmp/unused", "split": "train"}]
    return raw


# ------------------------------------------------------------------ prompts and flips

@pytest.mark.parametrize("axis", [0, 1])
def test_a_flip_keeps_the_click_on_its_pixel_and_the_box_around_its_object(axis):
    image = np.zeros((32, 48, 3), np.uint8)
    mask = np.zeros((32, 48), bool)
    mask[4:10, 30:40] = True
    prompt = ChipPrompt(text=None, points=np.array([[31.5, 5.5]], np.float32),
                        labels=np.array([1]), box=np.array([30, 4, 40, 10], np.float32))
    _, flipped_mask, flipped = flip_chip(image, mask, prompt, axis)
    col, row = flipped.points[0]
    assert flipped_mask[int(row), int(col)]
    c0, r0, c1, r1 = flipped.box.astype(int)
    assert c0 < c1 and r0 < r1
    inside = np.zeros_like(flipped_mask)
    inside[r0:r1, c0:c1] = True
    assert (inside == flipped_mask).all()


def test_prompts_of_different_point_counts_collate_with_padding():
    text = np.ones(384, np.float32)
    batch = collate_prompts("interactive", [
        ChipPrompt(text=None, points=np.array([[1, 2], [3, 4]], np.float32),
                   labels=np.array([1, 0]), box=None),
        ChipPrompt(text=text, points=np.zeros((0, 2), np.float32),
                   labels=np.zeros(0, np.int64), box=np.array([0, 0, 5, 5], np.float32))],
        text_dim=384)
    assert batch.points.shape == (2, 2, 2)
    assert batch.labels.tolist() == [[1, 0], [-1, -1]]
    assert batch.has_text.tolist() == [False, True] and batch.has_box.tolist() == [False, True]


# ------------------------------------------------------------------ real runs

def test_a_default_model_run_exports_a_folder_the_engine_serves(chips, tmp_path):
    config = write_config(tmp_path / "run.toml", default_sections(tmp_path / "out"),
                          [{"name": "local", "root": chips, "split": "train"}])
    done = run_trainer(config)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / "out" / "model"
    card = json.loads((folder / "model_card.json").read_text())
    print("classes:", card["classes"])
    assert {c["name"] for c in card["classes"]} == {"water", "vegetation", "cloud", "tree"}
    assert card["training"]["steps"] == 4
    assert card["training"]["never_train_on"] == evaluation_windows()
    loaded = load_default_model(folder)
    engine = DefaultEngine(loaded)
    rgb = np.full((64, 64, 3), 90, np.uint8)
    embedding = engine.encode(rgb)
    prediction = engine.decode(embedding, TilePrompt(task="referring", text="water"))
    assert prediction.mask.shape == (64, 64)


def test_a_default_model_run_resumed_midway_ends_bit_identical(chips, tmp_path):
    datasets = [{"name": "local", "root": chips, "split": "train"}]
    straight = write_config(tmp_path / "straight.toml", default_sections(tmp_path / "a"),
                            datasets)
    assert run_trainer(straight).returncode == 0
    half = write_config(tmp_path / "half.toml",
                        default_sections(tmp_path / "b", run={"max_steps": 2}), datasets)
    assert run_trainer(half).returncode == 0
    rest = write_config(tmp_path / "rest.toml", default_sections(tmp_path / "b"), datasets)
    resumed = run_trainer(rest)
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr
    weights = "model/default_model.safetensors"
    assert_bit_identical(tensors(tmp_path / "a" / weights), tensors(tmp_path / "b" / weights))


def write_user_chips(root: Path, class_name: str, instruction: str, count: int = 6,
                     size: int = 64) -> Path:
    """Chips of 'the analyst's own imagery' (no packaged scene): noise with one red square
    each, asked for by ``instruction`` (text) and by a click, in both splits."""
    from PIL import Image

    rng = np.random.default_rng(4)
    for split in ("train", "val"):
        (root / split).mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(count):
            image = (rng.random((size, size, 3)) * 120).astype(np.uint8)
            mask = np.zeros((size, size), bool)
            r, c = rng.integers(4, size - 24, 2)
            mask[r:r + 16, c:c + 16] = True
            image[mask] = (200, 40, 40)
            Image.fromarray(image).save(root / split / f"{i}.png")
            Image.fromarray(mask.astype(np.uint8) * 255).save(root / split / f"{i}-m.png")
            chip = {"scene": None, "window": [0, 0, size, size], "gsd_m": 0.5,
                    "crs": "EPSG:32633", "transform": [0.5, 0, 500000, 0, -0.5, 6000000]}
            base = {"image": f"{split}/{i}.png", "mask": f"{split}/{i}-m.png", "chip": chip}
            lines.append({**base, "id": f"{split}-{i}-text", "instruction": instruction,
                          "task": "referring", "target": "class",
                          "prompt": {"kind": "text", "class": class_name}})
            lines.append({**base, "id": f"{split}-{i}-click", "task": "interactive",
                          "instruction": "Please segment the region at the point.",
                          "target": "component",
                          "prompt": {"kind": "click", "class": class_name,
                                     "points": [[float(c) + 8.5, float(r) + 8.5]],
                                     "labels": [1]}})
        (root / f"{split}.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return root


def test_a_fine_tune_learns_a_new_class_and_records_its_score_before_and_after(chips,
                                                                               tmp_path):
    base_run = write_config(tmp_path / "base.toml", default_sections(tmp_path / "base"),
                            [{"name": "local", "root": chips, "split": "train"}])
    assert run_trainer(base_run).returncode == 0
    user = write_user_chips(tmp_path / "user", "red roofs", "the red roofs")
    sections = default_sections(
        tmp_path / "tuned", run={"max_steps": 6},
        model={"family": "default", "init": tmp_path / "base" / "model", "freeze": []},
        validation={"at_start": True, "batch_size": 4},
        default_model={"name": "red-roofs", "version": "1", "never_train_on": {}})
    sections["default_model"].pop("never_train_on")
    sections["model"].pop("architecture", None)
    config = write_config(tmp_path / "tune.toml", sections,
                          [{"name": "local", "root": user, "split": "train"}],
                          [{"name": "local", "root": user, "split": "val"}])
    done = run_trainer(config)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "tuned" / "validation" / "summary.json").read_text())
    print("held-out IoU before", summary["before"]["iou"], "after", summary["after"]["iou"])
    assert summary["before"]["count"] == summary["after"]["count"] == 12
    assert summary["before"]["step"] == 0 and summary["after"]["step"] == 6
    card = json.loads((tmp_path / "tuned" / "model" / "model_card.json").read_text())
    names = {c["name"]: c for c in card["classes"]}
    assert {"water", "vegetation", "cloud", "tree", "red roofs"} <= set(names)
    assert names["red roofs"]["phrases"] == ["the red roofs"]
    assert "phrases" not in names["water"]
    assert card["training"]["base_model"] == "default-test@0.0.1"
    engine = DefaultEngine(load_default_model(tmp_path / "tuned" / "model"))
    match = engine.vocabulary.match("segment the red roofs")
    assert getattr(match, "class_name", None) == "red roofs", match


def test_photometric_jitter_changes_the_look_but_not_the_shape_and_repeats_with_its_seed():
    from unigeoseg_trainer.default_family import photometric_jitter

    image = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    a = photometric_jitter(image, np.random.default_rng(5))
    b = photometric_jitter(image, np.random.default_rng(5))
    assert a.shape == image.shape and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, image)
    # a monotone change per band: the brighter of two pixels stays at least as bright
    order = np.argsort(image[..., 0].ravel())
    assert (np.diff(a[..., 0].ravel()[order].astype(int)) >= 0).all()


def test_photometric_jitter_is_refused_outside_the_default_model_family():
    sections = default_sections(Path("/tmp/unused"), augment={"photometric": 0.5})
    parse_config(_raw(sections), check_paths=False)           # the default family has it
    raw = _raw(sections)
    raw["model"] = {"architecture": "unigeoseg-tiny-sparseconv"}
    raw.pop("default_model")
    with pytest.raises(ConfigError) as raised:
        parse_config(raw, check_paths=False)
    assert raised.value.key == "augment.photometric"


def test_a_time_budget_ends_the_run_early_with_a_checkpoint_and_an_export(chips, tmp_path):
    sections = default_sections(tmp_path / "out", run={"max_steps": 500, "max_seconds": 0.001},
                                validation={"at_start": True})
    config = write_config(tmp_path / "run.toml", sections,
                          [{"name": "local", "root": chips, "split": "train"}],
                          [{"name": "local", "root": chips, "split": "val"}])
    done = run_trainer(config)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "time budget of 0.001 s reached at step 1" in done.stderr
    card = json.loads((tmp_path / "out" / "model" / "model_card.json").read_text())
    summary = json.loads((tmp_path / "out" / "validation" / "summary.json").read_text())
    print("steps", card["training"]["steps"], "after", summary["after"])
    assert card["training"]["steps"] == 1 and summary["after"]["step"] == 1
    assert (tmp_path / "out" / "checkpoints" / "step_00000001").is_dir()
