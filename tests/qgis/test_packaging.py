"""Packaging: the plugin zip as plugins.qgis.org and QGIS see it, the development link, and
pyzmq handling (``deps``) in QGIS's own Python.

The zip is built into a temporary folder, installed the way QGIS's plugin manager installs a
zip (its own ``pyplugin_installer.unzip``), and imported in fresh QGIS-Python processes, so
that ``sys.modules`` shows exactly what loading the plugin pulls in.
"""

from __future__ import annotations

import ast
import configparser
import importlib.util
import json
import os
import stat
import subprocess
import sys
import textwrap
import threading
import time
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import pytest
from tests.conftest import REPO

qgis_core = pytest.importorskip("qgis.core")

PACKAGE = "unigeoseg_qgis"
HEAVY = ("torch", "torchvision", "rasterio", "zmq", "segment_anything", "geopandas", "shapely")
REQUIRED_METADATA = ("name", "description", "version", "qgisMinimumVersion", "author", "email",
                     "about", "tracker", "repository")
ICONS = ("unigeoseg.svg", "click.svg", "box.svg", "text.svg", "backend.svg")
PY = f"py{sys.version_info[0]}{sys.version_info[1]}"
QGIS_UNZIP = Path("/usr/share/qgis/python/pyplugin_installer/unzip.py")

# Hides pyzmq from a fresh interpreter, as if QGIS's Python did not have it.
ZMQ_BLOCKER = textwrap.dedent("""
    import sys

    class _HideZmq:
        def find_spec(self, name, path=None, target=None):
            if name == "zmq" or name.startswith("zmq."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, _HideZmq())
""")


def _load_builder():
    spec = importlib.util.spec_from_file_location("build_plugin",
                                                  REPO / "scripts" / "build_plugin.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


builder = _load_builder()


def _pyproject_version() -> str:
    return builder.pyproject_version(REPO / "pyproject.toml")


def _install_zip(zip_path: Path, plugins_dir: Path) -> Path:
    """Extract as QGIS's plugin manager does ("Install from ZIP")."""
    if QGIS_UNZIP.is_file():
        spec = importlib.util.spec_from_file_location("qgis_installer_unzip", QGIS_UNZIP)
        unzip = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(unzip)
        unzip.unzip(str(zip_path), str(plugins_dir))
    else:
        with zipfile.ZipFile(zip_path) as archive:
            archive.extractall(plugins_dir)
    return plugins_dir / PACKAGE


def _run_qgis_python(code: str, cwd: Path, env: dict | None = None, timeout: float = 120):
    """Run ``code`` in a fresh QGIS Python; its last stdout line is JSON, returned parsed."""
    environment = dict(os.environ, QT_QPA_PLATFORM="offscreen", **(env or {}))
    environment.pop("PYTHONPATH", None)  # nothing from the repository may leak in
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=cwd, env=environment, timeout=timeout, check=False)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def _import_probe(plugins_dir: Path, prelude: str = "", body: str = "") -> str:
    return prelude + textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(plugins_dir)!r})
        before = set(sys.modules)
        import {PACKAGE}
        report = {{
            "file": {PACKAGE}.__file__,
            "has_class_factory": callable(getattr({PACKAGE}, "classFactory", None)),
            "heavy": sorted(set({HEAVY!r}) & set(sys.modules)),
            "new_modules": sorted(set(sys.modules) - before),
        }}
    """) + textwrap.dedent(body) + "\nprint(json.dumps(report))\n"


@pytest.fixture(scope="module")
def built_zip(tmp_path_factory) -> Path:
    return builder.build(tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def archive(built_zip):
    with zipfile.ZipFile(built_zip) as opened:
        yield opened


@pytest.fixture(scope="module")
def metadata(archive) -> configparser.ConfigParser:
    # As plugins.qgis.org's validator and qgis.utils.findPlugins read it.
    parser = configparser.ConfigParser()
    parser.optionxform = str
    parser.read_string(archive.read(f"{PACKAGE}/metadata.txt").decode("utf-8"))
    return parser


@pytest.fixture(scope="module")
def plugins_dir(tmp_path_factory, built_zip) -> Path:
    folder = tmp_path_factory.mktemp("plugins")
    _install_zip(built_zip, folder)
    return folder


@pytest.fixture(scope="module")
def deps(plugins_dir):
    """The shipped ``unigeoseg_qgis.deps``, imported from the installed zip."""
    sys.path.insert(0, str(plugins_dir))
    try:
        module = importlib.import_module(f"{PACKAGE}.deps")
        assert Path(module.__file__).is_relative_to(plugins_dir)
        yield module
    finally:
        sys.path.remove(str(plugins_dir))
        for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
            del sys.modules[name]


# --- the zip ---------------------------------------------------------------------------------


def test_the_zip_is_named_after_the_package_and_pyproject_version(built_zip):
    assert built_zip.name == f"{PACKAGE}-{_pyproject_version()}.zip"
    assert built_zip.stat().st_size < 25_000_000


def test_the_zip_has_a_single_top_folder_that_is_a_python_identifier(archive):
    names = archive.namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {PACKAGE}
    assert PACKAGE.isidentifier()
    # plugins.qgis.org takes the package name from the first entry.
    assert names[0][: names[0].index("/")] == PACKAGE
    assert archive.testzip() is None


def test_the_zip_holds_no_unsafe_or_generated_entries(archive):
    for info in archive.infolist():
        name = info.filename
        parts = name.split("/")
        assert not name.startswith("/") and "\\" not in name, name
        assert ":" not in name and ".." not in name, name
        assert "__pycache__" not in parts and ".pyc" not in name and ".pyo" not in name, name
        assert not any(part.startswith(".") for part in parts), name  # .git*, caches
        assert "tests" not in parts and "test" not in parts and "conftest.py" not in parts
        assert stat.S_ISREG(info.external_attr >> 16), f"{name} is not a regular file"


def test_the_entry_point_is_a_light_class_factory(archive):
    source = archive.read(f"{PACKAGE}/__init__.py").decode("utf-8")
    tree = ast.parse(source)
    assert ast.get_docstring(tree)
    factories = [node for node in tree.body
                 if isinstance(node, ast.FunctionDef) and node.name == "classFactory"]
    assert len(factories) == 1 and [a.arg for a in factories[0].args.args] == ["iface"]
    # Nothing is imported at module level: QGIS imports every enabled plugin at start-up.
    assert not [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]


def test_metadata_has_every_required_field(metadata):
    general = metadata["general"]
    for key in REQUIRED_METADATA:
        assert general.get(key, "").strip(), key
    assert general["name"] == "UniGeoSeg"
    assert general["qgisMinimumVersion"] == "3.22"
    assert general["qgisMaximumVersion"] == "4.99"
    assert general["version"] == _pyproject_version()
    assert general["category"] == "Raster"
    assert general["hasProcessingProvider"] == "yes"
    assert general["experimental"] == "True"
    assert "/" not in general["author"]
    for key in ("tracker", "repository", "homepage"):
        assert general[key].startswith("https://github.com/unigeoseg/unigeoseg-qgis")
    about = general["about"].lower()
    assert "backend" in about and "127.0.0.1" in about and "leaves your machine" in about


def test_license_and_icons_are_in_the_zip(archive, metadata):
    license_text = archive.read(f"{PACKAGE}/LICENSE")
    assert license_text == (REPO / "LICENSE").read_bytes()
    assert license_text.startswith(b"                    GNU GENERAL PUBLIC LICENSE\n"
                                   b"                       Version 2, June 1991")
    icon = metadata["general"]["icon"]
    assert icon == "icons/unigeoseg.svg"
    names = set(archive.namelist())
    for name in ICONS:
        entry = f"{PACKAGE}/icons/{name}"
        assert entry in names
        root = ET.fromstring(archive.read(entry))
        assert root.tag == "{http://www.w3.org/2000/svg}svg" and root.get("viewBox") == "0 0 24 24"


def test_icons_render_in_qt(qgis_app, archive):
    from qgis.PyQt.QtCore import QByteArray
    from qgis.PyQt.QtSvg import QSvgRenderer

    for name in ICONS:
        renderer = QSvgRenderer(QByteArray(archive.read(f"{PACKAGE}/icons/{name}")))
        assert renderer.isValid(), name


def test_the_protocol_package_is_carried_as_real_files(archive, plugins_dir):
    source = REPO / "backend" / "unigeoseg_protocol"
    modules = sorted(p for p in source.glob("*.py"))
    assert modules
    for path in modules:
        entry = f"{PACKAGE}/unigeoseg_protocol/{path.name}"
        assert archive.read(entry) == path.read_bytes(), entry
        installed = plugins_dir / PACKAGE / "unigeoseg_protocol" / path.name
        assert installed.is_file() and not installed.is_symlink()
    assert not (plugins_dir / PACKAGE / "unigeoseg_protocol").is_symlink()


def test_every_plugin_source_file_is_shipped(archive):
    names = set(archive.namelist())
    source = REPO / "qgis_plugin"
    for path in source.rglob("*.py"):
        relative = path.relative_to(source)
        if "__pycache__" in relative.parts or "tests" in relative.parts:
            continue
        assert f"{PACKAGE}/{relative.as_posix()}" in names


def test_the_build_is_reproducible(built_zip, tmp_path):
    again = builder.build(tmp_path)
    assert again.read_bytes() == built_zip.read_bytes()


def test_the_command_line_prints_the_zip_path(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "build_plugin.py"),
                             "--out-dir", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip())
    assert path == tmp_path / "out" / f"{PACKAGE}-{_pyproject_version()}.zip"
    assert zipfile.is_zipfile(path)


# --- the builder's own rules, on a small fake repository ------------------------------------


def _fake_repo(root: Path, version: str = "1.2.3") -> Path:
    repo = root / "repo"
    plugin = repo / "qgis_plugin"
    (plugin / "__pycache__").mkdir(parents=True)
    (plugin / "__init__.py").write_text('"""Fake."""\n\n\ndef classFactory(iface):\n'
                                        "    return None\n")
    (plugin / "__pycache__" / "__init__.cpython-311.pyc").write_bytes(b"\0")
    (plugin / "module.pyc").write_bytes(b"\0")
    (plugin / "tests").mkdir()
    (plugin / "tests" / "test_x.py").write_text("")
    (plugin / ".gitignore").write_text("*\n")
    (repo / "shared").mkdir()
    (repo / "shared" / "__init__.py").write_text("X = 1\n")
    (plugin / "linked").symlink_to("../shared")
    (repo / "pyproject.toml").write_text(f'[project]\nname = "x"\nversion = "{version}"\n')
    text = (REPO / "metadata.txt").read_text()
    text = text.replace(f"version={_pyproject_version()}\n", f"version={version}\n")
    (repo / "metadata.txt").write_text(text)
    (repo / "LICENSE").write_text("GPL\n")
    (repo / "icons").mkdir()
    (repo / "icons" / "unigeoseg.svg").write_text("<svg/>")
    return repo


def test_builder_resolves_links_and_leaves_out_generated_files(tmp_path):
    repo = _fake_repo(tmp_path)
    path = builder.build(tmp_path / "dist", repo=repo)
    with zipfile.ZipFile(path) as archive:
        names = sorted(archive.namelist())
        assert archive.read(f"{PACKAGE}/linked/__init__.py") == b"X = 1\n"
    assert names == [f"{PACKAGE}/LICENSE", f"{PACKAGE}/__init__.py",
                     f"{PACKAGE}/icons/unigeoseg.svg", f"{PACKAGE}/linked/__init__.py",
                     f"{PACKAGE}/metadata.txt"]


def test_builder_refuses_bad_metadata_and_sources(tmp_path):
    repo = _fake_repo(tmp_path)
    text = (repo / "metadata.txt").read_text()
    text = text.replace("version=1.2.3\n", "version=1.2.4\n")
    text = "\n".join(line for line in text.splitlines() if not line.startswith("tracker="))
    text = text.replace("icon=icons/unigeoseg.svg", "icon=icons/missing.svg")
    (repo / "metadata.txt").write_text(text)
    (repo / "qgis_plugin" / "broken.py").write_text("def f(:\n")
    with pytest.raises(builder.BuildError) as error:
        builder.build(tmp_path / "dist", repo=repo)
    message = str(error.value)
    for expected in ("'tracker' is missing", "version '1.2.4' differs from pyproject.toml's "
                     "'1.2.3'", "icons/missing.svg", "broken.py does not compile"):
        assert expected in message
    assert not (tmp_path / "dist").exists() or not list((tmp_path / "dist").iterdir())


def test_builder_parses_metadata_like_the_plugin_repository(tmp_path):
    repo = _fake_repo(tmp_path)
    text = (repo / "metadata.txt").read_text().replace("category=Raster",
                                                       "category=Raster\nnote=100% local")
    (repo / "metadata.txt").write_text(text)
    with pytest.raises(builder.BuildError, match="does not parse"):
        builder.build(tmp_path / "dist", repo=repo)


def test_builder_refuses_a_broken_symlink(tmp_path):
    repo = _fake_repo(tmp_path)
    (repo / "qgis_plugin" / "dangling.py").symlink_to("nowhere.py")
    with pytest.raises(builder.BuildError, match="broken symbolic link"):
        builder.build(tmp_path / "dist", repo=repo)


# --- installed: QGIS finds it, and loading it is light --------------------------------------


def test_qgis_finds_the_installed_plugin(plugins_dir):
    import qgis.utils

    found = dict(qgis.utils.findPlugins(str(plugins_dir)))
    assert list(found) == [PACKAGE]
    parser = found[PACKAGE]
    assert parser is not None
    assert parser.get("general", "name") == "UniGeoSeg"


def test_importing_the_installed_plugin_loads_nothing_heavy(plugins_dir, tmp_path):
    report = _run_qgis_python(_import_probe(plugins_dir), cwd=tmp_path)
    assert Path(report["file"]) == plugins_dir / PACKAGE / "__init__.py"
    assert report["has_class_factory"]
    assert report["heavy"] == []
    assert [m for m in report["new_modules"] if m.split(".")[0] in ("qgis", "PyQt5", "numpy")] \
        == []


@pytest.mark.skipif(not (REPO / "qgis_plugin" / "plugin.py").is_file(),
                    reason="qgis_plugin/plugin.py is not written yet")
def test_class_factory_creates_the_plugin_even_without_pyzmq(plugins_dir, tmp_path):
    """QGIS calls classFactory at start-up: it must work (and stay light) without pyzmq, so
    the plugin can offer to install it instead of failing to load."""
    body = """
        class Iface:
            pass

        plugin = unigeoseg_qgis.classFactory(Iface())
        report["plugin_class"] = type(plugin).__name__
        report["hooks"] = [name for name in ("initGui", "initProcessing", "unload")
                           if callable(getattr(plugin, name, None))]
        report["heavy_after_factory"] = sorted({"torch", "rasterio", "segment_anything"}
                                               & set(sys.modules))
        try:
            import zmq  # noqa: F401
            report["zmq_hidden"] = False
        except ImportError:
            report["zmq_hidden"] = True
    """
    report = _run_qgis_python(_import_probe(plugins_dir, ZMQ_BLOCKER, body), cwd=tmp_path,
                              env={"HOME": str(tmp_path)})
    assert report["zmq_hidden"]
    assert report["plugin_class"] == "UniGeoSegPlugin"
    assert report["hooks"] == ["initGui", "initProcessing", "unload"]
    assert report["heavy_after_factory"] == []


# --- development link ------------------------------------------------------------------------


def _link(target: Path) -> Path:
    result = subprocess.run(["bash", str(REPO / "scripts" / "link_plugin.sh"), str(target)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return Path(result.stdout.strip())


def test_link_plugin_makes_an_importable_development_folder(tmp_path):
    plugins = tmp_path / "profile" / "python" / "plugins"
    folder = _link(plugins)
    assert folder == plugins.resolve() / PACKAGE
    for name in ("__init__.py", "metadata.txt", "LICENSE", "icons", "unigeoseg_protocol"):
        assert (folder / name).is_symlink() and (folder / name).exists(), name
    assert (folder / "icons" / "unigeoseg.svg").is_file()
    assert _link(plugins) == folder  # idempotent

    import qgis.utils

    found = dict(qgis.utils.findPlugins(str(plugins)))
    assert found[PACKAGE] is not None
    body = f"""
        from {PACKAGE} import deps
        from {PACKAGE}.unigeoseg_protocol import errors
        report["deps_file"] = deps.__file__
        report["heavy_after_deps"] = sorted(set({HEAVY!r}) & set(sys.modules))
    """
    report = _run_qgis_python(_import_probe(plugins, body=body), cwd=tmp_path)
    assert Path(report["file"]) == folder / "__init__.py"
    assert Path(report["deps_file"]) == folder / "deps.py"
    assert report["heavy"] == [] and report["heavy_after_deps"] == []


def test_link_plugin_drops_stale_links_and_never_deletes_real_files(tmp_path):
    plugins = tmp_path / "plugins"
    folder = _link(plugins)
    (folder / "gone.py").symlink_to(tmp_path / "nothing.py")
    _link(plugins)
    assert not (folder / "gone.py").is_symlink()
    (folder / "real.py").write_text("# an installed copy\n")
    result = subprocess.run(["bash", str(REPO / "scripts" / "link_plugin.sh"), str(plugins)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1 and "real files" in result.stderr
    assert (folder / "real.py").read_text() == "# an installed copy\n"


# --- deps ------------------------------------------------------------------------------------


def test_private_site_dir_lives_in_the_qgis_profile(qgis_app, deps, tmp_path):
    from qgis.core import QgsApplication

    settings_dir = QgsApplication.qgisSettingsDirPath()
    assert settings_dir
    assert deps.private_site_dir() == Path(settings_dir) / "python" / "unigeoseg_deps" / PY
    assert deps.private_site_dir(tmp_path) == tmp_path / "python" / "unigeoseg_deps" / PY


def test_private_site_dir_without_a_qgis_application_uses_the_default_profile(plugins_dir,
                                                                             tmp_path):
    code = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(plugins_dir)!r})
        from {PACKAGE} import deps
        print(json.dumps(str(deps.private_site_dir())))
    """)
    env = {"HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "data")}
    path = _run_qgis_python(code, cwd=tmp_path, env=env)
    assert Path(path) == (tmp_path / "data" / "QGIS" / "QGIS3" / "profiles" / "default"
                          / "python" / "unigeoseg_deps" / PY)


def test_add_private_site_dir_is_idempotent_and_needs_the_folder(deps, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    folder = deps.private_site_dir(tmp_path)
    assert deps.add_private_site_dir(folder) is None
    assert str(folder) not in sys.path
    folder.mkdir(parents=True)
    assert deps.add_private_site_dir(folder) == folder
    assert deps.add_private_site_dir(folder) == folder
    assert sys.path.count(str(folder)) == 1
    assert sys.path[-1] == str(folder)  # appended: QGIS's own pyzmq wins


def test_install_command_shape(deps, tmp_path):
    command = deps.install_command("/opt/qgis/python3", tmp_path / "site")
    assert command[:6] == ["/opt/qgis/python3", "-m", "pip", "install", "--target",
                           str(tmp_path / "site")]
    assert "--no-warn-script-location" in command
    assert command[-1] == "pyzmq"
    assert not any(arg in command for arg in ("--user", "--break-system-packages", "numpy"))
    assert deps.install_command(sys.executable)[5] == str(deps.private_site_dir())


def test_missing_dependencies_is_empty_in_this_qgis_python(deps):
    assert deps.missing_dependencies() == []
    assert deps.explain_missing([]) == ""


def test_hidden_pyzmq_is_reported_and_the_plugin_still_imports(plugins_dir, tmp_path):
    body = f"""
        from {PACKAGE} import deps
        report["missing"] = deps.missing_dependencies()
        report["installable"] = deps.privately_installable(report["missing"])
        report["explanation"] = deps.explain_missing(report["missing"])
        try:
            import zmq  # noqa: F401
            report["zmq_hidden"] = False
        except ImportError:
            report["zmq_hidden"] = True
    """
    report = _run_qgis_python(_import_probe(plugins_dir, ZMQ_BLOCKER, body), cwd=tmp_path)
    assert report["zmq_hidden"]
    assert report["has_class_factory"]
    assert report["missing"] == ["pyzmq"]
    assert report["installable"]
    assert "python3-zmq" in report["explanation"]


def test_find_python_sees_through_an_embedding_executable(deps, monkeypatch):
    deps.find_python.cache_clear()
    try:
        assert deps.find_python() == sys.executable
        # Embedded in QGIS, sys.executable is often the QGIS binary (Windows, macOS).
        monkeypatch.setattr(sys, "executable", "/usr/bin/qgis")
        deps.find_python.cache_clear()
        python = deps.find_python()
        assert Path(python).name.startswith("python")
        probe = subprocess.run([python, "-c", "import sys; print(sys.version_info[:2])"],
                               capture_output=True, text=True, timeout=30, check=True)
        assert probe.stdout.strip() == str(sys.version_info[:2])
    finally:
        deps.find_python.cache_clear()


# install_private is exercised against a stand-in interpreter: for "-m pip" it acts like pip
# (MODE), for "-c" it runs the code like Python. No network, nothing installed for real.
FAKE_PYTHON = """#!{python}
import os, sys, time
MODE = {mode!r}
if sys.argv[1:3] == ["-m", "pip"]:
    args = sys.argv[3:]
    print("Collecting pyzmq", flush=True)
    if MODE == "ok":
        target = args[args.index("--target") + 1]
        os.makedirs(os.path.join(target, "zmq"), exist_ok=True)
        with open(os.path.join(target, "zmq", "__init__.py"), "w") as f:
            f.write("__version__ = '0.0.stub'\\ndef zmq_version():\\n    return 'stub'\\n")
        print("Successfully installed pyzmq-0.0.stub")
    elif MODE == "no-pip":
        print(sys.executable + ": No module named pip")
        sys.exit(1)
    elif MODE == "hang":
        time.sleep(120)
    sys.exit(0)
if sys.argv[1] == "-c":
    code = sys.argv[2]
    sys.argv = ["-c", *sys.argv[3:]]
    exec(compile(code, "<string>", "exec"), {{"__name__": "__main__"}})
"""


def _fake_python(tmp_path: Path, mode: str) -> Path:
    path = tmp_path / f"python-{mode}"
    path.write_text(FAKE_PYTHON.format(python=sys.executable, mode=mode))
    path.chmod(0o755)
    return path


def _feedback():
    from qgis.core import QgsProcessingFeedback

    class Recorder(QgsProcessingFeedback):
        def __init__(self):
            super().__init__()
            self.lines = []

        def pushConsoleInfo(self, info):
            self.lines.append(info)

    return Recorder()


def test_install_private_installs_into_the_target_and_puts_it_on_sys_path(
        deps, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    target = tmp_path / "profile" / "python" / "unigeoseg_deps" / PY
    feedback = _feedback()
    ok, log = deps.install_private(feedback, python=_fake_python(tmp_path, "ok"), target=target)
    assert ok, log
    assert f"-m pip install --target {target}" in log
    assert "Successfully installed pyzmq" in log
    assert f"pyzmq 0.0.stub libzmq stub from {target}" in log
    assert "Successfully installed pyzmq-0.0.stub" in feedback.lines
    assert (target / "zmq" / "__init__.py").is_file()
    assert sys.path[-1] == str(target)


def test_install_private_reports_a_python_without_pip(deps, tmp_path):
    ok, log = deps.install_private(python=_fake_python(tmp_path, "no-pip"),
                                   target=tmp_path / "site")
    assert not ok
    assert "pip failed (exit code 1)" in log
    assert "QGIS's Python has no pip" in log and "apt install python3-zmq" in log


def test_install_private_is_bounded_in_time(deps, tmp_path):
    start = time.monotonic()
    ok, log = deps.install_private(python=_fake_python(tmp_path, "hang"),
                                   target=tmp_path / "site", timeout_s=1.0)
    assert not ok and "pip timed out after 1 s" in log
    assert time.monotonic() - start < 20


def test_install_private_stops_when_canceled(deps, tmp_path):
    feedback = _feedback()
    threading.Timer(0.5, feedback.cancel).start()
    start = time.monotonic()
    ok, log = deps.install_private(feedback, python=_fake_python(tmp_path, "hang"),
                                   target=tmp_path / "site")
    assert not ok and "pip canceled" in log
    assert time.monotonic() - start < 20


def test_install_private_explains_when_no_python_is_found(deps, monkeypatch):
    def nothing():
        raise RuntimeError("cannot find the Python interpreter that QGIS uses")

    monkeypatch.setattr(deps, "find_python", nothing)
    ok, log = deps.install_private()
    assert not ok and "cannot find the Python interpreter" in log and "python3-zmq" in log


def test_deps_is_pure_logic(archive):
    """No widgets and no heavy imports in deps.py: it runs inside a QgsTask."""
    tree = ast.parse(archive.read(f"{PACKAGE}/deps.py"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    assert not imported & {"zmq", "numpy", "torch", "qgis.gui", "qgis.PyQt.QtWidgets"}
