"""The default model's network: a small prompt-conditioned segmenter, segment-anything style.

Three parts, so that a tile is encoded once and every prompt on it runs only the light part:

- :class:`ImageEncoder` (once per tile): a residual CNN down to stride 16, with lateral
  projections at strides 16, 8 and 4 to the decoder's widths -> :class:`ImageFeatures`.
- :class:`PromptEncoder` (per prompt): the text embedding (all-MiniLM-L6-v2, 384-d), the task
  and which prompt kinds are present -> one conditioning vector; the points and the box ->
  prompt maps (foreground and background Gaussian heatmaps, the filled box) rendered
  directly at each decoder resolution, so no prompt ever touches the image encoder.
- :class:`MaskDecoder` (per prompt): a U-Net decoder over the cached features whose stages
  are FiLM-modulated by the conditioning vector and take the prompt maps as extra input;
  it gives mask logits at stride 4 and a predicted-IoU score.

Frames: images are ``B x 3 x H x W`` float in 0..255 (RGB), ``H`` and ``W`` multiples of
:data:`STRIDE`. Points and boxes are continuous pixel coordinates ``(col, row)`` of that
image: pixel ``(i, j)`` covers ``[i, i+1) x [j, j+1)``. Logits cell ``(k, l)`` at stride 4
covers image pixels ``[4k, 4k+4) x [4l, 4l+4)``.

Configurations are named in :data:`DEFAULT_MODEL_CONFIGS`; ``tiny`` is for tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from unigeoseg_protocol.vocabulary import TASKS

#: The encoder's total downsampling: image sides must be multiples of it.
STRIDE = 16
#: The resolution of the output logits relative to the image.
OUTPUT_STRIDE = 4
#: Strides of the decoder stages, coarse to fine.
DECODER_STRIDES = (16, 8, 4)
#: Prompt map channels: foreground points, background points, box.
PROMPT_MAP_CHANNELS = 3
#: Label of a padding point (no point): rows of ``PromptBatch.points`` that are not used.
PAD_LABEL = -1


@dataclass(frozen=True)
class DefaultModelConfig:
    """The shape of a default model.

    Attributes:
        encoder_channels: widths of the encoder stages at strides 2, 4, 8, 16.
        encoder_blocks: residual blocks after the downsampling of each stage.
        decoder_channels: widths of the decoder stages at strides 16, 8, 4.
        text_dim: the text embedding's size (384 for all-MiniLM-L6-v2).
        condition_dim: the conditioning vector's size.
        point_sigma_px: the click heatmap's standard deviation in image pixels (at a coarse
            stage it is at least half a cell, so a click is never lost between cell centres).
        pixel_mean, pixel_std: RGB normalisation of the 0..255 input.
    """

    encoder_channels: tuple[int, int, int, int]
    encoder_blocks: tuple[int, int, int, int]
    decoder_channels: tuple[int, int, int]
    text_dim: int = 384
    condition_dim: int = 128
    point_sigma_px: float = 6.0
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)


#: Named configurations. ``default-v1`` is the shipped model's; ``tiny`` is for tests.
DEFAULT_MODEL_CONFIGS: dict[str, DefaultModelConfig] = {
    "default-v1": DefaultModelConfig(encoder_channels=(16, 32, 64, 144),
                                     encoder_blocks=(0, 1, 2, 3),
                                     decoder_channels=(96, 64, 32)),
    "tiny": DefaultModelConfig(encoder_channels=(8, 8, 16, 16), encoder_blocks=(0, 0, 1, 1),
                               decoder_channels=(16, 8, 8), condition_dim=16),
}


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """3 x 3 convolution, batch norm, ReLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class ResidualBlock(nn.Module):
    """Two 3 x 3 convolutions with batch norm and an identity shortcut; keeps the shape."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = conv_bn_relu(channels, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.norm2(self.conv2(self.conv1(x))))


@dataclass
class ImageFeatures:
    """The image side of a batch of tiles, projected to the decoder's widths.

    Attributes:
        stride16: B x D0 x H/16 x W/16.
        stride8: B x D1 x H/8 x W/8.
        stride4: B x D2 x H/4 x W/4.
    """

    stride16: torch.Tensor
    stride8: torch.Tensor
    stride4: torch.Tensor

    @property
    def levels(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self.stride16, self.stride8, self.stride4)

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the encoded image."""
        return (self.stride4.shape[-2] * OUTPUT_STRIDE, self.stride4.shape[-1] * OUTPUT_STRIDE)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.levels)

    def expand(self, batch: int) -> ImageFeatures:
        """The features of one tile repeated for ``batch`` prompts (views, no copy)."""
        return ImageFeatures(*(t.expand(batch, -1, -1, -1) for t in self.levels))


class ImageEncoder(nn.Module):
    """B x 3 x H x W (0..255 RGB) -> :class:`ImageFeatures`; runs once per tile."""

    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor

    def __init__(self, config: DefaultModelConfig):
        super().__init__()
        self.register_buffer("pixel_mean", torch.tensor(config.pixel_mean).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.pixel_std).view(1, 3, 1, 1),
                             persistent=False)
        stages = []
        c_in = 3
        for c_out, blocks in zip(config.encoder_channels, config.encoder_blocks, strict=True):
            stages.append(nn.Sequential(conv_bn_relu(c_in, c_out, stride=2),
                                        *(ResidualBlock(c_out) for _ in range(blocks))))
            c_in = c_out
        self.stages = nn.ModuleList(stages)  # strides 2, 4, 8, 16
        # stride 16 gets a global context term (what the whole tile looks like)
        c16 = config.encoder_channels[3]
        self.context = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c16, c16, 1))
        lateral_in = (config.encoder_channels[3], config.encoder_channels[2],
                      config.encoder_channels[1])
        self.laterals = nn.ModuleList(nn.Conv2d(c, d, 1) for c, d in
                                      zip(lateral_in, config.decoder_channels, strict=True))

    def forward(self, images: torch.Tensor) -> ImageFeatures:
        if images.shape[-2] % STRIDE or images.shape[-1] % STRIDE:
            raise ValueError(f"image sides must be multiples of {STRIDE}, got "
                             f"{tuple(images.shape[-2:])}")
        x = (images - self.pixel_mean) / self.pixel_std
        outputs = []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        s4, s8, s16 = outputs[1], outputs[2], outputs[3]
        s16 = F.relu(s16 + self.context(s16))
        return ImageFeatures(*(lateral(level) for lateral, level in
                               zip(self.laterals, (s16, s8, s4), strict=True)))


@dataclass
class PromptBatch:
    """B prompts in the pixel frame of the encoded image.

    Attributes:
        task: B int64, index into ``unigeoseg_protocol.vocabulary.TASKS``.
        text: B x text_dim float, the text embedding (zeros where there is no text).
        has_text: B bool.
        points: B x N x 2 float (col, row) image pixels; N may be 0.
        labels: B x N int64, 1 foreground, 0 background, ``PAD_LABEL`` for no point.
        boxes: B x 4 float (col_min, row_min, col_max, row_max) image pixels.
        has_box: B bool.
    """

    task: torch.Tensor
    text: torch.Tensor
    has_text: torch.Tensor
    points: torch.Tensor
    labels: torch.Tensor
    boxes: torch.Tensor
    has_box: torch.Tensor

    @classmethod
    def single(cls, task: str, text: torch.Tensor | None = None,
               points: torch.Tensor | None = None, labels: torch.Tensor | None = None,
               box: torch.Tensor | None = None, text_dim: int = 384,
               device: torch.device | str = "cpu") -> PromptBatch:
        """One prompt (B = 1): ``text`` a text_dim vector, ``points`` N x 2 with ``labels``
        N, ``box`` 4 values; any may be None."""
        n = 0 if points is None else int(points.shape[0])

        def floats(value: torch.Tensor | None, *shape: int) -> torch.Tensor:
            if value is None:
                return torch.zeros(*shape, dtype=torch.float32, device=device)
            return value.to(dtype=torch.float32, device=device).reshape(*shape)

        return cls(
            task=torch.tensor([TASKS.index(task)], dtype=torch.int64, device=device),
            text=floats(text, 1, text_dim),
            has_text=torch.tensor([text is not None], device=device),
            points=floats(points, 1, n, 2),
            labels=(torch.zeros(1, 0, dtype=torch.int64, device=device) if labels is None
                    else labels.to(dtype=torch.int64, device=device).reshape(1, n)),
            boxes=floats(box, 1, 4),
            has_box=torch.tensor([box is not None], device=device))

    @property
    def batch_size(self) -> int:
        return int(self.task.shape[0])


def render_prompt_maps(prompts: PromptBatch, size: tuple[int, int], stride: int,
                       sigma_px: float) -> torch.Tensor:
    """The prompts as B x 3 x h x w maps on the grid of cells of ``stride`` image pixels
    (``size`` = (h, w) cells): channel 0 the foreground clicks (max of Gaussians of standard
    deviation ``max(sigma_px, stride / 2)`` image pixels, 1 at a click), 1 the background
    clicks, 2 the box (1 at cells whose centre lies inside it)."""
    h, w = size
    device = prompts.points.device
    rows = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * stride
    cols = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * stride
    maps = torch.zeros(prompts.batch_size, PROMPT_MAP_CHANNELS, h, w, device=device)
    if prompts.points.shape[1]:
        sigma = max(sigma_px, stride / 2)
        dc = (cols.view(1, 1, 1, w) - prompts.points[..., 0].view(*prompts.labels.shape, 1, 1))
        dr = (rows.view(1, 1, h, 1) - prompts.points[..., 1].view(*prompts.labels.shape, 1, 1))
        gauss = torch.exp(-(dc ** 2 + dr ** 2) / (2 * sigma ** 2))  # B N h w
        for channel, label in ((0, 1), (1, 0)):
            chosen = (prompts.labels == label).view(*prompts.labels.shape, 1, 1)
            maps[:, channel] = (gauss * chosen).amax(dim=1)
    box = prompts.boxes.view(-1, 4, 1, 1)
    inside = ((cols.view(1, 1, w) >= box[:, 0]) & (cols.view(1, 1, w) < box[:, 2])
              & (rows.view(1, h, 1) >= box[:, 1]) & (rows.view(1, h, 1) < box[:, 3]))
    maps[:, 2] = inside.float() * prompts.has_box.view(-1, 1, 1).float()
    return maps


class PromptEncoder(nn.Module):
    """Text, task and prompt kinds -> a B x condition_dim vector (:meth:`condition`); points
    and box -> prompt maps at a decoder stride (:func:`render_prompt_maps`)."""

    def __init__(self, config: DefaultModelConfig):
        super().__init__()
        self.config = config
        self.task_embedding = nn.Embedding(len(TASKS), config.condition_dim)
        # which kinds are present: text, foreground points, background points, box
        self.kinds = nn.Linear(4, config.condition_dim)
        self.text = nn.Linear(config.text_dim, config.condition_dim)
        self.mix = nn.Sequential(nn.ReLU(), nn.Linear(config.condition_dim, config.condition_dim),
                                 nn.ReLU())

    def condition(self, prompts: PromptBatch) -> torch.Tensor:
        """B x condition_dim."""
        has_text = prompts.has_text.float()
        kinds = torch.stack([has_text, (prompts.labels == 1).any(dim=1).float(),
                             (prompts.labels == 0).any(dim=1).float(),
                             prompts.has_box.float()], dim=1)
        text = self.text(prompts.text) * has_text[:, None]
        return self.mix(self.task_embedding(prompts.task) + self.kinds(kinds) + text)

    def maps(self, prompts: PromptBatch, size: tuple[int, int], stride: int) -> torch.Tensor:
        """B x 3 x h x w prompt maps at ``stride`` (``size`` = (h, w))."""
        return render_prompt_maps(prompts, size, stride, self.config.point_sigma_px)


class FiLM(nn.Module):
    """``x * (1 + gamma(c)) + beta(c)`` per channel: the conditioning vector modulates a
    B x C x h x w feature map."""

    def __init__(self, condition_dim: int, channels: int):
        super().__init__()
        self.project = nn.Linear(condition_dim, 2 * channels)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.project(condition)[:, :, None, None].chunk(2, dim=1)
        return x * (1 + gamma) + beta


class DecoderStage(nn.Module):
    """One decoder stage: the coarser stage's output (upsampled x2, projected), the image
    features and the prompt maps summed, FiLM, ReLU, a 3 x 3 convolution, FiLM, ReLU."""

    def __init__(self, c_coarse: int | None, channels: int, condition_dim: int):
        super().__init__()
        self.from_coarse = None if c_coarse is None else nn.Conv2d(c_coarse, channels, 1)
        self.from_prompt = nn.Conv2d(PROMPT_MAP_CHANNELS, channels, 3, padding=1)
        self.film_in = FiLM(condition_dim, channels)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.film_out = FiLM(condition_dim, channels)

    def forward(self, image: torch.Tensor, prompt_maps: torch.Tensor, condition: torch.Tensor,
                coarse: torch.Tensor | None) -> torch.Tensor:
        x = image + self.from_prompt(prompt_maps)
        if coarse is not None and self.from_coarse is not None:
            x = x + self.from_coarse(F.interpolate(coarse, size=x.shape[-2:], mode="nearest"))
        x = F.relu(self.film_in(x, condition))
        return F.relu(self.film_out(self.conv(x), condition))


class MaskDecoder(nn.Module):
    """Cached :class:`ImageFeatures` + a :class:`PromptBatch` -> (B x 1 x H/4 x W/4 mask
    logits, B predicted-IoU logits)."""

    def __init__(self, config: DefaultModelConfig):
        super().__init__()
        widths = config.decoder_channels
        self.stages = nn.ModuleList(
            DecoderStage(None if i == 0 else widths[i - 1], widths[i], config.condition_dim)
            for i in range(len(widths)))
        self.mask_head = nn.Conv2d(widths[-1], 1, 1)
        self.score_head = nn.Sequential(nn.Linear(2 * widths[0] + config.condition_dim, 64),
                                        nn.ReLU(), nn.Linear(64, 1))

    def forward(self, features: ImageFeatures, prompt_maps: list[torch.Tensor],
                condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x: torch.Tensor | None = None
        coarsest: torch.Tensor | None = None
        for stage, image, maps in zip(self.stages, features.levels, prompt_maps, strict=True):
            x = stage(image, maps, condition, x)
            if coarsest is None:
                coarsest = x
        assert x is not None and coarsest is not None
        pooled = torch.cat([coarsest.mean(dim=(-2, -1)), coarsest.amax(dim=(-2, -1)),
                            condition], dim=1)
        return self.mask_head(x), self.score_head(pooled)[:, 0]


class DefaultSegmenter(nn.Module):
    """The default model: :meth:`encode_image` once per tile, :meth:`decode` per prompt.

    ``forward(images, prompts)`` is both at once (training): B images, B prompts.
    """

    def __init__(self, config: DefaultModelConfig):
        super().__init__()
        self.config = config
        self.image_encoder = ImageEncoder(config)
        self.prompt_encoder = PromptEncoder(config)
        self.mask_decoder = MaskDecoder(config)

    def encode_image(self, images: torch.Tensor) -> ImageFeatures:
        """B x 3 x H x W float 0..255 RGB (sides multiples of :data:`STRIDE`) -> features."""
        return self.image_encoder(images)

    def decode(self, features: ImageFeatures, prompts: PromptBatch
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits B x 1 x H/4 x W/4 and predicted-IoU logits B for ``prompts`` on
        ``features`` (batch B, or 1 to share one tile's features among B prompts)."""
        batch = prompts.batch_size
        if features.stride4.shape[0] == 1 and batch > 1:
            features = features.expand(batch)
        condition = self.prompt_encoder.condition(prompts)
        maps = [self.prompt_encoder.maps(prompts, (level.shape[-2], level.shape[-1]), stride)
                for level, stride in zip(features.levels, DECODER_STRIDES, strict=True)]
        return self.mask_decoder(features, maps, condition)

    def forward(self, images: torch.Tensor, prompts: PromptBatch
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decode(self.encode_image(images), prompts)


def build_default_model(config: str | DefaultModelConfig) -> DefaultSegmenter:
    """A randomly initialised model of a named configuration (or of ``config`` itself), in
    eval mode.

    Raises:
        KeyError: an unknown configuration name (the message lists the known ones).
    """
    if isinstance(config, str):
        if config not in DEFAULT_MODEL_CONFIGS:
            raise KeyError(f"unknown default model configuration {config!r}; known: "
                           f"{', '.join(DEFAULT_MODEL_CONFIGS)}")
        config = DEFAULT_MODEL_CONFIGS[config]
    return DefaultSegmenter(config).eval()


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
