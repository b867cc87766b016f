"""Evaluation of the proposals: the paper's added pixels and Dice (Section 3), plus stricter views."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from OAIMSSegment.metrics import pairwise_dice
from OAIMSSegment.proposals.data import ImageSet, make_pairs
from OAIMSSegment.proposals.inference import sample_proposals
from OAIMSSegment.proposals.model import ProposalModel, binarise, stack_planes

__all__ = ["evaluate"]


def evaluate(
    model: ProposalModel,
    images: ImageSet,
    n: int,
    k: int,
    seed: int,
    chunk: int = 100,
    growth: str = "random",
    prior: str = "standard",
    temperature: float = 1.0,
) -> dict[str, Any]:
    """The paper's evaluation, plus stricter views of the same proposals.

    ``n`` inputs (image ``i % N``, a random ground truth, a random input partial
    segmentation from :func:`make_pairs`), ``k`` proposals each, ``z`` drawn from ``prior`` at
    ``temperature`` (:func:`sample_proposals`; the inputs and the noise do not depend on them). For a
    proposal, the *added* pixels are ``m & ~x_m``; on them:

    * ``added_foreground`` / ``added_background``: counts (paper: 52 / 31), per proposal;
    * ``dice_any``: the paper's metric, the maximum Dice of the added foreground against the
      added part of every possible ground truth (paper: 0.87);
    * ``dice_consistent``: the same maximum over the ground truths that agree with the input
      partial segmentation (the only ones the user can still mean);
    * ``dice_true``: against the ground truth the input was made from.

    Dice is 1 when both added foregrounds are empty; proposals that add no pixel are left
    out of the Dice means and counted in ``empty_fraction``. ``distinct_per_input`` is the
    mean number of different proposals among the ``k`` of an input.

    Diagnostics of what the model learned, on the same inputs and their targets ``y``:
    ``target_added_foreground`` / ``target_added_background`` (what the training pairs add),
    and with ``z`` = the encoder's posterior mean ``mu(x, y)``: ``posterior_recall`` (share of
    the target's new pixels decided) and ``posterior_spill`` (share of the other undecided
    pixels decided). Equal values mean the decoder ignores where the target grows. The
    targets follow ``growth`` (:func:`make_pairs`); the inputs do not depend on it, so models
    trained either way are scored on the same inputs.
    """
    generator = torch.Generator().manual_seed(seed)
    totals: dict[str, list[float]] = {
        key: [] for key in ("fg", "bg", "any", "consistent", "true", "target_fg", "target_bg", "recall", "spill")
    }
    empty = distinct = 0
    for begin in range(0, n, chunk):
        rng = np.random.default_rng([seed, 3, begin])  # per chunk: the inputs stay the same for any growth
        indices = np.arange(begin, min(begin + chunk, n)) % images.images.shape[0]
        gt = images.sample_ground_truths(indices, rng)
        pairs = make_pairs(gt, rng, growth)
        x = stack_planes(images.images[indices], pairs["x_m"], pairs["x_s"])
        _, m, s = sample_proposals(model, x, k, generator, prior, temperature)
        m, s = m.numpy(), s.numpy()
        y = stack_planes(pairs["y_m"], pairs["y_s"])
        with torch.no_grad():
            posterior_m, _ = binarise(model.decode(model.encode(x, y)[0], x), x[:, 1:2], x[:, 2:3])
        posterior_m = posterior_m[:, 0].numpy()
        new, rest = pairs["y_m"] & ~pairs["x_m"], ~pairs["y_m"]
        totals["target_fg"] += list((new & pairs["y_s"]).sum(axis=(1, 2)))
        totals["target_bg"] += list((new & ~pairs["y_s"]).sum(axis=(1, 2)))
        totals["recall"] += list((posterior_m & new).sum(axis=(1, 2)) / np.maximum(new.sum(axis=(1, 2)), 1))
        totals["spill"] += list((posterior_m & rest).sum(axis=(1, 2)) / np.maximum(rest.sum(axis=(1, 2)), 1))
        for row, index in enumerate(indices):
            x_m, x_s = pairs["x_m"][row], pairs["x_s"][row]
            candidates = images.candidates(int(index))
            consistent = (candidates == x_s[None]) | ~x_m[None]
            consistent_ids = np.flatnonzero(consistent.reshape(len(candidates), -1).all(axis=1))
            distinct += len({m[row, j].tobytes() + s[row, j].tobytes() for j in range(k)})
            for j in range(k):
                added = m[row, j] & ~x_m
                fg = s[row, j] & added
                totals["fg"].append(int(fg.sum()))
                totals["bg"].append(int((added & ~fg).sum()))
                if not added.any():
                    empty += 1
                    continue
                dice = pairwise_dice(fg[added][None], candidates[:, added])[0]
                totals["any"].append(float(dice.max()))
                totals["consistent"].append(float(dice[consistent_ids].max()))
                totals["true"].append(float(pairwise_dice(fg[added][None], gt[row][added][None])[0, 0]))
    mean = lambda values: float(np.mean(values)) if values else math.nan  # noqa: E731
    return {
        "n_inputs": n,
        "n_images": int(min(n, images.images.shape[0])),
        "k": k,
        "prior": prior,
        "temperature": temperature,
        "added_foreground": mean(totals["fg"]),
        "added_background": mean(totals["bg"]),
        "dice_any": mean(totals["any"]),
        "dice_consistent": mean(totals["consistent"]),
        "dice_true": mean(totals["true"]),
        "empty_fraction": empty / (n * k),
        "distinct_per_input": distinct / n,
        "target_added_foreground": mean(totals["target_fg"]),
        "target_added_background": mean(totals["target_bg"]),
        "posterior_recall": mean(totals["recall"]),
        "posterior_spill": mean(totals["spill"]),
    }
