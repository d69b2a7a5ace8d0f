"""Typed access to the plugin's settings, stored in QGIS's user profile (QgsSettings)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from qgis.core import QgsSettings

PREFIX = "unigeoseg/"


@dataclass
class PluginSettings:
    """Everything the analyst can set; defaults apply until they change them."""

    backend_address: str = "tcp://127.0.0.1:5557"
    backend_python: str = ""          # a Python (or venv) with the backend; "" = don't start one
    backend_args: str = ""            # extra `unigeoseg serve` arguments, e.g. --sam-checkpoint
    request_timeout_s: float = 120.0
    tile_px: int = 1024               # side of the click window, in pixels
    ground_resolution: float = 0.0    # map units per pixel; 0 = native (files) / canvas (online)
    simplify: float = 0.0             # map units of the tile CRS
    min_area: float = 0.0             # square map units of the tile CRS
    # CURVE authentication, for a backend that listens beyond this machine (both or neither):
    curve_server_public_file: str = ""  # the backend's public certificate (server.key)
    curve_client_secret_file: str = ""  # this analyst's certificate with its secret key

    @classmethod
    def load(cls, settings: QgsSettings | None = None) -> PluginSettings:
        settings = settings or QgsSettings()
        values = {}
        for f in fields(cls):
            default = f.default
            raw = settings.value(PREFIX + f.name, default)
            try:
                values[f.name] = type(default)(raw)
            except (TypeError, ValueError):
                values[f.name] = default  # a hand-edited or corrupt value: fall back
        return cls(**values)

    def save(self, settings: QgsSettings | None = None) -> None:
        settings = settings or QgsSettings()
        for f in fields(self):
            settings.setValue(PREFIX + f.name, getattr(self, f.name))
