"""Structured logs: one JSON object per line, carrying the request id and op when there is one."""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

#: ``extra=`` keys copied into the JSON line when present.
CONTEXT_KEYS = ("request_id", "op", "client", "code", "elapsed_ms", "engine", "image_id",
                "queue", "address", "model")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                    timespec="milliseconds"),
                "level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        for key in CONTEXT_KEYS:
            if hasattr(record, key):
                line[key] = getattr(record, key)
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(level: str = "INFO") -> None:
    """Send JSON lines to stderr (the plugin shows them in its log tab)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
