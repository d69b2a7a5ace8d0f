#!/usr/bin/env python3
"""Build the installable QGIS plugin zip: ``dist/unigeoseg_qgis-<version>.zip``.

    python3 scripts/build_plugin.py [--out-dir DIR]

Any Python 3.8+ runs it (standard library only; no QGIS needed). The zip has one top folder,
``unigeoseg_qgis/``, holding:

- every file of ``qgis_plugin/``, with symbolic links resolved into real files (the shared
  protocol package ``qgis_plugin/unigeoseg_protocol`` is a link to
  ``backend/unigeoseg_protocol``: the zip carries a copy);
- ``metadata.txt``, ``LICENSE`` and ``icons/`` from the repository root.

Left out: ``__pycache__``, ``*.pyc``/``*.pyo``, hidden files and folders (``.git*``,
``.DS_Store``, tool caches), ``tests``/``test`` folders, ``conftest.py`` and editor backups.

Then it checks what the QGIS plugin repository's upload validator checks (plugins.qgis.org):
the required metadata fields, a top folder that is a valid Python identifier with
``__init__.py`` (defining ``classFactory``), ``metadata.txt`` and ``LICENSE``; no absolute
paths, backslashes, drive letters or ``..`` in entry names; no ``.pyc``, ``__pycache__``,
``.git`` or ``__MACOSX``; at most 25 MB. It also checks that ``version`` in metadata.txt
equals pyproject.toml's, that the icons metadata.txt names exist and that every ``.py`` file
compiles. Any problem stops the build (exit code 1) with a list of what is wrong; on success
it prints the zip's path. Entries have fixed timestamps, so rebuilding unchanged sources gives
the same bytes.

The validator also fetches the ``tracker``/``repository``/``homepage`` URLs on upload: they
must exist then. This script only checks that they are http(s) URLs.
"""

from __future__ import annotations

import argparse
import configparser
import os
import re
import stat
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "unigeoseg_qgis"
SOURCE_DIR = "qgis_plugin"
ROOT_FILES = ("metadata.txt", "LICENSE")
ROOT_DIRS = ("icons",)
REQUIRED_METADATA = ("name", "description", "version", "qgisMinimumVersion", "author",
                     "email", "about", "tracker", "repository")
URL_METADATA = ("tracker", "repository", "homepage")
MAX_ZIP_BYTES = 25_000_000  # plugins.qgis.org's PLUGIN_MAX_UPLOAD_SIZE
EXCLUDED_DIRS = frozenset({"__pycache__", "__MACOSX", "tests", "test"})
EXCLUDED_FILES = frozenset({"conftest.py", "Thumbs.db"})
EXCLUDED_SUFFIXES = (".pyc", ".pyo", "~", ".swp", ".orig", ".rej", ".bak")
FORBIDDEN_PARTS = frozenset({"__pycache__", "__MACOSX", ".git"})
ZIP_DATE = (1980, 1, 1, 0, 0, 0)


class BuildError(Exception):
    """The plugin cannot be packaged; the message lists every problem found."""


# --- inputs ----------------------------------------------------------------------------------


def pyproject_version(path: Path) -> str:
    """``[project] version`` of pyproject.toml (tomllib where available, else a plain parse)."""
    text = path.read_text(encoding="utf-8")
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        section = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
        match = section and re.search(r'^version\s*=\s*"([^"]+)"', section.group(1), re.M)
        if not match:
            raise BuildError(f"no [project] version in {path}") from None
        return match.group(1)
    try:
        return tomllib.loads(text)["project"]["version"]
    except (KeyError, tomllib.TOMLDecodeError) as exc:
        raise BuildError(f"no [project] version in {path}: {exc}") from exc


def read_metadata(text: str) -> dict[str, str]:
    """The ``[general]`` section, parsed as QGIS and plugins.qgis.org parse it.

    Both use ``configparser.ConfigParser`` with its default interpolation, so a lone ``%``
    fails here as it would there.
    """
    parser = configparser.ConfigParser()
    parser.optionxform = str  # keys are case-sensitive (qgisMinimumVersion)
    try:
        parser.read_string(text)
        if not parser.has_section("general"):
            raise BuildError("metadata.txt has no [general] section")
        return {key: value.strip() for key, value in parser.items("general")}
    except configparser.Error as exc:
        raise BuildError(f"metadata.txt does not parse: {exc}") from exc


def check_metadata(metadata: dict[str, str], version: str) -> list[str]:
    """Problems with the metadata (empty list if none)."""
    problems = [f"metadata.txt: required field {key!r} is missing or empty"
                for key in REQUIRED_METADATA if not metadata.get(key)]
    if metadata.get("version") and metadata["version"] != version:
        problems.append(f"metadata.txt: version {metadata['version']!r} differs from "
                        f"pyproject.toml's {version!r}")
    if "/" in metadata.get("author", ""):
        problems.append("metadata.txt: author cannot contain slashes")
    for key in URL_METADATA:
        url = metadata.get(key)
        if url and not re.match(r"^https?://[^/\s]+", url):
            problems.append(f"metadata.txt: {key} is not an http(s) URL: {url!r}")
    for key in ("qgisMinimumVersion", "qgisMaximumVersion"):
        value = metadata.get(key)
        if value and not re.fullmatch(r"\d+\.\d+(\.\d+)?", value):
            problems.append(f"metadata.txt: {key} is not a version number: {value!r}")
    return problems


def _excluded(name: str, is_dir: bool) -> bool:
    if name.startswith("."):
        return True
    if is_dir:
        return name in EXCLUDED_DIRS
    return name in EXCLUDED_FILES or name.endswith(EXCLUDED_SUFFIXES)


def _walk(source: Path, arc_prefix: str, seen: set[str]) -> list[tuple[str, Path]]:
    """(entry name, real file) for every file under ``source``, following symbolic links."""
    real = os.path.realpath(source)
    if real in seen:
        raise BuildError(f"symbolic link loop at {source}")
    seen = seen | {real}
    files: list[tuple[str, Path]] = []
    for child in sorted(source.iterdir(), key=lambda p: p.name):
        if child.is_symlink() and not child.exists():
            raise BuildError(f"broken symbolic link: {child} -> {os.readlink(child)}")
        is_dir = child.is_dir()
        if _excluded(child.name, is_dir):
            continue
        name = f"{arc_prefix}/{child.name}"
        if is_dir:
            files += _walk(child, name, seen)
        elif child.is_file():
            files.append((name, Path(os.path.realpath(child))))
        else:
            raise BuildError(f"not a regular file: {child}")
    return files


def collect_files(repo: Path = REPO) -> list[tuple[str, Path]]:
    """Every entry of the zip as (name inside the zip, file on disk), sorted by name."""
    source = repo / SOURCE_DIR
    if not source.is_dir():
        raise BuildError(f"no plugin source folder {source}")
    files = _walk(source, PACKAGE, set())
    for name in ROOT_FILES:
        path = repo / name
        if not path.is_file():
            raise BuildError(f"missing {path}")
        files.append((f"{PACKAGE}/{name}", Path(os.path.realpath(path))))
    for name in ROOT_DIRS:
        path = repo / name
        if not path.is_dir():
            raise BuildError(f"missing folder {path}")
        files += _walk(path, f"{PACKAGE}/{name}", set())
    names = [name for name, _ in files]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise BuildError("the same entry comes from two places (qgis_plugin/ and the "
                         f"repository root): {', '.join(duplicates)}")
    return sorted(files)


# --- checks on the result --------------------------------------------------------------------


def check_entries(names: list[str]) -> list[str]:
    """What the plugin repository would reject in the entry names (empty list if none)."""
    problems = []
    if not PACKAGE.isidentifier() or not re.match(r"^[A-Za-z][A-Za-z0-9_]+$", PACKAGE):
        problems.append(f"top folder {PACKAGE!r} is not a valid Python identifier")
    for name in names:
        if not name.startswith(PACKAGE + "/"):
            problems.append(f"entry outside the single top folder: {name}")
        if name.startswith("/") or "\\" in name or re.match(r"^[A-Za-z]:", name) \
                or ".." in name:
            problems.append(f"unsafe entry name (absolute path, backslash, drive or '..'): "
                            f"{name}")
        if ".pyc" in name or FORBIDDEN_PARTS & set(name.split("/")):
            problems.append(f"forbidden entry (.pyc, __pycache__, .git or __MACOSX): {name}")
    for required in ("__init__.py", "metadata.txt", "LICENSE"):
        if f"{PACKAGE}/{required}" not in names:
            problems.append(f"missing {PACKAGE}/{required}")
    return problems


def check_sources(files: list[tuple[str, Path]], metadata: dict[str, str]) -> list[str]:
    """classFactory present, icons present, every module compiles (empty list if fine)."""
    problems = []
    names = {name for name, _ in files}
    for key in ("icon", "screenshot"):
        value = metadata.get(key)
        if value:
            relative = value[2:] if value.startswith("./") else value
            if f"{PACKAGE}/{relative}" not in names:
                problems.append(f"metadata.txt: {key} {value!r} is not in the package")
    for name, path in files:
        if not name.endswith(".py"):
            continue
        source = path.read_bytes()
        try:
            compile(source, name, "exec", dont_inherit=True)
        except (SyntaxError, ValueError) as exc:
            problems.append(f"{name} does not compile: {exc}")
        if name == f"{PACKAGE}/__init__.py" and not re.search(rb"^def classFactory\(", source,
                                                                re.M):
            problems.append(f"{name} does not define classFactory(iface)")
    return problems


# --- build -----------------------------------------------------------------------------------


def build(out_dir: str | os.PathLike | None = None, repo: Path = REPO) -> Path:
    """Build and check the zip; returns its path. Raises ``BuildError`` with every problem."""
    repo = Path(repo)
    version = pyproject_version(repo / "pyproject.toml")
    metadata = read_metadata((repo / "metadata.txt").read_text(encoding="utf-8"))
    files = collect_files(repo)
    problems = (check_metadata(metadata, version) + check_entries([n for n, _ in files])
                + check_sources(files, metadata))
    if problems:
        raise BuildError("\n".join(problems))

    out = Path(out_dir) if out_dir is not None else repo / "dist"
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{PACKAGE}-{version}.zip"
    partial = target.with_name(target.name + ".part")
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for name, path in files:
            info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            info.create_system = 3  # Unix, so the permissions above are honoured
            archive.writestr(info, path.read_bytes())
    size = partial.stat().st_size
    if size > MAX_ZIP_BYTES:
        partial.unlink()
        raise BuildError(f"the zip is {size / 1e6:.1f} MB; plugins.qgis.org accepts at most "
                         f"{MAX_ZIP_BYTES / 1e6:.0f} MB")
    with zipfile.ZipFile(partial) as archive:
        bad = archive.testzip()
    if bad:
        partial.unlink()
        raise BuildError(f"corrupt entry in the written zip: {bad}")
    os.replace(partial, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="where to write the zip (default: dist/ in the repository)")
    args = parser.parse_args(argv)
    try:
        path = build(args.out_dir)
    except BuildError as exc:
        print(f"build_plugin: cannot build the plugin zip:\n{exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
