"""How proposals draw their latents: temperature, the fitted aggregate-posterior prior, the card's choice."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from OAIMSSegment import proposals as P
from OAIMSSegment.errors import ModelError
from OAIMSSegment.proposals.model import stack_planes
from OAIMSSegment.proposals.prior import card_sampling, fit_latent_prior, sample_latent
from test_proposals import run_cli

SHIPPED = "proposals-synthetic-disks"


@pytest.fixture(scope="module")
def shipped() -> P.ProposalModel:
    return P.load_proposal_model(SHIPPED)


@pytest.fixture(scope="module")
def inputs() -> torch.Tensor:
    """``(24, 3, 32, 32)`` held-out disk images with input partial segmentations, as in the evaluation."""
    images = P.load_images("synthetic", "Ts", 32, 24, seed=3)
    rng = np.random.default_rng(3)
    gt = images.sample_ground_truths(np.arange(24), rng)
    pairs = P.make_pairs(gt, rng)
    return stack_planes(images.images, pairs["x_m"], pairs["x_s"])


def added_and_spread(model: P.ProposalModel, x: torch.Tensor, prior: str, temperature: float) -> tuple[float, float]:
    """Mean pixels a proposal adds, and the mean per-pixel variance of ``m`` over 6 proposals of an input."""
    _, m, _ = P.sample_proposals(model, x, 6, torch.Generator().manual_seed(0), prior, temperature)
    added = m & (x[:, None, 1] < 0.5)
    return float(added.sum(dim=(2, 3)).float().mean()), float(m.float().var(dim=1).mean())


def test_temperature_one_reproduces_the_prior_samples_bit_for_bit(shipped: P.ProposalModel, inputs: torch.Tensor) -> None:
    # what sample_proposals drew before temperatures existed: decode(prior_sample(...)) with the same generator
    with torch.no_grad():
        z = shipped.prior_sample(24 * 3, torch.Generator().manual_seed(5))
        before = shipped.decode(z, inputs.repeat_interleave(3, dim=0)).view(24, 3, 2, 32, 32)
    logits, _, _ = P.sample_proposals(shipped, inputs, 3, torch.Generator().manual_seed(5), "standard", 1.0)
    assert torch.equal(logits, before)
    drawn = sample_latent(shipped, 7, torch.Generator().manual_seed(1))
    assert torch.equal(drawn, shipped.prior_sample(7, torch.Generator().manual_seed(1)))


def test_spread_and_additions_grow_with_temperature(shipped: P.ProposalModel, inputs: torch.Tensor) -> None:
    measured = [added_and_spread(shipped, inputs, "standard", t) for t in (0.25, 1.0, 2.0, 3.0)]
    print("added, spread per temperature 0.25 / 1 / 2 / 3:", measured)
    added, spread = zip(*measured)
    assert all(a < b for a, b in zip(added, added[1:])), added
    assert all(a < b for a, b in zip(spread, spread[1:])), spread
    assert added[-1] > 2 * added[1]  # T = 3 adds far more than T = 1 on the shipped model


def test_fitted_prior_holds_the_aggregate_posterior_moments(shipped: P.ProposalModel) -> None:
    images = P.load_images("synthetic", "Tr", 32, 50, seed=0)
    fitted = fit_latent_prior(shipped, images, 300, seed=2, growth="object", augment=False, chunk=120)
    # the same pairs, by hand: mean of mu, Cov(mu) + mean sigma^2 on the diagonal
    rng = np.random.default_rng([2, 5])
    batches = [P.sample_batch(images, n, rng, False, "object") for n in (120, 120, 60)]
    with torch.no_grad():
        stats = [shipped.encode(b["x"], b["y"]) for b in batches]
    mu = torch.cat([s[0].flatten(1) for s in stats]).double()
    var = torch.cat([s[1].flatten(1) for s in stats]).double().exp()
    mean, covariance = torch.tensor(fitted["mean"]), torch.tensor(fitted["covariance"], dtype=torch.float64)
    assert mean.shape == (16,) and covariance.shape == (16, 16)
    assert torch.allclose(mean.double(), mu.mean(0), atol=1e-6)
    centred = mu - mu.mean(0)
    assert torch.allclose(covariance, centred.T @ centred / len(mu) + torch.diag(var.mean(0)), atol=1e-6)
    # neighbouring latent pixels of the posterior are correlated: what N(0, I) cannot draw
    correlation = covariance[0, 1] / (covariance[0, 0] * covariance[1, 1]).sqrt()
    assert correlation > 0.2
    # samples from it have its moments (20,000 draws: standard errors about 0.01)
    model = P.ProposalModel()
    model.card = {"latent_prior": fitted}
    z = sample_latent(model, 20000, torch.Generator().manual_seed(0), "fitted").flatten(1).double()
    assert torch.allclose(z.mean(0), mean.double(), atol=0.05)
    assert torch.allclose(torch.cov(z.T), covariance, atol=0.06)
    hot = sample_latent(model, 20000, torch.Generator().manual_seed(0), "fitted", 2.0).flatten(1).double()
    assert torch.allclose(hot - mean.double(), 2.0 * (z - mean.double()), atol=1e-5)


def test_shipped_card_chooses_the_fitted_prior_and_it_is_the_default(shipped: P.ProposalModel, inputs: torch.Tensor) -> None:
    assert card_sampling(shipped) == ("fitted", 1.0)
    assert shipped.card["metrics"]["synthetic"]["prior"] == "fitted"
    # the fitted prior adds more than N(0, I) from the same noise (the reason it was chosen)
    fitted_added, standard_added = (added_and_spread(shipped, inputs, prior, 1.0)[0] for prior in ("fitted", "standard"))
    print("added per proposal, fitted / standard prior:", fitted_added, standard_added)
    assert fitted_added > 1.2 * standard_added
    image = P.load_images("synthetic", "Ts", 32, 1, seed=0).images[0]
    empty = np.zeros((32, 32), bool)
    default = P.propose_next_steps(shipped, image, empty, empty, k=4, seed=9)
    fitted = P.propose_next_steps(shipped, image, empty, empty, k=4, seed=9, prior="fitted", temperature=1.0)
    standard = P.propose_next_steps(shipped, image, empty, empty, k=4, seed=9, prior="standard")
    assert all(np.array_equal(a.partial_mask, b.partial_mask) for a, b in zip(default, fitted))
    assert not all(np.array_equal(a.partial_mask, b.partial_mask) for a, b in zip(default, standard))


def test_bad_sampling_is_refused(shipped: P.ProposalModel, tmp_path: Path) -> None:
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            sample_latent(shipped, 2, None, "standard", bad)
    with pytest.raises(ValueError, match="prior"):
        sample_latent(shipped, 2, None, "uniform")
    with pytest.raises(ModelError, match="no fitted prior"):
        sample_latent(P.ProposalModel(), 2, None, "fitted")
    for card, message in (
        ({"sampling": {"prior": "uniform"}}, "unknown|known"),
        ({"sampling": {"prior": "fitted"}}, "holds no 'latent_prior'"),
        ({"sampling": {"temperature": -2}}, "temperature"),
    ):
        model = P.ProposalModel()
        model.card = card
        with pytest.raises(ModelError, match=message):
            card_sampling(model)
    small = P.ProposalModel()
    small.card = {"latent_prior": {"mean": [0.0] * 4, "covariance": np.eye(4).tolist()}}
    with pytest.raises(ModelError, match="4 numbers, the latent 16"):
        sample_latent(small, 2, None, "fitted")


def test_cli_fits_the_prior_and_eval_records_the_sampling_it_measured(tmp_path: Path) -> None:
    card = json.loads((P.MODELS_DIR / f"{SHIPPED}.json").read_text())
    for key in ("latent_prior", "sampling"):
        card.pop(key)
    shutil.copy(P.MODELS_DIR / card["weights"], tmp_path / "m.pt")
    (tmp_path / "m.json").write_text(json.dumps(card))
    weights = str(tmp_path / "m.pt")
    assert card_sampling(P.load_proposal_model(weights)) == ("standard", 1.0)  # a card that chooses nothing
    assert run_cli(["proposals-fit-prior", "--model", weights, "--pairs", "300", "--seed", "4"]) == 0
    written = json.loads((tmp_path / "m.json").read_text())
    assert written["latent_prior"]["pairs"] == 300 and "sampling" not in written  # fitting alone changes no default
    report = tmp_path / "eval.json"
    argv = ["proposals-eval", "--model", weights, "--n", "20", "--k", "2", "--prior", "fitted", "--temperature", "1.5",
            "--json", str(report), "--update-card"]  # fmt: skip
    assert run_cli(argv) == 0
    metrics = json.loads(report.read_text())
    assert (metrics["prior"], metrics["temperature"]) == ("fitted", 1.5)
    assert "--prior fitted --temperature 1.5" in metrics["command"]
    assert card_sampling(P.load_proposal_model(weights)) == ("fitted", 1.5)
    # without options, eval samples as the card says
    assert run_cli(["proposals-eval", "--model", weights, "--n", "20", "--k", "2", "--json", str(report)]) == 0
    assert json.loads(report.read_text())["temperature"] == 1.5
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["proposals-eval", "--model", weights, "--temperature", "0"])
    assert exit_info.value.code == 2
