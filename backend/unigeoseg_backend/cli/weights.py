"""``unigeoseg weights list|download|verify``: SAM checkpoints and UniGeoSeg models in the
weights cache.

Exit codes: 0 success, 1 failure (a readable message on stderr), 2 the server or model hub
could not be reached (offline, no route): nothing was downloaded.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from ..engines.base import EngineSettings
from ..errors import WeightsError
from ..weights import (
    BASE_URL_ENV,
    CACHE_DIR_ENV,
    HUB_MODELS,
    MODEL_ENV,
    NetworkUnavailableError,
    WeightStatus,
    cache_dir,
    configured_model,
    default_model_status,
    download,
    known_names,
    local_model_status,
    models_dir,
    shipped_default_model_dir,
    status,
    verify,
)
from .predict import DEFAULT_MODEL_ENV

EXIT_UNREACHABLE = 2


def add_weights_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``weights list|download|verify`` to a CLI; each sets ``func`` to a handler that
    takes the parsed args and returns an exit code (see the module docstring)."""
    parser = subparsers.add_parser(
        "weights", help="list, download and verify SAM checkpoints and UniGeoSeg models",
        description=f"Manage SAM checkpoints and UniGeoSeg models in the cache folder "
                    f"({cache_dir()}; set {CACHE_DIR_ENV} to move it).")
    parser.set_defaults(func=_help_handler(parser))
    commands = parser.add_subparsers(dest="weights_command", metavar="COMMAND")

    listing = commands.add_parser(
        "list", help="show every model: SAM checkpoints, UniGeoSeg, the default model and "
                     "fine-tuned ones, with size, state, verified, path")
    listing.set_defaults(func=cmd_list)

    hub = ", ".join(f"{spec.name} ({spec.repo_id})" for spec in HUB_MODELS.values())
    fetch = commands.add_parser(
        "download", help="download (or resume) a checkpoint or a released model",
        description="Download a SAM checkpoint or a released UniGeoSeg model from the "
                    f"Hugging Face hub ({hub}) into the cache folder, resuming an "
                    "interrupted download, and verify it. A hub model is then usable as "
                    "--model NAME.")
    fetch.add_argument("name", help=f"one of {', '.join(known_names())}")
    fetch.add_argument("--dest", metavar="DIR", help="folder to download into (default: the "
                       "cache folder; a hub model goes into DIR/NAME)")
    fetch.add_argument("--base-url", metavar="URL", help="SAM only: mirror folder holding "
                       f"the same filenames (or set {BASE_URL_ENV})")
    fetch.add_argument("--endpoint", metavar="URL", help="hub models only: the hub's address "
                       "(default $HF_ENDPOINT, else https://huggingface.co)")
    fetch.add_argument("--no-progress", dest="progress", action="store_false",
                       help="do not show a progress bar")
    fetch.set_defaults(func=cmd_download)

    check = commands.add_parser(
        "verify", help="check sizes and digests of cached checkpoints and models")
    check.add_argument("name", nargs="?", help="weights name (default: every cached one)")
    check.set_defaults(func=cmd_verify)
    return parser


def _help_handler(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return 1
    return handler


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def _human(size: int) -> str:
    """Byte count for people: 375042383 -> '357.7 MiB'."""
    if size < 1024:
        return f"{size} B"
    value = size / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


_KIND_TITLES = {"sam": "SAM", "hub": "UniGeoSeg (hub)", "local": "UniGeoSeg (local)",
                "default": "default model", "finetuned": "default fine-tuned"}
#: Kinds that are installed (shipped, exported, made by a job) rather than downloaded.
_INSTALLED_KINDS = ("default", "finetuned")
_VERIFIED_WORDS = {True: "yes", False: "no", None: "unknown"}


def _state(row: WeightStatus) -> str:
    if row.problem is not None:
        return "unusable"
    if row.kind in _INSTALLED_KINDS:
        return "installed" if row.downloaded else "not installed"
    if row.downloaded:
        return "downloaded"
    if row.partial_bytes:
        return f"partial ({_human(row.partial_bytes)})"
    return "not downloaded"


def _configured_rows(rows: list[WeightStatus]) -> tuple[list[WeightStatus], set[Path]]:
    """Rows for the folders the environment names outside the cache and the package (a
    training run's export as ``$UNIGEOSEG_MODEL`` or ``$UNIGEOSEG_DEFAULT_MODEL``), and the
    folders ``serve`` uses without options: the default model's (that variable's, else the
    package's) and the UniGeoSeg model's."""
    listed = {row.path.resolve() for row in rows}
    extra: list[WeightStatus] = []
    text_model = configured_model(None)
    used: set[Path] = set()
    if text_model is not None:
        folder = Path(text_model).expanduser()
        if not folder.is_dir():  # a name in <cache>/models/
            folder = models_dir() / os.fspath(text_model)
        used.add(folder.resolve())
        if folder.is_dir() and folder.resolve() not in listed:
            extra.append(local_model_status(folder))
    named_default = os.environ.get(DEFAULT_MODEL_ENV)
    if named_default:
        folder = Path(named_default).expanduser()
        used.add(folder.resolve())
        if folder.resolve() not in listed:
            extra.append(default_model_status(folder))
    else:
        used.add(shipped_default_model_dir().resolve())
    return extra, used


def cmd_list(args: argparse.Namespace) -> int:
    """``weights list``: one line per known checkpoint or model, the default model, each
    cached or fine-tuned model folder and each folder the environment names; ``*`` marks
    what ``serve`` uses without options."""
    rows = status()
    extra, used = _configured_rows(rows)
    rows += extra
    default_sam = f"sam_{EngineSettings.sam_type}"
    print(f"Cache folder: {cache_dir()}  (* default; text model from ${MODEL_ENV}, default "
          f"model from ${DEFAULT_MODEL_ENV}, else the package's)")
    width = max((len(r.name) for r in rows), default=4) + 2
    print(f"{'NAME':<{width}}  {'KIND':<18}  {'SIZE':>10}  {'STATE':<16}  VERIFIED  PATH")
    for row in rows:
        is_default = row.name == default_sam or row.path.resolve() in used
        marked = f"{row.name}{' *' if is_default else ''}"
        size = _human(row.size_bytes) if row.size_bytes else "?"
        verified = _VERIFIED_WORDS[row.verified] if row.path.exists() else "-"
        why = f"  ({row.problem})" if row.problem else ""
        print(f"{marked:<{width}}  {_KIND_TITLES[row.kind]:<18}  {size:>10}  "
              f"{_state(row):<16}  {verified:<8}  {os.path.abspath(row.path)}{why}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    """``weights download NAME``: prints the checkpoint file or model folder on success."""
    try:
        path = download(args.name, dest_dir=args.dest, base_url=args.base_url,
                        endpoint=args.endpoint, progress=args.progress)
    except NetworkUnavailableError as exc:
        _fail(exc.message)
        return EXIT_UNREACHABLE
    except WeightsError as exc:
        return _fail(exc.message)
    except KeyboardInterrupt:
        # The .part file stays on disk; say so instead of showing a traceback.
        return _fail("Download interrupted; run the same command again to resume it.")
    print(path)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """``weights verify [NAME]``: 0 when every checked file is good."""
    if args.name is not None:
        names = [args.name]
    else:
        # Folders without a published digest list (local, fine-tuned) have nothing to verify.
        names = [row.name for row in status() if row.kind in ("sam", "hub")
                 and row.path.exists()]
        if not names:
            print(f"No checkpoints in {cache_dir()}; nothing to verify.")
            return 0
    failed = 0
    for name in names:
        try:
            result = verify(name)
        except WeightsError as exc:  # an unknown name, an unreadable hub-lock.json
            failed += 1
            _fail(f"{name}: {exc.message}")
            continue
        if result.ok:
            print(f"{name}: OK ({result.reason}) {result.path}")
        else:
            failed += 1
            _fail(f"{name}: {result.reason}. Run `unigeoseg weights download {name}` "
                  "to fetch it again.")
    return 1 if failed else 0
