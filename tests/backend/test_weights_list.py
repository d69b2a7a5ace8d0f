"""``unigeoseg weights list`` shows every model: SAM checkpoints, UniGeoSeg, the default model
(shipped or named by $UNIGEOSEG_DEFAULT_MODEL) and fine-tuned ones, in a tmp cache, with a tmp
folder standing in for the package's default-model weights."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from tests.backend.default_model_folders import save_tiny_default_model

from unigeoseg_backend import weights
from unigeoseg_backend.cli.weights import add_weights_parser
from unigeoseg_backend.default_model import weights_io
from unigeoseg_backend.default_model.weights_io import GsdRange

pytestmark = pytest.mark.timeout(60)

TRAINED = GsdRange(8.0, 12.0)


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path) -> Path:
    """A cache of its own, no model named by the environment, and the package's default-model
    folder moved to ``tmp_path/shipped`` (empty until a test writes one there)."""
    monkeypatch.setenv(weights.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(weights.MODEL_ENV, raising=False)
    monkeypatch.delenv("UNIGEOSEG_DEFAULT_MODEL", raising=False)
    shipped = tmp_path / "shipped"
    monkeypatch.setattr(weights_io, "shipped_weights_dir", lambda: shipped)
    return shipped


def listed(capsys) -> dict[str, str]:
    """The rows of ``weights list`` (below its two header lines) by the path in each (a
    folder's row is found by its folder, whatever name its card gives it)."""
    parser = argparse.ArgumentParser(prog="unigeoseg")
    add_weights_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["weights", "list"])
    assert args.func(args) == 0
    lines = capsys.readouterr().out.splitlines()[2:]
    # A row ends with its path, then "  (why it is unusable)" for a folder that cannot be used.
    return {line.split("  (")[0].split()[-1]: line for line in lines}


def test_the_shipped_default_model_shows_its_card_name_size_and_verified(isolated, capsys):
    save_tiny_default_model(isolated, "default-test", TRAINED)
    size = sum(f.stat().st_size for f in isolated.iterdir())
    row = {r.path: r for r in weights.status()}[isolated]
    assert (row.name, row.kind, row.downloaded, row.verified) == (
        "default-test@0.0.0", "default", True, True)
    assert row.size_bytes == size

    line = listed(capsys)[str(isolated)]
    assert line.split()[:2] == ["default-test@0.0.0", "*"]
    assert "installed" in line and "not installed" not in line and " yes " in line


def test_a_missing_shipped_folder_is_listed_as_not_installed(isolated, capsys):
    line = listed(capsys)[str(isolated)]
    assert line.startswith(weights.DEFAULT_MODEL_ROW) and "not installed" in line


def test_weights_that_do_not_match_their_card_are_listed_as_not_verified(isolated, capsys):
    save_tiny_default_model(isolated, "default-test", TRAINED)
    weights_file = isolated / "weights.safetensors"
    data = bytearray(weights_file.read_bytes())
    data[-1] ^= 0xFF
    weights_file.write_bytes(bytes(data))
    assert {r.path: r for r in weights.status()}[isolated].verified is False
    assert " no " in listed(capsys)[str(isolated)]


def test_an_invalid_card_is_listed_as_unusable_with_the_reason(isolated, capsys):
    save_tiny_default_model(isolated, "default-test", TRAINED)
    card = json.loads((isolated / "model_card.json").read_text())
    del card["gsd"]
    (isolated / "model_card.json").write_text(json.dumps(card))
    line = listed(capsys)[str(isolated)]
    assert "unusable" in line and "is not valid: missing 'gsd'" in line


def test_the_default_model_folder_the_environment_names_is_listed_and_marked(
        isolated, tmp_path, monkeypatch, capsys):
    save_tiny_default_model(isolated, "default-test", TRAINED)
    export = save_tiny_default_model(tmp_path / "run" / "model", "my-default", TRAINED)
    monkeypatch.setenv("UNIGEOSEG_DEFAULT_MODEL", str(export))
    rows = listed(capsys)
    assert rows[str(export)].split()[:2] == ["my-default@0.0.0", "*"]
    assert rows[str(isolated)].split()[1] != "*", "the package's model is not the one used"


def test_fine_tuned_models_and_a_unigeoseg_export_are_listed(tmp_path, monkeypatch, capsys):
    finetuned = save_tiny_default_model(weights.finetuned_dir() / "blue-roofs", "blue-roofs",
                                        TRAINED)
    cached = weights.models_dir() / "my-finetune"
    export = tmp_path / "run" / "model"       # the trainer's <output_dir>/model, not cached
    for folder in (cached, export):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"\0" * 1000)
    monkeypatch.setenv(weights.MODEL_ENV, str(export))
    rows = listed(capsys)

    assert rows[str(finetuned)].split()[0] == "blue-roofs"
    assert "default fine-tuned" in rows[str(finetuned)] and " yes " in rows[str(finetuned)]
    assert rows[str(cached)].split()[0] == "my-finetune"
    assert "UniGeoSeg (local)" in rows[str(cached)]
    assert rows[str(export)].split()[:2] == ["model", "*"]
    assert "UniGeoSeg (local)" in rows[str(export)]


def test_verify_checks_no_default_model_row(isolated, capsys):
    save_tiny_default_model(isolated, "default-test", TRAINED)
    parser = argparse.ArgumentParser(prog="unigeoseg")
    add_weights_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["weights", "verify"])
    assert args.func(args) == 0
    assert "nothing to verify" in capsys.readouterr().out
