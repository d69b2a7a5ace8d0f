"""``unigeoseg weights download unigeoseg`` against a model hub on 127.0.0.1.

The loopback hub answers the two requests a download makes, the way huggingface.co does:

* ``GET /api/models/{repo}/revision/{revision}?blobs=true`` (``HfApi.model_info`` with file
  metadata): the commit the revision is at, and every file with its size and either its LFS
  SHA-256 (large files) or its git blob id (small ones);
* ``GET /{repo}/resolve/{commit}/{path}``: the file; an LFS file is a 302 redirect to a CDN
  path, as on the real hub, served with ``Range`` support.

The repository it serves is the tiny random UniGeoSeg in the released layout
(``tiny_model_dir``). The client finds it through the hub client's endpoint setting: the
``endpoint`` argument in process, ``HF_ENDPOINT`` in the subprocess tests.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
import socket
import subprocess
import threading
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from huggingface_hub import constants as hub_constants
from tests.backend.loopback_http import QuietHandler, serving, without_proxies
from tests.conftest import REPO, backend_python

from unigeoseg_backend import weights
from unigeoseg_backend.cli.weights import add_weights_parser
from unigeoseg_backend.errors import WeightsError

pytestmark = pytest.mark.timeout(120)

REPO_ID = "nishuo1999/UniGeoSeg"
NAME = "unigeoseg"
TIMEOUT_S = 10
CUT = 1_000_003  # bytes of the large shard the hub sends before dropping the connection


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class LoopbackHub:
    """One repository on the loopback hub, and what the hub saw. ``main`` names the commit
    the branch is at; tests push commits, corrupt what is served or cut a transfer."""

    commits: dict[str, dict[str, bytes]]
    main: str
    cut_once: dict[str, int] = field(default_factory=dict)  # path -> bytes sent, then drop
    tampered: dict[str, bytes] = field(default_factory=dict)  # served instead of the listed
    url: str = ""
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def files(self) -> dict[str, bytes]:
        return self.commits[self.main]

    def push(self, files: dict[str, bytes]) -> str:
        commit = secrets.token_hex(20)
        self.commits[commit] = files
        self.main = commit
        return commit

    def listing(self, commit: str) -> dict:
        siblings = []
        for path, data in sorted(self.commits[commit].items()):
            entry = {"rfilename": path, "size": len(data), "blobId": git_blob_id(data)}
            if is_lfs(path):
                entry["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                                "pointerSize": 134}
            siblings.append(entry)
        return {"id": REPO_ID, "modelId": REPO_ID, "sha": commit, "private": False,
                "siblings": siblings}

    def file_requests(self, path: str) -> list[str | None]:
        """The Range header of every GET of ``path`` (resolve or CDN)."""
        return [rng for url, rng in self.requests if url.endswith("/" + path)]

    def api_requests(self) -> list[str]:
        return [url for url, _ in self.requests if url.startswith("/api/")]


def is_lfs(path: str) -> bool:
    return path.endswith(".safetensors")


class _HubHandler(QuietHandler):
    hub: LoopbackHub  # set on a per-server subclass

    def do_GET(self):  # noqa: N802 - http.server naming
        hub = self.hub
        url = urllib.parse.urlsplit(self.path)
        with hub.lock:
            hub.requests.append((url.path, self.headers.get("Range")))
        api = re.fullmatch(rf"/api/models/{REPO_ID}/revision/([^/]+)", url.path)
        resolve = re.fullmatch(rf"/{REPO_ID}/resolve/([^/]+)/(.+)", url.path)
        cdn = re.fullmatch(r"/cdn/([0-9a-f]{40})/(.+)", url.path)
        if api:
            revision = urllib.parse.unquote(api.group(1))
            commit = hub.main if revision == "main" else revision
            if commit not in hub.commits:
                return self._error(404, "RevisionNotFound")
            if "blobs=true" not in url.query.lower():
                return self._error(400, None)
            return self._send(200, json.dumps(hub.listing(commit)).encode())
        if resolve:
            commit, path = resolve.group(1), urllib.parse.unquote(resolve.group(2))
            if path not in hub.commits.get(commit, {}):
                return self._error(404, "EntryNotFound")
            if is_lfs(path):  # large files live on a CDN, as on huggingface.co
                self.send_response(302)
                self.send_header("Location", f"{hub.url}/cdn/{commit}/{resolve.group(2)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            return self._send_file(commit, path)
        if cdn:
            return self._send_file(cdn.group(1), urllib.parse.unquote(cdn.group(2)))
        return self._error(404, "RepoNotFound")

    def _send_file(self, commit: str, path: str):
        hub = self.hub
        body = hub.tampered.get(path, hub.commits[commit][path])
        with hub.lock:
            cut = hub.cut_once.pop(path, None)
        self.send_file_body(body, cut_after=cut)

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, code: str | None):
        self._send(status, json.dumps({"error": code or "bad request"}).encode(),
                   {"X-Error-Code": code} if code else None)


def repo_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def hub(tiny_model_dir):
    state = LoopbackHub(commits={}, main="")
    state.push(repo_files(tiny_model_dir))
    with serving(type("Handler", (_HubHandler,), {"hub": state})) as url:
        state.url = url
        yield state


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """Cache in tmp_path, no proxies (they would swallow 127.0.0.1), online, and no
    telemetry (which would look up huggingface.co from inside the hub client)."""
    monkeypatch.setenv("UNIGEOSEG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("UNIGEOSEG_MODEL", raising=False)
    without_proxies(monkeypatch)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_HUB_DISABLE_TELEMETRY", True)


def model_folder() -> Path:
    return weights.cache_dir() / "models" / NAME


def staging_folder() -> Path:
    return weights.cache_dir() / "models" / f".{NAME}.download"


def shard_names(hub: LoopbackHub) -> list[str]:
    return sorted(p for p in hub.files if p.endswith(".safetensors"))


def largest_shard(hub: LoopbackHub) -> str:
    return max(shard_names(hub), key=lambda p: len(hub.files[p]))


def fetch(hub: LoopbackHub) -> Path:
    return weights.download(NAME, endpoint=hub.url, progress=False, timeout_s=TIMEOUT_S)


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="unigeoseg")
    add_weights_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def corrupt_one_byte(path: Path) -> None:
    """Flip a byte in place (same size), stamped as a later edit would be: file systems
    stamp with a coarse clock, and this runs within one tick of the download."""
    before = path.stat().st_mtime_ns
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        value = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([value ^ 0xFF]))
    os.utime(path, ns=(before + 10**9, before + 10**9))


# --------------------------------------------------------------------------- download


def test_download_pins_the_commit_and_the_name_resolves(hub):
    folder = fetch(hub)
    assert folder == model_folder()
    assert weights.resolve_model(NAME) == folder
    assert not staging_folder().exists()
    for path, data in hub.files.items():
        assert (folder / path).read_bytes() == data

    lock = json.loads((folder / "hub-lock.json").read_text())
    assert (lock["repo_id"], lock["revision"], lock["commit"]) == (REPO_ID, "main", hub.main)
    assert set(lock["files"]) == set(hub.files)
    shard = largest_shard(hub)
    assert lock["files"][shard] == {"size": len(hub.files[shard]),
                                    "sha256": hashlib.sha256(hub.files[shard]).hexdigest()}
    assert lock["files"]["config.json"]["git_blob_sha1"] == git_blob_id(
        hub.files["config.json"])
    # The revision is asked for once; every file is fetched at the commit it resolved to.
    assert hub.api_requests() == [f"/api/models/{REPO_ID}/revision/main"]
    resolves = [url for url, _ in hub.requests if "/resolve/" in url]
    assert len(resolves) == len(hub.files)
    assert all(f"/resolve/{hub.main}/" in url for url in resolves)

    # Present and verified: nothing is asked of the hub again.
    seen = len(hub.requests)
    assert fetch(hub) == folder
    assert len(hub.requests) == seen


def test_the_engine_loads_the_downloaded_model_by_name(hub):
    import torch

    from unigeoseg_backend.engines.base import EngineSettings
    from unigeoseg_backend.engines.unigeoseg_engine import UniGeoSegEngine

    fetch(hub)
    engine = UniGeoSegEngine.loader(EngineSettings(torch.device("cpu"), model=NAME))()
    assert engine.loaded.path == model_folder()
    assert engine.model_id == "unigeoseg-tiny-sparseconv"


def test_an_interrupted_download_resumes_at_the_pinned_commit(hub):
    shard = largest_shard(hub)
    first, first_files = hub.main, dict(hub.files)
    hub.cut_once[shard] = CUT
    with pytest.raises(WeightsError, match="resume") as info:
        fetch(hub)
    assert not isinstance(info.value, weights.NetworkUnavailableError)
    assert not model_folder().exists()  # nothing under the final name
    assert (staging_folder() / f"{shard}.part").stat().st_size == CUT

    # The branch moves on meanwhile; the resumed download stays on the commit it began with.
    hub.push({**first_files, "config.json": b"{}"})
    folder = fetch(hub)
    assert hub.api_requests() == [f"/api/models/{REPO_ID}/revision/main"]
    assert hub.file_requests(shard)[-1] == f"bytes={CUT}-"
    assert json.loads((folder / "hub-lock.json").read_text())["commit"] == first
    downloaded = repo_files(folder)
    del downloaded["hub-lock.json"]
    assert downloaded == first_files
    assert weights.verify(NAME).ok
    assert not staging_folder().exists()


def test_a_pinned_commit_is_asked_for_and_kept(hub, monkeypatch):
    pinned = hub.main
    monkeypatch.setitem(weights.HUB_MODELS, NAME, weights.HubModelSpec(
        NAME, REPO_ID, "main", commit=pinned))
    hub.push({"config.json": b"{}"})  # main is elsewhere now
    folder = fetch(hub)
    assert hub.api_requests() == [f"/api/models/{REPO_ID}/revision/{pinned}"]
    assert json.loads((folder / "hub-lock.json").read_text())["commit"] == pinned

    monkeypatch.setitem(weights.HUB_MODELS, NAME, weights.HubModelSpec(
        NAME, REPO_ID, "main", commit="f" * 40))
    with pytest.raises(WeightsError, match="has no nishuo1999/UniGeoSeg"):
        fetch(hub)
    assert weights.resolve_model(NAME) == folder  # the old folder stays until a new one is whole


def test_a_file_unlike_the_hub_listing_is_refused(hub):
    shard = largest_shard(hub)
    data = bytearray(hub.files[shard])
    data[len(data) // 3] ^= 0xFF
    hub.tampered[shard] = bytes(data)
    with pytest.raises(WeightsError, match=rf"Downloaded {re.escape(shard)} from .*: SHA-256 is"):
        fetch(hub)
    assert not model_folder().exists()
    assert not (staging_folder() / shard).exists()
    assert not (staging_folder() / f"{shard}.part").exists()


# --------------------------------------------------------------------------- bad weights


def test_a_corrupted_shard_is_named_and_never_loaded(hub, capsys):
    import torch

    from unigeoseg_backend.engines.base import EngineSettings
    from unigeoseg_backend.engines.unigeoseg_engine import UniGeoSegEngine

    folder = fetch(hub)
    shard = shard_names(hub)[0]
    corrupt_one_byte(folder / shard)

    result = weights.verify(NAME)
    assert not result.ok and shard in result.reason and "SHA-256" in result.reason
    assert run_cli(["weights", "verify", NAME]) == 1
    err = capsys.readouterr().err
    assert shard in err and "Traceback" not in err
    with pytest.raises(WeightsError, match=re.escape(shard)):
        weights.resolve_model(NAME)
    with pytest.raises(WeightsError, match=re.escape(shard)):
        UniGeoSegEngine.loader(EngineSettings(torch.device("cpu"), model=NAME))

    # A new download repairs it, fetching only the damaged file.
    seen = len(hub.requests)
    assert fetch(hub) == folder
    fetched = {url.rsplit("/", 1)[1] for url, _ in hub.requests[seen:] if "/api/" not in url}
    assert fetched == {shard}
    assert weights.verify(NAME).ok
    assert weights.resolve_model(NAME) == folder


def test_a_shard_changed_after_verification_is_hashed_before_loading(hub):
    folder = fetch(hub)
    shard = shard_names(hub)[-1]
    before = (folder / shard).stat().st_mtime_ns
    os.utime(folder / shard, ns=(before + 10**9, before + 10**9))  # touched, same bytes
    assert weights.resolve_model(NAME) == folder  # re-hashed, still good
    corrupt_one_byte(folder / shard)
    with pytest.raises(WeightsError, match=f"{re.escape(shard)}: SHA-256 is"):
        weights.resolve_model(NAME)


# --------------------------------------------------------------------------- list


def list_rows(capsys) -> dict[str, str]:
    assert run_cli(["weights", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    return {line.split()[0]: line for line in lines[2:]}


def test_list_shows_sam_hub_and_local_models(hub, tiny_model_dir, capsys, monkeypatch):
    rows = list_rows(capsys)
    assert {"sam_vit_b", "sam_vit_l", "sam_vit_h", NAME} <= set(rows)
    assert "not downloaded" in rows[NAME] and str(model_folder()) in rows[NAME]

    folder = fetch(hub)
    finetuned = weights.cache_dir() / "models" / "my-finetune"
    finetuned.mkdir()
    for path, data in repo_files(tiny_model_dir).items():
        (finetuned / path).write_bytes(data)
    monkeypatch.setenv("UNIGEOSEG_MODEL", "my-finetune")

    by_name = {row.name: row for row in weights.status()}
    hub_row, local_row = by_name[NAME], by_name["my-finetune"]
    assert (hub_row.kind, hub_row.downloaded, hub_row.verified) == ("hub", True, True)
    assert hub_row.size_bytes == sum(len(d) for d in hub.files.values())
    assert (local_row.kind, local_row.verified, local_row.path) == ("local", None, finetuned)
    assert local_row.size_bytes == sum(len(d) for d in repo_files(tiny_model_dir).values())

    rows = list_rows(capsys)
    assert rows[NAME].split()[-3:] == ["downloaded", "yes", str(folder)]
    assert rows["my-finetune"].split()[-3:] == ["downloaded", "unknown", str(finetuned)]
    assert rows["my-finetune"].startswith("my-finetune *")  # $UNIGEOSEG_MODEL
    assert rows["sam_vit_b"].startswith("sam_vit_b *")  # serve's default SAM
    sam_file = weights.cache_dir() / "sam_vit_b_01ec64.pth"
    assert rows["sam_vit_b"].split()[-2:] == ["-", str(sam_file)]

    corrupt_one_byte(folder / shard_names(hub)[0])
    assert "unknown" in list_rows(capsys)[NAME]  # changed since it was verified
    assert not weights.verify(NAME).ok
    assert list_rows(capsys)[NAME].split()[-2] == "no"

    (folder / "config.json").unlink()
    assert list_rows(capsys)[NAME].split()[-4:] == ["not", "downloaded", "no", str(folder)]


# --------------------------------------------------------------------------- no network


def test_an_unreachable_hub_exits_2_and_leaves_nothing(capsys):
    with socket.socket() as sock:  # a port that was free a moment ago and is closed now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    assert run_cli(["weights", "download", NAME, "--endpoint", endpoint, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Cannot reach the model hub") and endpoint in err
    assert "Traceback" not in err
    assert not (weights.cache_dir() / "models").exists()


def cli_subprocess(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1",
                **env}
    return subprocess.run(
        [backend_python(), "-m", "unigeoseg_backend.cli.main", "weights", "download", NAME,
         "--no-progress"], env=full_env, cwd=REPO, capture_output=True, text=True, timeout=60)


def test_offline_mode_exits_2_then_hf_endpoint_downloads(hub, tmp_path):
    offline = cli_subprocess(tmp_path, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="1")
    assert offline.returncode == 2, offline.stderr
    assert "HF_HUB_OFFLINE is set" in offline.stderr and "Traceback" not in offline.stderr
    assert hub.requests == []
    assert not model_folder().exists() and not staging_folder().exists()

    online = cli_subprocess(tmp_path, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0")
    assert online.returncode == 0, online.stderr
    assert online.stdout.strip() == str(model_folder())
    assert weights.resolve_model(NAME) == model_folder()
