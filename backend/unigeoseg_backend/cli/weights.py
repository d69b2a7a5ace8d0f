"""``unigeoseg weights list|download|verify``: the SAM checkpoints in the weights cache."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from ..errors import WeightsError
from ..weights import BASE_URL_ENV, CACHE_DIR_ENV, cache_dir, download, get_spec, status, verify


def add_weights_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``weights list|download|verify`` to a CLI; each sets ``func`` to a handler that
    takes the parsed args and returns an exit code (0 ok, 1 failure)."""
    parser = subparsers.add_parser(
        "weights", help="list, download and verify SAM checkpoints",
        description=f"Manage SAM checkpoints in the cache folder ({cache_dir()}; "
                    f"set {CACHE_DIR_ENV} to move it).")
    parser.set_defaults(func=_help_handler(parser))
    commands = parser.add_subparsers(dest="weights_command", metavar="COMMAND")

    listing = commands.add_parser("list", help="show known checkpoints and which are cached")
    listing.set_defaults(func=cmd_list)

    fetch = commands.add_parser(
        "download", help="download (or resume) a checkpoint",
        description="Download a checkpoint into the cache folder, resuming an interrupted "
                    "download, and verify it.")
    fetch.add_argument("name", help="weights name, e.g. sam_vit_b (see `weights list`)")
    fetch.add_argument("--dest", metavar="DIR", help="folder to download into "
                       "(default: the cache folder)")
    fetch.add_argument("--base-url", metavar="URL",
                       help=f"mirror folder holding the same filenames (or set {BASE_URL_ENV})")
    fetch.add_argument("--no-progress", dest="progress", action="store_false",
                       help="do not show a progress bar")
    fetch.set_defaults(func=cmd_download)

    check = commands.add_parser("verify", help="check size and checksum of cached checkpoints")
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


def cmd_list(args: argparse.Namespace) -> int:
    """``weights list``: one line per known checkpoint."""
    rows = status()
    print(f"Cache folder: {cache_dir()}")
    width = max((len(r.name) for r in rows), default=4)
    for row in rows:
        if row.downloaded:
            state = "downloaded"
        elif row.partial_bytes:
            state = f"partial ({_human(row.partial_bytes)})"
        else:
            state = "not downloaded"
        print(f"{row.name:<{width}}  {_human(row.size_bytes):>10}  {state:<16}  {row.path}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    """``weights download NAME``: prints the checkpoint path on success."""
    try:
        path = download(args.name, dest_dir=args.dest, base_url=args.base_url,
                        progress=args.progress)
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
        try:
            names = [get_spec(args.name).name]
        except WeightsError as exc:
            return _fail(exc.message)
    else:
        names = [row.name for row in status() if row.path.exists()]
        if not names:
            print(f"No checkpoints in {cache_dir()}; nothing to verify.")
            return 0
    failed = 0
    for name in names:
        result = verify(name)
        if result.ok:
            print(f"{name}: OK ({result.reason}) {result.path}")
        else:
            failed += 1
            _fail(f"{name}: {result.reason}. Run `unigeoseg weights download {name}` "
                  "to fetch it again.")
    return 1 if failed else 0
