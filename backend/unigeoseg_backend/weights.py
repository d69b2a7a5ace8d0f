"""Where the weights are: the weights cache, official SAM checkpoints, UniGeoSeg model names.

Everything a process loads is found here: a SAM checkpoint by file or registry name
(:func:`resolve_checkpoint`), a UniGeoSeg model by directory or by name in the cache's
``models/`` folder (:func:`resolve_model`, default ``$UNIGEOSEG_MODEL``).

Checkpoints live in a per-user cache folder (see :func:`cache_dir`). A download is written to
``<file>.part`` first and renamed to its final name only after its size (and SHA-256, where
one is known) has been checked, so a file with the final name is always complete. An
interrupted download keeps its ``.part`` file; the next call resumes it with an HTTP
``Range`` request.

Only the standard library talks to the network (``urllib``), so the backend needs no HTTP
client package; ``urllib`` also honours the usual ``https_proxy`` / ``no_proxy`` variables.

The CLI ``unigeoseg weights list|download|verify`` is in ``cli/weights.py``.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import platformdirs
from tqdm import tqdm

from unigeoseg_backend import __version__
from unigeoseg_backend.errors import WeightsError

logger = logging.getLogger(__name__)

CACHE_DIR_ENV = "UNIGEOSEG_CACHE_DIR"
BASE_URL_ENV = "UNIGEOSEG_WEIGHTS_BASE_URL"
#: Environment variable naming the default UniGeoSeg model (a directory or a cached name).
MODEL_ENV = "UNIGEOSEG_MODEL"
PART_SUFFIX = ".part"
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class WeightSpec:
    """One downloadable checkpoint.

    Attributes:
        name: registry key, used on the command line (``sam_vit_b``).
        url: where the file is downloaded from.
        filename: name of the file in the cache folder.
        size_bytes: exact expected size; always checked.
        sha256: expected SHA-256 (lower-case hex), or None when no trustworthy digest is
            known, in which case only the size is checked.
        sam_type: the ``segment_anything.sam_model_registry`` key that loads it.
    """

    name: str
    url: str
    filename: str
    size_bytes: int
    sha256: str | None
    sam_type: str


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify`; ``reason`` is a sentence for the user either way."""

    name: str
    path: Path
    ok: bool
    reason: str


@dataclass(frozen=True)
class WeightStatus:
    """One row of :func:`status` (``unigeoseg weights list``)."""

    name: str
    size_bytes: int
    downloaded: bool
    path: Path
    partial_bytes: int = 0


_OFFICIAL_BASE = "https://dl.fbaipublicfiles.com/segment_anything"

# Meta publishes neither SHA-256 nor MD5 for these files (the README only links them). The
# SHA-256 values below are the ones the 3D Slicer extension SegmentWithSAM pins when it
# downloads these exact URLs: github.com/mazurowski-lab/SlicerSegmentWithSAM,
# SegmentWithSAM/SegmentWithSAM.py (``checksum = "SHA256:..."`` passed to
# SampleData.downloadFileIntoCache), checked at commit 09079a984f9cb737bd32d4d8864942de8cdda1fe.
# Many unrelated projects pin the same three digests, which makes a transcription error
# unlikely. Cross-check: the hex tag in each filename is the start of the file's MD5, as
# listed by IOPaint (github.com/Sanster/IOPaint, iopaint/plugins/interactive_seg.py):
# vit_b 01ec64d29a2fca3f0661936605ae66f8, vit_l 0b3195507c641ddb6910d2bb5adee89c,
# vit_h 4b8939a88964f0f4ff5f5b2642c598a6.
REGISTRY: dict[str, WeightSpec] = {
    spec.name: spec
    for spec in (
        WeightSpec(
            name="sam_vit_b",
            url=f"{_OFFICIAL_BASE}/sam_vit_b_01ec64.pth",
            filename="sam_vit_b_01ec64.pth",
            size_bytes=375_042_383,
            sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
            sam_type="vit_b",
        ),
        WeightSpec(
            name="sam_vit_l",
            url=f"{_OFFICIAL_BASE}/sam_vit_l_0b3195.pth",
            filename="sam_vit_l_0b3195.pth",
            size_bytes=1_249_524_607,
            sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
            sam_type="vit_l",
        ),
        WeightSpec(
            name="sam_vit_h",
            url=f"{_OFFICIAL_BASE}/sam_vit_h_4b8939.pth",
            filename="sam_vit_h_4b8939.pth",
            size_bytes=2_564_550_879,
            sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
            sam_type="vit_h",
        ),
    )
}


# --------------------------------------------------------------------------- registry, paths


def get_spec(name: str) -> WeightSpec:
    """The registry entry called ``name``; WeightsError listing the known names otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise WeightsError(f"Unknown weights {name!r}; known weights: {known}.",
                           {"name": name, "known": sorted(REGISTRY)}) from None


def cache_dir() -> Path:
    """Folder holding downloaded checkpoints: ``$UNIGEOSEG_CACHE_DIR/weights``, else the
    platform's user cache folder for ``unigeoseg`` (``~/.cache/unigeoseg`` on Linux)."""
    root = os.environ.get(CACHE_DIR_ENV) or platformdirs.user_cache_dir("unigeoseg")
    return Path(root).expanduser() / "weights"


def _target_dir(dest_dir: str | os.PathLike[str] | None) -> Path:
    return Path(dest_dir).expanduser() if dest_dir is not None else cache_dir()


def _part_path(final: Path) -> Path:
    return final.with_name(final.name + PART_SUFFIX)


def source_url(spec: WeightSpec, base_url: str | None = None) -> str:
    """URL to fetch ``spec`` from: ``base_url`` (or ``$UNIGEOSEG_WEIGHTS_BASE_URL``) replaces
    the directory of the official URL, so a mirror only has to host the same filenames."""
    base = base_url or os.environ.get(BASE_URL_ENV)
    if not base:
        return spec.url
    return f"{base.rstrip('/')}/{spec.filename}"


# --------------------------------------------------------------------------- verification


def sha256_file(path: Path, chunk_bytes: int = _HASH_CHUNK) -> str:
    """SHA-256 of a file, read in chunks so multi-GB checkpoints do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _check_file(spec: WeightSpec, path: Path, *, check_hash: bool = True) -> str | None:
    """Why ``path`` is not a good copy of ``spec``, or None when it is."""
    if not path.is_file():
        return f"{path} does not exist"
    size = path.stat().st_size
    if size != spec.size_bytes:
        return f"size is {size} bytes, expected {spec.size_bytes}"
    if check_hash and spec.sha256:
        actual = sha256_file(path)
        if actual != spec.sha256.lower():
            return f"SHA-256 is {actual}, expected {spec.sha256}"
    return None


def verify(name: str, path: str | os.PathLike[str] | None = None) -> VerifyResult:
    """Check a checkpoint file (default: its cache location) against the registry.

    The size is always compared; the SHA-256 too when the registry knows it.
    """
    spec = get_spec(name)
    target = Path(path).expanduser() if path is not None else cache_dir() / spec.filename
    problem = _check_file(spec, target)
    if problem is not None:
        return VerifyResult(spec.name, target, False, problem)
    what = "size and SHA-256 match" if spec.sha256 else "size matches (no known SHA-256)"
    return VerifyResult(spec.name, target, True, what)


def status() -> list[WeightStatus]:
    """One row per registry entry. ``downloaded`` compares sizes only: hashing several GB
    for a listing would be slow, and ``verify`` exists for the thorough check."""
    rows = []
    folder = cache_dir()
    for spec in REGISTRY.values():
        final = folder / spec.filename
        part = _part_path(final)
        downloaded = final.is_file() and final.stat().st_size == spec.size_bytes
        partial = part.stat().st_size if part.is_file() else 0
        rows.append(WeightStatus(spec.name, spec.size_bytes, downloaded, final, partial))
    return rows


def resolve_checkpoint(name_or_path: str | os.PathLike[str]) -> Path:
    """A checkpoint file to load: an existing file path as given, or the cached file of a
    registry name. Only the size of a cached file is checked, so that loading a model does
    not re-hash gigabytes each time (``download`` and ``verify`` hash it)."""
    text = os.fspath(name_or_path)
    candidate = Path(text).expanduser()
    if candidate.is_file():
        return candidate
    spec = REGISTRY.get(text)
    if spec is None:
        known = ", ".join(sorted(REGISTRY))
        raise WeightsError(
            f"Checkpoint {text!r} is neither an existing file nor a known weights name "
            f"({known}).", {"checkpoint": text})
    cached = cache_dir() / spec.filename
    if not cached.is_file():
        raise WeightsError(
            f"Weights {spec.name!r} are not downloaded yet (expected {cached}). "
            f"Run `unigeoseg weights download {spec.name}` first.",
            {"name": spec.name, "path": str(cached)})
    problem = _check_file(spec, cached, check_hash=False)
    if problem is not None:
        raise WeightsError(
            f"Cached weights {cached} look damaged ({problem}). "
            f"Run `unigeoseg weights download {spec.name}` to fetch them again.",
            {"name": spec.name, "path": str(cached)})
    return cached


# --------------------------------------------------------------------------- UniGeoSeg models


def configured_model(explicit: str | os.PathLike[str] | None) -> str | os.PathLike[str] | None:
    """The model to use: the one given, else ``$UNIGEOSEG_MODEL``, else None (no text engine)."""
    return explicit or os.environ.get(MODEL_ENV) or None


def resolve_model(model: str | os.PathLike[str]) -> Path:
    """The directory of a UniGeoSeg model: ``model`` itself when it is a path that exists, else
    a model name looked up as ``<weights cache>/models/<name>``.

    Raises:
        WeightsError: neither exists (the message names where it looked).
    """
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise WeightsError(f"UniGeoSeg model {path} is not a directory (the released "
                               f"layout is a folder with config.json, weights and tokenizer)")
        return path
    text = os.fspath(model)
    if "/" in text or "\\" in text or path.is_absolute() or text.startswith("."):
        raise WeightsError(f"UniGeoSeg model directory {path} does not exist")
    cached = cache_dir() / "models" / text
    if not cached.is_dir():
        raise WeightsError(f"no UniGeoSeg model {text!r}: {path} is not a directory here and "
                           f"{cached} does not exist; pass --model with a model directory")
    return cached


# --------------------------------------------------------------------------- download


def download(name: str, *, dest_dir: str | os.PathLike[str] | None = None,
             base_url: str | None = None, progress: bool = True, chunk_bytes: int = 1 << 20,
             timeout_s: float = 60) -> Path:
    """Download checkpoint ``name`` into ``dest_dir`` (default :func:`cache_dir`).

    Returns the final path. A final file that already verifies is returned untouched. An
    existing ``.part`` file is resumed. The file gets its final name only once verified;
    on a size or checksum mismatch the ``.part`` file is deleted and WeightsError raised.
    Network errors raise WeightsError and keep the ``.part`` file for the next attempt.

    Two processes downloading the same file at once are not coordinated; do not do that.
    """
    spec = get_spec(name)
    folder = _target_dir(dest_dir)
    final = folder / spec.filename
    if final.exists():
        existing = verify(spec.name, final)
        if existing.ok:
            logger.info("%s already present at %s", spec.name, final)
            return final
        logger.warning("Existing %s is not valid (%s); downloading it again", final,
                       existing.reason)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WeightsError(f"Cannot create the weights folder {folder}: {exc}",
                           {"path": str(folder)}) from exc

    part = _part_path(final)
    url = source_url(spec, base_url)
    if not _reuse_complete_part(spec, part):
        _fetch(url, part, spec, progress=progress, chunk_bytes=chunk_bytes,
               timeout_s=timeout_s)

    problem = _check_file(spec, part)
    if problem is not None:
        # A finished transfer that does not match will not get better by resuming it.
        part.unlink(missing_ok=True)
        raise WeightsError(
            f"Downloaded {spec.filename} from {url} is not the expected file: {problem}. "
            "The download was discarded.",
            {"name": spec.name, "url": url, "reason": problem})
    # os.replace is atomic on one filesystem, so readers never see a half-written file.
    os.replace(part, final)
    logger.info("Downloaded %s to %s", spec.name, final)
    return final


def _reuse_complete_part(spec: WeightSpec, part: Path) -> bool:
    """Deal with a ``.part`` file that is already full size (or larger).

    Returns True when it is a complete, verified download (a crash between verification
    and rename leaves one); drops it when it is too large or corrupt, since a Range
    request could never fix it.
    """
    if not part.is_file() or part.stat().st_size < spec.size_bytes:
        return False
    if _check_file(spec, part) is None:
        return True
    logger.warning("Discarding unusable partial download %s", part)
    part.unlink()
    return False


def _fetch(url: str, part: Path, spec: WeightSpec, *, progress: bool, chunk_bytes: int,
           timeout_s: float) -> None:
    """Bring ``part`` to the full length of ``url``, resuming from its current size."""
    offset = part.stat().st_size if part.is_file() else 0
    try:
        response = _open(url, offset, timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            # The server holds fewer bytes than our partial file: the partial file belongs
            # to some other version of the file. Start again from byte 0.
            exc.close()
            logger.warning("Server rejected resuming %s at byte %d; restarting", url, offset)
            part.unlink()
            offset = 0
            response = _open_or_raise(url, 0, timeout_s, part)
        else:
            exc.close()
            raise _network_error(url, f"HTTP {exc.code} {exc.reason}", part) from exc
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise _network_error(url, _describe(exc), part) from exc

    with response:
        offset, expected_total = _start_offset(response, url, offset, part)
        if expected_total is not None and expected_total != spec.size_bytes:
            # Reject e.g. an HTML error page from a proxy before writing any of it.
            part.unlink(missing_ok=True)
            raise WeightsError(
                f"{url} serves {expected_total} bytes but {spec.filename} has "
                f"{spec.size_bytes}; it is not the expected file.",
                {"url": url, "served_bytes": expected_total,
                 "expected_bytes": spec.size_bytes})
        _stream_to_part(response, url, part, offset, spec, progress=progress,
                        chunk_bytes=chunk_bytes)


def _open(url: str, offset: int, timeout_s: float) -> http.client.HTTPResponse:
    headers = {"User-Agent": f"unigeoseg/{__version__}"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    logger.debug("GET %s (Range: %s)", url, headers.get("Range"))
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                  timeout=timeout_s)


def _open_or_raise(url: str, offset: int, timeout_s: float,
                   part: Path) -> http.client.HTTPResponse:
    try:
        return _open(url, offset, timeout_s)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise _network_error(url, f"HTTP {exc.code} {exc.reason}", part) from exc
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise _network_error(url, _describe(exc), part) from exc


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


def _start_offset(response: http.client.HTTPResponse, url: str, offset: int,
                  part: Path) -> tuple[int, int | None]:
    """Where the body of ``response`` starts in the file, and the file's full size if the
    server said so. A 200 reply to a Range request means the server ignored the range: the
    body is the whole file, so the partial file is truncated rather than appended to."""
    length = response.headers.get("Content-Length")
    body_bytes = int(length) if length and length.isdigit() else None
    if response.status == 206:
        match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
        if match is None or int(match.group(1)) != offset:
            part.unlink(missing_ok=True)
            raise WeightsError(
                f"{url} answered a resume request with an unexpected range "
                f"({response.headers.get('Content-Range')!r}); the partial file was "
                "discarded, run the download again.", {"url": url})
        total = match.group(3)
        return offset, int(total) if total.isdigit() else None
    if offset:
        logger.info("Server ignored the Range request for %s; restarting from byte 0", url)
    return 0, body_bytes


def _stream_to_part(response: http.client.HTTPResponse, url: str, part: Path, offset: int,
                    spec: WeightSpec, *, progress: bool, chunk_bytes: int) -> None:
    """Append (offset > 0) or write the body to ``part``, with a progress bar."""
    length = response.headers.get("Content-Length")
    body_bytes = int(length) if length and length.isdigit() else None
    received = 0
    mode = "ab" if offset else "wb"
    with open(part, mode) as sink, tqdm(
            total=offset + body_bytes if body_bytes is not None else spec.size_bytes,
            initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
            desc=spec.filename, disable=not progress, leave=False) as bar:
        try:
            while chunk := response.read(chunk_bytes):
                sink.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as exc:
            sink.flush()
            raise _network_error(url, _describe(exc), part) from exc
    # http.client returns b"" instead of raising when the peer closes early, so a short
    # body is only visible by counting.
    if body_bytes is not None and received < body_bytes:
        raise _network_error(
            url, f"connection closed after {offset + received} of {offset + body_bytes} bytes",
            part)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        return str(exc.reason)
    return str(exc) or type(exc).__name__


def _network_error(url: str, what: str, part: Path) -> WeightsError:
    """WeightsError for a transfer problem; the partial file is kept so a rerun resumes."""
    kept = part.stat().st_size if part.is_file() else 0
    message = f"Could not download {url}: {what}."
    if kept:
        message += (f" The partial file {part} ({kept} bytes) is kept; run the download "
                    "again to resume it.")
    return WeightsError(message, {"url": url, "partial_path": str(part), "partial_bytes": kept})
