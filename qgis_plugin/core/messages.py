"""Engine messages shown once each: a prompt the default model does not understand, or an
assumption it made, comes back on every tile of a run, and the analyst needs it once."""

from __future__ import annotations


class DistinctMessages:
    """The engine messages a run has shown so far."""

    def __init__(self) -> None:
        self.shown: list[str] = []

    def is_new(self, message: str) -> bool:
        """Whether ``message`` is to be shown: not empty and not shown before in this run
        (it is then counted as shown)."""
        if not message or message in self.shown:
            return False
        self.shown.append(message)
        return True
