"""The conditional VAE of the proposals and the constraints its outputs obey.

* Encoder ``q(z | x, y)`` and decoder ``g(z, x)`` follow the paper's Section 3 (Setup).
* Constraints, by construction (see :func:`compose`): ``y^_m >= x_m``, ``y^_s = x_s`` on
  ``x_m``, and ``y^_s <= y^_m`` (segmentation only where the partialness mask is on).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn

from OAIMSSegment.errors import ModelError

__all__ = ["SEGMENTATION_PROBABILITIES", "ProposalConfig", "ProposalModel", "compose", "binarise", "stack_planes"]


@dataclass(frozen=True)
class ProposalConfig:
    """Architecture of the CVAE (paper defaults).

    Attributes:
        input_size: side of the square model input (32 for the paper's disks); a multiple of 8.
        latent_channels: channels of the latent map ``z`` of shape ``(latent_channels, S/8, S/8)``;
            1 in the paper (the decoder's first layer then has 1 + 3 = 4 input channels).
        encoder_channels: output channels of the encoder's first two layers (paper: 32, 16).
        decoder_channels: width of the decoder (paper: 64).
    """

    input_size: int = 32
    latent_channels: int = 1
    encoder_channels: tuple[int, int] = (32, 16)
    decoder_channels: int = 64

    @property
    def latent_size(self) -> int:
        return self.input_size // 8


class ProposalModel(nn.Module):
    """Conditional VAE for partial segmentations.

    Encoder (paper: "3-layer CNN with 5, 32 and 16 channels, kernel 3, ReLU, 2x max pooling
    after each layer"): ``(x_0, x_m, x_s, y_m, y_s)`` -> 32 -> 16 -> ``(mu, log sigma^2)``,
    i.e. ``(B, 5, S, S)`` -> ``(B, 2 L, S/8, S/8)``.

    Decoder (paper: "up-sampling of z to the size of x, conv, 2x max pooling, conv,
    transposed conv, conv; 4, 64, 64, 64 input channels; sigmoid at the end"):
    ``[up(z), x_0, x_m, x_s]`` ``(B, L + 3, S, S)`` -> 64 -> pool -> 64 -> up 64 -> 2 logits
    ``(a_m, a_s)``, turned into probabilities under the constraints by :func:`compose`.
    """

    def __init__(self, config: ProposalConfig = ProposalConfig()) -> None:
        super().__init__()
        if config.input_size % 8 or config.input_size < 8:
            raise ModelError(f"input_size must be a positive multiple of 8, got {config.input_size}")
        self.config = config
        self.card: dict[str, Any] = {}  # filled by load_proposal_model
        c1, c2 = config.encoder_channels
        width, latent = config.decoder_channels, config.latent_channels

        def conv(cin: int, cout: int, act: bool = True, transposed: bool = False) -> Convolution:
            return Convolution(
                spatial_dims=2,
                in_channels=cin,
                out_channels=cout,
                strides=2 if transposed else 1,
                kernel_size=3,
                act="RELU" if act else None,
                norm=None,
                conv_only=not act,
                is_transposed=transposed,
                padding=1,
                output_padding=1 if transposed else None,
            )

        self.encoder = nn.Sequential(
            conv(5, c1), nn.MaxPool2d(2),
            conv(c1, c2), nn.MaxPool2d(2),
            conv(c2, 2 * latent, act=False), nn.MaxPool2d(2),
        )  # fmt: skip
        self.decoder = nn.Sequential(
            conv(latent + 3, width), nn.MaxPool2d(2),
            conv(width, width),
            conv(width, width, transposed=True),
            conv(width, 2, act=False),
        )  # fmt: skip

    def encode(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``q(z | x, y)``: ``x (B, 3, S, S)``, ``y (B, 2, S, S)`` -> ``mu, logvar`` each ``(B, L, S/8, S/8)``."""
        stats = self.encoder(torch.cat([x, y], dim=1))
        mu, logvar = stats.chunk(2, dim=1)
        return mu, logvar.clamp(-10.0, 10.0)  # keeps exp() finite early in training

    def decode(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``g(z, x)``: ``z (B, L, S/8, S/8)``, ``x (B, 3, S, S)`` -> logits ``(B, 2, S, S)`` (``a_m, a_s``)."""
        up = F.interpolate(z, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.decoder(torch.cat([up, x], dim=1))

    def prior_sample(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``z ~ N(0, I)``: ``(batch, L, S/8, S/8)``."""
        shape = (batch, self.config.latent_channels, self.config.latent_size, self.config.latent_size)
        return torch.randn(shape, generator=generator)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: encode ``(x, y)``, reparameterise, decode. Returns ``(logits, mu, logvar)``."""
        mu, logvar = self.encode(x, y)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decode(z, x), mu, logvar


#: How the soft ``y^_s`` of :func:`compose` is kept inside ``y^_m`` (the paper does not say).
SEGMENTATION_PROBABILITIES = ("joint", "conditional")


def compose(
    logits: torch.Tensor, x_m: torch.Tensor, x_s: torch.Tensor, segmentation: str = "joint"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft proposal under the paper's constraints.

    With ``p_m = sigmoid(a_m)`` (probability that a pixel is decided) and ``p_s = sigmoid(a_s)``
    (probability that a decided pixel is foreground):
    ``y^_m = x_m + (1 - x_m) p_m`` and, with ``segmentation="joint"``,
    ``y^_s = x_m x_s + (1 - x_m) p_m p_s`` (the probability of "decided and foreground"), so
    that ``y^_m >= x_m``, ``y^_s = x_s`` on ``x_m`` and ``y^_s <= y^_m`` hold for any weights.
    ``"conditional"`` returns ``y^_s = x_m x_s + (1 - x_m) p_s``, the probability of foreground
    given decided: the loss's weight ``y_m - x_m`` only looks at decided pixels, and the
    constraint then holds for the hard proposal (:func:`binarise`) only; the segmentation
    term no longer pulls ``p_m`` up on foreground.

    Args:
        logits: ``(B, 2, H, W)``; x_m, x_s: ``(B, 1, H, W)`` in {0, 1}, ``x_s <= x_m``.
        segmentation: ``"joint"`` or ``"conditional"``.

    Returns:
        ``(y^_m, y^_s)``, each ``(B, 1, H, W)`` in ``[0, 1]``.
    """
    if segmentation not in SEGMENTATION_PROBABILITIES:
        raise ValueError(f"segmentation must be one of {SEGMENTATION_PROBABILITIES}, got {segmentation!r}")
    p_m, p_s = torch.sigmoid(logits[:, :1]), torch.sigmoid(logits[:, 1:2])
    free = 1.0 - x_m
    return x_m + free * p_m, x_m * x_s + free * (p_m * p_s if segmentation == "joint" else p_s)


def binarise(logits: torch.Tensor, x_m: torch.Tensor, x_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard proposal: ``m = x_m | p_m > 1/2``; ``s = x_s`` on ``x_m``, else ``m & p_s > 1/2``.

    Same shapes as :func:`compose`; returns bool tensors with ``m >= x_m``, ``s = x_s`` on ``x_m``, ``s <= m``.
    """
    known, seg = x_m > 0.5, x_s > 0.5
    m = known | (logits[:, :1] > 0)
    return m, torch.where(known, seg, m & (logits[:, 1:2] > 0))


def stack_planes(*planes: np.ndarray) -> torch.Tensor:
    """Planes of one shape ``(B, S, S)`` (image, masks) -> float32 ``(B, len(planes), S, S)``.

    The model's ``x`` is ``stack_planes(image, x_m, x_s)``, its ``y`` ``stack_planes(y_m, y_s)``.
    """
    return torch.from_numpy(np.stack(planes, axis=1).astype(np.float32))
