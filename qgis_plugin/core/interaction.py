"""The interactive path's decisions, as pure logic (no Qt, no canvas), so they are tested on
their own; ``controller.py`` does the I/O (reading tiles, requests, rubber bands) and asks
:class:`Interaction` what to do.

- Window reuse: the tile (and so the backend's cached embedding) is kept while later clicks
  stay inside it.
- Coalescing: one ``segment`` request at a time; clicks made while one is out, or while the
  tile is still being encoded, are sent together in one request once it answers.
- Text runs: the tiles of a text prompt answer one by one; their polygons show as they come,
  and once all have answered they are merged across the seams. An engine message shows once
  per run, however many tiles carry it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..unigeoseg_protocol.errors import ErrorCode
from .messages import DistinctMessages
from .session import PromptSession
from .tiles import TileWindow

#: A click this close to a window edge gets a new window centred on it (context matters).
EDGE_MARGIN_PX = 32

FeatureCollection = dict[str, Any]


@dataclass
class TextRun:
    """One text prompt over several tiles: their results so far, and how many are still out.

    Attributes:
        pending: tiles not answered yet.
        tiles: (FeatureCollection, core) of each tile answered, the core being what
            ``merge`` clips the tile's polygons to.
        messages: the engine messages shown for the run (each once, not once per tile).
    """

    pending: int
    tiles: list[tuple[FeatureCollection, Any]] = field(default_factory=list)
    messages: DistinctMessages = field(default_factory=DistinctMessages)

    def tile_done(self, collection: FeatureCollection | None, core: Any = None) -> None:
        """A tile answered (``collection``) or failed (None)."""
        self.pending -= 1
        if collection is not None:
            self.tiles.append((collection, core))

    def preview(self, merge: Callable[[list[tuple[FeatureCollection, Any]]], FeatureCollection]
                ) -> FeatureCollection | None:
        """What to show: the tiles' polygons as they are, merged once every tile answered
        (``merge``, e.g. ``results.merge_tile_results``); None before any tile answered."""
        if not self.tiles:
            return None
        if self.pending == 0:
            return merge(self.tiles)
        first, _ = self.tiles[0]
        return {**first, "features": [f for tile, _ in self.tiles for f in tile["features"]]}


class Interaction:
    """The state of the interactive path: the prompt session, the request in flight, and the
    text run under way.

    Attributes:
        session: the prompts of the current object and the window they are on.
        in_flight: id of the ``segment`` request out, or None.
        resend: prompts changed since the request in flight (or the tile upload) was sent.
        text_run: the text prompt whose tiles are still answering, or None.
    """

    def __init__(self) -> None:
        self.session = PromptSession()
        self.in_flight: str | None = None
        self.resend = False
        self.text_run: TextRun | None = None

    # ------------------------------------------------------------------ windows

    def keeps_window(self, x: float, y: float) -> bool:
        """Whether a click at (x, y) (the current window's CRS) stays on the current window.

        A first click near the edge gets a window centred on it; later clicks on the same
        object stay on its window wherever they fall inside it (a window at the raster's
        border cannot be centred anyway)."""
        window = self.session.window
        if window is None:
            return False
        margin = EDGE_MARGIN_PX if self.session.is_empty else 0.0
        return window.contains(x, y, margin)

    def move_to(self, window: TileWindow | None) -> None:
        """Prompts go to another window (None: text results, tied to no window); the
        backend has no image id for it yet."""
        self.session.new_window(window)

    def image_ready(self, window: TileWindow, image_id: str) -> bool:
        """The backend encoded ``window``; True when prompts wait for it (segment now)."""
        if self.session.window is not window:
            return False  # the analyst moved on to another window meanwhile
        self.session.image_id = image_id
        if self.resend or not self.session.is_empty:
            self.resend = False
            return True
        return False

    def image_failed(self, window: TileWindow) -> None:
        """Encoding ``window`` failed: the next click uploads a window again."""
        if self.session.window is window:
            self.session.window = None
            self.resend = False

    # ------------------------------------------------------------------ segment requests

    def segment_wanted(self) -> bool:
        """Whether to send a ``segment`` request for the current prompts now (then call
        :meth:`segment_sent`); False when it must wait for the tile or the request in flight
        (it is sent when they answer) or when there is nothing to segment."""
        if self.session.image_id is None or self.in_flight is not None:
            self.resend = True
            return False
        if self.session.is_empty:
            return False
        self.resend = False
        return True

    def segment_sent(self, request_id: str) -> None:
        self.in_flight = request_id

    def segment_answered(self, object_key: str, collection: FeatureCollection) -> bool:
        """The answer to the prompts of ``object_key``: it becomes the session's result
        (True), unless the prompts changed meanwhile (undo, accept, clear: False, stale).
        Either way, :attr:`resend` then says whether to send the newer prompts."""
        self.in_flight = None
        if object_key != self.session.object_key:
            return False
        self.session.result = collection
        return True

    def segment_failed(self, code: str) -> None:
        self.in_flight = None
        if code == ErrorCode.UNKNOWN_IMAGE:
            # The backend no longer has the image (restarted, or evicted): the next click
            # uploads the window again.
            self.session.window = None

    # ------------------------------------------------------------------ objects

    def start_text_run(self, tiles: int) -> TextRun:
        """A text prompt over ``tiles`` tiles replaces the current prompts."""
        self.move_to(None)
        self.text_run = TextRun(pending=tiles)
        return self.text_run

    def text_tile_done(self, run: TextRun, collection: FeatureCollection | None, core: Any,
                       merge: Callable[[list[tuple[FeatureCollection, Any]]],
                                       FeatureCollection]) -> bool:
        """A tile of ``run`` answered (or failed: None); False when the run is no longer the
        current one (a newer text prompt, or its result was accepted or cleared)."""
        if run is not self.text_run:
            return False
        run.tile_done(collection, core)
        preview = run.preview(merge)
        if preview is not None:
            self.session.result = preview
        return True

    def accepted(self) -> None:
        """The previewed result was written: start a new object on the same window (tiles
        of a text run still on their way belong to the accepted result)."""
        self.text_run = None
        self.session.next_object()

    def clear(self) -> str | None:
        """Esc: forget the current object's prompts; returns the request to cancel, if any."""
        request_id, self.in_flight = self.in_flight, None
        self.resend = False
        self.text_run = None
        self.session.next_object()
        return request_id
