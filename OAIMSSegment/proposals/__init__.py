"""Probabilistic partial-segmentation proposals (Wong, Guttag, Dalca, NeurIPS 2022 workshop).

Given an image ``x_0`` and the partial segmentation so far (a partialness mask ``x_m``: the
pixels already decided, and a segmentation mask ``x_s``: which of them are foreground), a
conditional VAE samples several *larger* partial segmentations ``(y^_m, y^_s)``; the user
picks one, corrects it and asks again.

One concept a module:

* :mod:`.model`: the CVAE (:class:`ProposalConfig`, :class:`ProposalModel`) and the
  constraints (:func:`compose`, :func:`binarise`);
* :mod:`.loss`: paper Eq. 3 (:class:`ProposalLoss`, :func:`kl_standard_normal`);
* :mod:`.data`: synthetic disks, random partialness shapes, input / target pairs, fundus sets;
* :mod:`.io`: weights and model card (``"kind": "proposals"``), saved atomically, sha256-checked;
* :mod:`.inference`: :func:`propose_next_steps` (the Slicer module's call) and :func:`sample_proposals`;
* :mod:`.prior`: the latent distribution samples come from (``N(0, I)`` or a Gaussian fitted to the
  aggregate posterior, :func:`fit_latent_prior`), its temperature, and the card's choice (:func:`card_sampling`);
* :mod:`.train`, :mod:`.metrics` (:func:`evaluate`), :mod:`.figure`;
* :mod:`.cli`: :func:`add_commands` registers ``proposals-train``, ``proposals-fit-prior``,
  ``proposals-eval`` and ``proposals-user``.

The names below are re-exported so that ``from OAIMSSegment.proposals import ...`` keeps working.
"""

from OAIMSSegment.model import MODELS_DIR
from OAIMSSegment.proposals.cli import add_commands
from OAIMSSegment.proposals.data import ImageSet, load_fundus_dataset, load_images, make_disk_images, make_pairs, normalise_image
from OAIMSSegment.proposals.figure import proposal_figure
from OAIMSSegment.proposals.inference import Proposal, propose_next_steps, sample_proposals
from OAIMSSegment.proposals.io import WEIGHTS_FORMAT, load_proposal_model, save_proposal_model
from OAIMSSegment.proposals.loss import ProposalLoss, kl_standard_normal
from OAIMSSegment.proposals.metrics import evaluate
from OAIMSSegment.proposals.model import ProposalConfig, ProposalModel, binarise, compose
from OAIMSSegment.proposals.prior import PRIOR_KINDS, card_sampling, fit_latent_prior, sample_latent
from OAIMSSegment.proposals.train import sample_batch, train

__all__ = [
    "MODELS_DIR",
    "PRIOR_KINDS",
    "WEIGHTS_FORMAT",
    "ImageSet",
    "Proposal",
    "ProposalConfig",
    "ProposalLoss",
    "ProposalModel",
    "add_commands",
    "binarise",
    "card_sampling",
    "compose",
    "evaluate",
    "fit_latent_prior",
    "kl_standard_normal",
    "load_fundus_dataset",
    "load_images",
    "load_proposal_model",
    "make_disk_images",
    "make_pairs",
    "normalise_image",
    "proposal_figure",
    "propose_next_steps",
    "sample_batch",
    "sample_latent",
    "sample_proposals",
    "save_proposal_model",
    "train",
]
