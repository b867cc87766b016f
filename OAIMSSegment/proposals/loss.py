"""The training loss of the proposals (paper Eq. 3): ``WDL(y_s, y^_s, y_m - x_m) + beta0 DL(y_m, y^_m) + beta1 KL``."""

from __future__ import annotations

import torch
from monai.losses import DiceLoss, MaskedDiceLoss
from torch import nn

__all__ = ["PARTIAL_DICE_MODES", "kl_standard_normal", "ProposalLoss"]

#: Pixels the partialness Dice ``DL(y_m, y^_m)`` is computed over (the paper does not say).
PARTIAL_DICE_MODES = ("all", "undecided")


def kl_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``KL(N(mu, sigma^2) || N(0, I))`` summed over latent dimensions, averaged over the batch.

    ``mu``, ``logvar``: ``(B, ...)``. Returns a scalar.
    """
    per_item = 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1.0)
    return per_item.flatten(1).sum(dim=1).mean()


class ProposalLoss(nn.Module):
    """Paper Eq. 3: ``WDL(y_s, y^_s, y_m - x_m) + beta0 DL(y_m, y^_m) + beta1 KL``.

    * ``DL`` is MONAI's soft Dice loss (per image, averaged over the batch).
    * ``WDL`` is the soft Dice loss of ``y^_s`` against ``y_s`` restricted to the target's new
      pixels ``w = y_m - x_m``; with ``y_m >= x_m`` the weight is binary, so weighting is
      masking and MONAI's ``MaskedDiceLoss`` computes it:
      ``1 - (2 sum w y y^ + eps) / (sum w y + sum w y^ + eps)``.
    * ``partial_dice``: ``"all"`` computes ``DL`` over every pixel, as Eq. 2 reads; ``"undecided"``
      over the pixels ``x_m`` leaves open (``MaskedDiceLoss`` with ``1 - x_m``). Over all pixels the
      decided part ``x_m``, matched for free by construction, lifts the Dice, and a soft Dice
      only adds a pixel whose chance of being in the target exceeds about Dice / 2, a bar no
      undecided pixel of a random growth shape reaches.
    """

    def __init__(self, beta0: float = 1.0, beta1: float = 1e-3, partial_dice: str = "all") -> None:
        super().__init__()
        if partial_dice not in PARTIAL_DICE_MODES:
            raise ValueError(f"partial_dice must be one of {PARTIAL_DICE_MODES}, got {partial_dice!r}")
        self.beta0, self.beta1, self.partial_dice = beta0, beta1, partial_dice
        self.dice = DiceLoss(sigmoid=False)
        self.weighted_dice = MaskedDiceLoss(sigmoid=False)

    def forward(
        self,
        pred_m: torch.Tensor,
        pred_s: torch.Tensor,
        target_m: torch.Tensor,
        target_s: torch.Tensor,
        x_m: torch.Tensor,
        mu: torch.Tensor,
        logvar: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """All image tensors ``(B, 1, H, W)`` (predictions soft, targets and ``x_m`` binary).

        Returns ``{"loss", "wdl", "dl", "kl"}`` (scalars; ``loss`` is the weighted sum).
        """
        wdl = self.weighted_dice(pred_s, target_s, mask=target_m - x_m)
        if self.partial_dice == "all":
            dl = self.dice(pred_m, target_m)
        else:
            dl = self.weighted_dice(pred_m, target_m, mask=1.0 - x_m)
        kl = kl_standard_normal(mu, logvar)
        return {"loss": wdl + self.beta0 * dl + self.beta1 * kl, "wdl": wdl, "dl": dl, "kl": kl}
