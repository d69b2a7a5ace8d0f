"""The click engine: Segment Anything (``segment-anything``) with cached image embeddings.

The model is built from ``segment_anything.modeling`` parts with our own registry of
configurations, so that checkpoints load with ``torch.load(weights_only=True)`` (the package's
own builders unpickle arbitrary objects) and so that tests can use a tiny random configuration
of exactly the same code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ..errors import EngineUnavailableError, WeightsError
from .base import Capabilities, Engine, EngineSettings, Prediction, TilePrompt


@dataclass(frozen=True)
class SamConfig:
    """Shape of a SAM model. The official ones differ only in the image encoder."""

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_embed_dim: int = 256
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding grid (64 for the official models)."""
        return self.image_size // self.patch_size


#: Named configurations. ``tiny`` is for tests and benchmarks only (random weights).
SAM_CONFIGS: dict[str, SamConfig] = {
    "vit_b": SamConfig(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": SamConfig(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SamConfig(1280, 32, 16, (7, 15, 23, 31)),
    "tiny": SamConfig(64, 2, 2, (1,), image_size=256, window_size=4, prompt_embed_dim=32,
                      decoder_mlp_dim=64, decoder_num_heads=2, iou_head_hidden_dim=32),
}


def build_sam(config: SamConfig) -> torch.nn.Module:
    """Build an uninitialised-weights ``segment_anything.modeling.Sam`` of ``config``'s shape."""
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    size = config.embedding_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=config.encoder_depth, embed_dim=config.encoder_embed_dim,
            img_size=config.image_size, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=config.encoder_num_heads, patch_size=config.patch_size, qkv_bias=True,
            use_rel_pos=True, global_attn_indexes=config.encoder_global_attn_indexes,
            window_size=config.window_size, out_chans=config.prompt_embed_dim),
        prompt_encoder=PromptEncoder(
            embed_dim=config.prompt_embed_dim, image_embedding_size=(size, size),
            input_image_size=(config.image_size, config.image_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=config.prompt_embed_dim,
                                          mlp_dim=config.decoder_mlp_dim,
                                          num_heads=config.decoder_num_heads),
            transformer_dim=config.prompt_embed_dim, iou_head_depth=3,
            iou_head_hidden_dim=config.iou_head_hidden_dim),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Read tensors from a ``.safetensors`` file or a ``torch.save`` file, never unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or unsafe files
        raise WeightsError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(state, dict):
        raise WeightsError(f"checkpoint {path} does not hold a state dict")
    if "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    return state


def load_sam(checkpoint: Path, sam_type: str, device: torch.device) -> torch.nn.Module:
    """Build SAM ``sam_type`` and load ``checkpoint`` strictly; errors name the bad tensors."""
    if sam_type not in SAM_CONFIGS:
        raise WeightsError(f"unknown SAM type {sam_type!r}; choose one of {sorted(SAM_CONFIGS)}")
    model = build_sam(SAM_CONFIGS[sam_type])
    state = load_state_dict_file(checkpoint)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or misshaped:
        raise WeightsError(
            f"checkpoint {checkpoint} does not fit SAM {sam_type}: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]}), {len(misshaped)} with other shapes (e.g. {misshaped[:3]}); "
            f"is --sam-type right?",
            {"missing": missing[:20], "unexpected": unexpected[:20], "misshaped": misshaped[:20]})
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


@dataclass
class SamEmbedding:
    """The cached output of the image encoder for one tile.

    Attributes:
        features: 1 x C x S x S image embedding (S = 64 for the official models), on the device.
        original_size: (H, W) of the tile in pixels.
        input_size: (h, w) of the resized tile inside the padded encoder input.
    """

    features: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.features.numel() * self.features.element_size()


def find_sam_checkpoint(sam_checkpoint: Path | None, sam_type: str) -> Path:
    """The checkpoint to load: the one given, else the weights cache's ``sam_<type>``.

    Raises:
        WeightsError: ``sam_checkpoint`` was given and does not exist.
        EngineUnavailableError: none was given and the cache has none (the message says how
            to get one).
    """
    if sam_checkpoint is not None:
        if not Path(sam_checkpoint).is_file():
            raise WeightsError(f"SAM checkpoint {sam_checkpoint} does not exist")
        return Path(sam_checkpoint)
    from ..weights import resolve_checkpoint

    try:
        return resolve_checkpoint(f"sam_{sam_type}")
    except WeightsError as exc:
        raise EngineUnavailableError(
            f"no SAM {sam_type} weights: {exc.message} Run `unigeoseg weights download "
            f"sam_{sam_type}` or pass --sam-checkpoint PATH.") from exc


class SamEngine(Engine):
    """Encode a tile once, then answer any number of point / box prompts on it.

    A prediction's ``score`` is SAM's predicted IoU of the mask; its ``low_res_logits``
    (1 x 1 x 4S x 4S) come back as ``mask_input`` on the next click on the same object.
    """

    name = "sam"
    title = "SAM"
    capabilities = Capabilities(tasks=("interactive",), points=True, background_points=True,
                                box=True, mask_feedback=True)

    def __init__(self, model: torch.nn.Module, sam_type: str, device: torch.device):
        from segment_anything.utils.transforms import ResizeLongestSide

        self.model = model
        self.sam_type = sam_type
        self.device = device
        self.image_size = model.image_encoder.img_size
        self._resize = ResizeLongestSide(self.image_size)

    @classmethod
    def from_checkpoint(cls, checkpoint: Path, sam_type: str, device: torch.device) -> SamEngine:
        return cls(load_sam(checkpoint, sam_type, device), sam_type, device)

    @classmethod
    def loader(cls, settings: EngineSettings) -> Callable[[], SamEngine]:
        checkpoint = find_sam_checkpoint(settings.sam_checkpoint, settings.sam_type)
        return lambda: cls.from_checkpoint(checkpoint, settings.sam_type, settings.device)

    @property
    def model_id(self) -> str:
        return f"sam_{self.sam_type}"

    @torch.no_grad()
    def encode(self, rgb: np.ndarray) -> SamEmbedding:
        """Run the image encoder on an H x W x 3 uint8 RGB tile."""
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"encode expects H x W x 3 uint8, got {rgb.shape} {rgb.dtype}")
        # Same resize as SamPredictor (longest side to image_size, antialiased), so that
        # official weights see what they were trained on.
        resized = self._resize.apply_image(rgb)
        tensor = torch.as_tensor(resized, device=self.device).permute(2, 0, 1)[None]  # 1 3 h w
        features = self.model.image_encoder(self.model.preprocess(tensor.float()))
        return SamEmbedding(features=features, original_size=rgb.shape[:2],
                            input_size=tuple(resized.shape[:2]))

    @torch.no_grad()
    def _decode(self, embedding: SamEmbedding, prompt: TilePrompt) -> Prediction:
        """Decode one mask from the points, box and previous mask of ``prompt``; with
        ``prompt.multimask``, of 3 candidates the one with the best predicted IoU."""
        h, w = embedding.original_size
        scale = np.array([embedding.input_size[1] / w, embedding.input_size[0] / h])
        point_arg = box_arg = None
        if prompt.points is not None and len(prompt.points):
            # SAM adds 0.5 to its inputs ("centre of pixel"), i.e. it takes integer pixel
            # indices; our coordinates are continuous, so remove that half pixel after scaling.
            coords = np.asarray(prompt.points, dtype=np.float64) * scale - 0.5
            point_arg = (torch.as_tensor(coords, dtype=torch.float32, device=self.device)[None],
                         torch.as_tensor(prompt.labels, dtype=torch.int64,
                                         device=self.device)[None])
        if prompt.box is not None:
            box = np.asarray(prompt.box, dtype=np.float64).reshape(2, 2) * scale - 0.5
            box_arg = torch.as_tensor(box.reshape(1, 4), dtype=torch.float32, device=self.device)
        mask_input = prompt.mask_input
        # With a previous mask as prompt SAM's own guidance is a single output.
        multimask = prompt.multimask and mask_input is None
        sparse, dense = self.model.prompt_encoder(points=point_arg, boxes=box_arg,
                                                  masks=mask_input)
        low_res, iou = self.model.mask_decoder(
            image_embeddings=embedding.features,
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
            multimask_output=multimask)
        best = int(torch.argmax(iou[0]))
        chosen = low_res[:, best:best + 1]  # 1 1 4S 4S
        upsampled = self.model.postprocess_masks(chosen, embedding.input_size,
                                                 embedding.original_size)
        mask = (upsampled[0, 0] > self.model.mask_threshold).cpu().numpy()
        return Prediction(mask=mask, score=float(iou[0, best]), low_res_logits=chosen)
