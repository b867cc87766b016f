"""Losses of the OAIMS paper: Dice-Focal (Eq. 4, MONAI) and Click-Centered Gaussian (Eq. 1-3).

Model outputs follow one convention everywhere in the engine: a binary model has one
logit channel ``(B, 1, H, W)`` (sigmoid); a K-class model has K channels ``(B, K, H, W)``
(softmax). Targets are integer class maps ``(B, H, W)``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss, FocalLoss
from torch import nn

from OAIMSSegment.clicks import Click, click_gaussians, click_offsets


class DiceFocal(nn.Module):
    """``L_DF = (1 - alpha) L_Dice + alpha L_Focal`` (paper Eq. 4) on logits and integer targets.

    Args:
        binary: True for a one-logit (sigmoid) model, False for a K-class softmax model.
        alpha: weight of the focal term (paper: 0.7).
    """

    def __init__(self, binary: bool, alpha: float = 0.7) -> None:
        super().__init__()
        self.binary = binary
        self.alpha = alpha
        # MONAI's DiceFocalLoss applies a per-channel sigmoid in its focal term even for
        # softmax outputs; composing the two losses keeps the focal term a softmax focal
        # loss for K-class models.
        self.dice = DiceLoss(sigmoid=binary, softmax=not binary, to_onehot_y=not binary)
        self.focal = FocalLoss(use_softmax=not binary, to_onehot_y=not binary)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``logits`` (B, 1|K, H, W); ``target`` (B, H, W) integer classes. Returns a scalar."""
        target = target.unsqueeze(1)
        target = target.float() if self.binary else target.long()
        return (1.0 - self.alpha) * self.dice(logits, target) + self.alpha * self.focal(logits, target)


def pixel_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pixel cross-entropy ``(B, H, W)`` for one-logit or K-class ``logits`` against integer ``target``."""
    if logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(logits[:, 0], target.float(), reduction="none")
    return F.cross_entropy(logits, target.long(), reduction="none")


def click_weight_map(
    clicks: Sequence[Click],
    target: torch.Tensor,
    sigma: float = 3.0,
    class_limited: bool = True,
    kernel: str = "gaussian",
) -> torch.Tensor:
    """``sum_c G_c(i, j) I_c(i, j)`` of Eq. 3 for one image.

    Args:
        clicks: the clicks ``C`` (array-index positions in pixels).
        target: (pseudo) ground truth ``P``, integer ``(H, W)``.
        sigma: Gaussian standard deviation in pixels; the kernel is cut to 0 outside the
            ``|di| <= 3 sigma and |dj| <= 3 sigma`` window (Eq. 1). ``sigma = 0`` keeps only
            the clicked pixel (the paper's Appendix A.8 ablation).
        class_limited: apply the indicator ``I_c`` (Eq. 2): only pixels whose target equals the
            click's class. False is the paper's "no_class" ablation.
        kernel: ``"gaussian"`` (Eq. 1) or ``"uniform"`` (weight 1 inside the window: the
            paper's "no_gaussian" ablation).

    Returns:
        Weights ``(H, W)``, float32.
    """
    if kernel not in ("gaussian", "uniform"):
        raise ValueError(f"kernel must be 'gaussian' or 'uniform', got {kernel!r}")
    if not clicks:
        return torch.zeros(target.shape, dtype=torch.float32, device=target.device)
    offsets = click_offsets(clicks, target.shape, target.device)
    inside = offsets[0].abs() <= 3.0 * sigma
    for axis in offsets[1:]:
        inside = inside & (axis.abs() <= 3.0 * sigma)
    if kernel == "uniform" or sigma == 0:
        weights = inside.float()
    else:
        weights = click_gaussians(offsets, sigma) * inside
    if class_limited:
        labels = torch.tensor([c.label for c in clicks], device=target.device)
        weights = weights * (target.unsqueeze(0) == labels.view(-1, *[1] * target.ndim))
    return weights.sum(dim=0)


def ccg_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    clicks: Sequence[Sequence[Click]],
    sigma: float = 3.0,
    class_limited: bool = True,
    kernel: str = "gaussian",
) -> torch.Tensor:
    """Click-Centered Gaussian loss (paper Eq. 3), averaged over the batch.

    ``L_CCG = sum_c sum_ij G_c(i,j) I_c(i,j) CE(P_hat(i,j), P(i,j)) / (|C| H W)``

    Args:
        logits: prediction ``P_hat`` as logits ``(B, 1|K, H, W)``.
        target: (pseudo) ground truth ``P``, integer ``(B, H, W)``.
        clicks: the click set of each batch item; an item without clicks contributes 0.
        sigma, class_limited, kernel: see :func:`click_weight_map`.
    """
    cross_entropy = pixel_cross_entropy(logits, target)
    pixels = target[0].numel()
    total = logits.new_zeros(())
    for b, item_clicks in enumerate(clicks):
        if not item_clicks:
            continue
        weights = click_weight_map(item_clicks, target[b], sigma, class_limited, kernel)
        total = total + (weights * cross_entropy[b]).sum() / (len(item_clicks) * pixels)
    return total / len(clicks)
