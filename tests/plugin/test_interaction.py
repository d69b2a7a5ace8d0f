"""The interactive path's decisions (``core.interaction``) without a canvas: window reuse,
coalescing of clicks, stale answers, text runs."""

from __future__ import annotations

from qgis_plugin.core.interaction import EDGE_MARGIN_PX, Interaction
from qgis_plugin.core.tiles import TileWindow

WINDOW = TileWindow("EPSG:32633", 0.0, 0.0, 1.0, 256, 256)


def _collection(*names):
    return {"type": "FeatureCollection", "features": [{"properties": {"n": n}} for n in names]}


def _on_window() -> Interaction:
    interaction = Interaction()
    interaction.move_to(WINDOW)
    return interaction


def test_a_first_click_near_the_edge_gets_a_new_window_later_clicks_keep_it():
    interaction = Interaction()
    assert not interaction.keeps_window(10.0, -10.0)  # no window yet
    interaction.move_to(WINDOW)
    assert interaction.keeps_window(128.0, -128.0)
    assert not interaction.keeps_window(EDGE_MARGIN_PX - 1.0, -128.0)
    interaction.session.add_point(128.0, -128.0, 1)
    assert interaction.keeps_window(EDGE_MARGIN_PX - 1.0, -128.0)  # same object: kept
    assert not interaction.keeps_window(-1.0, -128.0)


def test_clicks_while_encoding_are_sent_together_once_the_tile_is_ready():
    interaction = _on_window()
    interaction.session.add_point(100.0, -100.0, 1)
    assert not interaction.segment_wanted()  # no image id yet
    interaction.session.add_point(110.0, -100.0, 0)
    assert not interaction.segment_wanted()
    assert interaction.image_ready(WINDOW, "image-1")
    assert interaction.session.image_id == "image-1"
    assert interaction.segment_wanted()
    interaction.segment_sent("request-1")
    assert interaction.session.prompt().labels == (1, 0)


def test_an_encoded_tile_the_analyst_left_is_ignored_and_a_failed_one_is_dropped():
    interaction = _on_window()
    other = TileWindow("EPSG:32633", 0.0, 0.0, 1.0, 256, 256, col0=1000)
    interaction.move_to(other)
    assert not interaction.image_ready(WINDOW, "old")
    assert interaction.session.image_id is None
    interaction.image_failed(WINDOW)
    assert interaction.session.window is other
    interaction.image_failed(other)
    assert interaction.session.window is None


def test_clicks_while_a_request_is_out_are_coalesced_into_one_more_request():
    interaction = _on_window()
    interaction.image_ready(WINDOW, "image-1")
    interaction.session.add_point(100.0, -100.0, 1)
    assert interaction.segment_wanted()
    key = interaction.session.object_key
    interaction.segment_sent("request-1")
    for x in (110.0, 120.0):
        interaction.session.add_point(x, -100.0, 1)
        assert not interaction.segment_wanted()
    assert interaction.segment_answered(key, _collection("a"))
    assert interaction.session.result == _collection("a") and interaction.resend
    assert interaction.segment_wanted()  # one request with all three points
    assert not interaction.resend


def test_an_answer_to_prompts_that_changed_is_stale():
    interaction = _on_window()
    interaction.image_ready(WINDOW, "image-1")
    interaction.session.add_point(100.0, -100.0, 1)
    interaction.segment_wanted()
    key = interaction.session.object_key
    interaction.segment_sent("request-1")
    interaction.session.undo()  # a new object key
    assert not interaction.segment_answered(key, _collection("stale"))
    assert interaction.session.result is None and interaction.in_flight is None


def test_clear_returns_the_request_to_cancel_and_unknown_images_are_uploaded_again():
    interaction = _on_window()
    interaction.image_ready(WINDOW, "image-1")
    interaction.session.add_point(100.0, -100.0, 1)
    interaction.segment_wanted()
    interaction.segment_sent("request-1")
    assert interaction.clear() == "request-1"
    assert interaction.clear() is None and interaction.session.is_empty
    interaction.segment_failed("unknown_image")
    assert interaction.session.window is None


def test_a_text_run_shows_tiles_as_they_come_and_merges_once_all_answered():
    interaction = _on_window()
    merged = []

    def merge(tiles):
        merged.append(list(tiles))
        return _collection("merged")

    run = interaction.start_text_run(3)
    assert interaction.session.window is None  # text results belong to no click window
    assert interaction.text_tile_done(run, _collection("a"), "core-a", merge)
    assert interaction.text_tile_done(run, None, None, merge)  # a failed tile
    assert interaction.session.result["features"] == _collection("a")["features"]
    assert not merged
    assert interaction.text_tile_done(run, _collection("b", "c"), "core-b", merge)
    assert run.pending == 0 and interaction.session.result == _collection("merged")
    assert merged == [[(_collection("a"), "core-a"), (_collection("b", "c"), "core-b")]]


def test_tiles_of_a_run_that_was_replaced_or_accepted_are_ignored():
    interaction = Interaction()
    old = interaction.start_text_run(2)
    new = interaction.start_text_run(1)
    assert not interaction.text_tile_done(old, _collection("old"), None, lambda t: t)
    assert interaction.session.result is None
    interaction.accepted()
    assert not interaction.text_tile_done(new, _collection("late"), None, lambda t: t)
    assert interaction.session.result is None


def test_a_text_run_shows_each_distinct_engine_message_once():
    run = Interaction().start_text_run(4)
    said = ["did not understand 'planes'", "did not understand 'planes'", "",
            "segmented at its own resolution", "did not understand 'planes'"]
    assert [m for m in said if run.messages.is_new(m)] == [
        "did not understand 'planes'", "segmented at its own resolution"]
    assert Interaction().start_text_run(1).messages.is_new("did not understand 'planes'")
