"""Plugin settings: names with units, values saved under the old names kept."""

from __future__ import annotations

from qgis_plugin.core.settings import PREFIX, RENAMED, PluginSettings


class FakeSettings:
    """The part of QgsSettings the plugin uses, over a dict."""

    def __init__(self, values=None):
        self.values = dict(values or {})

    def value(self, key, default=None):
        return self.values.get(key, default)

    def setValue(self, key, value):  # noqa: N802 - QgsSettings API
        self.values[key] = value

    def contains(self, key):
        return key in self.values

    def remove(self, key):
        self.values.pop(key, None)


def test_values_saved_under_the_old_names_are_loaded_and_moved():
    # QgsSettings returns strings for values written by an earlier session.
    saved = FakeSettings({PREFIX + "tile_px": "512", PREFIX + "ground_resolution": "0.25",
                          PREFIX + "simplify": "1.5", PREFIX + "min_area": "4",
                          PREFIX + "request_timeout_s": "30"})
    settings = PluginSettings.load(saved)
    assert settings.tile_size_px == 512 and settings.pixel_size_map_units == 0.25
    assert settings.simplify_map_units == 1.5 and settings.min_area_square_map_units == 4.0
    assert settings.request_timeout_s == 30.0
    assert not any(saved.contains(PREFIX + old) for old in RENAMED.values())
    assert PluginSettings.load(saved) == settings


def test_a_value_under_the_new_name_wins_over_a_stale_old_one():
    saved = FakeSettings({PREFIX + "tile_px": "512", PREFIX + "tile_size_px": "2048"})
    assert PluginSettings.load(saved).tile_size_px == 2048
    assert not saved.contains(PREFIX + "tile_px")


def test_save_then_load_round_trips_and_corrupt_values_fall_back_to_defaults():
    store = FakeSettings()
    PluginSettings(tile_size_px=640, backend_address="tcp://127.0.0.1:6000").save(store)
    loaded = PluginSettings.load(store)
    assert loaded.tile_size_px == 640 and loaded.backend_address == "tcp://127.0.0.1:6000"
    store.setValue(PREFIX + "tile_size_px", "not a number")
    assert PluginSettings.load(store).tile_size_px == PluginSettings().tile_size_px
