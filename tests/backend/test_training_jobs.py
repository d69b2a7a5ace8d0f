"""Fine-tuning through a real ``unigeoseg serve`` process on 127.0.0.1: chips uploaded in
pieces, a job run by the trainer in its own process (a tiny default model as the base), its
live curve, the model it makes (in the weights cache, in hello and ``weights list``,
answering by its engine name), clicks answered meanwhile, cancel, bad uploads, and a backend
killed mid-job."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tests.backend.default_model_folders import save_tiny_default_model
from tests.conftest import REPO

from unigeoseg_backend.cli.main import main
from unigeoseg_backend.default_model.weights_io import GsdRange
from unigeoseg_protocol import (
    ErrorCode,
    Georeference,
    Prompt,
    RemoteError,
    SegmentOptions,
    TrainCancelRequest,
    TrainJobReply,
    TrainStartRequest,
    TrainStatusRequest,
    TrainUploadRequest,
)
from unigeoseg_protocol.client import Client
from unigeoseg_protocol.operations import MAX_UPLOAD_CHUNK_BYTES

BASE_NAME = "ft-base"
CHIP_PX = 64
GSD_M = 0.5
JOB_DEADLINE_S = 300        # a short job on 2 busy cores, trainer start-up included
CANCEL_DEADLINE_S = 10      # cancel stops the trainer "within a few seconds"
POLL_S = 0.2

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads the backend's child processes from /proc")


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    """A tiny default model (seeded random weights) whose card knows water at 0.1-100 m."""
    return save_tiny_default_model(tmp_path_factory.mktemp("base") / BASE_NAME, BASE_NAME,
                                   GsdRange(0.1, 100.0))


def write_chips(root: Path, train: int = 6, val: int = 2) -> Path:
    """Chips as the plugin makes them: noise with one blue square each, a text record ("the
    blue roofs") and a click record per chip, in the ``local`` layout."""
    rng = np.random.default_rng(7)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for split, count in (("train", train), ("val", val)):
        records = []
        for i in range(count):
            image = (rng.random((CHIP_PX, CHIP_PX, 3)) * 150).astype(np.uint8)
            mask = np.zeros((CHIP_PX, CHIP_PX), bool)
            row, col = rng.integers(4, CHIP_PX - 24, 2)
            mask[row:row + 16, col:col + 16] = True
            image[mask] = (30, 60, 210)
            stem = f"{split}-{i}"
            Image.fromarray(image).save(root / "images" / f"{stem}.png")
            Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"{stem}.png")
            chip = {"scene": None, "window": [i * CHIP_PX, 0, CHIP_PX, CHIP_PX],
                    "gsd_m": GSD_M, "crs": "EPSG:32633",
                    "transform": [GSD_M, 0.0, 500000.0, 0.0, -GSD_M, 6000000.0]}
            common = {"image": f"images/{stem}.png", "mask": f"masks/{stem}.png", "chip": chip}
            records.append({**common, "id": f"{stem}-text", "instruction": "the blue roofs",
                            "task": "referring", "target": "class",
                            "prompt": {"kind": "text", "class": "blue roofs"}})
            records.append({**common, "id": f"{stem}-click", "task": "interactive",
                            "instruction": "Please segment the region at the point.",
                            "target": "component",
                            "prompt": {"kind": "click", "class": "blue roofs",
                                       "points": [[float(col) + 8.5, float(row) + 8.5]],
                                       "labels": [1]}})
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty weights cache of the backends this test starts (no SAM, no UniGeoSeg), named
    relative to their working folder as a user may (the trainer runs in another folder)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("UNIGEOSEG_CACHE_DIR", os.path.relpath(folder, REPO))
    monkeypatch.delenv("UNIGEOSEG_MODEL", raising=False)
    monkeypatch.delenv("UNIGEOSEG_DEFAULT_MODEL", raising=False)
    return folder / "weights"


@pytest.fixture
def backend(cache, base_model, backend_factory):
    """A backend whose default model is ``base_model``, named relative to its folder."""
    return backend_factory("--default-model", os.path.relpath(base_model, REPO))


def upload_chips(client: Client, root: Path, upload: str, piece_bytes: int = 1000) -> int:
    """Send every file of ``root`` in pieces of ``piece_bytes``; returns the bytes sent."""
    sent = 0
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        data = np.frombuffer(file.read_bytes(), np.uint8)
        path = file.relative_to(root).as_posix()
        for offset in range(0, max(len(data), 1), piece_bytes):
            reply = client.call(TrainUploadRequest(upload, path, data[offset:offset + piece_bytes],
                                                   offset=offset))
            assert reply.size == min(len(data), offset + piece_bytes)
        sent += len(data)
    return sent


def wait_for(client: Client, job: str, done, deadline_s: float) -> TrainJobReply:
    """Poll train_status until ``done(reply)``, collecting the curve's events."""
    deadline = time.monotonic() + deadline_s
    cursor, events = 0, []
    while True:
        reply = client.call(TrainStatusRequest(job, after=cursor))
        events += reply.events
        cursor = reply.cursor
        if done(reply):
            return TrainJobReply(**{**reply.__dict__, "events": tuple(events)})
        assert time.monotonic() < deadline, f"job still {reply.state} at step {reply.step}"
        time.sleep(POLL_S)


def children(pid: int) -> set[int]:
    """The process ids of ``pid``'s children (Linux)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(c) for c in (task / "children").read_text().split()}
    return found


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status


def tile() -> tuple[np.ndarray, Georeference]:
    pixels = (np.random.default_rng(3).random((CHIP_PX, CHIP_PX, 3)) * 255).astype(np.uint8)
    return pixels, Georeference("EPSG:32633", (500000.0, GSD_M, 0.0, 6000000.0, 0.0, -GSD_M))


def test_an_uploaded_chip_set_is_fine_tuned_into_a_model_hello_lists_and_that_answers(
        backend, cache, tmp_path, capsys):
    chips = write_chips(tmp_path / "chips")
    with Client(backend.address, timeout_s=60) as client:
        started = time.perf_counter()
        sent = upload_chips(client, chips, "upload-1")
        upload_s = time.perf_counter() - started
        print(f"upload: {sent} bytes in {upload_s:.2f} s ({sent / upload_s / 1e6:.2f} MB/s, "
              f"1000-byte pieces)")
        # 12 training records in batches of 8: 4 epochs are 6 steps
        job = client.call(TrainStartRequest("blue-roofs", upload="upload-1", epochs=4))
        assert job.state in ("queued", "running") and job.max_steps == 6
        assert job.data["chips"] == 8 and job.data["objects"] == 8
        assert job.data["instructions"] == ["the blue roofs"]
        done = wait_for(client, job.job, lambda r: r.finished, JOB_DEADLINE_S)
        print(f"job: {done.state} in {done.elapsed_s:.1f} s, held-out IoU "
              f"{done.before_iou} -> {done.after_iou}, message {done.message}")
        assert done.state == "succeeded", done.message
        assert done.engine == "default:blue-roofs" and done.step == 6
        assert done.before_iou is not None and done.after_iou is not None
        losses = [e for e in done.events if e.loss is not None]
        assert [e.step for e in losses] == [1, 2, 3, 4, 5, 6]
        assert any(e.val_iou is not None and e.step == 0 for e in done.events)

        offered = client.hello().engine("default:blue-roofs")
        assert offered.available and offered.about is not None
        assert "blue roofs" in offered.about["classes"]
        assert offered.about["fine_tuned"]["base_model"] == f"{BASE_NAME}@0.0.0"
        pixels, georeference = tile()
        answer = client.segment(Prompt(text="the blue roofs"),
                                SegmentOptions(engine="default:blue-roofs"),
                                pixels=pixels, georeference=georeference)
        assert answer.engine == "default:blue-roofs"
        assert answer.model.startswith("blue-roofs@")

    card = json.loads((cache / "finetuned" / "blue-roofs" / "model_card.json").read_text())
    record = card["training"]["fine_tune"]
    assert record["base_model"] == f"{BASE_NAME}@0.0.0"
    assert record["data"]["chips"] == 8 and record["instructions"] == ["the blue roofs"]
    assert record["budget"] == {"max_steps": 6, "max_seconds": None, "epochs": 4.0}
    assert record["iou"]["before"] == done.before_iou and record["iou"]["after"] == done.after_iou
    assert record["date"].startswith("20")
    work = [p for p in (cache / "tmp" / "training").rglob("*") if p.is_file()]
    assert work == [], "the job's chips, config and trainer output are removed"
    assert main(["weights", "list"]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if "blue-roofs" in line]
    print(listed)
    assert len(listed) == 1 and "fine-tuned" in listed[0]
    assert str(cache / "finetuned" / "blue-roofs") in listed[0]


def test_jobs_run_one_at_a_time_a_click_is_answered_meanwhile_and_cancel_saves_nothing(
        backend, cache, tmp_path):
    chips = write_chips(tmp_path / "chips")
    with Client(backend.address, timeout_s=60) as client:
        job = client.call(TrainStartRequest("never-saved", chips_dir=str(chips),
                                            max_steps=5000))
        waiting = client.call(TrainStartRequest("waits", chips_dir=str(chips), max_steps=5))
        assert waiting.state == "queued", "jobs run one at a time"
        assert client.call(TrainCancelRequest(waiting.job)).state == "cancelled"
        with pytest.raises(RemoteError) as taken:
            client.call(TrainStartRequest("never-saved", chips_dir=str(chips), max_steps=5))
        assert taken.value.code == ErrorCode.INVALID_ARGUMENT
        assert "never-saved" in taken.value.message
        running = wait_for(client, job.job, lambda r: r.step >= 2 or r.finished,
                           JOB_DEADLINE_S)
        assert running.state == "running", running.message
        trainers = children(backend.process.pid)
        assert trainers, "the job runs in a process of its own"

        pixels, georeference = tile()
        click_s = []
        for point in ((500016.25, 5999983.75), (500008.25, 5999991.75)):
            started = time.perf_counter()
            answer = client.segment(Prompt(points=(point,), labels=(1,)),
                                    SegmentOptions(engine="default"),
                                    pixels=pixels, georeference=georeference)
            click_s.append(time.perf_counter() - started)
        during = client.call(TrainStatusRequest(job.job))
        print(f"clicks answered in {click_s[0]:.2f} s (first) and {click_s[1] * 1000:.0f} ms "
              f"while the job was at step {during.step} (loss {during.loss}, ETA "
              f"{during.eta_s} s)")
        assert answer.engine == "default" and during.state == "running"
        assert during.eta_s is not None and during.eta_s > 0

        started = time.perf_counter()
        client.call(TrainCancelRequest(job.job))
        cancelled = wait_for(client, job.job, lambda r: r.finished, CANCEL_DEADLINE_S)
        print(f"cancelled in {time.perf_counter() - started:.2f} s")
        assert cancelled.state == "cancelled" and cancelled.engine is None
        assert not any(alive(pid) for pid in trainers)
        assert "default:never-saved" not in client.hello().engines
    assert not (cache / "finetuned" / "never-saved").exists()
    assert chips.is_dir() and (chips / "train.jsonl").is_file(), "a local chips_dir is kept"


def test_bad_uploads_and_unknown_jobs_are_refused_in_words(backend, tmp_path):
    data = np.zeros(16, np.uint8)
    with Client(backend.address, timeout_s=30) as client:
        refusals = {
            "traversal": TrainUploadRequest("u1", "../../outside.png", data),
            "absolute": TrainUploadRequest("u1", "/tmp/outside.png", data),
            "not a chip file": TrainUploadRequest("u1", "run.sh", data),
            "over the piece bound": TrainUploadRequest(
                "u1", "images/big.png", np.zeros(MAX_UPLOAD_CHUNK_BYTES + 1, np.uint8)),
            "a gap": TrainUploadRequest("u1", "train.jsonl", data, offset=100),
            "unknown job": TrainStatusRequest("no-such-job"),
            "unknown job cancelled": TrainCancelRequest("no-such-job"),
            "unknown upload": TrainStartRequest("x", upload="never-sent", max_steps=2),
            "SAM": TrainStartRequest("x", base="sam", chips_dir=str(tmp_path), max_steps=2),
            "UniGeoSeg": TrainStartRequest("x", base="unigeoseg", chips_dir=str(tmp_path),
                                           max_steps=2),
            "no val split": TrainStartRequest("x", chips_dir=str(tmp_path), max_steps=2),
        }
        codes = {}
        for what, request in refusals.items():
            with pytest.raises(RemoteError) as refused:
                client.call(request)
            print(f"{what}: [{refused.value.code}] {refused.value.message}")
            codes[what] = refused.value.code
        assert client.hello().engine("default").available, "the backend keeps serving"
    assert codes == {
        "traversal": ErrorCode.INVALID_ARGUMENT, "absolute": ErrorCode.INVALID_ARGUMENT,
        "not a chip file": ErrorCode.INVALID_ARGUMENT,
        "over the piece bound": ErrorCode.PAYLOAD_TOO_LARGE,
        "a gap": ErrorCode.INVALID_ARGUMENT, "unknown job": ErrorCode.UNKNOWN_JOB,
        "unknown job cancelled": ErrorCode.UNKNOWN_JOB, "unknown upload": ErrorCode.UNKNOWN_JOB,
        "SAM": ErrorCode.ENGINE_UNAVAILABLE, "UniGeoSeg": ErrorCode.ENGINE_UNAVAILABLE,
        "no val split": ErrorCode.INVALID_ARGUMENT}
    assert not (tmp_path / "outside.png").exists()


def test_a_backend_killed_mid_job_leaves_no_model_and_the_next_one_cleans_up(
        cache, base_model, backend_factory, tmp_path):
    chips = write_chips(tmp_path / "chips")
    backend = backend_factory("--default-model", str(base_model))
    with Client(backend.address, timeout_s=60) as client:
        upload_chips(client, chips, "upload-k", piece_bytes=MAX_UPLOAD_CHUNK_BYTES)
        job = client.call(TrainStartRequest("half-done", upload="upload-k", max_steps=5000))
        wait_for(client, job.job, lambda r: r.step >= 1 or r.finished, JOB_DEADLINE_S)
        trainers = children(backend.process.pid)
    assert trainers
    os.kill(backend.process.pid, signal.SIGKILL)
    backend.process.wait(timeout=10)
    deadline = time.monotonic() + CANCEL_DEADLINE_S
    while any(alive(pid) for pid in trainers):  # the kernel kills the orphaned trainer
        assert time.monotonic() < deadline, "the trainer outlived its backend"
        time.sleep(POLL_S)
    assert not (cache / "finetuned" / "half-done").exists()
    left = list((cache / "tmp" / "training").iterdir())
    assert left, "the dead backend's work area is still there"

    restarted = backend_factory("--default-model", str(base_model))
    with Client(restarted.address, timeout_s=30) as client:
        assert "default:half-done" not in client.hello().engines
    assert not any(p.exists() for p in left), "the next backend removed the dead one's files"


def test_chips_upload_over_loopback_in_pieces_of_the_bound(backend, cache):
    """Upload speed (benchmark print): 6 files of 4 MiB, one piece each; every byte lands."""
    piece = np.random.default_rng(0).integers(0, 255, MAX_UPLOAD_CHUNK_BYTES, dtype=np.uint8)
    with Client(backend.address, timeout_s=60) as client:
        started = time.perf_counter()
        for i in range(6):
            reply = client.call(TrainUploadRequest("speed", f"images/{i}.png", piece))
        elapsed = time.perf_counter() - started
    print(f"upload: {reply.total_bytes / 2**20:.0f} MiB in {elapsed:.2f} s "
          f"({reply.total_bytes / elapsed / 1e6:.0f} MB/s, 4 MiB pieces)")
    assert reply.files == 6 and reply.total_bytes == 6 * MAX_UPLOAD_CHUNK_BYTES
    stored = list((cache / "tmp" / "training").glob("*/uploads/speed/images/*.png"))
    assert sorted(p.stat().st_size for p in stored) == [MAX_UPLOAD_CHUNK_BYTES] * 6
