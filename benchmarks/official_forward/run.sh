#!/usr/bin/env bash
# Rebuild tests/model/data/official_forward_tiny.npz: our seeded release folder -> the OFFICIAL
# UniGeoSeg eval forward (own venv) -> compared with ours -> the golden file. See README.md.
#
#   OFFICIAL_SRC=/path/to/MiliLab/UniGeoSeg(.git) benchmarks/official_forward/run.sh [WORK]
#
# OFFICIAL_SRC: a clone (or bare mirror) of https://github.com/MiliLab/UniGeoSeg holding
# commit 73abc28. WORK (default /tmp/official-forward) keeps the venv between runs.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
HERE="$REPO/benchmarks/official_forward"
WORK=$(mkdir -p "${1:-/tmp/official-forward}" && cd "${1:-/tmp/official-forward}" && pwd)
OFFICIAL_SRC=${OFFICIAL_SRC:?set OFFICIAL_SRC to a clone of MiliLab/UniGeoSeg}
COMMIT=73abc28f1c41e314813f64895b172cb7564b7e0a

rm -rf "$WORK/official" "$WORK/bench"
mkdir -p "$WORK/official"
git -C "$OFFICIAL_SRC" archive "$COMMIT" | tar -x -C "$WORK/official"

if [ ! -x "$WORK/venv/bin/python" ]; then
    python3 -m venv "$WORK/venv"
    "$WORK/venv/bin/pip" install -r "$HERE/requirements-official.txt"
fi

cd "$REPO"
HF_HUB_OFFLINE=1 .venv/bin/python "$HERE/make_release.py" "$WORK"
(cd "$WORK/official" && PYTHONPATH="$WORK/official" \
    "$WORK/venv/bin/python" "$HERE/run_official.py" "$WORK")
HF_HUB_OFFLINE=1 .venv/bin/python "$HERE/compare.py" "$WORK" --write
