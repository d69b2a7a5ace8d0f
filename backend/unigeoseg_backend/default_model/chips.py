"""Training chips for the default model, written as a dataset in the project's ``local`` layout
(docs/datasets.md), so the trainer and ``unigeoseg eval`` read them unchanged through
``open_dataset("local", out_dir, split)``.

Chips are cut only from the training windows of ``regions.REGIONS`` (every chip window and
every stretch tile is checked with ``regions.check_training_window``) of the scenes that have
both a training window and a reference label: Sentinel-2 (water, vegetation), Landsat 8
(cloud) and the Yellowstone training tile (tree).

How one chip is made:

1. A source window of ``size = round(scale * chip_px)`` pixels a side, ``scale`` drawn
   log-uniformly from ``scales`` (capped by the training window's shorter side), inside a
   stretch tile of ``STRETCH_TILE_PX`` pixels a side (or the training window's side where it
   is narrower) on a grid of ``TILE_STRIDE_PX``.
2. The tile's red, green and blue bands are made 8-bit with ``radiometry.to_model_rgb``
   (the service's per-tile stretch), and the chip is cut out of that.
3. Image and reference masks are resampled to ``chip_px`` with Pillow's bilinear filter (the
   masks then thresholded at one half), so the chip's ground sample distance is
   ``scene.gsd_m * size / chip_px``.
4. Prompts, each a record of its own: for every class present, referring phrasings from
   ``text_encoder.DEFAULT_CLASSES`` and a reasoning wording from ``REASONING_PHRASINGS``
   (target: the class mask); a foreground click inside one connected component (sometimes
   with a background click beside it) and a box around a compact component (target: that
   component); for every class of the scene absent from the chip, its phrasing with an
   empty mask (a negative that the same imagery also answers positively elsewhere).

Label diversity: on 30 % of the Sentinel-2 chips, the bright part of Landsat 8 clouds cut at
the chip's ground sample distance is pasted (``PASTES``), so "clouds" is asked on both
sensors, answered with the pasted mask or, on the cloud-free coast, with an empty one; the
classes under a pasted cloud lose those pixels.

Everything is drawn from ``numpy.random.default_rng([seed, split, scene, chip])``, so a
build is a function of its arguments: the same seed gives byte-identical files.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from affine import Affine
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

from ..model.prompting import interactive_instruction
from .radiometry import rgb_band_names, to_model_rgb
from .references import SCENE_LABELS, component_labels, scene_reference
from .regions import check_training_window, train_windows
from .sources import LANDSAT8, SCENES, SENTINEL2, Scene, read_scene
from .text_encoder import DEFAULT_CLASSES

#: Side of the tiles the stretch is computed over, in source pixels (a tile as the service
#: receives one from QGIS is a few hundred pixels a side).
STRETCH_TILE_PX = 512
#: Stretch tiles start every this many source pixels of a training window.
TILE_STRIDE_PX = 128
#: Smallest connected component (chip pixels) a click or a box is put on.
MIN_COMPONENT_PX = 12
#: A box is put only on a compact component: its pixels fill at least this share of the box.
BOX_MIN_FILL = 0.35
#: ... and the box covers at most this share of the chip.
BOX_MAX_SHARE = 0.5
#: Chance that a click prompt gets a background click beside the foreground one.
BACKGROUND_CLICK_CHANCE = 0.5
#: Chance that a negative gets a reasoning wording as well as its referring phrasing.
NEGATIVE_REASONING_CHANCE = 0.5
#: Splits written, in this order; the chips of each are drawn independently.
SPLITS = ("train", "val")


@dataclass(frozen=True)
class Paste:
    """Objects of class ``label`` cut from training chips of scene ``donor`` and pasted onto a
    share ``chance`` of another scene's chips."""

    donor: str
    label: str
    chance: float
    min_brightness: float = 0.0   #: pasted pixels: the class, where the RGB mean is at least this


#: Which scenes get which pasted objects. Landsat 8 clouds on the cloud-free Sentinel-2 coast:
#: so "clouds" is answered on Sentinel-2 imagery too, positively where pasted and with an
#: empty mask elsewhere (true there: the scene is cloud-free), and the model cannot learn
#: "Sentinel-2 never has clouds" or "Landsat always might".
PASTES: dict[str, Paste] = {SENTINEL2.name: Paste(LANDSAT8.name, "cloud", 0.3, 150.0)}
#: A donor chip is used when the class covers this share of it (drawn up to PASTE_TRIES times).
PASTE_SHARES = (0.05, 0.6)
PASTE_TRIES = 10

#: Reasoning-style wordings per class: what the class does or is for, more than its name.
#: Each is kept only if the phrase vocabulary (the engine's text matching) understands it as
#: its class, and none is a paraphrase the text tests evaluate on; both are tested
#: (tests/default_model/test_chips.py), so those paraphrases stay unseen. Wordings that the
#: vocabulary refuses ("places where a boat could float" is nearest to "boats", "where cattle
#: could graze" scores below the threshold) would teach the model text the engine never
#: passes on.
REASONING_PHRASINGS: dict[str, tuple[str, ...]] = {
    "water": ("the parts of the scene that are wet", "places covered by the tide",
              "where the river flows to the sea", "water where ducks could float",
              "where the tide comes in"),
    "vegetation": ("land covered by living plants", "ground that looks green and alive",
                   "green growth on the land", "where plants are growing",
                   "the lush green parts"),
    "cloud": ("where the sky is clouded over", "white clouds seen from above",
              "clouds that could bring rain", "the cloud deck hiding the ground",
              "the haze of cloud over the land", "storm clouds"),
    "tree": ("woody plants with crowns", "trees a woodpecker could live in",
             "tall trunks with leafy tops", "the tops of tall trees", "trees to climb"),
    "lake": ("a body of fresh water surrounded by land", "a reservoir behind a dam",
             "a lake in a valley", "a quiet lake to row on"),
    "field": ("land a farmer ploughs", "the plots of cropland", "fields a farmer harvests",
              "parcels of farmland to plough", "fields a tractor works"),
}

_PHRASINGS = {c.name: c.phrases for c in DEFAULT_CLASSES}


def training_scenes() -> tuple[Scene, ...]:
    """The scenes chips are cut from: a training window and at least one reference label."""
    return tuple(SCENES[name] for name in SCENES
                 if train_windows(name) and SCENE_LABELS.get(name))


@dataclass
class _SceneData:
    """A training scene held in memory: per training window, its RGB bands and references."""

    scene: Scene
    windows: list[Window]
    bands: list[np.ndarray]                 # 3 x h x w per window, the files' dtype
    references: list[dict[str, np.ndarray]]  # label -> h x w bool per window
    nodata: float | None
    crs: str | None
    full_transform: Affine

    @classmethod
    def load(cls, scene: Scene) -> _SceneData:
        windows = train_windows(scene.name)
        whole = {label: scene_reference(scene, label) for label in SCENE_LABELS[scene.name]}
        reads = [read_scene(scene, rgb_band_names(scene), window) for window in windows]
        references = [{label: mask[window.toslices()] for label, mask in whole.items()}
                      for window in windows]
        first = reads[0]
        # the whole grid's transform: the first window's, moved back to the grid's origin
        transform = first.transform * Affine.translation(-windows[0].col_off,
                                                         -windows[0].row_off)
        return cls(scene, windows, [r.pixels for r in reads], references, first.nodata,
                   first.crs.to_string() if first.crs is not None else None, transform)


@dataclass
class _Chip:
    """Where one chip lies: ``window`` (its source pixels) inside ``tile`` (the stretch tile),
    both on the scene grid, inside training window number ``window_index``."""

    index: int
    window_index: int
    tile: Window
    window: Window
    rng: np.random.Generator = field(repr=False)


def _window_list(window: Window) -> list[int]:
    return [int(window.col_off), int(window.row_off), int(window.width), int(window.height)]


def _tile_origins(start: int, length: int, tile: int) -> list[int]:
    """Tile starts every ``TILE_STRIDE_PX`` along one axis, the last flush with the end."""
    last = start + length - tile
    origins = list(range(start, last + 1, TILE_STRIDE_PX))
    if origins[-1] != last:
        origins.append(last)
    return origins


def _draw_scale(rng: np.random.Generator, scales: tuple[float, float]) -> float:
    """Source pixels per chip pixel, log-uniform in ``scales``."""
    return math.exp(rng.uniform(math.log(scales[0]), math.log(scales[1])))


def _place_chip(data: _SceneData, index: int, rng: np.random.Generator, chip_px: int,
                scale: float) -> _Chip:
    """A chip of ``round(scale * chip_px)`` source pixels a side (at most the training
    window's shorter side) at a random place of a random stretch tile."""
    areas = np.array([w.width * w.height for w in data.windows], dtype=np.float64)
    window_index = int(rng.choice(len(areas), p=areas / areas.sum()))
    train = data.windows[window_index]
    size = min(max(round(scale * chip_px), 1), int(train.width), int(train.height))
    tile_w = max(min(STRETCH_TILE_PX, int(train.width)), size)
    tile_h = max(min(STRETCH_TILE_PX, int(train.height)), size)
    tile_col = int(rng.choice(_tile_origins(int(train.col_off), int(train.width), tile_w)))
    tile_row = int(rng.choice(_tile_origins(int(train.row_off), int(train.height), tile_h)))
    col = tile_col + int(rng.integers(0, tile_w - size + 1))
    row = tile_row + int(rng.integers(0, tile_h - size + 1))
    tile, window = Window(tile_col, tile_row, tile_w, tile_h), Window(col, row, size, size)
    check_training_window(data.scene.name, tile)
    check_training_window(data.scene.name, window)
    return _Chip(index, window_index, tile, window, rng)


def _resize_rgb(rgb: np.ndarray, chip_px: int) -> np.ndarray:
    """An RGB cut resampled to chip_px x chip_px, as a new (writable) array."""
    if rgb.shape[0] == chip_px:
        return rgb.copy()
    return np.array(Image.fromarray(rgb).resize((chip_px, chip_px), Image.Resampling.BILINEAR))


def _resize_mask(mask: np.ndarray, chip_px: int) -> np.ndarray:
    """A bool mask resampled like the image, foreground where it covers at least half."""
    if mask.shape[0] == chip_px:
        return mask.copy()
    grey = Image.fromarray(mask.astype(np.uint8) * np.uint8(255))
    return np.asarray(grey.resize((chip_px, chip_px), Image.Resampling.BILINEAR)) >= 128


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """The 4-connected components of at least ``MIN_COMPONENT_PX`` pixels, as bool masks."""
    if not mask.any():
        return []
    labels = component_labels(mask)
    ids, counts = np.unique(labels[mask], return_counts=True)
    return [labels == i for i, n in zip(ids, counts, strict=True) if n >= MIN_COMPONENT_PX]


def _interior(component: np.ndarray) -> np.ndarray:
    """Pixels of a component whose four neighbours are in it too (itself if none are)."""
    padded = np.pad(component, 1)
    inner = (component & padded[:-2, 1:-1] & padded[2:, 1:-1]
             & padded[1:-1, :-2] & padded[1:-1, 2:])
    return inner if inner.any() else component


def _pick_pixel(rng: np.random.Generator, where: np.ndarray) -> tuple[float, float]:
    """The centre ``(col + 0.5, row + 0.5)`` of a random True pixel of ``where``."""
    rows, cols = np.nonzero(where)
    k = int(rng.integers(0, rows.size))
    return float(cols[k]) + 0.5, float(rows[k]) + 0.5


def _bounding_box(component: np.ndarray) -> tuple[int, int, int, int]:
    """``(col_min, row_min, col_max, row_max)`` pixel edges around a component."""
    rows, cols = np.nonzero(component)
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


def _box_area(box: tuple[int, int, int, int]) -> int:
    return (box[2] - box[0]) * (box[3] - box[1])


def _background_click(rng: np.random.Generator, component: np.ndarray,
                      box: tuple[int, int, int, int]) -> tuple[float, float] | None:
    """A pixel outside the component, within 8 pixels of its box where there is one."""
    height, width = component.shape
    near = np.zeros_like(component)
    near[max(box[1] - 8, 0):min(box[3] + 8, height),
         max(box[0] - 8, 0):min(box[2] + 8, width)] = True
    for where in (near & ~component, ~component):
        if where.any():
            return _pick_pixel(rng, where)
    return None


@dataclass
class _ChipWriter:
    """Writes one split's files and records under ``root``."""

    root: Path
    split: str
    chip_px: int
    records: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        # One all-background mask that every negative of every chip names.
        self.empty_mask = f"masks/empty-{self.chip_px}.png"
        _save_mask(self.root / self.empty_mask, np.zeros((self.chip_px,) * 2, dtype=bool))

    def chip(self, data: _SceneData, chip: _Chip, rgb: np.ndarray,
             masks: dict[str, np.ndarray], pasted: dict[str, Any] | None) -> None:
        """Write one chip's image, masks (label -> mask, every class the chip's scene is
        labelled with) and prompt records; ``pasted`` says where pasted objects came from."""
        scene, rng, chip_px = data.scene, chip.rng, self.chip_px
        stem = f"{self.split}/{scene.name}/{chip.index:05d}"
        image = f"images/{stem}.png"
        (self.root / image).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(self.root / image, format="PNG")
        size = int(chip.window.width)
        # chip pixel -> map: the source window's transform, scaled by the resampling
        transform = window_transform(chip.window, data.full_transform) \
            * Affine.scale(size / chip_px)
        present = [label for label in masks if masks[label].any()]
        chip_meta = {
            "scene": scene.name, "window": _window_list(chip.window),
            "stretch_window": _window_list(chip.tile),
            "scale": size / chip_px, "gsd_m": scene.gsd_m * size / chip_px,
            "crs": data.crs, "transform": list(transform)[:6], "classes_present": present,
            "pasted": pasted,
        }
        count = 0

        def record(task: str, instruction: str, mask_path: str, prompt: dict[str, Any],
                   target: str) -> None:
            nonlocal count
            self.records.append({
                "id": f"{stem.replace('/', '-')}-{count}", "image": image, "mask": mask_path,
                "instruction": instruction, "task": task,
                "prompt": prompt, "target": target, "chip": chip_meta})
            count += 1

        def mask_file(name: str, mask: np.ndarray) -> str:
            path = f"masks/{stem}-{name}.png"
            _save_mask(self.root / path, mask)
            return path

        for label in present:
            path = mask_file(label, masks[label])
            phrases = _PHRASINGS[label]
            for phrase in rng.choice(phrases, size=min(2, len(phrases)), replace=False):
                record("referring", str(phrase), path,
                       {"kind": "text", "class": label}, "class")
            record("reasoning", str(rng.choice(REASONING_PHRASINGS[label])), path,
                   {"kind": "text", "class": label}, "class")

        components = {label: _components(masks[label]) for label in present}
        clickable = [label for label in present if components[label]]
        if clickable:
            label = clickable[int(rng.integers(0, len(clickable)))]
            candidates = components[label]
            component = candidates[int(rng.integers(0, len(candidates)))]
            points = [_pick_pixel(rng, _interior(component))]
            labels = [1]
            if rng.random() < BACKGROUND_CLICK_CHANCE:
                background = _background_click(rng, component, _bounding_box(component))
                if background is not None:
                    points.append(background)
                    labels.append(0)
            # The benchmark wording cannot mark a point as background: the text names the
            # foreground click only, the record's prompt holds both with their labels.
            col, row = points[0]
            record("interactive",
                   interactive_instruction(points_norm=[[col / chip_px, row / chip_px]]),
                   mask_file("click", component),
                   {"kind": "click", "class": label, "points": [list(p) for p in points],
                    "labels": labels}, "component")

        boxable = [(label, c, box) for label in present for c in components[label]
                   for box in [_bounding_box(c)]
                   if c.sum() >= BOX_MIN_FILL * _box_area(box)
                   and _box_area(box) <= BOX_MAX_SHARE * chip_px * chip_px]
        if boxable:
            label, component, box = boxable[int(rng.integers(0, len(boxable)))]
            record("interactive",
                   interactive_instruction(box_norm=[v / chip_px for v in box]),
                   mask_file("box", component),
                   {"kind": "box", "class": label, "box": [float(v) for v in box]}, "component")

        for label in masks:
            if label in present:
                continue
            record("referring", str(rng.choice(_PHRASINGS[label])), self.empty_mask,
                   {"kind": "text", "class": label}, "empty")
            if rng.random() < NEGATIVE_REASONING_CHANCE:
                record("reasoning", str(rng.choice(REASONING_PHRASINGS[label])),
                       self.empty_mask, {"kind": "text", "class": label}, "empty")

    def finish(self) -> None:
        with open(self.root / f"{self.split}.jsonl", "w", encoding="utf-8") as f:
            for rec in self.records:
                f.write(json.dumps(rec, separators=(",", ":")) + "\n")


def _save_mask(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * np.uint8(255)).save(path, format="PNG")


def _within(inner: Window, outer: Window) -> tuple[slice, slice]:
    """Row and column slices of ``inner`` in an array holding ``outer`` (same grid)."""
    row, col = int(inner.row_off - outer.row_off), int(inner.col_off - outer.col_off)
    return slice(row, row + int(inner.height)), slice(col, col + int(inner.width))


def _stretched_tile(data: _SceneData, chip: _Chip) -> np.ndarray:
    """The chip's stretch tile as 8-bit RGB (``radiometry.to_model_rgb``), h x w x 3."""
    train = data.windows[chip.window_index]
    bands = data.bands[chip.window_index][(slice(None),) + _within(chip.tile, train)]
    return to_model_rgb(bands, data.nodata)[0]


def _cut(data: _SceneData, chip: _Chip, tile_rgb: np.ndarray,
         chip_px: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The chip's image (chip_px x chip_px x 3 uint8, out of its stretched tile) and its
    reference masks (label -> chip_px x chip_px bool), resampled."""
    rgb = _resize_rgb(np.ascontiguousarray(tile_rgb[_within(chip.window, chip.tile)]), chip_px)
    in_train = _within(chip.window, data.windows[chip.window_index])
    return rgb, {label: _resize_mask(reference[in_train], chip_px)
                 for label, reference in data.references[chip.window_index].items()}


def _paste(data: _SceneData, chip: _Chip, donor: _SceneData, paste: Paste, chip_px: int,
           rgb: np.ndarray, masks: dict[str, np.ndarray]) -> dict[str, Any] | None:
    """Paste ``paste.label`` objects cut from ``donor`` at the chip's ground sample distance
    onto the chip (``rgb`` and ``masks`` are changed in place): the pasted mask becomes the
    class's mask and hides the other classes under it. Returns where they came from, or
    None when no donor chip of ``PASTE_TRIES`` held enough of the class."""
    scale = chip.window.width / chip_px * data.scene.gsd_m / donor.scene.gsd_m
    for _ in range(PASTE_TRIES):
        source = _place_chip(donor, chip.index, chip.rng, chip_px, scale)
        in_train = _within(source.window, donor.windows[source.window_index])
        share = donor.references[source.window_index][paste.label][in_train].mean()
        if PASTE_SHARES[0] <= share <= PASTE_SHARES[1]:
            break
    else:
        return None
    donor_rgb, donor_masks = _cut(donor, source, _stretched_tile(donor, source), chip_px)
    # Only the bright part of the class is pasted: medium-confidence BQA cloud over land
    # looks like land, and pasted onto another scene it would teach that land is cloud.
    pasted = donor_masks[paste.label] & (donor_rgb.mean(axis=-1) >= paste.min_brightness)
    # a 3 x 3 mean of the mask as opacity, so the pasted edge is not a hard step
    alpha = sliding_window_view(np.pad(pasted.astype(np.float32), 1, mode="edge"),
                                (3, 3)).mean(axis=(-2, -1))
    blended = alpha[..., None] * donor_rgb + (1 - alpha[..., None]) * rgb
    rgb[...] = np.rint(blended).astype(np.uint8)
    for label in masks:
        masks[label] &= ~pasted
    masks[paste.label] = pasted
    return {"class": paste.label, "scene": donor.scene.name,
            "window": _window_list(source.window), "stretch_window": _window_list(source.tile)}


def _build_scene_split(writer: _ChipWriter, data: _SceneData, scene_index: int,
                       split_index: int, n_chips: int, seed: int, chip_px: int,
                       scales: tuple[float, float], donors: dict[str, _SceneData]) -> None:
    rngs = [np.random.default_rng([seed, split_index, scene_index, i]) for i in range(n_chips)]
    chips = [_place_chip(data, i, rng, chip_px, _draw_scale(rng, scales))
             for i, rng in enumerate(rngs)]
    by_tile: dict[tuple[int, tuple[int, ...]], list[_Chip]] = {}
    for chip in chips:
        by_tile.setdefault((chip.window_index, tuple(_window_list(chip.tile))), []).append(chip)
    made: dict[int, tuple[np.ndarray, dict[str, np.ndarray]]] = {}
    for tile_chips in by_tile.values():
        tile_rgb = _stretched_tile(data, tile_chips[0])
        for chip in tile_chips:
            made[chip.index] = _cut(data, chip, tile_rgb, chip_px)
    paste = PASTES.get(data.scene.name)
    for chip in chips:  # in index order: the records' and the draws' order is not the tiles'
        rgb, masks = made.pop(chip.index)
        pasted = None
        if paste is not None:
            masks.setdefault(paste.label, np.zeros_like(next(iter(masks.values()))))
            if chip.rng.random() < paste.chance:
                pasted = _paste(data, chip, donors[paste.donor], paste, chip_px, rgb, masks)
        writer.chip(data, chip, rgb, masks, pasted)


def build_chip_dataset(out_dir: str | Path, *, chip_px: int = 128, chips_per_scene: int = 1800,
                       val_chips_per_scene: int = 60, seed: int = 0,
                       scales: Sequence[float] = (0.5, 3.5)) -> dict[str, Any]:
    """Write the default model's training chips as a ``local``-layout dataset.

    Args:
        out_dir: a new or empty folder; it receives ``train.jsonl``, ``val.jsonl``,
            ``images/``, ``masks/`` and ``build.json`` (docs/default-model.md, "Training
            chips").
        chip_px: chip side in pixels after resampling.
        chips_per_scene, val_chips_per_scene: chips per training scene in each split.
        seed: every random choice follows from it.
        scales: ``(smallest, largest)`` source pixels per chip pixel.

    Returns:
        The contents of ``build.json`` (parameters, chip and sample counts per split, scene,
        task and target, bytes written) plus ``seconds``, the wall time of the build.

    Raises:
        ValueError: a bad argument, or ``out_dir`` holds files.
        AssetPackageMissingError: a scene's package is not installed.
    """
    started = time.perf_counter()
    lo, hi = (float(s) for s in scales)
    if not 0 < lo <= hi:
        raise ValueError(f"scales must be (smallest, largest) with 0 < smallest <= largest, "
                         f"got {tuple(scales)}")
    if chip_px < 8 or chips_per_scene < 0 or val_chips_per_scene < 0:
        raise ValueError("chip_px must be at least 8 and chip counts non-negative")
    root = Path(out_dir)
    if root.exists() and any(root.iterdir()):
        raise ValueError(f"{root} is not empty; chips are written into a new or empty folder")
    root.mkdir(parents=True, exist_ok=True)

    counts = {"train": chips_per_scene, "val": val_chips_per_scene}
    scenes = [_SceneData.load(scene) for scene in training_scenes()]
    donors = {data.scene.name: data for data in scenes}
    summary: dict[str, Any] = {
        "chip_px": chip_px, "seed": seed, "scales": [lo, hi],
        "chips_per_scene": dict(counts), "scenes": [d.scene.name for d in scenes], "splits": {}}
    for split_index, split in enumerate(SPLITS):
        writer = _ChipWriter(root, split, chip_px)
        for scene_index, data in enumerate(scenes):
            _build_scene_split(writer, data, scene_index, split_index, counts[split], seed,
                               chip_px, (lo, hi), donors)
        writer.finish()
        summary["splits"][split] = _split_counts(writer.records)
    summary["bytes"] = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    with open(root / "build.json", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1, sort_keys=True)
        f.write("\n")
    return {**summary, "seconds": round(time.perf_counter() - started, 2)}


def _split_counts(records: list[dict[str, Any]]) -> dict[str, Any]:
    def tally(key) -> dict[str, int]:
        out: dict[str, int] = {}
        for rec in records:
            out[key(rec)] = out.get(key(rec), 0) + 1
        return dict(sorted(out.items()))

    return {"samples": len(records),
            "chips": len({rec["image"] for rec in records}),
            "by_scene": tally(lambda r: r["chip"]["scene"]),
            "by_task": tally(lambda r: r["task"]),
            "by_prompt": tally(lambda r: r["prompt"]["kind"]),
            "by_target": tally(lambda r: r["target"]),
            "by_class": tally(lambda r: r["prompt"]["class"])}

