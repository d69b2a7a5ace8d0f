"""Where the weights are: the weights cache, official SAM checkpoints, UniGeoSeg models.

Everything a process loads is found here: a SAM checkpoint by file or registry name
(:func:`resolve_checkpoint`), a UniGeoSeg model by directory or by name in the cache's
``models/`` folder (:func:`resolve_model`, default ``$UNIGEOSEG_MODEL``).

One downloader fetches two kinds of things:

* a SAM checkpoint (:data:`REGISTRY`): one file from a fixed URL, of known size and SHA-256;
* a released UniGeoSeg model (:data:`HUB_MODELS`): every file of a Hugging Face model
  repository at one commit, into ``<cache>/models/<name>/``. ``huggingface_hub`` resolves
  the revision to a commit and lists the files with their sizes and digests (the LFS
  SHA-256, or the git blob id of a small file); that list is pinned in the folder's
  ``hub-lock.json`` and every later download, check and load uses it.

A file is written to ``<file>.part`` first and gets its final name only after its size and
digest have been checked, so a file with its final name is always complete. An interrupted
download keeps its ``.part`` file; the next call resumes it with an HTTP ``Range`` request.
A model folder is put together in ``models/.<name>.download/`` and renamed to its final
name only once every file in it is verified.

A full check is remembered in ``<cache>/verified.json`` (each file's size and modification
time when it was hashed, and the outcome), so loading re-hashes only a file that changed
since, and ``weights list`` can say whether a file is verified without reading gigabytes.

The bytes go through ``urllib`` (which honours ``https_proxy`` / ``no_proxy``), the hub's
too: ``hf_hub_download`` of huggingface_hub 2.x deletes its partial file when a transfer
fails, so an interrupted multi-GB shard would start again from byte 0.

The CLI ``unigeoseg weights list|download|verify`` is in ``cli/weights.py``.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

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
#: In a model folder downloaded from the hub: the repository, commit and files pinned.
HUB_LOCK_FILE = "hub-lock.json"
#: In the cache folder: the outcome of each file's last full check.
VERIFIED_RECORD_FILE = "verified.json"
MODELS_FOLDER = "models"
#: Where the service's fine-tuning jobs put the default models they make (one folder each,
#: named after the model, holding its weights and model card).
FINETUNED_FOLDER = "finetuned"
_HASH_CHUNK = 1 << 20


class NetworkUnavailableError(WeightsError):
    """The server could not be reached at all (offline mode, no route, connection refused);
    nothing was transferred. ``unigeoseg weights download`` exits with 2 for it."""


@dataclass(frozen=True)
class ExpectedFile:
    """A file as its publisher describes it, so that a copy can be checked.

    Attributes:
        filename: path relative to its folder, ``/``-separated.
        size_bytes: exact size; always checked.
        sha256: lower-case hex SHA-256, or None.
        git_blob_sha1: git's blob id of the content (SHA-1 of ``b"blob <size>\\0" + data``),
            which is what the hub publishes for a file kept in git rather than LFS; or None.
            With neither digest only the size is checked.
    """

    filename: str
    size_bytes: int
    sha256: str | None = None
    git_blob_sha1: str | None = None


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

    @property
    def expected(self) -> ExpectedFile:
        return ExpectedFile(self.filename, self.size_bytes, self.sha256)


@dataclass(frozen=True)
class HubModelSpec:
    """A released UniGeoSeg model in a Hugging Face model repository.

    Attributes:
        name: registry key, and the folder name under ``<cache>/models/`` (``--model NAME``).
        repo_id: the hub repository, ``owner/name``.
        revision: branch or tag resolved to a commit at the first download when ``commit``
            is None; the commit found is pinned in the folder's ``hub-lock.json``.
        commit: the 40-hex commit every download must get, or None while it is unknown.
    """

    name: str
    repo_id: str
    revision: str
    commit: str | None


@dataclass(frozen=True)
class HubLock:
    """What a model folder was downloaded as (its ``hub-lock.json``): the repository, the
    revision asked for, the commit it resolved to, and every file with size and digest."""

    repo_id: str
    revision: str
    commit: str
    files: tuple[ExpectedFile, ...]

    def to_json(self) -> dict[str, Any]:
        files = {}
        for file in self.files:
            entry: dict[str, Any] = {"size": file.size_bytes}
            if file.sha256:
                entry["sha256"] = file.sha256
            if file.git_blob_sha1:
                entry["git_blob_sha1"] = file.git_blob_sha1
            files[file.filename] = entry
        return {"repo_id": self.repo_id, "revision": self.revision, "commit": self.commit,
                "files": files}

    @classmethod
    def read(cls, folder: Path) -> HubLock | None:
        """The lock of ``folder``, None when it has none; WeightsError when unreadable."""
        path = folder / HUB_LOCK_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            files = tuple(
                ExpectedFile(_safe_repo_path(name), int(entry["size"]), entry.get("sha256"),
                             entry.get("git_blob_sha1"))
                for name, entry in data["files"].items())
            return cls(data["repo_id"], data["revision"], data["commit"], files)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise WeightsError(f"{path} is damaged ({exc}); delete {folder} and download the "
                               "model again", {"path": str(path)}) from exc

    def write(self, folder: Path) -> None:
        _write_json_atomically(folder / HUB_LOCK_FILE, self.to_json())

    @property
    def size_bytes(self) -> int:
        return sum(file.size_bytes for file in self.files)


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify`; ``reason`` is a sentence for the user either way."""

    name: str
    path: Path
    ok: bool
    reason: str


@dataclass(frozen=True)
class WeightStatus:
    """One row of :func:`status` (``unigeoseg weights list``).

    Attributes:
        kind: ``sam`` (a registry checkpoint), ``hub`` (a released model from the hub),
            ``local`` (another model folder in ``<cache>/models/``), ``default`` (the
            embedded default model's weights folder, shipped in the package or named by the
            user) or ``finetuned`` (a default model a fine-tuning job made, in
            ``<cache>/finetuned/``).
        size_bytes: the full size; 0 when not known yet (a hub model before its first
            download).
        downloaded: the files are there (for a default-model folder: its card and weights).
        verified: True when every file passed its last full check and has not changed since,
            False when one is missing, has the wrong size or failed its last check, None when
            not known (never hashed, changed since, or nothing to check against). A
            default-model folder is hashed each time: True when the weights file's SHA-256
            is its card's.
        problem: why a folder that is there cannot be used (an invalid card, a missing
            weights file), in words for the user; None otherwise.
    """

    name: str
    size_bytes: int
    downloaded: bool
    path: Path
    partial_bytes: int = 0
    kind: str = "sam"
    verified: bool | None = None
    problem: str | None = None


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


#: The commit of nishuo1999/UniGeoSeg to pin every download to. Unknown here: it was written
#: without network access, so the first download resolves ``revision`` and pins what it
#: found in the model folder's hub-lock.json. Someone with network access fills it in from
#: https://huggingface.co/api/models/nishuo1999/UniGeoSeg (its "sha"); from then on a download
#: of any other commit is refused.
UNIGEOSEG_RELEASE_COMMIT: str | None = None

HUB_MODELS: dict[str, HubModelSpec] = {
    spec.name: spec
    for spec in (
        HubModelSpec(name="unigeoseg", repo_id="nishuo1999/UniGeoSeg", revision="main",
                     commit=UNIGEOSEG_RELEASE_COMMIT),
    )
}


# --------------------------------------------------------------------------- registry, paths


def known_names() -> list[str]:
    """Every name ``weights download`` accepts."""
    return sorted([*REGISTRY, *HUB_MODELS])


def _unknown(name: str) -> WeightsError:
    return WeightsError(f"Unknown weights {name!r}; known weights: {', '.join(known_names())}.",
                        {"name": name, "known": known_names()})


def get_spec(name: str) -> WeightSpec:
    """The SAM registry entry called ``name``; WeightsError listing the known names otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise _unknown(name) from None


def get_hub_spec(name: str) -> HubModelSpec:
    """The hub model called ``name``; WeightsError listing the known names otherwise."""
    try:
        return HUB_MODELS[name]
    except KeyError:
        raise _unknown(name) from None


def cache_dir() -> Path:
    """Folder holding downloaded checkpoints: ``$UNIGEOSEG_CACHE_DIR/weights``, else the
    platform's user cache folder for ``unigeoseg`` (``~/.cache/unigeoseg`` on Linux)."""
    root = os.environ.get(CACHE_DIR_ENV) or platformdirs.user_cache_dir("unigeoseg")
    return Path(root).expanduser() / "weights"


def models_dir() -> Path:
    """Folder of the model folders that ``--model NAME`` finds: ``<cache>/models``."""
    return cache_dir() / MODELS_FOLDER


def finetuned_dir() -> Path:
    """Folder of the fine-tuned default models: ``<cache>/finetuned``."""
    return cache_dir() / FINETUNED_FOLDER


def _target_dir(dest_dir: str | os.PathLike[str] | None, default: Path) -> Path:
    return Path(dest_dir).expanduser() if dest_dir is not None else default


def _part_path(final: Path) -> Path:
    return final.with_name(final.name + PART_SUFFIX)


def _staging_path(final: Path) -> Path:
    """Where a model folder is put together before it gets its final name."""
    return final.with_name(f".{final.name}.download")


def source_url(spec: WeightSpec, base_url: str | None = None) -> str:
    """URL to fetch ``spec`` from: ``base_url`` (or ``$UNIGEOSEG_WEIGHTS_BASE_URL``) replaces
    the directory of the official URL, so a mirror only has to host the same filenames."""
    base = base_url or os.environ.get(BASE_URL_ENV)
    if not base:
        return spec.url
    return f"{base.rstrip('/')}/{spec.filename}"


def _safe_repo_path(name: str) -> str:
    """A repository file path that stays inside its folder; WeightsError otherwise."""
    parts = PurePosixPath(name).parts
    if (not parts or name.startswith("/") or "\\" in name
            or any(part in ("", ".", "..") for part in parts)):
        raise WeightsError(f"refusing the repository file name {name!r}: not a relative path "
                           "inside the model folder", {"filename": name})
    return name


def _write_json_atomically(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- verification


def _hash_file(path: Path, digest: Any, chunk_bytes: int = _HASH_CHUNK) -> str:
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: Path, chunk_bytes: int = _HASH_CHUNK) -> str:
    """SHA-256 of a file, read in chunks so multi-GB checkpoints do not fill memory."""
    return _hash_file(path, hashlib.sha256(), chunk_bytes)


def git_blob_sha1(path: Path) -> str:
    """The id git (and the hub) gives a file's content: SHA-1 of ``blob <size>\\0<data>``."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode(), usedforsecurity=False)
    return _hash_file(path, digest)


def _check_file(expected: ExpectedFile, path: Path, *, check_hash: bool = True) -> str | None:
    """Why ``path`` is not a good copy of ``expected``, or None when it is."""
    if not path.is_file():
        return f"{path} does not exist"
    size = path.stat().st_size
    if size != expected.size_bytes:
        return f"{path.name}: size is {size} bytes, expected {expected.size_bytes}"
    if not check_hash:
        return None
    if expected.sha256:
        actual = sha256_file(path)
        if actual != expected.sha256.lower():
            return f"{path.name}: SHA-256 is {actual}, expected {expected.sha256}"
    elif expected.git_blob_sha1:
        actual = git_blob_sha1(path)
        if actual != expected.git_blob_sha1.lower():
            return f"{path.name}: git blob id is {actual}, expected {expected.git_blob_sha1}"
    return None


def _verify_file(expected: ExpectedFile, path: Path) -> str | None:
    """Full check of ``path`` (size and digest); the outcome is remembered."""
    problem = _check_file(expected, path)
    if path.is_file():
        _remember({path: problem})
    return problem


def _check_cached(expected: ExpectedFile, path: Path) -> str | None:
    """The check before loading: the size always, the digest only when the file was not
    hashed as it is now (so gigabytes are read once, and again only after a change)."""
    problem = _check_file(expected, path, check_hash=False)
    if problem is not None:
        return problem
    known, remembered_problem = _remembered(path)
    if known:
        return remembered_problem
    return _verify_file(expected, path)


# The record is a cache of facts about files: losing it (or a concurrent writer's update)
# only means a file is hashed again.
def _record_path() -> Path:
    return cache_dir() / VERIFIED_RECORD_FILE


def _read_record() -> dict[str, Any]:
    try:
        data = json.loads(_record_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _remember(problems: Mapping[Path, str | None]) -> None:
    """Note the outcome of full checks (None: good) with each file's current size and time."""
    record = _read_record()
    for path, problem in problems.items():
        stat = path.stat()
        record[str(path.resolve())] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                                       "problem": problem}
    record = {name: entry for name, entry in record.items() if Path(name).is_file()}
    try:
        _record_path().parent.mkdir(parents=True, exist_ok=True)
        _write_json_atomically(_record_path(), record)
    except OSError as exc:  # a read-only cache still works, it just hashes again
        logger.debug("cannot update %s: %s", _record_path(), exc)


def _remembered(path: Path) -> tuple[bool, str | None]:
    """(True, last problem or None) when ``path`` was fully checked as it is now, else
    (False, None)."""
    entry = _read_record().get(str(path.resolve()))
    if not isinstance(entry, dict) or not path.is_file():
        return False, None
    stat = path.stat()
    if (entry.get("size"), entry.get("mtime_ns")) != (stat.st_size, stat.st_mtime_ns):
        return False, None
    return True, entry.get("problem")


def _remembered_state(files: Iterable[tuple[ExpectedFile, Path]]) -> bool | None:
    """WeightStatus.verified of a set of files, from sizes and the record only."""
    state: bool | None = True
    for expected, path in files:
        if _check_file(expected, path, check_hash=False) is not None:
            return False
        known, problem = _remembered(path)
        if known and problem is not None:
            return False
        if not known:
            state = None
    return state


def verify(name: str, path: str | os.PathLike[str] | None = None) -> VerifyResult:
    """Check a checkpoint file, or a hub model's folder (default: its cache location).

    A SAM checkpoint's size is always compared, its SHA-256 too when the registry knows it;
    every file of a hub model is compared with its ``hub-lock.json``.
    """
    if name in HUB_MODELS:
        return verify_model(name, path)
    spec = get_spec(name)
    target = Path(path).expanduser() if path is not None else cache_dir() / spec.filename
    problem = _verify_file(spec.expected, target)
    if problem is not None:
        return VerifyResult(spec.name, target, False, problem)
    what = "size and SHA-256 match" if spec.sha256 else "size matches (no known SHA-256)"
    return VerifyResult(spec.name, target, True, what)


def verify_model(name: str, folder: str | os.PathLike[str] | None = None) -> VerifyResult:
    """Check every file of hub model ``name`` (default folder ``<cache>/models/<name>``)
    against the sizes and digests pinned in its ``hub-lock.json``."""
    spec = get_hub_spec(name)
    target = Path(folder).expanduser() if folder is not None else models_dir() / spec.name
    if not target.is_dir():
        return VerifyResult(spec.name, target, False, f"{target} does not exist")
    lock = HubLock.read(target)
    if lock is None:
        return VerifyResult(spec.name, target, False,
                            f"{target} has no {HUB_LOCK_FILE}: it is not a download of "
                            f"{spec.repo_id}")
    problems = [p for file in lock.files
                if (p := _verify_file(file, target / file.filename)) is not None]
    if problems:
        return VerifyResult(spec.name, target, False, "; ".join(problems))
    return VerifyResult(spec.name, target, True,
                        f"{len(lock.files)} files match the sizes and digests of "
                        f"{lock.repo_id} at commit {lock.commit}")


# --------------------------------------------------------------------------- status


def status() -> list[WeightStatus]:
    """One row per SAM registry entry, per hub model, for the default model shipped in the
    package, per other model folder in ``<cache>/models/`` and per fine-tuned default model
    in ``<cache>/finetuned/``. Checkpoints and UniGeoSeg models are not hashed (``verify`` is
    the thorough check): their ``verified`` comes from sizes and the record of earlier
    checks. Default-model weights (a few MB) are hashed against their card."""
    rows = []
    folder = cache_dir()
    for spec in REGISTRY.values():
        final = folder / spec.filename
        part = _part_path(final)
        downloaded = final.is_file() and final.stat().st_size == spec.size_bytes
        partial = part.stat().st_size if part.is_file() else 0
        verified = _remembered_state([(spec.expected, final)]) if final.is_file() else None
        rows.append(WeightStatus(spec.name, spec.size_bytes, downloaded, final, partial,
                                 "sam", verified))
    rows.extend(_hub_status(hub_spec) for hub_spec in HUB_MODELS.values())
    rows.append(default_model_status(shipped_default_model_dir()))
    if models_dir().is_dir():
        for model in sorted(models_dir().iterdir()):
            if (model.name in HUB_MODELS or model.name.startswith(".")
                    or not (model / "config.json").is_file()):
                continue
            rows.append(local_model_status(model))
    rows.extend(_finetuned_status())
    return rows


def local_model_status(folder: Path) -> WeightStatus:
    """The row of a UniGeoSeg model folder in the released layout that no hub lock pins
    (a fine-tuned export, ``<output_dir>/model``): its size; nothing to verify against."""
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return WeightStatus(folder.name, size, True, folder, 0, "local", None)


def _finetuned_status() -> list[WeightStatus]:
    """One row per fine-tuned model folder, named as ``default:<name>`` selects it (a staging
    folder, hidden, is not one yet)."""
    if not finetuned_dir().is_dir():
        return []
    return [default_model_status(model, kind="finetuned", name=model.name)
            for model in sorted(finetuned_dir().iterdir())
            if not model.name.startswith(".") and (model / "model_card.json").is_file()]


#: The name of a default-model row whose card cannot be read (or that is not installed).
DEFAULT_MODEL_ROW = "default-model"


def shipped_default_model_dir() -> Path:
    """The default model's weights folder inside the installed package."""
    from .default_model.weights_io import shipped_weights_dir  # it imports this module

    return shipped_weights_dir()


def default_model_status(folder: Path, *, kind: str = "default",
                         name: str | None = None) -> WeightStatus:
    """The row of a default-model weights folder (``model_card.json`` and the safetensors
    file it names), called ``name`` or else its card's ``name@version``.

    No card: not installed. An unreadable card or a missing weights file: there, with the
    ``problem`` said. Otherwise ``verified`` is whether the weights file's SHA-256 is the
    card's (hashed here; the engine checks the same before loading)."""
    from .default_model.weights_io import MODEL_CARD_FILE, read_model_card

    card_path = folder / MODEL_CARD_FILE
    if not card_path.is_file():
        return WeightStatus(name or DEFAULT_MODEL_ROW, 0, False, folder, kind=kind)
    try:
        card = read_model_card(folder)
    except WeightsError as exc:
        return WeightStatus(name or DEFAULT_MODEL_ROW, card_path.stat().st_size, True, folder,
                            kind=kind, verified=False, problem=exc.message)
    weights = folder / card.weights_file
    size = card_path.stat().st_size + (weights.stat().st_size if weights.is_file() else 0)
    if not weights.is_file():
        return WeightStatus(name or card.model_id, size, True, folder, kind=kind,
                            verified=False,
                            problem=f"{card.weights_file}, named by its card, is missing")
    return WeightStatus(name or card.model_id, size, True, folder, kind=kind,
                        verified=sha256_file(weights) == card.sha256)


def _hub_status(spec: HubModelSpec) -> WeightStatus:
    final = models_dir() / spec.name
    staging = _staging_path(final)
    try:
        lock = HubLock.read(final) if final.is_dir() else None
        staged = HubLock.read(staging) if staging.is_dir() else None
    except WeightsError:
        return WeightStatus(spec.name, 0, False, final, 0, "hub", False)
    partial = sum(f.stat().st_size for f in staging.rglob("*") if f.is_file()
                  and f.name != HUB_LOCK_FILE) if staged is not None else 0
    if lock is None:
        size = staged.size_bytes if staged is not None else 0
        return WeightStatus(spec.name, size, False, final, partial, "hub", None)
    files = [(file, final / file.filename) for file in lock.files]
    verified = _remembered_state(files)
    downloaded = all(_check_file(f, p, check_hash=False) is None for f, p in files)
    return WeightStatus(spec.name, lock.size_bytes, downloaded, final, partial, "hub", verified)


# --------------------------------------------------------------------------- resolve


def resolve_checkpoint(name_or_path: str | os.PathLike[str]) -> Path:
    """A checkpoint file to load: an existing file path as given, or the cached file of a
    registry name. A cached file's size is checked; its SHA-256 only when it was not
    verified as it is now, so loading does not re-hash gigabytes each time."""
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
    problem = _check_cached(spec.expected, cached)
    if problem is not None:
        raise WeightsError(
            f"Cached weights {cached} look damaged ({problem}). "
            f"Run `unigeoseg weights download {spec.name}` to fetch them again.",
            {"name": spec.name, "path": str(cached)})
    return cached


def configured_model(explicit: str | os.PathLike[str] | None) -> str | os.PathLike[str] | None:
    """The model to use: the one given, else ``$UNIGEOSEG_MODEL``, else None (no text engine)."""
    return explicit or os.environ.get(MODEL_ENV) or None


def resolve_model(model: str | os.PathLike[str]) -> Path:
    """The directory of a UniGeoSeg model: ``model`` itself when it is a path that exists, else
    a model name looked up as ``<weights cache>/models/<name>``.

    A folder with a ``hub-lock.json`` (a hub download) is checked against it first: every
    file there with its size, and the digest of any file changed since it was verified.

    Raises:
        WeightsError: neither exists (the message names where it looked, and for a hub
            model how to download it), or a pinned file is missing or damaged (the message
            names the file).
    """
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise WeightsError(f"UniGeoSeg model {path} is not a directory (the released "
                               f"layout is a folder with config.json, weights and tokenizer)")
        return _checked_against_lock(path)
    text = os.fspath(model)
    if "/" in text or "\\" in text or path.is_absolute() or text.startswith("."):
        raise WeightsError(f"UniGeoSeg model directory {path} does not exist")
    cached = models_dir() / text
    if not cached.is_dir():
        if text in HUB_MODELS:
            raise WeightsError(f"UniGeoSeg model {text!r} is not downloaded yet (expected "
                               f"{cached}); run `unigeoseg weights download {text}`",
                               {"name": text, "path": str(cached)})
        raise WeightsError(f"no UniGeoSeg model {text!r}: {path} is not a directory here and "
                           f"{cached} does not exist; pass --model with a model directory")
    return _checked_against_lock(cached)


def _checked_against_lock(folder: Path) -> Path:
    lock = HubLock.read(folder)
    if lock is None:
        return folder
    problems = [p for file in lock.files
                if (p := _check_cached(file, folder / file.filename)) is not None]
    if problems:
        name = folder.name if folder.name in HUB_MODELS else "NAME"
        raise WeightsError(f"UniGeoSeg model {folder} is damaged: {'; '.join(problems)}. "
                           f"Run `unigeoseg weights download {name}` to repair it.",
                           {"path": str(folder), "problems": problems})
    return folder


# --------------------------------------------------------------------------- download


def download(name: str, *, dest_dir: str | os.PathLike[str] | None = None,
             base_url: str | None = None, endpoint: str | None = None, progress: bool = True,
             chunk_bytes: int = 1 << 20, timeout_s: float = 60) -> Path:
    """Download SAM checkpoint or hub model ``name``; returns the file or model folder.

    A SAM checkpoint goes into ``dest_dir`` (default :func:`cache_dir`) from its URL, or from
    ``base_url``, a mirror folder holding the same file names. A hub model goes into
    ``dest_dir/<name>`` (default ``<cache>/models/<name>``) from the hub at ``endpoint``
    (default ``$HF_ENDPOINT``, else huggingface.co); see :func:`download_model`.

    What is already there and verifies is kept. An existing ``.part`` file is resumed. A file
    gets its final name only once verified; on a size or digest mismatch the ``.part`` file
    is deleted and WeightsError raised. Network errors raise WeightsError
    (NetworkUnavailableError when nothing could be reached) and keep the ``.part`` file for
    the next attempt.

    Two processes downloading the same file at once are not coordinated; do not do that.
    """
    if name in HUB_MODELS:
        if base_url is not None:
            raise WeightsError(f"{name} comes from the model hub: give its address as the "
                               "endpoint (--endpoint or $HF_ENDPOINT), not as a base URL")
        return download_model(name, models_folder=dest_dir, endpoint=endpoint,
                              progress=progress, chunk_bytes=chunk_bytes, timeout_s=timeout_s)
    spec = get_spec(name)
    folder = _target_dir(dest_dir, cache_dir())
    return _download_file(spec.expected, source_url(spec, base_url), folder, progress=progress,
                          chunk_bytes=chunk_bytes, timeout_s=timeout_s)


def _download_file(expected: ExpectedFile, url: str, folder: Path, *, progress: bool,
                   chunk_bytes: int, timeout_s: float) -> Path:
    """``folder / expected.filename``, downloaded from ``url`` unless it already verifies."""
    final = folder / expected.filename
    if final.exists():
        problem = _verify_file(expected, final)
        if problem is None:
            logger.info("%s already present at %s", expected.filename, final)
            return final
        logger.warning("Existing %s is not valid (%s); downloading it again", final, problem)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WeightsError(f"Cannot create the weights folder {final.parent}: {exc}",
                           {"path": str(final.parent)}) from exc

    part = _part_path(final)
    if not _reuse_complete_part(expected, part):
        _fetch(url, part, expected, progress=progress, chunk_bytes=chunk_bytes,
               timeout_s=timeout_s)

    problem = _check_file(expected, part)
    if problem is not None:
        # A finished transfer that does not match will not get better by resuming it.
        part.unlink(missing_ok=True)
        raise WeightsError(
            f"Downloaded {expected.filename} from {url} is not the expected file: {problem}. "
            "The download was discarded.",
            {"filename": expected.filename, "url": url, "reason": problem})
    # os.replace is atomic on one filesystem, so readers never see a half-written file.
    os.replace(part, final)
    _remember({final: None})
    logger.info("Downloaded %s to %s", expected.filename, final)
    return final


def _reuse_complete_part(expected: ExpectedFile, part: Path) -> bool:
    """Deal with a ``.part`` file that is already full size (or larger).

    Returns True when it is a complete, verified download (a crash between verification
    and rename leaves one); drops it when it is too large or corrupt, since a Range
    request could never fix it.
    """
    if not part.is_file() or part.stat().st_size < expected.size_bytes:
        return False
    if _check_file(expected, part) is None:
        return True
    logger.warning("Discarding unusable partial download %s", part)
    part.unlink()
    return False


def _fetch(url: str, part: Path, expected: ExpectedFile, *, progress: bool, chunk_bytes: int,
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
        raise _network_error(url, _describe(exc), part, unreachable=True) from exc

    with response:
        offset, expected_total = _start_offset(response, url, offset, part)
        if expected_total is not None and expected_total != expected.size_bytes:
            # Reject e.g. an HTML error page from a proxy before writing any of it.
            part.unlink(missing_ok=True)
            raise WeightsError(
                f"{url} serves {expected_total} bytes but {expected.filename} has "
                f"{expected.size_bytes}; it is not the expected file.",
                {"url": url, "served_bytes": expected_total,
                 "expected_bytes": expected.size_bytes})
        _stream_to_part(response, url, part, offset, expected, progress=progress,
                        chunk_bytes=chunk_bytes)


# --------------------------------------------------------------------------- hub models


def download_model(name: str, *, models_folder: str | os.PathLike[str] | None = None,
                   endpoint: str | None = None, progress: bool = True,
                   chunk_bytes: int = 1 << 20, timeout_s: float = 60) -> Path:
    """Download hub model ``name`` into ``models_folder/<name>`` (default
    ``<cache>/models/<name>``) and return that folder, usable as ``--model <name>``.

    The commit is the registry's pinned one, else the one this folder was first downloaded
    as (its ``hub-lock.json``), else ``revision`` resolved now and pinned in the lock. Files
    are put together in ``.<name>.download/`` beside the final folder (an interrupted
    download resumes there, at the commit pinned by its lock) and the folder is renamed to
    its final name once every file is verified, replacing an older or damaged one. A final
    folder that verifies is returned without any network access.

    Raises:
        NetworkUnavailableError: the hub cannot be reached (``HF_HUB_OFFLINE`` set, no
            route, refused); nothing is left under the final name.
        WeightsError: anything else (unknown repository or revision, a file that does not
            match the hub's digest, a repository that is no released-layout folder).
    """
    spec = get_hub_spec(name)
    final = _target_dir(models_folder, models_dir()) / spec.name
    staging = _staging_path(final)
    existing = HubLock.read(final) if final.is_dir() else None
    if final.exists() and existing is None:
        raise WeightsError(f"{final} exists and is not a download of {spec.repo_id} (no "
                           f"{HUB_LOCK_FILE}); move it away or pass --model {final}",
                           {"path": str(final)})
    repairable = existing is not None and spec.commit in (None, existing.commit)
    if repairable:
        result = verify_model(spec.name, final)
        if result.ok:
            logger.info("%s already present at %s (%s)", spec.name, final, result.reason)
            return final
        logger.warning("%s: %s; repairing it", final, result.reason)

    from huggingface_hub import constants as hub_constants

    if hub_constants.is_offline_mode():
        raise NetworkUnavailableError(
            f"Cannot download {spec.name} from {spec.repo_id}: HF_HUB_OFFLINE is set. Unset "
            "it, or copy a released model folder here and pass --model PATH.",
            {"name": spec.name, "repo_id": spec.repo_id, "offline": True})
    if repairable and not staging.exists():  # good files are kept, bad ones fetched again
        os.replace(final, staging)

    lock = HubLock.read(staging) if staging.is_dir() else None
    if lock is not None and spec.commit not in (None, lock.commit):
        logger.warning("Discarding %s: it holds commit %s, not the pinned %s", staging,
                       lock.commit, spec.commit)
        shutil.rmtree(staging)
        lock = None
    if lock is None:
        lock = _resolve_lock(spec, endpoint, timeout_s)
        staging.mkdir(parents=True, exist_ok=True)
        lock.write(staging)

    from huggingface_hub import hf_hub_url

    for file in lock.files:
        url = hf_hub_url(lock.repo_id, file.filename, revision=lock.commit, endpoint=endpoint)
        _download_file(file, url, staging, progress=progress, chunk_bytes=chunk_bytes,
                       timeout_s=timeout_s)
    _check_released_layout(staging, lock)
    _replace_folder(staging, final)
    _remember({final / file.filename: None for file in lock.files})  # renamed, not changed
    logger.info("Downloaded %s (%s at %s) to %s", spec.name, lock.repo_id, lock.commit, final)
    return final


def _resolve_lock(spec: HubModelSpec, endpoint: str | None, timeout_s: float) -> HubLock:
    """Ask the hub which commit ``spec`` is at and which files it holds, with their sizes
    and digests (the model-info API with file metadata)."""
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    revision = spec.commit or spec.revision
    api = HfApi(endpoint=endpoint, library_name="unigeoseg", library_version=__version__)
    where = f"{spec.repo_id} at {revision!r} ({api.endpoint})"
    try:
        info = api.model_info(spec.repo_id, revision=revision, files_metadata=True,
                              timeout=timeout_s)
    except (OfflineModeIsEnabled, httpx2.ConnectError, httpx2.TimeoutException) as exc:
        raise NetworkUnavailableError(
            f"Cannot reach the model hub for {where}: {exc}. Check the network (or "
            "$HF_ENDPOINT), or copy a released model folder here and pass --model PATH.",
            {"name": spec.name, "repo_id": spec.repo_id, "endpoint": api.endpoint}) from exc
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise WeightsError(f"The model hub has no {where}: {exc}",
                           {"name": spec.name, "repo_id": spec.repo_id}) from exc
    except HfHubHTTPError as exc:
        raise WeightsError(f"The model hub refused {where}: {exc}",
                           {"name": spec.name, "repo_id": spec.repo_id}) from exc
    except httpx2.TransportError as exc:  # reached, but the exchange broke off
        raise WeightsError(f"The model hub failed to answer for {where}: {exc}",
                           {"name": spec.name, "repo_id": spec.repo_id}) from exc
    if spec.commit is not None and info.sha != spec.commit:
        raise WeightsError(f"The hub answered commit {info.sha} for {where}, not the pinned "
                           f"{spec.commit}", {"name": spec.name, "commit": info.sha})
    if not info.sha or not re.fullmatch(r"[0-9a-f]{40}", info.sha):
        raise WeightsError(f"The hub gave no commit for {where} ({info.sha!r})")
    files = []
    for sibling in info.siblings or ():
        name = _safe_repo_path(sibling.rfilename)
        if sibling.lfs is not None:
            files.append(ExpectedFile(name, sibling.lfs.size, sha256=sibling.lfs.sha256))
        elif sibling.size is not None and sibling.blob_id:
            files.append(ExpectedFile(name, sibling.size, git_blob_sha1=sibling.blob_id))
        else:
            raise WeightsError(f"The hub listed {name} of {where} without size and digest")
    if not files:
        raise WeightsError(f"The hub lists no files for {where}")
    logger.info("%s resolved to commit %s (%d files)", where, info.sha, len(files))
    return HubLock(spec.repo_id, revision, info.sha, tuple(files))


def _check_released_layout(folder: Path, lock: HubLock) -> None:
    """A downloaded repository must be a released-layout model folder (config.json and
    weights at its top), or ``--model`` could not load it."""
    from .model.weight_files import find_weight_files

    try:
        if not (folder / "config.json").is_file():
            raise WeightsError(f"{folder}: no config.json")
        find_weight_files(folder)
    except WeightsError as exc:
        raise WeightsError(f"{lock.repo_id} at commit {lock.commit} is not a released-layout "
                           f"model folder: {exc.message}", {"repo_id": lock.repo_id}) from exc


def _replace_folder(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target``; an existing ``target`` is removed only after."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
    os.replace(source, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- transfer


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
                    expected: ExpectedFile, *, progress: bool, chunk_bytes: int) -> None:
    """Append (offset > 0) or write the body to ``part``, with a progress bar."""
    length = response.headers.get("Content-Length")
    body_bytes = int(length) if length and length.isdigit() else None
    received = 0
    mode = "ab" if offset else "wb"
    with open(part, mode) as sink, tqdm(
            total=offset + body_bytes if body_bytes is not None else expected.size_bytes,
            initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
            desc=expected.filename, disable=not progress, leave=False) as bar:
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


def _network_error(url: str, what: str, part: Path, *, unreachable: bool = False
                   ) -> WeightsError:
    """WeightsError for a transfer problem (NetworkUnavailableError when the server could
    not be reached); the partial file is kept so a rerun resumes."""
    kept = part.stat().st_size if part.is_file() else 0
    message = f"Could not download {url}: {what}."
    if kept:
        message += (f" The partial file {part} ({kept} bytes) is kept; run the download "
                    "again to resume it.")
    error = NetworkUnavailableError if unreachable else WeightsError
    return error(message, {"url": url, "partial_path": str(part), "partial_bytes": kept})
