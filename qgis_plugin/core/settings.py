"""Typed access to the plugin's settings, stored in QGIS's user profile (QgsSettings).

Every name says its unit. Settings saved by an earlier version under a name without its unit
(:data:`RENAMED`) are moved to the new name the first time they are loaded, so an analyst's
saved values are kept.

QGIS is imported only when no settings object is passed, so the rules here are tested without
QGIS (any object with ``value``, ``setValue``, ``contains`` and ``remove`` will do).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

PREFIX = "unigeoseg/"

#: Current name -> the name an earlier version saved the same setting under.
RENAMED = {
    "tile_size_px": "tile_px",
    "pixel_size_map_units": "ground_resolution",
    "simplify_map_units": "simplify",
    "min_area_square_map_units": "min_area",
}


@dataclass
class PluginSettings:
    """Everything the analyst can set; defaults apply until they change them."""

    backend_address: str = "tcp://127.0.0.1:5557"
    backend_python: str = ""          # a Python (or venv) with the backend; "" = don't start one
    backend_args: str = ""            # extra `unigeoseg serve` arguments, e.g. --sam-checkpoint
    request_timeout_s: float = 120.0
    tile_size_px: int = 1024          # side of the click window and of text tiles
    pixel_size_map_units: float = 0.0  # of the tiles sent; 0 = native (files) / canvas (online)
    simplify_map_units: float = 0.0   # simplification tolerance, map units of the tile CRS
    min_area_square_map_units: float = 0.0  # smallest polygon kept, tile CRS
    # CURVE authentication, for a backend that listens beyond this machine (both or neither):
    curve_server_public_file: str = ""  # the backend's public certificate (server.key)
    curve_client_secret_file: str = ""  # this analyst's certificate with its secret key

    @classmethod
    def load(cls, settings: Any = None) -> PluginSettings:
        """The saved settings (``settings``: a QgsSettings; by default the profile's)."""
        settings = settings if settings is not None else _qgs_settings()
        migrate(settings)
        values = {}
        for f in fields(cls):
            default = f.default
            raw = settings.value(PREFIX + f.name, default)
            try:
                values[f.name] = type(default)(raw)
            except (TypeError, ValueError):
                values[f.name] = default  # a hand-edited or corrupt value: fall back
        return cls(**values)

    def save(self, settings: Any = None) -> None:
        settings = settings if settings is not None else _qgs_settings()
        for f in fields(self):
            settings.setValue(PREFIX + f.name, getattr(self, f.name))


def migrate(settings: Any) -> None:
    """Move values saved under an old name (:data:`RENAMED`) to the current one; a value
    already saved under the current name wins."""
    for name, old in RENAMED.items():
        if not settings.contains(PREFIX + old):
            continue
        if not settings.contains(PREFIX + name):
            settings.setValue(PREFIX + name, settings.value(PREFIX + old))
        settings.remove(PREFIX + old)


def _qgs_settings():
    from qgis.core import QgsSettings

    return QgsSettings()
