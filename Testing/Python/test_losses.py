"""The CCG loss against a literal, pixel-by-pixel implementation of the paper's Eq. 1-3."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from OAIMSSegment.clicks import Click
from OAIMSSegment.losses import DiceFocal, ccg_loss, click_weight_map


def literal_ccg(logits, target, clicks, sigma, class_limited=True, kernel="gaussian"):
    """Eq. 3 written as loops over clicks and pixels, for one image (logits (L, H, W))."""
    _, height, width = logits.shape
    total = 0.0
    for click in clicks:
        ci, cj = click.position
        for i in range(height):
            for j in range(width):
                if abs(i - ci) > 3 * sigma or abs(j - cj) > 3 * sigma:
                    continue  # Eq. 1: G = 0 outside the 3-sigma window
                if sigma == 0 or kernel == "uniform":
                    g = 1.0
                else:
                    g = math.exp(-((i - ci) ** 2 + (j - cj) ** 2) / (2 * sigma**2))
                indicator = 1.0 if (not class_limited or target[i, j] == click.label) else 0.0
                if logits.shape[0] == 1:
                    p = torch.sigmoid(logits[0, i, j])
                    ce = -math.log(p) if target[i, j] == 1 else -math.log(1 - p)
                else:
                    ce = -float(torch.log_softmax(logits[:, i, j], dim=0)[target[i, j]])
                total += g * indicator * ce
    return total / (len(clicks) * height * width)


@pytest.mark.parametrize("num_classes", [2, 3])
@pytest.mark.parametrize("sigma", [3.0, 1.5, 0.0])
def test_ccg_matches_literal_equation(num_classes, sigma):
    rng = np.random.default_rng(int(sigma * 10) + num_classes)
    height, width = 23, 29
    channels = 1 if num_classes == 2 else num_classes
    logits = torch.tensor(rng.normal(size=(2, channels, height, width)), dtype=torch.float64)
    target = torch.tensor(rng.integers(0, num_classes, size=(2, height, width)))
    clicks = [
        [Click((2, 3), 1), Click((20, 25), 0), Click((11, 14), num_classes - 1)],  # near borders: window clipped
        [Click((0, 0), 0)],
    ]
    fast = ccg_loss(logits, target, clicks, sigma=sigma)
    slow = np.mean([literal_ccg(logits[b], target[b].numpy(), clicks[b], sigma) for b in range(2)])
    assert float(fast) == pytest.approx(slow, rel=1e-6)  # float32 weights


@pytest.mark.parametrize("variant", [{"class_limited": False}, {"kernel": "uniform"}])
def test_ccg_ablations_match_literal(variant):
    rng = np.random.default_rng(7)
    logits = torch.tensor(rng.normal(size=(1, 3, 17, 19)), dtype=torch.float64)
    target = torch.tensor(rng.integers(0, 3, size=(1, 17, 19)))
    clicks = [[Click((8, 9), 2), Click((1, 17), 0)]]
    fast = ccg_loss(logits, target, clicks, sigma=2.0, **variant)
    slow = literal_ccg(logits[0], target[0].numpy(), clicks[0], 2.0, **variant)
    assert float(fast) == pytest.approx(slow, rel=1e-6)


def test_weight_map_is_cut_at_three_sigma_and_class_limited():
    target = torch.zeros(40, 40, dtype=torch.long)
    target[:, 20:] = 1
    weights = click_weight_map([Click((20, 20), 1)], target, sigma=2.0)
    assert weights[20, 26] > 0 and weights[20, 27] == 0  # |dj| = 6 = 3 sigma inside, 7 outside
    assert weights[20, 19] == 0  # class-limited: the target there is background
    assert weights[20, 20] == pytest.approx(1.0)


def test_ccg_is_zero_without_clicks_and_has_gradient():
    logits = torch.randn(1, 1, 8, 8, requires_grad=True)
    target = torch.ones(1, 8, 8, dtype=torch.long)
    assert float(ccg_loss(logits, target, [[]])) == 0.0
    ccg_loss(logits, target, [[Click((4, 4), 1)]]).backward()
    assert logits.grad.abs().sum() > 0


def test_dice_focal_weights_and_perfect_prediction():
    target = torch.zeros(1, 16, 16, dtype=torch.long)
    target[:, 4:12, 4:12] = 1
    perfect = (target.float() * 40 - 20)[:, None]
    wrong = -perfect
    loss = DiceFocal(binary=True, alpha=0.7)
    assert float(loss(perfect, target)) < 0.01 < float(loss(wrong, target))
    multi = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float() * 40
    assert float(DiceFocal(binary=False)(multi, target)) < 0.01
