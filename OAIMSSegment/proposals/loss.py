"""The training loss of the proposals (paper Eq. 3): ``WDL(y_s, y^_s, y_m - x_m) + beta0 DL(y_m, y^_m) + beta1 KL``."""

from __future__ import annotations

import torch
from monai.losses import DiceLoss, MaskedDiceLoss
from torch import nn

__all__ = ["kl_standard_normal", "ProposalLoss"]


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
    """

    def __init__(self, beta0: float = 1.0, beta1: float = 1e-3) -> None:
        super().__init__()
        self.beta0, self.beta1 = beta0, beta1
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
        dl = self.dice(pred_m, target_m)
        kl = kl_standard_normal(mu, logvar)
        return {"loss": wdl + self.beta0 * dl + self.beta1 * kl, "wdl": wdl, "dl": dl, "kl": kl}
