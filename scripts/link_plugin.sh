#!/usr/bin/env bash
# Install the plugin for development: edits in the repository take effect in QGIS without
# rebuilding a zip (use the "Plugin Reloader" plugin, or restart QGIS).
#
#   bash scripts/link_plugin.sh [PROFILE_PLUGINS_DIR]
#
# PROFILE_PLUGINS_DIR defaults to the default profile's plugin folder:
#   Linux  ~/.local/share/QGIS/QGIS3/profiles/default/python/plugins  (or $XDG_DATA_HOME/...)
#   macOS  ~/Library/Application Support/QGIS/QGIS3/profiles/default/python/plugins
# (QGIS shows a profile's folder under Settings > User Profiles > Open Active Profile Folder.)
#
# How: QGIS needs a folder named unigeoseg_qgis holding the package *and* metadata.txt,
# LICENSE and icons/, which live at the repository root, outside qgis_plugin/. Linking
# qgis_plugin/ itself as unigeoseg_qgis would lack them, and putting them into qgis_plugin/
# would duplicate them in the repository. So this creates a real folder
#   PROFILE_PLUGINS_DIR/unigeoseg_qgis/
# whose entries are all symbolic links (absolute) into the repository: one per entry of
# qgis_plugin/ (files and subpackages, the unigeoseg_protocol link included) plus
# metadata.txt, LICENSE and icons. Python imports the package from that folder, so the
# relative imports work exactly as in the installed zip; changes to linked files and to files
# inside linked subfolders are live. Re-run the script after adding or removing a top-level
# entry of qgis_plugin/: it is idempotent, replaces every link and removes links whose
# target is gone. Python writes __pycache__/ into the folder; that is harmless.
#
# It never deletes real files: if PROFILE_PLUGINS_DIR/unigeoseg_qgis is an installed copy
# (e.g. from the plugin manager or the zip), it stops and asks you to remove it first. An
# old-style link of the whole folder is replaced.
#
# Alternative without touching the profile: build such a folder anywhere, e.g.
#   bash scripts/link_plugin.sh /tmp/unigeoseg-dev && QGIS_PLUGINPATH=/tmp/unigeoseg-dev qgis
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
NAME="unigeoseg_qgis"

if [ "$#" -gt 1 ]; then
    echo "usage: $0 [PROFILE_PLUGINS_DIR]" >&2
    exit 2
fi
if [ "$#" -eq 1 ]; then
    PLUGINS_DIR="$1"
elif [ "$(uname -s)" = "Darwin" ]; then
    PLUGINS_DIR="$HOME/Library/Application Support/QGIS/QGIS3/profiles/default/python/plugins"
else
    PLUGINS_DIR="${XDG_DATA_HOME:-$HOME/.local/share}/QGIS/QGIS3/profiles/default/python/plugins"
fi

for required in qgis_plugin/__init__.py metadata.txt LICENSE icons; do
    if [ ! -e "$REPO/$required" ]; then
        echo "link_plugin: missing $REPO/$required" >&2
        exit 1
    fi
done
for entry in metadata.txt LICENSE icons; do
    if [ -e "$REPO/qgis_plugin/$entry" ] || [ -L "$REPO/qgis_plugin/$entry" ]; then
        echo "link_plugin: qgis_plugin/$entry would clash with the repository's $entry" >&2
        exit 1
    fi
done

mkdir -p "$PLUGINS_DIR"
PLUGINS_DIR="$(cd "$PLUGINS_DIR" && pwd -P)"
DEST="$PLUGINS_DIR/$NAME"

if [ -L "$DEST" ]; then
    rm "$DEST"                      # a link of the whole folder (older setup): replace it
elif [ -e "$DEST" ] && [ ! -d "$DEST" ]; then
    echo "link_plugin: $DEST exists and is not a folder; remove it first" >&2
    exit 1
elif [ -d "$DEST" ]; then
    # Only a folder made by this script may be refreshed: links and __pycache__, nothing else.
    for entry in "$DEST"/* "$DEST"/.[!.]*; do
        [ -e "$entry" ] || [ -L "$entry" ] || continue
        if [ ! -L "$entry" ] && [ "$(basename "$entry")" != "__pycache__" ]; then
            echo "link_plugin: $DEST holds real files (an installed copy?): remove it first" >&2
            exit 1
        fi
    done
fi
mkdir -p "$DEST"

# Drop every old link (stale ones included), then link the current entries.
find "$DEST" -mindepth 1 -maxdepth 1 -type l -delete
shopt -s nullglob
for entry in "$REPO"/qgis_plugin/*; do
    base="$(basename "$entry")"
    case "$base" in
        __pycache__|*.pyc|*.pyo|tests|test|conftest.py) continue ;;
    esac
    ln -s "$entry" "$DEST/$base"
done
for entry in metadata.txt LICENSE icons; do
    ln -s "$REPO/$entry" "$DEST/$entry"
done

echo "$DEST"
