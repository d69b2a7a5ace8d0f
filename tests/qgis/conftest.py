"""Fixtures for the tests that run in QGIS's own Python (``.venv-qgis``).

QGIS's Python has no torch (and must not): checkpoints are written, and backends run, by the
backend's Python, which ``UNIGEOSEG_BACKEND_PYTHON`` names.
"""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import BackendProcess, backend_python, start_backend


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A seeded random tiny-SAM state dict, written by the backend's Python."""
    path = tmp_path_factory.mktemp("weights") / "sam_tiny.pth"
    script = textwrap.dedent(f"""
        import torch
        from unigeoseg_backend.engines.sam import SAM_CONFIGS, build_sam
        torch.manual_seed(0)
        torch.save(build_sam(SAM_CONFIGS["tiny"]).state_dict(), {str(path)!r})
    """)
    subprocess.run([backend_python(), "-c", script], check=True, timeout=300)
    return path


@pytest.fixture(scope="module")
def tiny_text_model(tmp_path_factory) -> Path:
    """The tiny UniGeoSeg (seeded random weights) in the released layout, written by the
    backend's Python: a text engine for ``serve --model``."""
    path = tmp_path_factory.mktemp("models") / "unigeoseg-tiny-sparseconv"
    script = textwrap.dedent(f"""
        import torch
        from unigeoseg_backend.model.checkpoint import save_released
        from unigeoseg_backend.model.registry import get_config, tiny_tokenizer
        from unigeoseg_backend.model.unigeoseg import UniGeoSeg
        torch.manual_seed(0)
        model = UniGeoSeg(get_config("unigeoseg-tiny-sparseconv")).eval()
        save_released(model, tiny_tokenizer(), {str(path)!r})
    """)
    subprocess.run([backend_python(), "-c", script], check=True, timeout=300)
    return path


def tiny_args(checkpoint: Path) -> list[str]:
    """``serve`` arguments for the tiny SAM on the CPU."""
    return ["--sam-type", "tiny", "--sam-checkpoint", str(checkpoint), "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny_serve_args(tiny_checkpoint) -> list[str]:
    """``serve`` arguments for the tiny SAM on the CPU (for a launcher or a backend)."""
    return tiny_args(tiny_checkpoint)


@pytest.fixture(scope="module")
def backend(tmp_path_factory, tiny_checkpoint) -> Iterator[BackendProcess]:
    """One tiny-SAM backend shared by a test module."""
    process = start_backend(tmp_path_factory.mktemp("backend"), *tiny_args(tiny_checkpoint))
    yield process
    _stop(process)


@pytest.fixture
def tiny_backend_factory(tmp_path, tiny_checkpoint):
    """For tests that kill, freeze or restart backends: ``factory(*serve_args, address=None)``
    starts a tiny-SAM backend (on ``address``, or a free loopback port); every backend started
    is killed or stopped after the test, frozen (SIGSTOP) ones included."""
    started: list[BackendProcess] = []

    def factory(*args: str, address: str | None = None) -> BackendProcess:
        extra = [*tiny_args(tiny_checkpoint), *(["--address", address] if address else []),
                 *args]
        process = start_backend(tmp_path, *extra)
        started.append(process)
        return process

    yield factory
    for process in started:
        _stop(process)


@pytest.fixture
def backend_process(tiny_backend_factory) -> BackendProcess:
    """A tiny-SAM backend of this test's own, on a free loopback port: kill or freeze it."""
    return tiny_backend_factory()


def _stop(backend: BackendProcess) -> None:
    """Stop (or reap) a backend, frozen (SIGSTOP) ones included, and close its stdout pipe."""
    if backend.process.poll() is None:
        os.kill(backend.process.pid, signal.SIGCONT)  # a frozen one could not exit
    backend.stop()
    if backend.process.stdout is not None:
        backend.process.stdout.close()
