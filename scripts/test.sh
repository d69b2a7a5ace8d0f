#!/usr/bin/env bash
# Set up everything the test suite needs on Debian 12, then run it all:
#   tests/protocol, tests/backend  in the backend venv (.venv)
#   tests/qgis                     in Debian's QGIS Python (.venv-qgis), against a real backend
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_qgis_env.sh .venv-qgis
bash scripts/setup_backend.sh .venv "[test]"
mkdir -p artifacts
.venv/bin/python -m pytest tests/protocol tests/backend tests/model -p no:cacheprovider
QT_QPA_PLATFORM=offscreen UNIGEOSEG_BACKEND_PYTHON="$PWD/.venv/bin/python" \
    .venv-qgis/bin/python -m pytest tests/qgis -p no:cacheprovider
