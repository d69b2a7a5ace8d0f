"""Tests of unigeoseg_backend.weights against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs
import pytest
from tests.backend.loopback_http import QuietHandler, serving, without_proxies

from unigeoseg_backend import weights
from unigeoseg_backend.cli.weights import add_weights_parser
from unigeoseg_backend.errors import WeightsError
from unigeoseg_backend.weights import WeightSpec

pytestmark = pytest.mark.timeout(60)

NAME = "test_tiny"
FILENAME = "test_tiny.bin"
PAYLOAD = os.urandom(300 * 1024 + 17)  # odd size so off-by-one errors show
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()
CUT = 100_003  # bytes the "flaky" server sends before hanging up
TIMEOUT_S = 10


@dataclass
class ServerState:
    """What the handler serves and what it saw; tests tweak it before downloading."""

    files: dict[str, bytes]
    honor_range: bool = True
    cut_first_after: int | None = None  # first GET sends only this many body bytes
    base_url: str = ""
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(QuietHandler):
    state: ServerState  # set on a per-server subclass

    def do_GET(self):  # noqa: N802 - http.server naming
        state = self.state
        range_header = self.headers.get("Range")
        with state.lock:
            first = not state.requests
            state.requests.append((self.path, range_header))
        body = state.files.get(self.path.lstrip("/"))
        if body is None:
            self.send_error(404, "Not Found")
            return
        cut = state.cut_first_after if first else None
        self.send_file_body(body, honor_range=state.honor_range, cut_after=cut)


@pytest.fixture
def server():
    state = ServerState(files={FILENAME: PAYLOAD})
    with serving(type("Handler", (_Handler,), {"state": state})) as base_url:
        state.base_url = base_url
        yield state


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """Cache in tmp_path, no proxies (they would swallow 127.0.0.1), no mirror override."""
    monkeypatch.setenv("UNIGEOSEG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("UNIGEOSEG_WEIGHTS_BASE_URL", raising=False)
    without_proxies(monkeypatch)


def register(monkeypatch, server, **overrides) -> WeightSpec:
    """Put a spec for the served test file into the registry (undone after the test)."""
    values = dict(name=NAME, url=f"{server.base_url}/{FILENAME}", filename=FILENAME,
                  size_bytes=len(PAYLOAD), sha256=PAYLOAD_SHA256, sam_type="vit_b")
    values.update(overrides)
    spec = WeightSpec(**values)
    monkeypatch.setitem(weights.REGISTRY, spec.name, spec)
    return spec


def cached(name: str = FILENAME) -> Path:
    return weights.cache_dir() / name


def part_of(path: Path) -> Path:
    return path.with_name(path.name + ".part")


# --------------------------------------------------------------------------- registry, paths


def test_official_registry_entries():
    assert set(weights.REGISTRY) >= {"sam_vit_b", "sam_vit_l", "sam_vit_h"}
    sizes = {"sam_vit_b": 375042383, "sam_vit_l": 1249524607, "sam_vit_h": 2564550879}
    for name, size in sizes.items():
        spec = weights.REGISTRY[name]
        assert spec.url == f"https://dl.fbaipublicfiles.com/segment_anything/{spec.filename}"
        assert spec.size_bytes == size
        assert spec.sam_type == name.removeprefix("sam_")
        assert spec.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", spec.sha256)


def test_cache_dir_env_and_default(monkeypatch, tmp_path):
    assert weights.cache_dir() == tmp_path / "cache" / "weights"
    monkeypatch.delenv("UNIGEOSEG_CACHE_DIR")
    assert weights.cache_dir() == Path(platformdirs.user_cache_dir("unigeoseg")) / "weights"


def test_unknown_name_lists_known_names():
    with pytest.raises(WeightsError, match="sam_vit_b"):
        weights.download("sam_vit_x", progress=False)


# --------------------------------------------------------------------------- download


def test_fresh_download_verifies_and_is_reused(monkeypatch, server):
    register(monkeypatch, server)
    path = weights.download(NAME, progress=False, timeout_s=TIMEOUT_S)
    assert path == cached()
    assert path.read_bytes() == PAYLOAD
    assert not part_of(path).exists()
    assert server.requests == [(f"/{FILENAME}", None)]
    assert weights.verify(NAME).ok

    # Already present and valid: no second request.
    assert weights.download(NAME, progress=False, timeout_s=TIMEOUT_S) == path
    assert len(server.requests) == 1


def test_download_with_progress_bar_and_small_chunks(monkeypatch, server, tmp_path):
    register(monkeypatch, server)
    dest = tmp_path / "elsewhere"
    path = weights.download(NAME, dest_dir=dest, progress=True, chunk_bytes=4096,
                            timeout_s=TIMEOUT_S)
    assert path == dest / FILENAME
    assert path.read_bytes() == PAYLOAD


def test_base_url_overrides_directory(monkeypatch, server):
    # The official-looking URL is unreachable (.invalid); only the override can work.
    register(monkeypatch, server, url=f"https://example.invalid/segment_anything/{FILENAME}")
    path = weights.download(NAME, base_url=server.base_url + "/", progress=False,
                            timeout_s=TIMEOUT_S)
    assert path.read_bytes() == PAYLOAD


def test_base_url_from_environment(monkeypatch, server):
    register(monkeypatch, server, url=f"https://example.invalid/segment_anything/{FILENAME}")
    monkeypatch.setenv("UNIGEOSEG_WEIGHTS_BASE_URL", server.base_url)
    assert weights.download(NAME, progress=False, timeout_s=TIMEOUT_S).read_bytes() == PAYLOAD


def test_interrupted_download_resumes_with_range(monkeypatch, server):
    spec = register(monkeypatch, server)
    server.cut_first_after = CUT
    with pytest.raises(WeightsError) as info:
        weights.download(NAME, progress=False, timeout_s=TIMEOUT_S)
    message = info.value.message
    assert spec.url in message and "resume" in message
    assert not cached().exists()
    assert part_of(cached()).stat().st_size == CUT

    path = weights.download(NAME, progress=False, timeout_s=TIMEOUT_S)
    assert server.requests[1] == (f"/{FILENAME}", f"bytes={CUT}-")
    assert path.read_bytes() == PAYLOAD
    assert not part_of(path).exists()


def test_server_ignoring_range_restarts_from_zero(monkeypatch, server):
    register(monkeypatch, server)
    server.honor_range = False
    # A stale partial file of junk: appending the 200 body to it would corrupt the result.
    part = part_of(cached())
    part.parent.mkdir(parents=True)
    part.write_bytes(b"junk" * 1000)
    path = weights.download(NAME, progress=False, timeout_s=TIMEOUT_S)
    assert server.requests == [(f"/{FILENAME}", "bytes=4000-")]
    assert path.read_bytes() == PAYLOAD


def test_oversized_partial_file_is_discarded(monkeypatch, server):
    register(monkeypatch, server)
    part = part_of(cached())
    part.parent.mkdir(parents=True)
    part.write_bytes(PAYLOAD + b"extra")
    path = weights.download(NAME, progress=False, timeout_s=TIMEOUT_S)
    assert server.requests == [(f"/{FILENAME}", None)]
    assert path.read_bytes() == PAYLOAD


def test_complete_partial_file_is_finished_without_network(monkeypatch, server):
    register(monkeypatch, server)
    part = part_of(cached())
    part.parent.mkdir(parents=True)
    part.write_bytes(PAYLOAD)
    assert weights.download(NAME, progress=False, timeout_s=TIMEOUT_S).read_bytes() == PAYLOAD
    assert server.requests == []


def test_range_not_satisfiable_restarts_then_rejects_wrong_file(monkeypatch, server):
    # The server's file is shorter than our partial file: 416, restart, and the full
    # response is then recognised as the wrong file before it is written.
    register(monkeypatch, server)
    server.files[FILENAME] = PAYLOAD[:1000]
    part = part_of(cached())
    part.parent.mkdir(parents=True)
    part.write_bytes(PAYLOAD[:2000])
    with pytest.raises(WeightsError, match="serves 1000 bytes"):
        weights.download(NAME, progress=False, timeout_s=TIMEOUT_S)
    assert server.requests == [(f"/{FILENAME}", "bytes=2000-"), (f"/{FILENAME}", None)]
    assert not part.exists() and not cached().exists()


def test_checksum_mismatch_leaves_nothing(monkeypatch, server):
    register(monkeypatch, server, sha256="0" * 64)
    with pytest.raises(WeightsError, match="SHA-256"):
        weights.download(NAME, progress=False, timeout_s=TIMEOUT_S)
    assert not cached().exists()
    assert not part_of(cached()).exists()


def test_size_mismatch_leaves_nothing(monkeypatch, server):
    register(monkeypatch, server, size_bytes=len(PAYLOAD) + 1, sha256=None)
    with pytest.raises(WeightsError, match=str(len(PAYLOAD) + 1)):
        weights.download(NAME, progress=False, timeout_s=TIMEOUT_S)
    assert not cached().exists()
    assert not part_of(cached()).exists()


def test_size_only_spec_downloads(monkeypatch, server):
    register(monkeypatch, server, sha256=None)
    assert weights.download(NAME, progress=False, timeout_s=TIMEOUT_S).read_bytes() == PAYLOAD
    assert "no known SHA-256" in weights.verify(NAME).reason


def test_http_404_names_the_url(monkeypatch, server):
    spec = register(monkeypatch, server, url=f"{server.base_url}/missing.bin",
                    filename="missing.bin")
    with pytest.raises(WeightsError, match="404") as info:
        weights.download(NAME, progress=False, timeout_s=TIMEOUT_S)
    assert spec.url in info.value.message
    assert not cached("missing.bin").exists()


def test_connection_refused_names_the_url(monkeypatch):
    with socket.socket() as sock:  # a port that was free a moment ago and is closed now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/{FILENAME}"
    monkeypatch.setitem(weights.REGISTRY, NAME, WeightSpec(
        NAME, url, FILENAME, len(PAYLOAD), PAYLOAD_SHA256, "vit_b"))
    with pytest.raises(WeightsError) as info:
        weights.download(NAME, progress=False, timeout_s=TIMEOUT_S)
    assert url in info.value.message


def test_corrupt_final_file_is_downloaded_again(monkeypatch, server):
    register(monkeypatch, server)
    cached().parent.mkdir(parents=True)
    cached().write_bytes(b"\0" * len(PAYLOAD))
    assert weights.download(NAME, progress=False, timeout_s=TIMEOUT_S).read_bytes() == PAYLOAD
    assert len(server.requests) == 1


# --------------------------------------------------------------------------- verify, status


def test_verify_detects_corruption(monkeypatch, server):
    register(monkeypatch, server)
    path = weights.download(NAME, progress=False, timeout_s=TIMEOUT_S)
    data = bytearray(PAYLOAD)
    data[1234] ^= 0xFF
    path.write_bytes(bytes(data))
    result = weights.verify(NAME)
    assert (result.ok, result.path) == (False, path)
    assert "SHA-256" in result.reason

    path.write_bytes(PAYLOAD[:-1])
    assert "size" in weights.verify(NAME).reason
    path.unlink()
    assert not weights.verify(NAME).ok


def test_verify_explicit_path(monkeypatch, server, tmp_path):
    register(monkeypatch, server)
    other = tmp_path / "copy.bin"
    other.write_bytes(PAYLOAD)
    assert weights.verify(NAME, other).ok


def test_status_rows(monkeypatch, server):
    register(monkeypatch, server)
    row = {r.name: r for r in weights.status()}[NAME]
    assert (row.downloaded, row.partial_bytes, row.size_bytes) == (False, 0, len(PAYLOAD))
    weights.download(NAME, progress=False, timeout_s=TIMEOUT_S)
    row = {r.name: r for r in weights.status()}[NAME]
    assert row.downloaded and row.path == cached()


# --------------------------------------------------------------------------- resolve


def test_resolve_existing_path(tmp_path):
    ckpt = tmp_path / "my.pth"
    ckpt.write_bytes(b"x")
    assert weights.resolve_checkpoint(ckpt) == ckpt
    assert weights.resolve_checkpoint(str(ckpt)) == ckpt


def test_resolve_registry_name(monkeypatch, server):
    register(monkeypatch, server)
    with pytest.raises(WeightsError, match=f"unigeoseg weights download {NAME}"):
        weights.resolve_checkpoint(NAME)
    weights.download(NAME, progress=False, timeout_s=TIMEOUT_S)
    assert weights.resolve_checkpoint(NAME) == cached()

    cached().write_bytes(PAYLOAD[:10])  # truncated cache file
    with pytest.raises(WeightsError, match="damaged"):
        weights.resolve_checkpoint(NAME)


def test_resolve_unknown(tmp_path):
    with pytest.raises(WeightsError, match="neither an existing file"):
        weights.resolve_checkpoint(tmp_path / "nope.pth")


# --------------------------------------------------------------------------- CLI


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="unigeoseg")
    add_weights_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_download_list_verify(monkeypatch, server, capsys):
    register(monkeypatch, server, url=f"https://example.invalid/x/{FILENAME}")
    assert run_cli(["weights", "download", NAME, "--base-url", server.base_url,
                    "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(cached())

    assert run_cli(["weights", "list"]) == 0
    out, _ = capsys.readouterr()
    line = next(ln for ln in out.splitlines() if ln.startswith(NAME))
    assert "downloaded" in line and "not downloaded" not in line
    assert "sam_vit_h" in out

    assert run_cli(["weights", "verify", NAME]) == 0
    assert "OK" in capsys.readouterr().out
    assert run_cli(["weights", "verify"]) == 0
    assert f"{NAME}: OK" in capsys.readouterr().out


def test_cli_verify_failure(monkeypatch, server, capsys):
    register(monkeypatch, server)
    cached().parent.mkdir(parents=True)
    cached().write_bytes(b"broken")
    assert run_cli(["weights", "verify", NAME]) == 1
    _, err = capsys.readouterr()
    assert f"unigeoseg weights download {NAME}" in err
    assert "Traceback" not in err
    assert run_cli(["weights", "verify"]) == 1


def test_cli_verify_nothing_cached(capsys):
    assert run_cli(["weights", "verify"]) == 0
    assert "nothing to verify" in capsys.readouterr().out
    assert run_cli(["weights", "verify", "sam_vit_b"]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_cli_download_failures(monkeypatch, server, capsys):
    register(monkeypatch, server, url=f"{server.base_url}/missing.bin", filename="missing.bin")
    assert run_cli(["weights", "download", NAME, "--no-progress"]) == 1
    _, err = capsys.readouterr()
    assert err.startswith("error: ") and f"{server.base_url}/missing.bin" in err
    assert "Traceback" not in err

    assert run_cli(["weights", "download", "no_such_weights", "--no-progress"]) == 1
    assert "sam_vit_b" in capsys.readouterr().err


def test_cli_download_to_dest(monkeypatch, server, tmp_path, capsys):
    register(monkeypatch, server)
    dest = tmp_path / "dest"
    assert run_cli(["weights", "download", NAME, "--dest", str(dest), "--no-progress"]) == 0
    assert (dest / FILENAME).read_bytes() == PAYLOAD
    assert capsys.readouterr().out.strip() == str(dest / FILENAME)


def test_cli_weights_without_command_prints_help(capsys):
    assert run_cli(["weights"]) == 1
    assert "download" in capsys.readouterr().err
