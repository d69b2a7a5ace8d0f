"""Point-sampled BCE + Dice with importance sampling, deep supervision, LM cross-entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from unigeoseg_backend.distributed import World
from unigeoseg_trainer.losses import (
    IGNORE_INDEX,
    PointSampling,
    TrainingLoss,
    labelled_tokens,
    lm_cross_entropy,
    mask_losses,
    mean_mask_count,
    point_sample,
    uncertain_point_coords,
)


def pixel_centres(batch: int, height: int, width: int) -> torch.Tensor:
    """B x (H*W) x 2 (X, Y) fractions at every pixel centre, row by row."""
    rows = (torch.arange(height, dtype=torch.float64) + 0.5) / height
    cols = (torch.arange(width, dtype=torch.float64) + 0.5) / width
    ys, xs = torch.meshgrid(rows, cols, indexing="ij")
    coords = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)
    return coords.expand(batch, -1, -1)


def dense_reference(logits: torch.Tensor, targets: torch.Tensor, num_masks: float):
    """BCE and Dice over every pixel (B x 1 x H x W logits, B x H x W targets)."""
    x = logits[:, 0].flatten(1)
    g = targets.flatten(1).to(x.dtype)
    bce = F.binary_cross_entropy_with_logits(x, g, reduction="none").mean(1).sum() / num_masks
    p = x.sigmoid()
    dice = (1 - (2 * (p * g).sum(1) + 1) / (p.sum(1) + g.sum(1) + 1)).sum() / num_masks
    return bce, dice


def test_point_sample_reads_pixel_centres_exactly():
    grid = torch.arange(12, dtype=torch.float64).reshape(1, 1, 3, 4)
    values = point_sample(grid, pixel_centres(1, 3, 4))
    torch.testing.assert_close(values[0, 0], grid.flatten(), rtol=0, atol=1e-12)


def test_all_points_sampled_equals_the_dense_loss():
    torch.manual_seed(0)
    logits = torch.randn(3, 1, 8, 8, dtype=torch.float64) * 3
    targets = torch.rand(3, 8, 8) > 0.6
    bce, dice = mask_losses(logits, targets, 2.0, PointSampling(),
                            point_coords=pixel_centres(3, 8, 8))
    ref_bce, ref_dice = dense_reference(logits.float(), targets, 2.0)
    assert bce.item() == pytest.approx(ref_bce.item(), rel=1e-6)
    assert dice.item() == pytest.approx(ref_dice.item(), rel=1e-6)


def test_targets_at_a_finer_grid_land_on_the_same_points():
    # a 4x4 prediction against a 16x16 target whose 4x4 blocks are constant: the prediction's
    # pixel centres fall inside the matching blocks
    torch.manual_seed(1)
    coarse = torch.rand(2, 4, 4) > 0.5
    fine = coarse.repeat_interleave(4, 1).repeat_interleave(4, 2)
    logits = torch.randn(2, 1, 4, 4)
    at_points = mask_losses(logits, fine, 1.0, PointSampling(),
                            point_coords=pixel_centres(2, 4, 4).float())
    dense = dense_reference(logits, coarse, 1.0)
    for a, b in zip(at_points, dense, strict=True):
        assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_gradient_matches_finite_differences():
    torch.manual_seed(2)
    logits = torch.randn(2, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    targets = torch.rand(2, 6, 6) > 0.5
    coords = torch.rand(2, 20, 2, dtype=torch.float64)

    def weighted(x):
        bce, dice = mask_losses(x, targets, 1.5, PointSampling(), point_coords=coords)
        return 5 * bce + 5 * dice

    assert torch.autograd.gradcheck(weighted, (logits,), eps=1e-6, atol=1e-6)


def test_importance_points_go_where_logits_are_uncertain():
    # left half |logit| = 0 (uncertain), right half |logit| = 20 (certain)
    logits = torch.full((2, 1, 16, 16), 20.0)
    logits[..., :8] = 0.0
    logits[1, :, :, 8:] = -20.0
    sampling = PointSampling(num_points=400, oversample_ratio=3.0, importance_sample_ratio=0.75)
    generator = torch.Generator().manual_seed(0)
    coords = uncertain_point_coords(logits, sampling, generator)
    assert coords.shape == (2, 400, 2)
    important, uniform = coords[:, :300], coords[:, 300:]
    # importance points: bilinear |logit| < 20 means within half a pixel of the left half
    assert bool((important[..., 0] < 9 / 16).all())
    # the uniform remainder reaches the right half too
    assert bool((uniform[..., 0] > 0.6).any())
    assert bool(((coords >= 0) & (coords <= 1)).all())


def test_sampled_loss_is_near_the_dense_loss_for_uniform_points():
    torch.manual_seed(3)
    logits = torch.randn(4, 1, 32, 32)
    targets = torch.rand(4, 32, 32) > 0.5
    sampling = PointSampling(num_points=20000, oversample_ratio=1.0, importance_sample_ratio=0.0)
    bce, _ = mask_losses(logits, targets, 4.0, sampling,
                         generator=torch.Generator().manual_seed(0))
    ref_bce, _ = dense_reference(logits, targets, 4.0)
    # uniform points read bilinear mixtures of neighbouring pixels: close, not equal
    assert bce.item() == pytest.approx(ref_bce.item(), rel=0.1)


def test_deep_supervision_sums_every_output_with_weights():
    torch.manual_seed(4)
    outputs = [torch.randn(2, 1, 8, 8, requires_grad=True) for _ in range(3)]
    targets = torch.rand(2, 8, 8) > 0.5
    loss = TrainingLoss(PointSampling(num_points=64), bce_weight=5.0, dice_weight=5.0)
    result = loss(outputs, targets, 2.0, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    parts = [mask_losses(o, targets, 2.0, loss.sampling, generator=generator) for o in outputs]
    expected = sum(5 * b + 5 * d for b, d in parts)
    assert result.total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert result.terms["loss_mask"].item() == pytest.approx(parts[-1][0].item(), rel=1e-6)
    assert "loss_lm" not in result.terms
    result.total.backward()
    assert all(o.grad is not None and o.grad.abs().sum() > 0 for o in outputs)


def test_lm_cross_entropy_ignores_unlabelled_positions():
    torch.manual_seed(5)
    logits = torch.randn(2, 5, 11)
    labels = torch.full((2, 5), IGNORE_INDEX)
    labels[0, 2], labels[1, 4] = 3, 7
    expected = (F.cross_entropy(logits[0, 2:3], labels[0, 2:3])
                + F.cross_entropy(logits[1, 4:5], labels[1, 4:5])) / 2
    assert lm_cross_entropy(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    nothing = lm_cross_entropy(logits.requires_grad_(), torch.full((2, 5), IGNORE_INDEX))
    assert nothing.item() == 0.0
    nothing.backward()                                   # no NaN, graph intact


def test_lm_cross_entropy_divides_the_sum_by_the_given_token_count():
    torch.manual_seed(6)
    logits = torch.randn(2, 5, 11)
    labels = torch.full((2, 5), IGNORE_INDEX)
    labels[0, 1], labels[0, 2], labels[1, 4] = 3, 4, 7
    assert labelled_tokens(labels) == 3
    summed = 3 * lm_cross_entropy(logits, labels)
    # e.g. 3 tokens here and 5 on the other process: 4 per process
    assert lm_cross_entropy(logits, labels, num_tokens=4.0).item() == pytest.approx(
        summed.item() / 4, rel=1e-6)


def test_text_loss_is_added_with_its_weight():
    outputs = [torch.zeros(1, 1, 4, 4)]
    targets = torch.zeros(1, 4, 4, dtype=torch.bool)
    logits = torch.randn(1, 3, 5)
    labels = torch.tensor([[IGNORE_INDEX, 1, 2]])
    loss = TrainingLoss(PointSampling(num_points=16), lm_weight=0.5)
    with_text = loss(outputs, targets, 1.0, lm_logits=logits, lm_labels=labels)
    without = loss(outputs, targets, 1.0)
    assert (with_text.total - without.total).item() == pytest.approx(
        0.5 * lm_cross_entropy(logits, labels).item(), rel=1e-5)


def test_mean_mask_count_without_a_process_group():
    assert mean_mask_count(World(), 6) == 6.0
    assert mean_mask_count(World(), 0) == 1.0
