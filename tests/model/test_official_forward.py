"""End to end against the OFFICIAL UniGeoSeg forward: same random weights, same inputs.

``data/official_forward_tiny.npz`` holds the final-stage mask logits that the official code
(MiliLab/UniGeoSeg ``eval_seg``, transformers 4.36.2, fp32, CPU) produced for one image and
four prompts (referring, reasoning, interactive box, interactive point) on a small model of the
official shape, whose weights :func:`seeded_model` regenerates here from a seed.
``benchmarks/official_forward/`` rebuilds the file (README there: the official venv, and the
stubs it needs).

The model is small but keeps every width the official code hard-codes (Swin embed 128 / res5
1024 channels, the 512 px letterbox for SparseConv_1's fixed LayerNorm, 512-wide description
projector, 4 TATE reasoning queries, 1024-wide pixel-decoder FFN, 32 GroupNorm groups); the
language model and the Mask2Former widths, which the official code reads from its configs,
are shrunk.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unigeoseg_backend.model.checkpoint import load_released, save_released
from unigeoseg_backend.model.conversion import released_name
from unigeoseg_backend.model.heads import HeadsConfig
from unigeoseg_backend.model.mask_decoder import MaskDecoderConfig
from unigeoseg_backend.model.pixel_decoder import PixelDecoderConfig
from unigeoseg_backend.model.preprocess import letterbox_image
from unigeoseg_backend.model.prompting import build_prompt, interactive_instruction
from unigeoseg_backend.model.registry import MODEL_CONFIGS, tiny_tokenizer
from unigeoseg_backend.model.swin import SwinConfig
from unigeoseg_backend.model.unigeoseg import PHI_1_5, UniGeoSeg, UniGeoSegConfig

DATA = Path(__file__).parent / "data" / "official_forward_tiny.npz"
#: Registry name under which the generator and this test register the configuration.
ARCH = "unigeoseg-official-shaped-small"
SEED = 20251225
IMAGE_SIZE = 512

#: case -> (task, instruction). Task strings are ours; the official prompt_type comes from
#: the benchmark folder (``/ref/``, ``/intera/``, else reasoning).
CASES: dict[str, tuple[str, str]] = {
    "ref": ("referring", "the warehouse with the blue roof next to the rail yard"),
    "reason": ("reasoning", "areas where people could swim"),
    "intera_box": ("interactive", interactive_instruction(box_norm=(0.1, 0.2, 0.3, 0.4))),
    "intera_point": ("interactive", interactive_instruction(points_norm=[(0.49, 0.828)])),
}

#: fp32 on CPU, two implementations (transformers 4.36 eager Phi vs ours, the official
#: pure-PyTorch deformable attention vs ours): the generator measured 1.2e-5 abs, 1.4e-6 of
#: max |logit|. The tolerance is relative to max |logit| (about 9 here).
ATOL = 1e-4
RTOL = 1e-4


def official_shaped_config() -> UniGeoSegConfig:
    swin = SwinConfig(embed_dim=128, depths=(2, 2, 2, 2), num_heads=(4, 8, 16, 32),
                      window_size=12, drop_path_rate=0.0)
    language = dict(PHI_1_5, vocab_size=1000, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512)
    return UniGeoSegConfig(
        language=language, connector="SparseConv_1", swin=swin,
        pixel_decoder=PixelDecoderConfig(in_channels=tuple(swin.num_features), conv_dim=32,
                                         mask_dim=32, num_encoder_layers=2, num_heads=4,
                                         ffn_dim=1024, num_points=4, num_groups=32),
        mask_decoder=MaskDecoderConfig(hidden_dim=32, num_heads=4, ffn_dim=64, num_layers=3,
                                       mask_dim=32, num_queries=5),
        heads=HeadsConfig(hidden=64, vision_dim=swin.num_features[-1], seg_dim=32,
                          proj_dim=512, n_latents=4, reason_queries=4, dproj_heads=8,
                          dproj_dim_head=64, n_seg_queries=5, legacy_dtype=torch.bfloat16),
        image_size=IMAGE_SIZE)


def register_config() -> None:
    """save_released / load_released only know registry architectures."""
    MODEL_CONFIGS[ARCH] = official_shaped_config


def released_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters under their released module names (``ref_attn.query``, not
    ``heads.ref_attn.query``), sorted: the names the golden file's seeds were drawn from."""
    return sorted((released_name(name), p) for name, p in model.named_parameters())


def randomize_(model: nn.Module, seed: int = SEED) -> None:
    """Deterministic weights that depend only on parameter names and shapes (not on module
    order or init code): one ``torch.randn`` stream per parameter, seeded from its released
    name."""
    owners = {}
    for module_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            owners[released_name(full)] = module
    with torch.no_grad():
        for name, parameter in released_parameters(model):
            generator = torch.Generator().manual_seed(seed * 4_294_967_296
                                                      + zlib.crc32(name.encode()))
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
            if isinstance(owners[name], nn.LayerNorm | nn.GroupNorm) and name.endswith("weight"):
                value = 1.0 + 0.1 * noise
            elif name.endswith("bias") or parameter.ndim < 2:
                value = 0.1 * noise
            else:
                value = noise / math.sqrt(math.prod(parameter.shape[1:]))
            parameter.copy_(value)


def parameter_digest(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, parameter in released_parameters(model):
        tensor = parameter.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def seeded_model() -> UniGeoSeg:
    model = UniGeoSeg(official_shaped_config())
    randomize_(model)
    return model.eval()


def make_image() -> np.ndarray:
    """A 512 x 512 RGB test image from integer arithmetic only (no RNG, no float maths):
    a checkerboard, a bright rectangle, gradients and hashed noise. Square, so the letterbox
    is the identity and both sides see the very same tensor."""
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.uint32)
    h = (x * np.uint32(73856093)) ^ (y * np.uint32(19349663))
    h = (h ^ (h >> np.uint32(13))) * np.uint32(1274126177)
    noise = ((h ^ (h >> np.uint32(16))) & np.uint32(63)).astype(np.int64)
    board = (((x // 64 + y // 64) % 2) * 90).astype(np.int64)
    rect = ((x >= 150) & (x < 300) & (y >= 80) & (y < 200)).astype(np.int64) * 120
    red = 30 + board + rect + noise
    green = (x // 3).astype(np.int64) + noise
    blue = (y // 3).astype(np.int64) + rect // 2 + noise
    return np.clip(np.stack([red, green, blue], axis=-1), 0, 255).astype(np.uint8)


def image_digest(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


def run_ours(model: UniGeoSeg, tokenizer) -> dict[str, torch.Tensor]:
    """case -> final-stage mask logits, 1 x 1 x 128 x 128 (fp32)."""
    image, _ = letterbox_image(make_image(), IMAGE_SIZE)
    vision = model.encode_images(image[None])
    out = {}
    for case, (task, instruction) in CASES.items():
        prompt = build_prompt(task, instruction, tokenizer)
        out[case] = model.segment(vision, [prompt]).float()
    return out


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(DATA) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def ours(tmp_path_factory) -> tuple[str, str, dict[str, torch.Tensor]]:
    """Our logits after a round trip through the released layout (fused 4.36 attention)."""
    register_config()
    try:
        model = seeded_model()
        digest = parameter_digest(model)
        folder = save_released(model, tiny_tokenizer(),
                               tmp_path_factory.mktemp("official") / "release")
        loaded = load_released(folder, device="cpu", dtype=torch.float32)
        with torch.no_grad():
            return digest, image_digest(make_image()), run_ours(loaded.model, loaded.tokenizer)
    finally:
        MODEL_CONFIGS.pop(ARCH, None)


def test_the_weights_and_the_image_are_those_the_official_code_saw(golden, ours):
    digest, image_sha, _ = ours
    assert str(golden["weights_sha256"]) == digest, (
        "the seeded weights changed (torch.randn stream or parameter names/shapes): "
        "regenerate the golden file with benchmarks/official_forward/run.sh")
    assert str(golden["image_sha256"]) == image_sha


@pytest.mark.parametrize("case", list(CASES))
def test_mask_logits_match_the_official_forward(golden, ours, case):
    _, _, logits = ours
    mine = logits[case].numpy()[0, 0]
    official = golden[f"{case}/logits"]
    assert mine.shape == official.shape == (IMAGE_SIZE // 4, IMAGE_SIZE // 4)
    scale = float(np.abs(official).max())
    assert scale > 1e-2  # not a degenerate all-zero output
    np.testing.assert_allclose(mine, official, atol=ATOL * scale, rtol=RTOL)


@pytest.mark.parametrize("case", list(CASES))
def test_thresholded_masks_agree_with_the_official_ones(golden, ours, case):
    """The official eval upsamples the last logits bilinearly to 512 and keeps ``> 0``."""
    _, _, logits = ours

    def mask(grid: np.ndarray | torch.Tensor) -> np.ndarray:
        grid = torch.as_tensor(np.asarray(grid, dtype=np.float32)).reshape(1, 1, *grid.shape[-2:])
        up = F.interpolate(grid, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
                           align_corners=False)
        return (up > 0)[0, 0].numpy()

    official = mask(golden[f"{case}/logits"])
    assert int(official.sum()) == int(golden[f"{case}/mask_pixels"])  # as eval_seg returned it
    agreement = float((mask(logits[case]) == official).mean())
    assert agreement >= 0.9999
