"""Tiny fixture trees in every dataset layout, with the traps real downloads hold.

Each ``build_*`` function writes one layout under a given directory (deterministic bytes, a few
tens of kB at the default size 64) and returns a :class:`FixtureTree`: what to pass to
``open_dataset``, and what the listing and the readers must then give, hand-known:

* ``samples``: every sample the listing must return, in listing order, with its task, template,
  instruction, answer, ground-truth mask (official and robust rule) and image;
* ``problems``: the ``SampleProblem.where`` of every entry the listing must skip;
* ``unreadable``: sample id -> file name that ``read_image`` must name in its SampleReadError.

The traps, each a way real downloads or the official loaders trip a reader (docs/datasets.md
describes the layouts and the official behaviour): a non-square image, a mask with a stray
value 128 (and a raw 1), an unparseable point prompt, a task folder named ``interactive``, an
RRSIS-D JPEG shorter than its RLE, a polygon segmentation, a CRLF phrase line, an EarthReason
empty target, a ``._`` dot-file, a missing file, a corrupt image.

Used by tests/backend/test_datasets.py and by the evaluator's tests (``import dataset_trees``:
pytest puts tests/ on sys.path through tests/conftest.py).
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
from PIL import Image
from rasterio.transform import from_origin

from unigeoseg_backend.datasets.coco_mask import encode_rle
from unigeoseg_backend.model.prompting import PromptTemplate

#: Bytes that no image decoder accepts (the "corrupt image" trap).
CORRUPT_BYTES = b"\x89PNG\r\n\x1a\n this is not an image"
INTERACTIVE_BOX = ("Please segment the region corresponding to the box "
                   "x0,y0=[0.250,0.250], x1,y1=[0.750,0.750].")
#: The paper's point example, with the space after the comma the official regex rejects.
INTERACTIVE_POINT_UNPARSEABLE = ("Please segment the target corresponding to the point "
                                 "[0.49, 0.828].")
REASON_QUESTION = "Where could aircraft be parked while waiting for departure?"
REASON_ANSWER = "Aprons next to taxiways are where parked aircraft wait."
REFERRING_TEXT = "the small red-roofed building left of the road"


@dataclass
class ExpectedSample:
    """What one listed sample must be.

    Attributes:
        mask: H x W bool ground truth under ``mask_rule="official"``.
        robust_mask: the same under ``mask_rule="robust"`` (differs only where a trap is).
        rgb: the exact H x W x 3 uint8 image, or None where the file is lossy (JPEG) or
            corrupt.
        image_shape: (H, W) of the image (may differ from the mask's: RRSIS-D).
    """

    sample_id: str
    task: str
    template: PromptTemplate
    instruction: str
    answer: str | None
    mask: np.ndarray
    image_shape: tuple[int, int]
    rgb: np.ndarray | None = None
    robust_mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.robust_mask is None:
            self.robust_mask = self.mask


@dataclass
class FixtureTree:
    """One built layout: ``open_dataset(dataset, root, split)`` must list ``samples``."""

    dataset: str
    root: Path
    split: str
    samples: dict[str, ExpectedSample] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)

    def add(self, sample: ExpectedSample) -> None:
        self.samples[sample.sample_id] = sample


# -- pixels -------------------------------------------------------------------------------

def image_pixels(h: int, w: int, seed: int) -> np.ndarray:
    """H x W x 3 uint8 low-entropy RGB (small files), different per seed."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([(xx * 3 + seed) % 256, (yy * 5 + seed) % 256,
                     np.full((h, w), (seed * 37) % 256)], -1).astype(np.uint8)


def rect(h: int, w: int, box: tuple[int, int, int, int], value: int = 255) -> np.ndarray:
    """H x W uint8 zeros with ``value`` in ``box = (x0, y0, x1, y1)`` (x1, y1 exclusive)."""
    mask = np.zeros((h, w), np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = value
    return mask


def _mkdir(*parts: Path | str) -> Path:
    path = Path(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _save(array: np.ndarray, path: Path) -> Path:
    """Write with Pillow (format from the suffix: PNG, JPEG, TIFF)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _write_json(data: object, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")


def _write_geotiff(path: Path, bands: np.ndarray, nodata: float | None) -> None:
    """``C x H x W`` bands as a georeferenced GeoTIFF (UTM 33N, 10 m pixels)."""
    count, height, width = bands.shape
    with rasterio.open(path, "w", driver="GTiff", height=height, width=width, count=count,
                       dtype=bands.dtype, crs="EPSG:32633", nodata=nodata,
                       transform=from_origin(500000, 4000000, 10, 10)) as dst:
        dst.write(bands)


# -- GeoSeg-Bench -------------------------------------------------------------------------

def build_geoseg_bench(directory: Path, layout: str = "A", size: int = 64) -> FixtureTree:
    """GeoSeg-Bench root ``<directory>/geoseg_bench_<layout>`` with ``ref/``, ``interactive/``
    and ``reason/`` task folders, split ``test``.

    Layout ``A`` (HF style): ``<task>/test.json``, entry paths ``test/images/...`` relative to
    it. Layout ``B`` (eval.sh style): ``<task>/test/test.json``, entry paths ``images/...``
    relative to it, except entry 1 of ``ref`` whose paths are relative to the task folder
    (``test/images/...``: exercises the fallback).

    Each task has entries 0-3, ids ``<task>/<i>:<folder>_000<i>``: entry 1's image is
    ``size`` x ``3 * size // 4`` (non-square); masks are a centred 255 rectangle, entry 0's
    with one raw-1 pixel (foreground officially, not under robust), entry 2's with row 0 set
    to 128 (background officially, foreground under robust). Interactive entry 2 is the
    unparseable point prompt. ``ref`` entry 3 names a missing image (problem
    ``referring/3:ref_0003``); ``reason`` entry 3 has a corrupt image (listed, unreadable).
    """
    root = _mkdir(directory, f"geoseg_bench_{layout}")
    tree = FixtureTree("geoseg-bench", root, "test")
    folders = {"ref": "referring", "interactive": "interactive", "reason": "reasoning"}
    for rank, folder in enumerate(sorted(folders)):  # listing order: folder name order
        task = folders[folder]
        index_dir = _mkdir(root, folder) if layout == "A" else _mkdir(root, folder, "test")
        files_dir = _mkdir(root, folder, "test")  # images/, masks/, jsons/ live here
        prefix = "test/" if layout == "A" else ""
        entries = []
        for i in range(4):
            stem = f"{folder}_{i:04d}"
            h, w = size, (size * 3 // 4 if i == 1 else size)
            rgb = image_pixels(h, w, 10 * rank + i)
            raw = rect(h, w, (w // 4, h // 4, 3 * w // 4, 3 * h // 4))
            if i == 0:
                raw[h - 1, 0] = 1
            if i == 2:
                raw[0, :] = 128
            question = {"ref": REFERRING_TEXT, "interactive": INTERACTIVE_BOX,
                        "reason": REASON_QUESTION}[folder]
            if folder == "interactive" and i == 2:
                question = INTERACTIVE_POINT_UNPARSEABLE
            reasons = [REASON_ANSWER] if folder == "reason" else []
            image_path = files_dir / "images" / f"{stem}.png"
            if folder == "reason" and i == 3:
                image_path.parent.mkdir(parents=True, exist_ok=True)
                image_path.write_bytes(CORRUPT_BYTES)
            elif not (folder == "ref" and i == 3):  # ref entry 3: image never written
                _save(rgb, image_path)
            _save(raw, files_dir / "masks" / f"{stem}.png")
            _write_json({"question": [question, "an unused paraphrase"], "reason": reasons},
                        files_dir / "jsons" / f"{stem}.json")
            entry_prefix = "test/" if (layout == "B" and folder == "ref" and i == 1) else prefix
            entries.append({"img": f"{entry_prefix}images/{stem}.png",
                            "mask": f"{entry_prefix}masks/{stem}.png",
                            "json": f"{entry_prefix}jsons/{stem}.json"})
            sample_id = f"{task}/{i}:{stem}"
            if folder == "ref" and i == 3:
                tree.problems.append(sample_id)
                continue
            if folder == "reason" and i == 3:
                tree.unreadable[sample_id] = image_path.name
            tree.add(ExpectedSample(
                sample_id, task, PromptTemplate.GEOSEG_BENCH, question,
                REASON_ANSWER if folder == "reason" else None,
                mask=(raw == 255) | (raw == 1), image_shape=(h, w),
                rgb=None if (folder == "reason" and i == 3) else rgb,
                robust_mask=raw > 127))
        _write_json(entries, index_dir / "test.json")
    return tree


# -- RRSIS-D ------------------------------------------------------------------------------

RRSISD_SENTENCE = "The baseball field on the top"


def build_rrsisd(directory: Path, size: int = 64) -> FixtureTree:
    """RRSIS-D REFER root ``<directory>/rrsisd_root``, split ``test``.

    Refs (``ref_id``: split, segmentation): 2934 train and 6000 val (not listed for test);
    15324 test, RLE, its JPEG ``size - 13`` rows tall while the RLE and the metadata say
    ``size`` x ``size`` (the mask keeps the RLE size); 11 test, a polygon (COCO rasterises an
    integer rectangle polygon to exactly that rectangle); 12 test, JPEG missing (problem
    ``12``); 13 test with ``image_id`` 20 (not its ref id) and two overlapping parts, an RLE
    and a polygon, whose union is the mask. Sentence: ``sentences[0]['raw']``.
    """
    root = _mkdir(directory, "rrsisd_root")
    jpegs = _mkdir(root, "images", "rrsisd", "JPEGImages")
    _mkdir(root, "images", "rrsisd", "ann_split")
    tree = FixtureTree("rrsis-d", root, "test")
    s = size
    box = (s // 8, s // 5, s // 2, s // 3)
    other = (s // 4, s // 4, 3 * s // 4, s // 2)
    x0, y0, x1, y1 = box
    polygon = [x0, y0, x1, y0, x1, y1, x0, y1]
    specs = [  # ref_id, image_id, split, jpeg height, segmentation, mask
        (2934, 2934, "train", s, [encode_rle(rect(s, s, box, 1))], rect(s, s, box) > 0),
        (6000, 6000, "val", s, [encode_rle(rect(s, s, box, 1))], rect(s, s, box) > 0),
        (15324, 15324, "test", s - 13, [encode_rle(rect(s, s, box, 1))], rect(s, s, box) > 0),
        (11, 11, "test", s, [polygon], rect(s, s, box) > 0),
        (12, 12, "test", None, [encode_rle(rect(s, s, box, 1))], None),
        (13, 20, "test", s, [encode_rle(rect(s, s, other, 1)), polygon],
         (rect(s, s, other) > 0) | (rect(s, s, box) > 0)),
    ]
    images, annotations, refs = [], [], []
    for ref_id, image_id, split, height, segmentation, mask in specs:
        file_name = f"{image_id:05d}.jpg"
        if height is not None:
            _save(image_pixels(height, s, image_id % 251), jpegs / file_name)
        images.append({"file_name": file_name, "height": s, "width": s, "id": image_id})
        annotations.append({"bbox": list(box), "categories_id": 4, "id": ref_id,
                            "image_id": image_id, "segmentation": segmentation, "area": 0})
        refs.append({"image_id": image_id, "split": split,
                     "sentences": [{"tokens": RRSISD_SENTENCE.split(), "raw": RRSISD_SENTENCE,
                                    "sent_id": ref_id, "sent": RRSISD_SENTENCE.lower()}],
                     "file_name": file_name, "category_id": 4, "ann_id": ref_id,
                     "sent_ids": [ref_id], "ref_id": ref_id})
        if split != "test":
            continue
        if height is None:
            tree.problems.append(str(ref_id))
            continue
        tree.add(ExpectedSample(str(ref_id), "referring", PromptTemplate.RRSISD,
                                RRSISD_SENTENCE, None, mask=mask, image_shape=(height, s)))
    _write_json({"images": images, "annotations": annotations,
                 "categories": [{"name": "baseballfield", "id": 4}]},
                root / "rrsisd" / "instances.json")
    with open(root / "rrsisd" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    return tree


# -- RefSegRS -----------------------------------------------------------------------------

def build_refsegrs(directory: Path, size: int = 64) -> FixtureTree:
    """RefSegRS root ``<directory>/refsegrs`` (plain TIFFs), split ``test``.

    ``output_phrase_test.txt`` lines: ``2`` (mask with a raw-1 pixel), ``3`` written with CRLF
    (mask rows 0-1 = 128), a blank line, ``abc not an id`` (problem
    ``output_phrase_test.txt:4``), ``4`` whose mask is missing (problem ``4``), ``5`` with a
    corrupt image TIFF (listed, unreadable), ``2`` again (listed as ``2#2``). Train and val
    files hold one line each. Masks: 255 rectangle in the top-left quarter's lower half.
    """
    root = _mkdir(directory, "refsegrs")
    tree = FixtureTree("refsegrs", root, "test")
    s = size

    def write(image_id: int, trap: str = "") -> tuple[np.ndarray, np.ndarray]:
        rgb = image_pixels(s, s, image_id)
        raw = rect(s, s, (s // 4, s // 4, s // 2, s // 2))
        if image_id == 2:
            raw[s - 1, s - 1] = 1
        if image_id == 3:
            raw[:2, :] = 128
        if trap == "corrupt":
            _mkdir(root, "images").joinpath(f"{image_id}.tif").write_bytes(CORRUPT_BYTES)
        else:
            _save(rgb, root / "images" / f"{image_id}.tif")
        if trap != "no-mask":
            _save(raw, root / "masks" / f"{image_id}.tif")
        return rgb, raw

    write(0)
    write(1)
    (root / "output_phrase_train.txt").write_text("0 road on the left\n", encoding="utf-8")
    (root / "output_phrase_val.txt").write_text("1 vehicle in the middle of the road\n",
                                                encoding="utf-8")
    lines = [(2, "building along the road", "\n", ""),
             (3, "low vegetation near the parking lot", "\r\n", ""),
             (None, "", "\n", ""),
             (None, "abc not an id", "\n", ""),
             (4, "car park", "\n", "no-mask"),
             (5, "tree", "\n", "corrupt"),
             (2, "building next to the road", "\n", "")]
    with open(root / "output_phrase_test.txt", "w", encoding="utf-8", newline="") as f:
        for line_no, (image_id, phrase, end, trap) in enumerate(lines, start=1):
            f.write((f"{image_id} {phrase}" if image_id is not None else phrase) + end)
            if image_id is None:
                if phrase:
                    tree.problems.append(f"output_phrase_test.txt:{line_no}")
                continue
            rgb, raw = write(image_id, trap)
            sample_id = f"{image_id}#2" if f"{image_id}" in tree.samples else f"{image_id}"
            if trap == "no-mask":
                tree.problems.append(sample_id)
                continue
            if trap == "corrupt":
                tree.unreadable[sample_id] = f"{image_id}.tif"
            tree.add(ExpectedSample(sample_id, "referring", PromptTemplate.REFSEGRS, phrase,
                                    None, mask=(raw == 255) | (raw == 1), image_shape=(s, s),
                                    rgb=None if trap == "corrupt" else rgb,
                                    robust_mask=raw > 127))
    return tree


# -- EarthReason --------------------------------------------------------------------------

EARTHREASON_QUESTIONS = ["Where would a plane wait before take-off?",
                         "Which region is used for parking aircraft?"]
EARTHREASON_ANSWER = "The apron, because it is adjacent to the taxiway."


def build_earthreason(directory: Path, size: int = 64, nest: str = "split") -> FixtureTree:
    """EarthReason tree under ``<directory>/earthreason``, split ``test``.

    ``nest``: ``split`` (``<root>/test/{images,labels,QAs}``, root = ``earthreason``),
    ``nested`` (``<root>/test/test/...``) or ``flat`` (root = the split folder itself).

    Stems (listing order): ``airport_0`` (.jpg, target), ``airport_1`` (.png, ``answer: []``
    and an all-zero label: empty target), ``harbor_10`` (.jpg, target with a stray 128 pixel:
    foreground under ``!= 0``; QA file ``.txt``). ``._airport_0.jpg`` (a macOS dot-file) must
    be ignored; ``lonely_3.jpg`` has no label and no QA (problem ``lonely_3``). Images are
    ``size`` x ``size + 32``.
    """
    top = _mkdir(directory, "earthreason")
    base = {"split": top / "test", "nested": top / "test" / "test", "flat": top / "test"}[nest]
    root = base if nest == "flat" else top
    tree = FixtureTree("earthreason", root, "test")
    h, w = size, size + 32
    for k, (stem, ext, has_target, qa_ext) in enumerate([
            ("airport_0", ".jpg", True, ".json"), ("airport_1", ".png", False, ".json"),
            ("harbor_10", ".jpg", True, ".txt")]):
        rgb = image_pixels(h, w, k)
        _save(rgb, base / "images" / f"{stem}{ext}")
        raw = rect(h, w, (w // 3, h // 3, w // 2, h // 2)) if has_target \
            else np.zeros((h, w), np.uint8)
        if stem == "harbor_10":
            raw[h - 1, w - 1] = 128
        _save(raw, base / "labels" / f"{stem}.png")
        _write_json({"questions": EARTHREASON_QUESTIONS,
                     "answer": [EARTHREASON_ANSWER] if has_target else []},
                    base / "QAs" / f"{stem}{qa_ext}")
        tree.add(ExpectedSample(stem, "reasoning", PromptTemplate.EARTHREASON,
                                EARTHREASON_QUESTIONS[0],
                                EARTHREASON_ANSWER if has_target else None, mask=raw != 0,
                                image_shape=(h, w), rgb=rgb if ext == ".png" else None))
    (base / "images" / "._airport_0.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    _save(image_pixels(h, w, 9), base / "images" / "lonely_3.jpg")
    tree.problems.append("lonely_3")
    return tree


# -- local --------------------------------------------------------------------------------

#: The 16-bit chip's expected RGB is hand-known: each band holds two values (so the 2nd and
#: 98th percentiles are exactly those two, which stretch to 0 and 255) and pixel (0, 0) is
#: nodata (0 in every channel).
CHIP_SHAPE = (6, 8)


def chip_16bit() -> tuple[np.ndarray, np.ndarray]:
    """``(bands, rgb)``: 4 x 6 x 8 uint16 bands (nodata 0 at pixel (0, 0)) and the
    6 x 8 x 3 uint8 RGB the reader must make of them."""
    h, w = CHIP_SHAPE
    top = np.zeros((h, w), bool)
    top[: h // 2] = True
    bands = np.stack([np.where(top, 1000, 3000), np.where(top, 3200, 1200),
                      np.where(top, 1400, 3400), np.where(np.eye(h, w, dtype=bool), 9, 5)])
    bands = bands.astype(np.uint16)
    bands[:, 0, 0] = 0
    rgb = np.stack([np.where(top, 0, 255), np.where(top, 255, 0), np.where(top, 0, 255)],
                   -1).astype(np.uint8)
    rgb[0, 0] = 0
    return bands, rgb


def build_local(directory: Path, size: int = 64) -> FixtureTree:
    """Local layout root ``<directory>/local``: ``test.jsonl`` + ``images/`` + ``masks/``.

    Listed: ``rgba-png`` (referring; RGBA PNG whose alpha must be dropped; PNG mask with values
    0, 1 and 200, foreground = > 0), ``chip-16bit`` (interactive via the alias ``intera``;
    4-band uint16 GeoTIFF, see :func:`chip_16bit`; uint8 GeoTIFF mask with nodata 9, which
    is background), ``7`` (an integer id; reasoning with an answer and the ``earthreason``
    template; 1-band uint8 GeoTIFF, grey repeated), ``corrupt-chip`` (listed, unreadable).
    Problems by line: 6 (no ``mask`` key), 7 (unknown task), 8 (empty instruction), 9 (not
    JSON), 11 (repeats the id ``rgba-png``); by id: ``missing-image`` (line 10). Line 5 is
    blank.
    """
    root = _mkdir(directory, "local")
    tree = FixtureTree("local", root, "test")
    s = size
    records: list[dict | str] = []

    # 1: RGBA PNG + PNG mask.
    rgba = np.dstack([image_pixels(s, s, 3), np.arange(s * s, dtype=np.uint8).reshape(s, s)])
    _save(rgba, root / "images" / "rgba.png")
    mask = rect(s, s, (2, 3, 20, 30), 200)
    mask[0, 0] = 1
    _save(mask, root / "masks" / "rgba.png")
    records.append({"id": "rgba-png", "image": "images/rgba.png", "mask": "masks/rgba.png",
                    "instruction": "the building in the top left", "task": "referring"})
    tree.add(ExpectedSample("rgba-png", "referring", PromptTemplate.GEOSEG_BENCH,
                            "the building in the top left", None, mask=mask > 0,
                            image_shape=(s, s), rgb=rgba[:, :, :3].copy()))

    # 2: 16-bit 4-band GeoTIFF chip + GeoTIFF mask with nodata.
    bands, chip_rgb = chip_16bit()
    _write_geotiff(_mkdir(root, "images") / "chip16.tif", bands, nodata=0)
    chip_mask = rect(*CHIP_SHAPE, (2, 1, 6, 4), 1)
    chip_mask[5, :] = 9
    _write_geotiff(_mkdir(root, "masks") / "chip16.tif", chip_mask[np.newaxis], nodata=9)
    records.append({"id": "chip-16bit", "image": "images/chip16.tif",
                    "mask": "masks/chip16.tif", "instruction": INTERACTIVE_BOX,
                    "task": "intera"})
    tree.add(ExpectedSample("chip-16bit", "interactive", PromptTemplate.GEOSEG_BENCH,
                            INTERACTIVE_BOX, None, mask=chip_mask == 1,
                            image_shape=CHIP_SHAPE, rgb=chip_rgb))

    # 3: integer id, grey GeoTIFF, reasoning with the EarthReason template.
    grey = image_pixels(s, s, 5)[:, :, 0]
    _write_geotiff(root / "images" / "grey.tif", grey[np.newaxis], nodata=None)
    grey_mask = rect(s, s, (10, 10, 40, 20))
    _save(grey_mask, root / "masks" / "grey.png")
    records.append({"id": 7, "image": "images/grey.tif", "mask": "masks/grey.png",
                    "instruction": REASON_QUESTION, "task": "reasoning",
                    "answer": REASON_ANSWER, "template": "earthreason"})
    tree.add(ExpectedSample("7", "reasoning", PromptTemplate.EARTHREASON, REASON_QUESTION,
                            REASON_ANSWER, mask=grey_mask > 0, image_shape=(s, s),
                            rgb=np.repeat(grey[:, :, np.newaxis], 3, axis=2)))

    # 4: corrupt image (listed; read_image fails naming it).
    (root / "images" / "corrupt.tif").write_bytes(CORRUPT_BYTES)
    records.append({"id": "corrupt-chip", "image": "images/corrupt.tif",
                    "mask": "masks/grey.png", "instruction": "anything", "task": "ref"})
    tree.add(ExpectedSample("corrupt-chip", "referring", PromptTemplate.GEOSEG_BENCH,
                            "anything", None, mask=grey_mask > 0, image_shape=(s, s)))
    tree.unreadable["corrupt-chip"] = "corrupt.tif"

    ok = {"image": "images/rgba.png", "mask": "masks/rgba.png", "instruction": "x",
          "task": "referring"}
    records += [
        "",                                                               # 5: blank
        {"id": "no-mask", "image": "images/rgba.png", "instruction": "x",
         "task": "referring"},                                            # 6
        {**ok, "id": "bad-task", "task": "segment"},                      # 7
        {**ok, "id": "empty-text", "instruction": "   "},                 # 8
        '{"id": "not-json", ',                                            # 9
        {**ok, "id": "missing-image", "image": "images/nowhere.png"},     # 10
        {**ok, "id": "rgba-png"},                                         # 11: repeated id
    ]
    tree.problems += ["test.jsonl:6", "test.jsonl:7", "test.jsonl:8", "test.jsonl:9",
                      "missing-image", "test.jsonl:11"]
    (root / "test.jsonl").write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records),
        encoding="utf-8")
    return tree


def build_all(directory: Path, size: int = 64) -> dict[str, FixtureTree]:
    """Every layout under ``directory``, keyed by dataset name (``geoseg-bench`` is layout
    A; ``geoseg-bench-B`` layout B)."""
    directory = Path(directory)
    return {"geoseg-bench": build_geoseg_bench(directory, "A", size),
            "geoseg-bench-B": build_geoseg_bench(directory, "B", size),
            "rrsis-d": build_rrsisd(directory, size),
            "refsegrs": build_refsegrs(directory, size),
            "earthreason": build_earthreason(directory, size),
            "local": build_local(directory, size)}
