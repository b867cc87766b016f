"""Training the proposal model with Adam on the paper's Eq. 3 from seeded random pairs."""

from __future__ import annotations

import time

import numpy as np
import torch

from OAIMSSegment.proposals.data import ImageSet, make_pairs
from OAIMSSegment.proposals.loss import ProposalLoss
from OAIMSSegment.proposals.model import ProposalConfig, ProposalModel, compose, stack_planes

__all__ = ["sample_batch", "train"]


def sample_batch(
    images: ImageSet, batch: int, rng: np.random.Generator, augment: bool, growth: str = "random"
) -> dict[str, torch.Tensor]:
    """A training batch: ``x (B, 3, S, S)`` = image, ``x_m``, ``x_s``; ``y (B, 2, S, S)`` = ``y_m``, ``y_s``.

    ``augment`` (real data only: the paper's disks need none) flips images at random and
    jitters their contrast with a random gamma in [0.7, 1.4]. ``growth``: see :func:`make_pairs`.
    """
    indices = rng.integers(0, images.images.shape[0], size=batch)
    image = images.images[indices].copy()
    gt = images.sample_ground_truths(indices, rng)
    if augment:
        flip_rows, flip_cols = rng.random(batch) < 0.5, rng.random(batch) < 0.5
        image[flip_rows], gt[flip_rows] = image[flip_rows, ::-1], gt[flip_rows, ::-1]
        image[flip_cols], gt[flip_cols] = image[flip_cols, :, ::-1], gt[flip_cols, :, ::-1]
        image = image ** rng.uniform(0.7, 1.4, size=(batch, 1, 1))
    pairs = make_pairs(gt, rng, growth)
    return {"x": stack_planes(image, pairs["x_m"], pairs["x_s"]), "y": stack_planes(pairs["y_m"], pairs["y_s"])}


def train(
    images: ImageSet,
    steps: int,
    seed: int,
    batch: int = 64,
    lr: float = 1e-3,
    augment: bool = False,
    config: ProposalConfig = ProposalConfig(),
    growth: str = "random",
    log_every: int = 250,
    partial_dice: str = "all",
    kl_warmup: int = 0,
    segmentation: str = "joint",
) -> tuple[ProposalModel, list[dict[str, float]]]:
    """Train the CVAE with Adam on Eq. 3 (beta0 = 1, beta1 = 1e-3).

    ``partial_dice``: see :class:`ProposalLoss`. ``kl_warmup``: steps over which the KL weight
    rises linearly from 0 to beta1 (0: beta1 from the start, as the paper states nothing else).
    ``segmentation``: how ``y^_s`` is kept inside ``y^_m`` in the loss (see :func:`compose`).

    Returns the model (eval mode) and the log: one ``{"step", "loss", "wdl", "dl", "kl"}``
    per ``log_every`` steps, each averaged over those steps.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 2])
    model = ProposalModel(config)
    loss_fn = ProposalLoss(partial_dice=partial_dice)
    beta1 = loss_fn.beta1
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    log: list[dict[str, float]] = []
    sums: dict[str, float] = {}
    start = time.time()
    model.train()
    for step in range(1, steps + 1):
        loss_fn.beta1 = beta1 * min(1.0, step / kl_warmup) if kl_warmup else beta1
        data = sample_batch(images, batch, rng, augment, growth)
        x, y = data["x"], data["y"]
        logits, mu, logvar = model(x, y)
        pred_m, pred_s = compose(logits, x[:, 1:2], x[:, 2:3], segmentation)
        terms = loss_fn(pred_m, pred_s, y[:, :1], y[:, 1:2], x[:, 1:2], mu, logvar)
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        for key, value in terms.items():
            sums[key] = sums.get(key, 0.0) + float(value.detach())
        if step % log_every == 0 or step == steps:
            count = step - (log[-1]["step"] if log else 0)
            entry = {"step": step, **{key: value / count for key, value in sums.items()}}
            log.append(entry)
            sums = {}
            print(
                f"step {step}/{steps}  loss {entry['loss']:.4f}  wdl {entry['wdl']:.4f}  dl {entry['dl']:.4f}"
                f"  kl {entry['kl']:.2f}  ({time.time() - start:.0f} s)",
                flush=True,
            )
    return model.eval(), log
