"""The training losses: point-sampled mask BCE + Dice on every decoder output, LM cross-entropy.

As UniGeoSeg's criterion (Mask2Former's, with one query and one target per sample):

- for each decoder output (deep supervision: the prediction and every auxiliary one), sample
  ``num_points`` points per mask: ``oversample_ratio * num_points`` uniform candidates, the
  ``importance_sample_ratio`` share of them with the most uncertain logits (smallest
  ``|logit|``), the rest uniform again; points are chosen without gradient;
- at those points, sigmoid BCE (mean over the points) and Dice
  ``1 - (2 sum(p g) + 1) / (sum(p) + sum(g) + 1)``, each summed over the masks and divided by
  the number of masks per process (all-reduced over the processes, at least 1);
- ``loss = sum over outputs (bce_weight * bce + dice_weight * dice) + lm_weight * lm``, where
  ``lm`` is the next-token cross-entropy summed over the answer tokens (reasoning samples)
  and divided, like the mask losses, by the labelled tokens per process (all-reduced).

Frames: predictions are ``B x 1 x h x w`` logits (the model's mask-feature resolution, 128 for
a 512 input), targets ``B x H x W`` (the letterboxed 512 input). Point coordinates are
``B x P x 2`` (X, Y) fractions of the width and height, ``(0, 0)`` the top-left corner of the
top-left pixel, so the same point lands on the same place of both grids.

Point sampling and uncertainty selection adapted from Mask2Former
(https://github.com/facebookresearch/Mask2Former/blob/main/mask2former/modeling/criterion.py)
and detectron2's ``point_sample``
(https://github.com/facebookresearch/detectron2/blob/main/projects/PointRend/point_rend/point_features.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from unigeoseg_backend.distributed import World, sum_over_ranks

#: Label of a position without a next-token target.
IGNORE_INDEX = -100


@dataclass(frozen=True)
class PointSampling:
    """How many points each mask loss looks at, and where."""

    num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75


def point_sample(inputs: torch.Tensor, point_coords: torch.Tensor) -> torch.Tensor:
    """Bilinear values of ``inputs`` (B x C x H x W) at ``point_coords`` (B x P x 2, X, Y in
    [0, 1] of the grid's extent): B x C x P. Outside the grid reads 0."""
    grid = 2.0 * point_coords.to(inputs.dtype).unsqueeze(2) - 1.0   # B P 2 -> B P 1 2, [-1, 1]
    return F.grid_sample(inputs, grid, align_corners=False).squeeze(3)


#: The random source of point sampling: one generator for the batch, or one per sample (the
#: same sample then gets the same points in whatever batch it is, on whatever process).
Generators = torch.Generator | Sequence[torch.Generator] | None


def uniform_points(batch: int, count: int, device: torch.device,
                   generator: Generators = None) -> torch.Tensor:
    """``batch x count x 2`` uniform points in [0, 1); rows from their own generators if a
    sequence is given."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.rand(batch, count, 2, device=device, generator=generator)
    if len(generator) != batch:
        raise ValueError(f"{len(generator)} generators for a batch of {batch}")
    return torch.cat([torch.rand(1, count, 2, device=device, generator=g) for g in generator])


def uncertain_point_coords(logits: torch.Tensor, sampling: PointSampling,
                           generator: Generators = None) -> torch.Tensor:
    """Points where ``logits`` (B x 1 x h x w) are least certain, plus uniform ones: B x P x 2.

    Call under ``torch.no_grad()``: the choice of points is not differentiated.
    """
    batch = logits.shape[0]
    device = logits.device
    num_candidates = int(sampling.num_points * sampling.oversample_ratio)
    num_uncertain = int(sampling.importance_sample_ratio * sampling.num_points)
    num_random = sampling.num_points - num_uncertain
    candidates = uniform_points(batch, num_candidates, device, generator)
    uncertainty = -point_sample(logits, candidates)[:, 0, :].abs()       # B x candidates
    picked = torch.topk(uncertainty, k=num_uncertain, dim=1).indices     # B x uncertain
    coords = torch.gather(candidates, 1, picked.unsqueeze(-1).expand(-1, -1, 2))
    if num_random > 0:
        uniform = uniform_points(batch, num_random, device, generator)
        coords = torch.cat([coords, uniform], dim=1)
    return coords


def sigmoid_bce(point_logits: torch.Tensor, point_labels: torch.Tensor,
                num_masks: float) -> torch.Tensor:
    """Mean BCE over each mask's points (B x P), summed over masks, over ``num_masks``."""
    per_point = F.binary_cross_entropy_with_logits(point_logits, point_labels,
                                                   reduction="none")
    return per_point.mean(1).sum() / num_masks


def dice(point_logits: torch.Tensor, point_labels: torch.Tensor,
         num_masks: float) -> torch.Tensor:
    """``1 - (2 sum(p g) + 1) / (sum(p) + sum(g) + 1)`` per mask (B x P), summed, over
    ``num_masks``."""
    probs = point_logits.sigmoid()
    numerator = 2 * (probs * point_labels).sum(-1)
    denominator = probs.sum(-1) + point_labels.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


def mask_losses(logits: torch.Tensor, targets: torch.Tensor, num_masks: float,
                sampling: PointSampling, *, point_coords: torch.Tensor | None = None,
                generator: Generators = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bce, dice)`` of one decoder output.

    Args:
        logits: B x 1 x h x w mask logits.
        targets: B x H x W ground truth (bool or 0/1), any H x W covering the same extent.
        num_masks: the normaliser (:func:`mean_mask_count`).
        sampling: the point sampling; ignored when ``point_coords`` is given.
        point_coords: B x P x 2 points to use instead of sampling them.
        generator: random source of the sampled points (the global one if None), or one
            generator per sample.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):      # losses in at least fp32
        logits = logits.float()
    target_maps = targets.to(logits.dtype).unsqueeze(1)      # B H W -> B 1 H W
    with torch.no_grad():
        if point_coords is None:
            point_coords = uncertain_point_coords(logits, sampling, generator)
        point_labels = point_sample(target_maps, point_coords)[:, 0, :]
    point_logits = point_sample(logits, point_coords)[:, 0, :]
    return (sigmoid_bce(point_logits, point_labels, num_masks),
            dice(point_logits, point_labels, num_masks))


def mean_count_per_process(world: World, local_count: int) -> float:
    """A count (masks, labelled tokens) per process, averaged over the processes of
    ``world``, at least 1.

    Each process divides its summed losses by this; averaging the gradients over the
    processes then divides the sum over the whole global batch by its total count, so N
    processes train like one with the same global batch.
    """
    return max(sum_over_ranks(world, float(local_count)) / world.size, 1.0)


def mean_mask_count(world: World, local_masks: int) -> float:
    """The normaliser of the mask losses: :func:`mean_count_per_process` of the masks."""
    return mean_count_per_process(world, local_masks)


def labelled_tokens(lm_labels: torch.Tensor) -> int:
    """How many positions of ``lm_labels`` have a next-token target (a device sync)."""
    return int((lm_labels != IGNORE_INDEX).sum())


def lm_cross_entropy(lm_logits: torch.Tensor, lm_labels: torch.Tensor,
                     num_tokens: float | None = None) -> torch.Tensor:
    """Next-token cross-entropy summed over labelled positions, divided by ``num_tokens``.

    Args:
        lm_logits: B x T x V logits.
        lm_labels: B x T targets already aligned with the logits; IGNORE_INDEX elsewhere.
        num_tokens: the normaliser: :func:`mean_count_per_process` of the labelled tokens
            in training (so that the mean is over every process's tokens); None: this
            batch's labelled positions (the mean over them), without a device sync.

    Returns 0 (keeping the graph) when no position is labelled, where a plain mean would
    give NaN.
    """
    labels = lm_labels.reshape(-1)
    summed = F.cross_entropy(lm_logits.float().reshape(-1, lm_logits.shape[-1]), labels,
                             ignore_index=IGNORE_INDEX, reduction="sum")
    if num_tokens is None:
        return summed / (labels != IGNORE_INDEX).sum().clamp(min=1)
    return summed / num_tokens


@dataclass(frozen=True)
class LossResult:
    """The loss to differentiate and its terms (detached 0-d tensors: reading them is a
    device sync, so the loop does it only when it logs)."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]


@dataclass(frozen=True)
class TrainingLoss:
    """The weighted sum of the module docstring."""

    sampling: PointSampling = PointSampling()
    bce_weight: float = 5.0
    dice_weight: float = 5.0
    lm_weight: float = 1.0

    def __call__(self, mask_logits: Sequence[torch.Tensor], targets: torch.Tensor,
                 num_masks: float, *, lm_logits: torch.Tensor | None = None,
                 lm_labels: torch.Tensor | None = None, num_tokens: float | None = None,
                 generator: Generators = None) -> LossResult:
        """Args:
            mask_logits: one B x 1 x h x w tensor per decoder output (the last: prediction).
            targets: B x H x W ground truth.
            num_masks: :func:`mean_mask_count` of the batch.
            lm_logits, lm_labels: the language model's B x T x V logits and aligned B x T
                targets, or None (no text loss).
            num_tokens: the LM loss's normaliser (:func:`lm_cross_entropy`).

        Terms: ``loss_mask`` / ``loss_dice`` of the prediction, ``loss_mask_all`` /
        ``loss_dice_all`` summed over every output, ``loss_lm`` if there is text, ``loss``.
        """
        if not mask_logits:
            raise ValueError("no decoder output to supervise")
        per_output = [mask_losses(logits, targets, num_masks, self.sampling,
                                  generator=generator) for logits in mask_logits]
        bce_all = torch.stack([bce for bce, _ in per_output]).sum()
        dice_all = torch.stack([d for _, d in per_output]).sum()
        total = self.bce_weight * bce_all + self.dice_weight * dice_all
        terms = {"loss_mask": per_output[-1][0], "loss_dice": per_output[-1][1],
                 "loss_mask_all": bce_all, "loss_dice_all": dice_all}
        if lm_logits is not None and lm_labels is not None:
            lm = lm_cross_entropy(lm_logits, lm_labels, num_tokens)
            total = total + self.lm_weight * lm
            terms["loss_lm"] = lm
        terms["loss"] = total
        return LossResult(total=total, terms={k: v.detach() for k, v in terms.items()})
