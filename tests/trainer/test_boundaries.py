"""The trainer is a client of the backend's library layers, and the backend never needs it.

Each check imports in a fresh interpreter, so that modules other tests loaded do not hide an
import that the package itself makes.
"""

from __future__ import annotations

import subprocess
import sys


def _modules_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=True)
    return set(result.stdout.split())


def test_the_trainer_never_imports_the_service_zmq_or_the_protocol_client():
    loaded = _modules_after_import("unigeoseg_trainer.train")
    forbidden = {"zmq", "unigeoseg_protocol.client", "unigeoseg_backend.service",
                 "unigeoseg_backend.service.server", "unigeoseg_backend.segmenter"}
    assert "unigeoseg_backend.model.unigeoseg" in loaded  # the import really ran
    assert not forbidden & loaded, sorted(forbidden & loaded)


def test_the_backend_cli_loads_without_the_trainer():
    loaded = _modules_after_import("unigeoseg_backend.cli.main")
    assert "unigeoseg_backend.cli.main" in loaded
    assert not {name for name in loaded if name.startswith("unigeoseg_trainer")}
