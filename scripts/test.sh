#!/usr/bin/env bash
# Set up everything the test suite needs on Debian 12, then check and test it all:
#   lint           ruff over the repository, mypy on the protocol and geo packages (seconds,
#                  before the tests)
#   tests/protocol, tests/backend, tests/model, tests/trainer, tests/default_model   in the
#                  backend venv (.venv)
#   tests/qgis     in Debian's QGIS Python (.venv-qgis), against a real backend
# Stops at the first failing step with its exit code.
set -euo pipefail
cd "$(dirname "$0")/.."
# QGIS's set-up goes first: its apt step also installs python3-venv, which the backend's needs.
bash scripts/setup_qgis_env.sh .venv-qgis
bash scripts/setup_backend.sh .venv "[test,lint]"
.venv/bin/ruff check .
.venv/bin/mypy              # which files, and how: pyproject.toml, [tool.mypy]
.venv/bin/python -m pytest tests/protocol tests/backend tests/model tests/trainer \
    tests/default_model -p no:cacheprovider
.venv/bin/python -m pytest tests/plugin -p no:cacheprovider  # the plugin's pure logic
QT_QPA_PLATFORM=offscreen UNIGEOSEG_BACKEND_PYTHON="$PWD/.venv/bin/python" \
    .venv-qgis/bin/python -m pytest tests/qgis -p no:cacheprovider
