"""The latent distribution proposals are drawn from, and the temperature that scales it.

* ``"standard"``: the CVAE's prior ``N(0, I)`` (the paper), ``z = T eps``.
* ``"fitted"``: a Gaussian fitted after training to the encoder's *aggregate posterior* on
  training pairs, ``N(m, C)`` with ``m`` the mean of ``mu(x, y)`` and
  ``C = Cov(mu) + mean(diag sigma^2)`` over the pairs (the mixture's exact first two
  moments), ``z = m + T L eps`` with ``L L^T = C``. The KL term (weight 1e-3) matches the
  posterior to ``N(0, I)`` one latent pixel at a time only; neighbouring latent pixels of the
  posterior are correlated (a growth region is smooth), so independent prior draws ask the
  decoder for growth patterns it rarely saw. Fitting the prior after training is the paper's
  model unchanged, sampled from a better estimate of the latents it was trained on (the paper
  is silent on how to sample; this is our choice, measured in docs/PROPOSALS.md).

A model's card chooses both (``"sampling": {"prior", "temperature"}``; absent: standard, 1)
and holds the fitted Gaussian (``"latent_prior"``); callers may override either.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from OAIMSSegment.errors import ModelError
from OAIMSSegment.proposals.data import ImageSet
from OAIMSSegment.proposals.model import ProposalModel
from OAIMSSegment.proposals.train import sample_batch

__all__ = ["PRIOR_KINDS", "card_sampling", "check_temperature", "fit_latent_prior", "sample_latent"]

#: Latent distributions proposals can be sampled from (see the module doc).
PRIOR_KINDS = ("standard", "fitted")


def check_temperature(temperature: float) -> float:
    """``temperature`` as a float; raises ``ValueError`` unless it is finite and positive."""
    value = float(temperature)
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    return value


def card_sampling(model: ProposalModel) -> tuple[str, float]:
    """``(prior, temperature)`` the model's card chose; ``("standard", 1.0)`` when it names none.

    Raises:
        ModelError: a card naming an unknown prior, the fitted prior without ``"latent_prior"``,
            or a temperature that is not positive.
    """
    sampling = model.card.get("sampling", {})
    prior = sampling.get("prior", "standard")
    if prior not in PRIOR_KINDS:
        raise ModelError(f"model card names prior {prior!r}; known: {', '.join(PRIOR_KINDS)}")
    if prior == "fitted" and "latent_prior" not in model.card:
        raise ModelError("model card chooses the fitted prior but holds no 'latent_prior'")
    try:
        return prior, check_temperature(sampling.get("temperature", 1.0))
    except ValueError as error:
        raise ModelError(f"model card: {error}") from error


def sample_latent(
    model: ProposalModel, batch: int, generator: torch.Generator | None, prior: str = "standard", temperature: float = 1.0
) -> torch.Tensor:
    """``batch`` latents ``(batch, L, S/8, S/8)`` from ``eps ~ N(0, I)`` drawn with ``generator``.

    ``prior="standard"``: ``z = temperature * eps`` (at 1, bit for bit :meth:`ProposalModel.prior_sample`);
    ``"fitted"``: ``z = m + temperature * L eps`` from the card's ``"latent_prior"``. The same
    ``eps`` are drawn whatever the prior and temperature.

    Raises:
        ValueError: an unknown prior or a temperature that is not positive.
        ModelError: ``"fitted"`` for a model whose card holds no fitted prior.
    """
    if prior not in PRIOR_KINDS:
        raise ValueError(f"prior must be one of {PRIOR_KINDS}, got {prior!r}")
    temperature = check_temperature(temperature)
    eps = model.prior_sample(batch, generator)
    if prior == "standard":
        return eps * temperature
    fitted = model.card.get("latent_prior")
    if fitted is None:
        raise ModelError("this proposal model has no fitted prior (run proposals-fit-prior)")
    mean = torch.tensor(fitted["mean"], dtype=torch.float64)
    if mean.shape != (eps[0].numel(),):
        raise ModelError(f"the card's fitted prior has {mean.numel()} numbers, the latent {eps[0].numel()}")
    scale = torch.linalg.cholesky(torch.tensor(fitted["covariance"], dtype=torch.float64))
    z = mean + temperature * eps.flatten(1).double() @ scale.T
    return z.float().view_as(eps)


@torch.no_grad()
def fit_latent_prior(
    model: ProposalModel, images: ImageSet, pairs: int, seed: int, growth: str, augment: bool, chunk: int = 500
) -> dict[str, Any]:
    """Fit ``N(m, C)`` to the encoder's aggregate posterior on ``pairs`` training pairs.

    Pairs are drawn as in training (:func:`~OAIMSSegment.proposals.train.sample_batch` with
    ``growth`` and ``augment``), seeded by ``seed``. Returns the card entry
    ``{"kind": "fitted-gaussian", "mean": [D], "covariance": [D][D], "pairs", "seed", "growth"}``
    with ``D = L (S/8)^2`` latent numbers, flattened in ``(L, S/8, S/8)`` order.
    """
    rng = np.random.default_rng([seed, 5])
    means, variances = [], []
    for begin in range(0, pairs, chunk):
        batch = sample_batch(images, min(chunk, pairs - begin), rng, augment, growth)
        mu, logvar = model.eval().encode(batch["x"], batch["y"])
        means.append(mu.flatten(1).double())
        variances.append(logvar.flatten(1).double().exp())
    mu, var = torch.cat(means), torch.cat(variances)
    covariance = torch.cov(mu.T, correction=0) + torch.diag(var.mean(dim=0))
    return {
        "kind": "fitted-gaussian",
        "mean": mu.mean(dim=0).tolist(),
        "covariance": covariance.tolist(),
        "pairs": pairs,
        "seed": seed,
        "growth": growth,
    }
