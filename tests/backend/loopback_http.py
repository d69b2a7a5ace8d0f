"""A threaded HTTP server on 127.0.0.1 for download tests, stopped when the block ends."""

from __future__ import annotations

import http.server
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class QuietHandler(http.server.BaseHTTPRequestHandler):
    """HTTP/1.1 handler base that keeps test output clean."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        pass

    def send_file_body(self, body: bytes, *, honor_range: bool = True,
                       cut_after: int | None = None) -> None:
        """Answer with ``body`` as a file server does: 206 from the ``Range: bytes=N-`` offset
        (416 past the end), or 200 when there is no range or ``honor_range`` is False. With
        ``cut_after`` the whole length is promised, that many bytes sent, and the connection
        dropped."""
        start = 0
        range_header = self.headers.get("Range")
        if range_header and honor_range:
            match = re.fullmatch(r"bytes=(\d+)-", range_header)
            assert match, range_header
            start = int(match.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        chunk = body[start:]
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(chunk)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if cut_after is not None:
            self.wfile.write(chunk[:cut_after])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(chunk)


def without_proxies(monkeypatch) -> None:
    """Clear the proxy variables for a test: a proxy would swallow requests to 127.0.0.1."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")


@contextmanager
def serving(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serve ``handler`` on a free loopback port; yields the base URL (no trailing slash)."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
        assert not thread.is_alive()
