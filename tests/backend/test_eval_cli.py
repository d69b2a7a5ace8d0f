"""``unigeoseg eval`` end to end with a tiny released-layout model.

In process on hand-made samples (the evaluator against a by-hand run of the model, failures,
resume, the output folder's guard), then the command itself on a GeoSeg-Bench fixture tree,
and a two-process ``torchrun`` (Gloo, CPU) whose results must equal a one-process run.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unigeoseg_backend.datasets.base import DatasetListing, Sample, SampleProblem, SampleReadError
from unigeoseg_backend.evaluation.metrics import intersection_union, letterbox_mask
from unigeoseg_backend.evaluation.pipeline import EvalSettings, evaluate
from unigeoseg_backend.evaluation.records import COLUMNS, ROWS, RowWriter, SampleRow, read_rows
from unigeoseg_backend.evaluation.runner import Evaluator
from unigeoseg_backend.model.preprocess import letterbox_image, logits_to_tile
from unigeoseg_backend.model.prompting import PromptTemplate, build_prompt

REPO = Path(__file__).resolve().parents[2]
SUBPROCESS_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    from unigeoseg_backend.model.checkpoint import load_released

    return load_released(tiny_model_dir, device="cpu", dtype=torch.float32)


# ---------------------------------------------------------------------- hand-made samples


def _sample(i: int, task: str = "referring", shape=(48, 72), mask_shape=None,
            broken: bool = False) -> Sample:
    rng = np.random.default_rng(i)
    image = (rng.random((*shape, 3)) * 255).astype(np.uint8)
    mask = np.zeros(mask_shape or shape, dtype=bool)
    mask[mask.shape[0] // 4: mask.shape[0] // 2, i % 5: mask.shape[1] // 2 + i] = True

    def read_image() -> np.ndarray:
        if broken:
            raise SampleReadError(f"image{i}.png is truncated")
        return image

    return Sample(sample_id=f"s{i:02d}", task=task, template=PromptTemplate.GEOSEG_BENCH,
                  instruction=f"the bright field number {i}", answer=None,
                  image_path=Path(f"image{i}.png"), image_reader=read_image,
                  mask_reader=lambda: mask)


def _listing(n: int = 6, broken: tuple[int, ...] = ()) -> DatasetListing:
    tasks = ["referring", "reasoning", "interactive"]
    samples = [_sample(i, tasks[i % 3], shape=(48 + 8 * (i % 2), 72), broken=i in broken)
               for i in range(n)]
    return DatasetListing("hand", Path("."), "test", samples,
                          [SampleProblem("missing.png", "no such file")])


def _settings(out: Path, **kw) -> EvalSettings:
    return EvalSettings(**{"dataset": "hand", "root": Path("."), "split": "test", "out": out,
                           "batch_size": 2, "worst": 2, "workers": 0, "progress": False, **kw})


def _run(settings: EvalSettings, listing: DatasetListing, loaded, tiny_model_dir: Path):
    return evaluate(settings, listing, tiny_model_dir, lambda: loaded, torch.device("cpu"),
                    torch.float32)


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_evaluator_matches_the_model_run_by_hand(loaded):
    """Letterbox, encode, segment, bilinear to S, > 0, against the letterboxed mask."""
    sample = _sample(3, "reasoning", shape=(40, 70), mask_shape=(20, 35))
    rows: list[SampleRow] = []
    Evaluator(loaded, native_resolution=True, workers=0).run([(0, sample)], 1, rows.extend)

    size = loaded.model.config.image_size
    image, box = letterbox_image(sample.read_image(), size)
    with torch.inference_mode():
        vision = loaded.model.encode_images(image[None])
        prompt = build_prompt("reasoning", sample.instruction, loaded.tokenizer)
        logits = loaded.model.segment(vision, [prompt])
    pred = (F.interpolate(logits, size=(size, size), mode="bilinear",
                          align_corners=False)[0, 0] > 0).numpy()
    expected = intersection_union(pred, letterbox_mask(sample.read_mask(), size))
    # Native: prediction on the image grid's crop, resized to the 20 x 35 mask.
    native_box = dataclasses.replace(box, height=20, width=35)
    native = (logits_to_tile(logits[0, 0], native_box) > 0).numpy()
    expected_native = intersection_union(native, sample.read_mask())

    (row,) = rows
    assert (row.index, row.sample_id, row.task, row.error) == (0, "s03", "reasoning", "")
    assert (row.intersection, row.union) == expected
    assert (row.native_intersection, row.native_union) == expected_native
    assert row.seconds > 0


def test_batches_and_thread_reading_give_the_same_counts(loaded):
    items = [(i, s) for i, s in enumerate(_listing(5).samples)]
    one, many = [], []
    Evaluator(loaded, workers=0).run(items, 1, one.extend)
    Evaluator(loaded, workers=2).run(items, 3, many.extend)
    assert [(r.index, r.intersection, r.union) for r in one] == \
        [(r.index, r.intersection, r.union) for r in many]


def test_a_failing_sample_is_recorded_and_the_run_goes_on(tmp_path, loaded, tiny_model_dir):
    listing = _listing(4, broken=(1,))
    doc = _run(_settings(tmp_path), listing, loaded, tiny_model_dir)
    rows = _csv(tmp_path / ROWS)
    assert [r["sample_id"] for r in rows] == ["s00", "s01", "s02", "s03"]
    assert rows[1]["error"] == "SampleReadError: image1.png is truncated"
    assert rows[1]["iou"] == rows[1]["intersection"] == ""
    assert doc["metrics"]["overall"]["count"] == 3
    assert doc["metrics"]["overall"]["failed"] == 1
    assert doc["metrics"]["reasoning"]["failed"] == 1  # s01 is a reasoning sample
    assert doc["problems"] == 1
    assert (tmp_path / "problems.csv").read_text().splitlines() == [
        "where,message", "missing.png,no such file"]
    assert len(list((tmp_path / "overlays").glob("worst-*.png"))) == 2
    table = (tmp_path / "metrics.md").read_text()
    assert "| **overall** | 3 | 1 |" in table


def test_resume_does_not_recompute_finished_samples(tmp_path, loaded, tiny_model_dir):
    listing = _listing(6)
    first = _run(_settings(tmp_path, limit=3), listing, loaded, tiny_model_dir)
    assert first["run"]["computed_this_run"] == 3
    before = _csv(tmp_path / ROWS)
    second = _run(_settings(tmp_path), listing, loaded, tiny_model_dir)
    assert (second["run"]["computed_this_run"], second["run"]["reused"]) == (3, 3)
    after = _csv(tmp_path / ROWS)
    assert after[:3] == before  # the same lines, seconds included: not recomputed
    fresh = _run(_settings(tmp_path / "fresh"), listing, loaded, tiny_model_dir)
    assert second["metrics"] == fresh["metrics"]
    # Nothing left to do: everything reused, same numbers.
    third = _run(_settings(tmp_path), listing, loaded, tiny_model_dir)
    assert third["run"]["computed_this_run"] == 0 and third["metrics"] == fresh["metrics"]
    # A smaller --limit scores only its samples but keeps the other rows in the file.
    small = _run(_settings(tmp_path, limit=2), listing, loaded, tiny_model_dir)
    assert small["metrics"]["overall"]["count"] == 2
    assert _csv(tmp_path / ROWS) == after


def test_resume_after_an_interruption_ignores_a_torn_line(tmp_path, loaded, tiny_model_dir):
    listing = _listing(4, broken=(2,))
    _run(_settings(tmp_path, limit=2), listing, loaded, tiny_model_dir)
    with open(tmp_path / ROWS, "a") as file:
        file.write("s02,reasoning,0.5,1")  # killed in the middle of a row
    doc = _run(_settings(tmp_path), listing, loaded, tiny_model_dir)
    assert doc["run"]["computed_this_run"] == 2
    rows = _csv(tmp_path / ROWS)
    assert [r["sample_id"] for r in rows] == ["s00", "s01", "s02", "s03"]
    assert rows[2]["error"].startswith("SampleReadError")


def test_an_interrupted_run_leaves_whole_rows_and_resumes(tmp_path, loaded, tiny_model_dir):
    listing = _listing(5)
    calls = []

    def read_image():  # Ctrl+C while reading sample 3, the first time only
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return _sample(3).read_image()

    listing.samples[3] = dataclasses.replace(listing.samples[3], image_reader=read_image)
    with pytest.raises(KeyboardInterrupt):
        _run(_settings(tmp_path), listing, loaded, tiny_model_dir)
    assert [r["sample_id"] for r in _csv(tmp_path / ROWS)] == ["s00", "s01"]  # batch 1 only
    assert not (tmp_path / "metrics.json").exists()
    doc = _run(_settings(tmp_path), listing, loaded, tiny_model_dir)
    assert (doc["run"]["computed_this_run"], doc["run"]["reused"]) == (3, 2)


def test_failed_samples_are_retried_on_resume(tmp_path, loaded, tiny_model_dir):
    _run(_settings(tmp_path), _listing(3, broken=(0,)), loaded, tiny_model_dir)
    doc = _run(_settings(tmp_path), _listing(3), loaded, tiny_model_dir)  # the file was fixed
    assert doc["run"]["computed_this_run"] == 1
    assert doc["metrics"]["overall"]["failed"] == 0


def test_rsvg_scores_the_box_of_the_largest_component(tmp_path, loaded, tiny_model_dir):
    from unigeoseg_backend.errors import InvalidInputError
    from unigeoseg_backend.evaluation.metrics import largest_component_box

    sample = _sample(1, "referring", shape=(40, 70))
    masks, boxes = [], []
    Evaluator(loaded, workers=0).run([(0, sample)], 1, masks.extend)
    Evaluator(loaded, workers=0, box_predictions=True).run([(0, sample)], 1, boxes.extend)
    prepared = Evaluator(loaded, workers=0).prepare(0, sample)
    (prediction,) = Evaluator(loaded, workers=0).predict(
        [prepared], [build_prompt("referring", sample.instruction, loaded.tokenizer)])
    box = largest_component_box(prediction.mask)
    assert not np.array_equal(box, prediction.mask)  # the random model's mask is no box
    assert (boxes[0].intersection, boxes[0].union) == intersection_union(box, prepared.target)
    assert (masks[0].intersection, masks[0].union) == intersection_union(
        prediction.mask, prepared.target)

    # A folder scored with masks is not resumed with boxes.
    _run(_settings(tmp_path), _listing(2), loaded, tiny_model_dir)
    with pytest.raises(InvalidInputError, match="box_predictions"):
        _run(_settings(tmp_path, box_predictions=True), _listing(2), loaded, tiny_model_dir)


def test_another_evaluation_in_the_folder_is_refused_unless_restart(tmp_path, loaded,
                                                                    tiny_model_dir):
    from unigeoseg_backend.errors import InvalidInputError

    listing = _listing(2)
    _run(_settings(tmp_path), listing, loaded, tiny_model_dir)
    with pytest.raises(InvalidInputError, match="split"):
        _run(_settings(tmp_path, split="val"), listing, loaded, tiny_model_dir)
    doc = _run(_settings(tmp_path, split="val", restart=True), listing, loaded, tiny_model_dir)
    assert doc["run"]["computed_this_run"] == 2
    assert json.loads((tmp_path / "run.json").read_text())["split"] == "val"


def test_row_files_keep_whole_lines(tmp_path):
    path = tmp_path / "rows.csv"
    row = SampleRow(0, "a,b", "referring", 3, 7, 0.25, error="")
    bad = SampleRow(1, "c", "reasoning", None, None, 0.1, error="Boom: two\nlines")
    with RowWriter(path) as writer:
        writer.write([row, bad])
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(COLUMNS) and len(lines) == 3
    assert lines[2].endswith("Boom: two lines")
    back = read_rows(path, {"a,b": 5, "c": 6})
    assert [(r.index, r.intersection, r.union, r.failed) for r in back] == \
        [(5, 3, 7, False), (6, None, None, True)]
    assert read_rows(path, {"c": 0})[0].sample_id == "c"  # rows outside the selection: out


# ---------------------------------------------------------------------- the command


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _eval_args(root: Path, tiny_model_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "--dataset", "geoseg-bench", "--root", str(root), "--split", "test",
            "--model", str(tiny_model_dir), "--device", "cpu", "--batch-size", "2", "--workers",
            "0", "--worst", "3", "--no-progress", "--out", str(out), *extra]


def _subprocess_env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "backend"),
                                                         os.environ.get("PYTHONPATH")])))


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from tests.dataset_trees import build_geoseg_bench

    return build_geoseg_bench(tmp_path_factory.mktemp("bench"), "A")


def test_command_needs_a_model(tmp_path, bench, monkeypatch, capsys):
    from unigeoseg_backend.cli import evaluate
    from unigeoseg_backend.cli.main import main
    from unigeoseg_backend.datasets import DATASETS

    assert evaluate.DATASETS == DATASETS

    monkeypatch.delenv("UNIGEOSEG_MODEL", raising=False)
    args = _eval_args(bench.root, tmp_path, tmp_path / "out")
    args.remove("--model")
    args.remove(str(tmp_path))
    assert main(args) == 1
    assert "no model to evaluate" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    from tests.dataset_trees import build_all

    return build_all(tmp_path_factory.mktemp("trees"))


@pytest.mark.parametrize("layout", ["geoseg-bench", "geoseg-bench-B", "rrsis-d", "refsegrs",
                                    "earthreason", "local"])
def test_command_on_every_layout(tmp_path, trees, layout, tiny_model_dir, capsys):
    from unigeoseg_backend.cli.main import main

    tree, out = trees[layout], tmp_path / "out"
    args = _eval_args(tree.root, tiny_model_dir, out, "--native-resolution")
    args[args.index("--dataset") + 1] = tree.dataset
    args[args.index("--split") + 1] = tree.split
    assert main(args) == 0
    doc = json.loads((out / "metrics.json").read_text())
    listed, failed = len(tree.samples), len(tree.unreadable)
    assert doc["run"]["selected"] == listed and doc["problems"] == len(tree.problems)
    assert doc["metrics"]["overall"]["failed"] == failed
    assert doc["metrics"]["overall"]["count"] == listed - failed
    assert doc["native_metrics"]["overall"]["count"] == listed - failed
    tasks = {s.task for s in tree.samples.values()}
    assert set(doc["metrics"]) == tasks | {"overall"}
    rows = _csv(out / ROWS)
    assert sorted(r["sample_id"] for r in rows) == sorted(tree.samples)
    assert sorted(r["sample_id"] for r in rows if r["error"]) == sorted(tree.unreadable)
    assert "gIoU" in capsys.readouterr().out


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path, bench, tiny_model_dir):
    """torchrun with 2 CPU processes (Gloo) and a plain run: the same rows and metrics."""
    env = _subprocess_env()
    single, double = tmp_path / "single", tmp_path / "double"
    # Batches of one: the same tensors per sample in both runs, so equal rows test the
    # sharding and the gather, not floating-point effects of batch composition.
    args = {out: [*_eval_args(bench.root, tiny_model_dir, out), "--batch-size", "1"]
            for out in (single, double)}
    base = [sys.executable, "-m", "unigeoseg_backend.cli.main"]
    one = subprocess.run([*base, *args[single]], env=env,
                         cwd=REPO, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert one.returncode == 0, one.stderr[-3000:]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                "-m", "unigeoseg_backend.cli.main"]
    two = subprocess.run([*launcher, *args[double]], env=env,
                         cwd=REPO, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert two.returncode == 0, two.stderr[-3000:]

    a, b = (json.loads((d / "metrics.json").read_text()) for d in (single, double))
    assert a["metrics"] == b["metrics"] and a["problems"] == b["problems"]
    assert (a["run"]["world_size"], b["run"]["world_size"]) == (1, 2)
    keep = [c for c in COLUMNS if c != "seconds"]
    rows_a, rows_b = _csv(single / ROWS), _csv(double / ROWS)
    assert [[r[c] for c in keep] for r in rows_a] == [[r[c] for c in keep] for r in rows_b]
    assert not list(double.glob("per_sample.rank*.csv"))  # merged, shards removed
    assert len(list((double / "overlays").glob("*.png"))) == 3
