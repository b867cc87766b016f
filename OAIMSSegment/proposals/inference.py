"""Proposing next steps: ``k`` larger partial segmentations of one image, one per latent sample.

:func:`propose_next_steps` is what the Slicer module calls, in the image's own grid;
:func:`sample_proposals` is the batched model-grid sampler the evaluation and figure share.
Latents come from :func:`~OAIMSSegment.proposals.prior.sample_latent` (the CVAE's prior
``N(0, I)`` or the fitted one, scaled by a temperature); a model's card chooses the default.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from OAIMSSegment.errors import InvalidImageError
from OAIMSSegment.proposals.data import LUMINANCE, normalise_image
from OAIMSSegment.proposals.model import ProposalModel, binarise
from OAIMSSegment.proposals.prior import card_sampling, sample_latent

__all__ = ["Proposal", "propose_next_steps", "sample_proposals"]


@dataclass
class Proposal:
    """One proposed larger partial segmentation, in the caller's image grid.

    Attributes:
        partial_mask: ``(H, W)`` bool, pixels decided (a superset of the input's).
        seg_mask: ``(H, W)`` bool, foreground; equal to the input on the input's partial mask
            and inside ``partial_mask`` everywhere.
        added_foreground: pixels newly decided as foreground.
        added_background: pixels newly decided as background.
    """

    partial_mask: np.ndarray
    seg_mask: np.ndarray
    added_foreground: int
    added_background: int


def _check_inputs(image2d: np.ndarray, partial_mask: np.ndarray, seg_mask: np.ndarray) -> np.ndarray:
    """Validate the inputs of :func:`propose_next_steps`; returns the image as ``(H, W)`` float64."""
    image = np.asarray(image2d)
    if image.ndim == 3 and image.shape[-1] in (3, 4):  # an RGB(A) slice: luminance, as in training
        image = image[..., :3].astype(np.float64) @ LUMINANCE
    if image.ndim != 2:
        raise InvalidImageError(f"expected a 2D image (H, W), got shape {tuple(np.shape(image2d))}")
    if min(image.shape) < 2:
        raise InvalidImageError(f"image {tuple(image.shape)} is too small (at least 2 x 2)")
    image = image.astype(np.float64)
    if not np.isfinite(image).all():
        raise InvalidImageError("image contains NaN or infinite values")
    for name, mask in (("partial_mask", partial_mask), ("seg_mask", seg_mask)):
        if np.shape(mask) != image.shape:
            raise InvalidImageError(f"{name} has shape {tuple(np.shape(mask))}, the image {tuple(image.shape)}")
    return image


def _to_model_grid(array: np.ndarray, size: int, mode: str) -> torch.Tensor:
    """``(H, W)`` -> ``(1, 1, size, size)`` float tensor (``mode``: torch interpolate mode)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    if tensor.shape[-2:] == (size, size):
        return tensor
    if mode == "bilinear":
        return F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return F.interpolate(tensor, size=(size, size), mode=mode)


@torch.no_grad()
def sample_proposals(
    model: ProposalModel,
    x: torch.Tensor,
    k: int,
    generator: torch.Generator | None,
    prior: str = "standard",
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``k`` decoder samples for each input, ``z`` from :func:`sample_latent` (``prior``, ``temperature``).

    Args:
        x: ``(B, 3, S, S)`` = image, ``x_m``, ``x_s``.
        prior, temperature: ``"standard"`` and 1 draw ``z ~ N(0, I)`` (the paper); a temperature
            above 1 spreads the samples further; ``"fitted"`` uses the card's fitted Gaussian.

    Returns:
        ``(logits (B, k, 2, S, S), m (B, k, S, S) bool, s (B, k, S, S) bool)`` -- the latter two
        from :func:`binarise`.
    """
    b, size = x.shape[0], x.shape[-1]
    z = sample_latent(model, b * k, generator, prior, temperature)
    xk = x.repeat_interleave(k, dim=0)
    logits = model.decode(z, xk)
    m, s = binarise(logits, xk[:, 1:2], xk[:, 2:3])
    return logits.view(b, k, 2, size, size), m.view(b, k, size, size), s.view(b, k, size, size)


def propose_next_steps(
    model: ProposalModel,
    image2d: np.ndarray,
    partial_mask: np.ndarray,
    seg_mask: np.ndarray,
    k: int = 3,
    seed: int | None = None,
    prior: str | None = None,
    temperature: float | None = None,
) -> list[Proposal]:
    """Sample ``k`` larger partial segmentations for one 2D image.

    Args:
        model: from :func:`load_proposal_model`.
        image2d: ``(H, W)`` float, raw intensities (normalised here as in training); an
            ``(H, W, 3|4)`` RGB(A) slice is turned to luminance.
        partial_mask: ``(H, W)`` bool, the pixels already decided (``x_m``).
        seg_mask: ``(H, W)`` bool, the foreground among them (``x_s``); a foreground pixel counts
            as decided even if ``partial_mask`` misses it.
        k: number of proposals (>= 1).
        seed: seeds ``z``; the same seed gives the same proposals.
        prior, temperature: how ``z`` is drawn (see :func:`sample_proposals`); ``None``: what the
            model's card chose (:func:`~OAIMSSegment.proposals.prior.card_sampling`).

    Returns:
        ``k`` :class:`Proposal` in the input grid. The image and masks are resized to the
        model's input (linear for the image, nearest for masks); the proposal's logits are
        resized back linearly and thresholded, and the input partial segmentation is then
        re-imposed at the original resolution, so the constraints hold exactly.

    Raises:
        InvalidImageError: not 2D, too small, non-finite, or masks of another shape.
        ValueError: ``k < 1``, an unknown prior, or a temperature that is not positive and finite.
        ModelError: the fitted prior for a model whose card holds none.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    image = _check_inputs(image2d, partial_mask, seg_mask)
    seg = np.asarray(seg_mask, dtype=bool)
    known = np.asarray(partial_mask, dtype=bool) | seg
    size = model.config.input_size
    x = torch.cat(
        [
            _to_model_grid(normalise_image(image), size, "bilinear"),
            _to_model_grid(known, size, "nearest-exact"),
            _to_model_grid(seg, size, "nearest-exact"),
        ],
        dim=1,
    )
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    card_prior, card_temperature = card_sampling(model)
    logits, _, _ = sample_proposals(
        model.eval(), x, k, generator, card_prior if prior is None else prior,
        card_temperature if temperature is None else temperature,
    )  # fmt: skip
    # The raw logits on decided model-grid pixels are never trained (compose overrides them);
    # pin them to the input's decision so that resizing back does not leak them next to strokes.
    pinned = torch.cat([torch.ones_like(x[:, 2:3]), 2.0 * x[:, 2:3] - 1.0], dim=1) * 10.0
    logits = torch.where(x[:, 1:2] > 0.5, pinned, logits[0])
    logits = F.interpolate(logits, size=image.shape, mode="bilinear", align_corners=False)
    full = torch.from_numpy(known)[None, None].float().expand(k, 1, *image.shape)
    m, s = binarise(logits, full, torch.from_numpy(seg)[None, None].float().expand_as(full))
    proposals = []
    for i in range(k):
        mask, fg = m[i, 0].numpy(), s[i, 0].numpy()
        added = mask & ~known
        proposals.append(Proposal(mask, fg, int((added & fg).sum()), int((added & ~fg).sum())))
    return proposals
