"""pyzmq for QGIS's Python, without ever installing anything into QGIS's own Python.

The plugin needs only what QGIS ships (qgis, PyQt, numpy) plus pyzmq. Many QGIS builds
(Debian/Ubuntu with ``python3-zmq``, conda, OSGeo4W with its pyzmq package) already have
pyzmq. Where it is missing, the plugin offers a one-click install into a *plugin-private site
directory*::

    <QGIS profile>/python/unigeoseg_deps/py<major><minor>

- inside the user's QGIS profile, so it needs no admin rights, survives plugin upgrades (the
  plugin folder itself is replaced on every upgrade) and is removed with the profile;
- one folder per Python minor version, because pyzmq is a compiled extension: a QGIS upgrade
  that changes Python gets a fresh folder instead of loading an incompatible binary;
- appended to ``sys.path`` (never prepended), so a pyzmq that QGIS's Python already has always
  wins over the private copy;
- filled by ``python -m pip install --target`` run as a separate process with the interpreter
  QGIS itself runs (same version and ABI). ``--target`` writes only into that folder: nothing
  in QGIS's installation or its site-packages is touched, and numpy is never (re)installed.

Only pyzmq is ever installed this way. numpy must come with QGIS (GDAL's Python bindings are
built against it); if it is missing, QGIS's installation is broken and the user is told so.

Everything here is a plain function without widgets, safe to call from a ``QgsTask.run()``
worker thread: the GUI offers a button that runs :func:`install_private` in a task.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import shutil
import subprocess  # nosec B404 - runs pip and a version probe, list arguments, no shell
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

DEPS_FOLDER = "unigeoseg_deps"
PIP_PACKAGE = "pyzmq"
INSTALL_TIMEOUT_S = 600.0
PROBE_TIMEOUT_S = 30.0

# (import name, distribution name, can install_private() provide it?)
REQUIREMENTS = (
    ("numpy", "numpy", False),
    ("zmq", "pyzmq", True),
)


# --- where -----------------------------------------------------------------------------------


def _default_profile_dir() -> Path:
    """The default QGIS 3 profile folder, for calls made before QgsApplication is initialised."""
    if sys.platform.startswith("win"):
        base = Path(os.environ.get("APPDATA") or Path.home() / "AppData" / "Roaming")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "QGIS" / "QGIS3" / "profiles" / "default"


def qgis_settings_dir() -> Path:
    """The active QGIS profile folder (``QgsApplication.qgisSettingsDirPath()``).

    Inside QGIS this is always set. Outside an initialised QgsApplication (scripts, some
    tests) QGIS returns ``""``; the default profile of this platform is used then.
    """
    try:
        from qgis.core import QgsApplication
    except ImportError:  # not running in QGIS's Python at all
        return _default_profile_dir()
    path = QgsApplication.qgisSettingsDirPath()
    return Path(path) if path else _default_profile_dir()


def private_site_dir(settings_dir: str | os.PathLike | None = None) -> Path:
    """``<profile>/python/unigeoseg_deps/py<major><minor>`` for the running Python."""
    root = Path(settings_dir) if settings_dir is not None else qgis_settings_dir()
    return root / "python" / DEPS_FOLDER / f"py{sys.version_info[0]}{sys.version_info[1]}"


def add_private_site_dir(path: str | os.PathLike | None = None) -> Path | None:
    """Append the private site directory to ``sys.path`` if it exists; idempotent.

    Returns the directory when it is (now) on ``sys.path``, else ``None``. Appended, not
    prepended: a pyzmq that QGIS's Python has on its own is preferred.
    """
    directory = Path(path) if path is not None else private_site_dir()
    if not directory.is_dir():
        return None
    entry = str(directory)
    if entry not in sys.path:
        sys.path.append(entry)
        importlib.invalidate_caches()
    return directory


# --- what ------------------------------------------------------------------------------------


def _importable(name: str) -> bool:
    """Whether ``import name`` would find a module, without importing it."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a blocking finder, or sys.modules[name] is None
        return False


def missing_dependencies() -> list[str]:
    """Distribution names of the plugin's requirements that QGIS's Python cannot import.

    ``[]`` when everything is there; ``["pyzmq"]`` is fixed by :func:`install_private`;
    ``"numpy"`` can only be fixed by repairing the QGIS installation.
    """
    return [dist for module, dist, _ in REQUIREMENTS if not _importable(module)]


def privately_installable(missing: Sequence[str]) -> bool:
    """Whether :func:`install_private` can fix every name in ``missing``."""
    fixable = {dist for _, dist, ok in REQUIREMENTS if ok}
    return bool(missing) and set(missing) <= fixable


def explain_missing(missing: Sequence[str]) -> str:
    """One paragraph for the analyst about what is missing and what to do (empty if nothing)."""
    if not missing:
        return ""
    parts = []
    if "numpy" in missing:
        parts.append("QGIS's Python has no numpy: the QGIS installation is incomplete; "
                     "reinstall QGIS (numpy is never installed by this plugin).")
    if PIP_PACKAGE in missing:
        parts.append("pyzmq (ZeroMQ for Python) is missing: install it with your QGIS "
                     "distribution's package manager (Debian/Ubuntu: apt install python3-zmq; "
                     "conda: conda install pyzmq), or let the plugin download it from PyPI into "
                     f"{private_site_dir()} (nothing else on the system is modified).")
    return " ".join(parts)


# --- which Python ----------------------------------------------------------------------------


def _looks_like_python(path: str | os.PathLike | None) -> bool:
    return bool(path) and Path(path).name.lower().startswith("python")


def _candidate_pythons() -> list[Path]:
    """Interpreters that may be the one QGIS embeds, most likely first.

    ``sys.executable`` is the Python interpreter in a plain Python process and on most Linux
    builds of QGIS, but embedded in QGIS it is often the QGIS binary itself: ``qgis-bin.exe``
    on Windows, ``QGIS.app/Contents/MacOS/QGIS`` on macOS. Running that with ``-m pip`` would
    start another QGIS. So look next to the Python installation QGIS uses instead:

    - ``sys._base_executable`` (the interpreter behind a venv; CPython's own guess);
    - Windows (OSGeo4W and the standalone installer): ``<sys.exec_prefix>\\python.exe``, i.e.
      ``...\\apps\\Python3xx\\python.exe``;
    - macOS app bundles: ``<sys.exec_prefix>/bin/python3.x`` and ``Contents/MacOS/bin/python3``;
    - Linux and others: ``<sys.exec_prefix>/bin/python3.x``;
    - finally ``python3.x`` on ``PATH``.

    :func:`find_python` then keeps only a candidate that reports the same Python version.
    """
    major, minor = sys.version_info[:2]
    names = [f"python{major}.{minor}", f"python{major}", "python"]
    candidates: list[Path] = []
    for exe in (sys.executable, getattr(sys, "_base_executable", None)):
        if _looks_like_python(exe):
            candidates.append(Path(exe))
    prefixes = [Path(p) for p in dict.fromkeys((sys.exec_prefix, sys.base_exec_prefix)) if p]
    if sys.platform.startswith("win"):
        for prefix in prefixes:
            candidates += [prefix / "python.exe", prefix / f"python{major}.exe"]
    else:
        for prefix in prefixes:
            candidates += [prefix / "bin" / name for name in names]
        if sys.executable:
            exe_dir = Path(sys.executable).parent  # QGIS.app/Contents/MacOS
            candidates += [exe_dir / "bin" / name for name in names]
            candidates += [exe_dir / name for name in names]
    on_path = shutil.which(names[0])
    if on_path:
        candidates.append(Path(on_path))
    return list(dict.fromkeys(candidates))


def _creation_flags() -> int:
    """No console window flashing up on Windows when QGIS (a GUI program) starts pip."""
    return getattr(subprocess, "CREATE_NO_WINDOW", 0) if sys.platform.startswith("win") else 0


def _reports_our_version(python: Path) -> bool:
    probe = "import sys; print('%d.%d' % sys.version_info[:2])"
    try:
        result = subprocess.run(  # nosec B603 - fixed arguments, no shell
            [str(python), "-c", probe], capture_output=True, text=True,
            timeout=PROBE_TIMEOUT_S, creationflags=_creation_flags(), check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    expected = "{}.{}".format(*sys.version_info[:2])
    return result.returncode == 0 and result.stdout.strip() == expected


@functools.lru_cache(maxsize=1)
def find_python() -> str:
    """Path of a Python interpreter of the same version as the one QGIS runs.

    Raises ``RuntimeError`` (with the candidates tried) when there is none.
    """
    tried = []
    for candidate in _candidate_pythons():
        if candidate.is_file() and os.access(candidate, os.X_OK):
            if _reports_our_version(candidate):
                return str(candidate)
        tried.append(str(candidate))
    raise RuntimeError("cannot find the Python interpreter that QGIS uses "
                       f"(Python {sys.version_info[0]}.{sys.version_info[1]}); tried: "
                       + ", ".join(tried))


# --- install ---------------------------------------------------------------------------------


def install_command(python_exe: str | os.PathLike,
                    target: str | os.PathLike | None = None) -> list[str]:
    """The pip command that puts pyzmq (and nothing else) into the private site directory.

    ``--upgrade`` makes a second run repair or update the folder (without it pip leaves an
    existing ``zmq`` folder in the target alone); ``--only-binary`` fails fast instead of trying
    to compile libzmq where no wheel exists.
    """
    target = Path(target) if target is not None else private_site_dir()
    return [str(python_exe), "-m", "pip", "install", "--target", str(target),
            "--no-warn-script-location", "--upgrade", "--only-binary=:all:",
            "--disable-pip-version-check", "--no-input", PIP_PACKAGE]


def _report(feedback, text: str) -> None:
    """Forward a log line to a QgsProcessingFeedback-like object, if it takes one."""
    for method in ("pushConsoleInfo", "pushInfo"):
        push = getattr(feedback, method, None)
        if callable(push):
            push(text)
            return


def _canceled(feedback) -> bool:
    is_canceled = getattr(feedback, "isCanceled", None)
    return bool(is_canceled()) if callable(is_canceled) else False


def _run_streaming(command: list[str], feedback, timeout_s: float,
                   log: list[str]) -> int | None:
    """Run ``command``, collect its output in ``log``; ``None`` if canceled or timed out."""
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONIOENCODING="utf-8")
    process = subprocess.Popen(  # nosec B603 - list arguments, no shell
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        text=True, encoding="utf-8", errors="replace", env=env,
        creationflags=_creation_flags())

    def pump() -> None:
        for line in process.stdout:
            line = line.rstrip()
            log.append(line)
            _report(feedback, line)

    reader = threading.Thread(target=pump, name="unigeoseg-pip-output", daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout_s
    stopped = None
    while process.poll() is None:
        if _canceled(feedback):
            stopped = "canceled"
        elif time.monotonic() > deadline:
            stopped = f"timed out after {timeout_s:g} s"
        if stopped:
            process.kill()
            break
        time.sleep(0.1)
    process.wait()
    reader.join(timeout=5)
    if stopped:
        log.append(f"pip {stopped}")
        return None
    return process.returncode


def _verify(python: str, target: Path) -> tuple[bool, str]:
    """Import zmq from ``target`` in a separate process: a broken binary can't crash QGIS."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import zmq; "
            "print('pyzmq', zmq.__version__, 'libzmq', zmq.zmq_version(), 'from', zmq.__file__)")
    try:
        result = subprocess.run(  # nosec B603 - fixed arguments, no shell
            [python, "-c", code, str(target)], capture_output=True, text=True,
            timeout=PROBE_TIMEOUT_S, creationflags=_creation_flags(), check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"could not check the installed pyzmq: {exc}"
    return result.returncode == 0, (result.stdout + result.stderr).strip()


def install_private(feedback=None, *, python: str | os.PathLike | None = None,
                    target: str | os.PathLike | None = None,
                    timeout_s: float = INSTALL_TIMEOUT_S) -> tuple[bool, str]:
    """Download pyzmq from PyPI into the private site directory; returns ``(ok, log_text)``.

    ``feedback`` is optional: anything with ``isCanceled()`` (a QgsFeedback, or the QgsTask
    that runs this) stops pip when canceled; with ``pushConsoleInfo``/``pushInfo`` (a
    QgsProcessingFeedback) it also receives pip's output line by line. Blocks up to
    ``timeout_s`` seconds, so call it from a QgsTask, never on the GUI thread. On success the
    folder is on ``sys.path`` and ``import zmq`` works without restarting QGIS.
    """
    log: list[str] = []
    try:
        python = str(python) if python is not None else find_python()
    except RuntimeError as exc:
        return False, f"{exc}\n{explain_missing([PIP_PACKAGE])}"
    target = Path(target) if target is not None else private_site_dir()
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return False, f"cannot create {target}: {exc}"
    command = install_command(python, target)
    log.append("$ " + " ".join(command))
    _report(feedback, log[-1])
    try:
        returncode = _run_streaming(command, feedback, timeout_s, log)
    except OSError as exc:
        log.append(f"cannot run {python}: {exc}")
        return False, "\n".join(log)
    if returncode is None:
        return False, "\n".join(log)
    if returncode != 0:
        log.append(f"pip failed (exit code {returncode}).")
        if any("No module named pip" in line for line in log):
            log.append("QGIS's Python has no pip. " + explain_missing([PIP_PACKAGE]))
        return False, "\n".join(log)
    ok, text = _verify(python, target)
    log.append(text)
    if not ok:
        log.append("pyzmq was installed but does not import; it is not used.")
        return False, "\n".join(log)
    add_private_site_dir(target)
    return True, "\n".join(log)
