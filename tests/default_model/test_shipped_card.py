"""The shipped default model's folder: its weights load (digest checked), fit the size
budget, and its card says what the model is, what it was trained on and never trained on,
under which licences, what it measured and what it cannot do."""

from __future__ import annotations

from unigeoseg_backend.default_model import regions
from unigeoseg_backend.default_model.weights_io import load_default_model, shipped_weights_dir

MAX_WEIGHTS_BYTES = 25 * 2**20


def test_the_shipped_weights_load_and_fit_the_size_budget():
    loaded = load_default_model(shipped_weights_dir())
    size = (shipped_weights_dir() / loaded.card.weights_file).stat().st_size
    print(loaded.card.model_id, size, "bytes")
    assert size <= MAX_WEIGHTS_BYTES
    assert {c.name for c in loaded.card.classes} == {"water", "vegetation", "cloud", "tree"}


def test_the_card_names_its_data_licences_regions_quality_and_limits():
    card = load_default_model(shipped_weights_dir()).card
    training = card.training
    evaluation = {r.scene: [int(r.window.col_off), int(r.window.row_off), int(r.window.width),
                            int(r.window.height)]
                  for r in regions.REGIONS if r.role == "evaluation"}
    assert training["never_train_on"] == evaluation
    assert training["rebuild"] == "bash scripts/build_default_model.sh"
    assert all("licence" in entry for entry in training["data"].values())
    assert set(training["data"]) >= {"sentinel2_coast", "landsat8_cloudy",
                                     "yell_528000_4978000", "text_encoder"}
    assert training["seed"] and training["steps"] > 0
    assert any(name.startswith("sentinel2_coast | water") for name in card.metrics)
    assert len(card.limits) >= 4
