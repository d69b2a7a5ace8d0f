#!/usr/bin/env bash
# Debian's QGIS (PyQGIS for /usr/bin/python3, qgis_process from the desktop package) and a
# venv on top of it for the plugin tests.
#   bash scripts/setup_qgis_env.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-qgis}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
$SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
    python3-venv python3-qgis qgis-providers python3-zmq qgis >/dev/null
if [ ! -x "$VENV/bin/python" ]; then
    # Debian's Python refuses pip installs (PEP 668); a venv that sees its site-packages
    # keeps QGIS, PyQt, numpy and pyzmq from Debian and adds only the test tools.
    /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet pytest pytest-qgis pytest-qt pytest-timeout
QT_QPA_PLATFORM=offscreen "$VENV/bin/python" -c "import qgis.core, zmq; \
print('QGIS', qgis.core.Qgis.QGIS_VERSION, '| pyzmq', zmq.__version__)"
