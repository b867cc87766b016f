"""A figure of proposals like the paper's Figure 3."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from OAIMSSegment.files import atomic_write_bytes
from OAIMSSegment.proposals.data import ImageSet, make_pairs
from OAIMSSegment.proposals.inference import sample_proposals
from OAIMSSegment.proposals.model import ProposalModel, stack_planes

__all__ = ["proposal_figure"]


def proposal_figure(
    model: ProposalModel,
    images: ImageSet,
    path: Path,
    seed: int,
    rows: int = 5,
    k: int = 4,
    prior: str = "standard",
    temperature: float = 1.0,
) -> None:
    """A figure like the paper's Figure 3: per row the input partial segmentation, ``k`` proposals
    (``z`` from ``prior`` at ``temperature``, see :func:`sample_proposals`) and the ground truth
    the input was cut from; foreground red, background blue, over the image.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng([seed, 4])
    indices = rng.choice(images.images.shape[0], size=rows, replace=rows > images.images.shape[0])
    gt = images.sample_ground_truths(indices, rng)
    pairs = make_pairs(gt, rng)
    x = stack_planes(images.images[indices], pairs["x_m"], pairs["x_s"])
    _, m, s = sample_proposals(model, x, k, torch.Generator().manual_seed(seed), prior, temperature)

    def overlay(axis: Any, image: np.ndarray, mask: np.ndarray, fg: np.ndarray, title: str) -> None:
        rgba = np.zeros((*image.shape, 4))
        rgba[mask & fg] = (1.0, 0.1, 0.1, 0.55)
        rgba[mask & ~fg] = (0.1, 0.3, 1.0, 0.55)
        axis.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        axis.imshow(rgba, interpolation="nearest")
        axis.set_title(title, fontsize=8)
        axis.axis("off")

    figure, axes = plt.subplots(rows, k + 2, figsize=(1.6 * (k + 2), 1.7 * rows))
    axes = np.atleast_2d(axes)
    for r in range(rows):
        image = images.images[indices[r]]
        overlay(axes[r, 0], image, pairs["x_m"][r], pairs["x_s"][r], "input")
        for j in range(k):
            mask, fg = m[r, j].numpy(), s[r, j].numpy()
            added = mask & ~pairs["x_m"][r]
            overlay(axes[r, j + 1], image, mask, fg, f"z{j + 1}: +{int((added & fg).sum())} fg +{int((added & ~fg).sum())} bg")
        full = np.ones_like(gt[r])
        overlay(axes[r, k + 1], image, full, gt[r], "gt of input")
    figure.suptitle("Proposals (red: foreground, blue: background)", fontsize=9)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format=Path(path).suffix[1:] or "png", dpi=110)
    plt.close(figure)
    atomic_write_bytes(Path(path), buffer.getvalue())
