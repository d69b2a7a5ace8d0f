"""Shared fixtures: tiny random SAM checkpoints and real backend processes on loopback."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SERVER_START_TIMEOUT_S = 90


def backend_python() -> str:
    """The Python that has the backend installed: this one, unless the tests run in QGIS's."""
    return os.environ.get("UNIGEOSEG_BACKEND_PYTHON", sys.executable)


@pytest.fixture(scope="session")
def tiny_sam_checkpoint(tmp_path_factory) -> Path:
    """A ``torch.save`` state dict of the tiny SAM configuration, seeded random weights."""
    import torch

    from unigeoseg_backend.engines.sam import SAM_CONFIGS, build_sam

    torch.manual_seed(0)
    model = build_sam(SAM_CONFIGS["tiny"])
    path = tmp_path_factory.mktemp("weights") / "sam_tiny.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny SparseConv_1 UniGeoSeg (seeded random weights) saved in the released layout
    with the tiny tokenizer, as a user's model folder would be."""
    import torch

    from unigeoseg_backend.model.checkpoint import save_released
    from unigeoseg_backend.model.registry import get_config, tiny_tokenizer
    from unigeoseg_backend.model.unigeoseg import UniGeoSeg

    torch.manual_seed(0)
    model = UniGeoSeg(get_config("unigeoseg-tiny-sparseconv")).eval()
    path = tmp_path_factory.mktemp("models") / "unigeoseg-tiny-sparseconv"
    save_released(model, tiny_tokenizer(), path)
    return path


@dataclass
class BackendProcess:
    """A running ``unigeoseg serve`` subprocess."""

    process: subprocess.Popen
    address: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 20) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout_s)
        return self.process.returncode


def start_backend(log_dir: Path, *args: str) -> BackendProcess:
    """Start ``unigeoseg serve`` on a free loopback port and wait until it says it listens."""
    log_path = log_dir / f"backend-{time.monotonic_ns()}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    command = [backend_python(), "-m", "unigeoseg_backend.cli.main", "serve",
               "--address", "tcp://127.0.0.1:*", "--device", "cpu", *args]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, env=env,
                                   cwd=REPO)
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    line = b""
    while time.monotonic() < deadline:
        if not selector.select(timeout=deadline - time.monotonic()):
            break
        line = process.stdout.readline()
        if not line:  # the process exited
            break
        if line.startswith(b"unigeoseg serving on "):
            address = line.decode().rsplit(" ", 1)[1].strip()
            return BackendProcess(process, address, log_path)
    process.kill()
    process.wait(timeout=10)
    raise RuntimeError(f"backend did not start: {line!r}\n{log_path.read_text(errors='replace')}")


@pytest.fixture
def backend_factory(tmp_path) -> Iterator:
    """Call with extra ``serve`` arguments; every backend started is stopped afterwards."""
    started: list[BackendProcess] = []

    def factory(*args: str) -> BackendProcess:
        backend = start_backend(tmp_path, *args)
        started.append(backend)
        return backend

    yield factory
    for backend in started:
        backend.stop()


@pytest.fixture(scope="module")
def tiny_backend(tmp_path_factory, tiny_sam_checkpoint) -> Iterator[BackendProcess]:
    """One tiny-SAM backend shared by a test module (8 MiB message cap)."""
    backend = start_backend(tmp_path_factory.mktemp("backend"), "--sam-type", "tiny",
                            "--sam-checkpoint", str(tiny_sam_checkpoint),
                            "--max-message-mb", "8")
    yield backend
    backend.stop()
