"""Probabilistic partial-segmentation proposals (Wong, Guttag, Dalca, NeurIPS 2022 workshop).

Given an image ``x_0`` and the partial segmentation so far (a partialness mask ``x_m``: the
pixels already decided, and a segmentation mask ``x_s``: which of them are foreground), a
conditional VAE samples several *larger* partial segmentations ``(y^_m, y^_s)``; the user
picks one, corrects it and asks again.

* Encoder ``q(z | x, y)`` and decoder ``g(z, x)`` follow the paper's Section 3 (Setup).
* Loss (paper Eq. 3): ``WDL(y_s, y^_s, y_m - x_m) + beta0 DL(y_m, y^_m) + beta1 KL``.
* Constraints, by construction (see :func:`compose`): ``y^_m >= x_m``, ``y^_s = x_s`` on
  ``x_m``, and ``y^_s <= y^_m`` (segmentation only where the partialness mask is on).

The public entry points are :func:`load_proposal_model` and :func:`propose_next_steps`;
:func:`add_commands` registers ``proposals-train`` / ``proposals-eval`` on the CLI.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss, MaskedDiceLoss
from monai.networks.blocks import Convolution
from torch import nn

from OAIMSSegment.errors import DatasetError, InvalidImageError, ModelError
from OAIMSSegment.proposals_data import (
    ImageSet,
    load_fundus_dataset,
    make_disk_images,
    make_pairs,
    normalise_image,
)

#: Shipped models: ``<name>.pt`` (weights) beside ``<name>.json`` (model card).
MODELS_DIR = Path(__file__).resolve().parent.parent / "Resources" / "Models"
#: Format tag stored in every weights file.
WEIGHTS_FORMAT = "oaims-proposals-v1"


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


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


def compose(logits: torch.Tensor, x_m: torch.Tensor, x_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft proposal under the paper's constraints.

    With ``p_m = sigmoid(a_m)`` (probability that a pixel is decided) and ``p_s = sigmoid(a_s)``
    (probability that a decided pixel is foreground):
    ``y^_m = x_m + (1 - x_m) p_m`` and ``y^_s = x_m x_s + (1 - x_m) p_m p_s``, so that
    ``y^_m >= x_m``, ``y^_s = x_s`` on ``x_m`` and ``y^_s <= y^_m`` hold for any weights.

    Args:
        logits: ``(B, 2, H, W)``; x_m, x_s: ``(B, 1, H, W)`` in {0, 1}, ``x_s <= x_m``.

    Returns:
        ``(y^_m, y^_s)``, each ``(B, 1, H, W)`` in ``[0, 1]``.
    """
    p_m, p_s = torch.sigmoid(logits[:, :1]), torch.sigmoid(logits[:, 1:2])
    free = 1.0 - x_m
    return x_m + free * p_m, x_m * x_s + free * p_m * p_s


def binarise(logits: torch.Tensor, x_m: torch.Tensor, x_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard proposal: ``m = x_m | p_m > 1/2``; ``s = x_s`` on ``x_m``, else ``m & p_s > 1/2``.

    Same shapes as :func:`compose`; returns bool tensors with ``m >= x_m``, ``s = x_s`` on ``x_m``, ``s <= m``.
    """
    known, seg = x_m > 0.5, x_s > 0.5
    m = known | (logits[:, :1] > 0)
    return m, torch.where(known, seg, m & (logits[:, 1:2] > 0))


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Loading and saving
# --------------------------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_proposal_model(model: ProposalModel, path: Path, card: dict[str, Any]) -> dict[str, Any]:
    """Write ``path`` (weights + config) and ``path.with_suffix('.json')`` (card with its sha256).

    Returns the card as written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = asdict(model.config)
    config["encoder_channels"] = list(config["encoder_channels"])
    torch.save({"format": WEIGHTS_FORMAT, "config": config, "state_dict": model.state_dict()}, path)
    card = {**card, "weights": path.name, "config": config, "sha256": sha256_of(path)}
    path.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    return card


def _resolve(name_or_path: str | Path) -> tuple[Path, Path | None]:
    """Weights path and card path (None when a user's file has no card beside it)."""
    text = str(name_or_path)
    if "/" not in text and "\\" not in text and not text.endswith(".pt"):
        weights, card = MODELS_DIR / f"{text}.pt", MODELS_DIR / f"{text}.json"
        if not card.is_file() or not weights.is_file():
            known = sorted(p.stem for p in MODELS_DIR.glob("proposals-*.json"))
            raise ModelError(f"unknown proposal model {text!r}; shipped: {', '.join(known) or 'none'}")
        return weights, card
    weights = Path(text)
    if not weights.is_file():
        raise ModelError(f"proposal model file {weights} does not exist")
    card = weights.with_suffix(".json")
    return weights, card if card.is_file() else None


def load_proposal_model(name_or_path: str | Path = "proposals-synthetic-disks") -> ProposalModel:
    """A trained proposal model in eval mode, its card (or ``{}``) in ``model.card``.

    Args:
        name_or_path: a shipped model's name (``Resources/Models/<name>.pt`` + ``.json``) or
            a path to a ``.pt`` written by ``proposals-train``; a card beside it is checked.

    Raises:
        ModelError: unknown name, missing or unreadable file, sha256 differing from the card,
            or weights that do not fit the architecture.
    """
    weights, card_path = _resolve(name_or_path)
    card: dict[str, Any] = {}
    if card_path is not None:
        try:
            card = json.loads(card_path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ModelError(f"cannot read model card {card_path}: {error}") from error
        actual = sha256_of(weights)
        if card.get("sha256") != actual:
            raise ModelError(f"{weights.name}: sha256 {actual} does not match its card ({card.get('sha256')})")
    try:
        blob = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a corrupt or foreign file
        raise ModelError(f"cannot load proposal weights {weights}: {error}") from error
    if not isinstance(blob, dict) or blob.get("format") != WEIGHTS_FORMAT:
        raise ModelError(f"{weights} is not a proposal model ({WEIGHTS_FORMAT})")
    try:
        config = dict(blob["config"])
        config["encoder_channels"] = tuple(config["encoder_channels"])
        model = ProposalModel(ProposalConfig(**config))
        model.load_state_dict(blob["state_dict"])
    except (KeyError, TypeError, RuntimeError) as error:
        raise ModelError(f"{weights}: weights do not fit the proposal architecture: {error}") from error
    model.card = card
    return model.eval()


# --------------------------------------------------------------------------------------------
# Inference API
# --------------------------------------------------------------------------------------------


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
        image = image[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
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
def sample_proposals(model: ProposalModel, x: torch.Tensor, k: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` decoder samples with ``z ~ N(0, I)`` for each input.

    Args:
        x: ``(B, 3, S, S)`` = image, ``x_m``, ``x_s``.

    Returns:
        ``(logits (B, k, 2, S, S), m (B, k, S, S) bool, s (B, k, S, S) bool)`` -- the latter two
        from :func:`binarise`.
    """
    b, size = x.shape[0], x.shape[-1]
    z = model.prior_sample(b * k, generator)
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

    Returns:
        ``k`` :class:`Proposal` in the input grid. The image and masks are resized to the
        model's input (linear for the image, nearest for masks); the proposal's logits are
        resized back linearly and thresholded, and the input partial segmentation is then
        re-imposed at the original resolution, so the constraints hold exactly.

    Raises:
        InvalidImageError: not 2D, too small, non-finite, or masks of another shape.
        ValueError: ``k < 1``.
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
    logits, _, _ = sample_proposals(model.eval(), x, k, generator)
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


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


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
    x = np.stack([image, pairs["x_m"], pairs["x_s"]], axis=1).astype(np.float32)
    y = np.stack([pairs["y_m"], pairs["y_s"]], axis=1).astype(np.float32)
    return {"x": torch.from_numpy(x), "y": torch.from_numpy(y)}


def load_images(data: str, split: str, size: int, n: int, seed: int) -> ImageSet:
    """Images for ``--data``: ``"synthetic"`` (``n`` disk images, seeded) or a dataset folder.

    Training and evaluation draw disk images from different seed streams (``split`` "Tr"
    or "Ts"), so evaluation images are held out.

    Raises:
        DatasetError: a folder that is not a readable 2D nnU-Net dataset.
    """
    if data == "synthetic":
        stream = {"Tr": 0, "Ts": 1}[split]
        return make_disk_images(n, size, np.random.default_rng([seed, stream]))
    root = Path(data)
    if not root.is_dir():
        raise DatasetError(f"--data must be 'synthetic' or a dataset folder; {root} is not a folder")
    return load_fundus_dataset(root, split, size)


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
) -> tuple[ProposalModel, list[dict[str, float]]]:
    """Train the CVAE with Adam on Eq. 3 (beta0 = 1, beta1 = 1e-3).

    Returns the model (eval mode) and the log: one ``{"step", "loss", "wdl", "dl", "kl"}``
    per ``log_every`` steps, each averaged over those steps.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 2])
    model = ProposalModel(config)
    loss_fn = ProposalLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    log: list[dict[str, float]] = []
    sums: dict[str, float] = {}
    start = time.time()
    model.train()
    for step in range(1, steps + 1):
        data = sample_batch(images, batch, rng, augment, growth)
        x, y = data["x"], data["y"]
        logits, mu, logvar = model(x, y)
        pred_m, pred_s = compose(logits, x[:, 1:2], x[:, 2:3])
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


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def _dice(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Binary Dice along the last axis: ``pred (P, N)``, ``target (C, N)`` -> ``(P, C)``; 1 when both are empty."""
    inter = pred.astype(np.int64) @ target.T.astype(np.int64)
    total = pred.sum(axis=1)[:, None] + target.sum(axis=1)[None, :]
    return np.where(total == 0, 1.0, 2.0 * inter / np.maximum(total, 1))


def evaluate(
    model: ProposalModel, images: ImageSet, n: int, k: int, seed: int, chunk: int = 100, growth: str = "random"
) -> dict[str, Any]:
    """The paper's evaluation, plus stricter views of the same proposals.

    ``n`` inputs (image ``i % N``, a random ground truth, a random input partial
    segmentation from :func:`make_pairs`), ``k`` proposals each with ``z ~ N(0, I)``. For a
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
        x = torch.from_numpy(np.stack([images.images[indices], pairs["x_m"], pairs["x_s"]], axis=1).astype(np.float32))
        _, m, s = sample_proposals(model, x, k, generator)
        m, s = m.numpy(), s.numpy()
        y = torch.from_numpy(np.stack([pairs["y_m"], pairs["y_s"]], axis=1).astype(np.float32))
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
                dice = _dice(fg[added][None], candidates[:, added])[0]
                totals["any"].append(float(dice.max()))
                totals["consistent"].append(float(dice[consistent_ids].max()))
                totals["true"].append(float(_dice(fg[added][None], gt[row][added][None])[0, 0]))
    mean = lambda values: float(np.mean(values)) if values else math.nan  # noqa: E731
    return {
        "n_inputs": n,
        "n_images": int(min(n, images.images.shape[0])),
        "k": k,
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


def proposal_figure(model: ProposalModel, images: ImageSet, path: Path, seed: int, rows: int = 5, k: int = 4) -> None:
    """A figure like the paper's Figure 3: per row the input partial segmentation, ``k`` proposals
    and the ground truth the input was cut from; foreground red, background blue, over the image.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng([seed, 4])
    indices = rng.choice(images.images.shape[0], size=rows, replace=rows > images.images.shape[0])
    gt = images.sample_ground_truths(indices, rng)
    pairs = make_pairs(gt, rng)
    x = torch.from_numpy(np.stack([images.images[indices], pairs["x_m"], pairs["x_s"]], axis=1).astype(np.float32))
    _, m, s = sample_proposals(model, x, k, torch.Generator().manual_seed(seed))

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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse then reports bad values as ``error: ...``, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _train_command(args: argparse.Namespace) -> int:
    """``proposals-train``: train, then write MODEL.pt and its card MODEL.json."""
    synthetic = args.data == "synthetic"
    size = args.size or (32 if synthetic else 64)
    if size % 8:
        raise ModelError(f"--size must be a multiple of 8, got {size}")
    torch.set_num_threads(args.threads)
    images = load_images(args.data, "Tr", size, args.train_images, args.seed)
    started = time.time()
    config = ProposalConfig(input_size=size)
    model, log = train(images, args.steps, args.seed, args.batch_size, args.lr, not synthetic, config, args.growth)
    command = (
        f"python -m OAIMSSegment proposals-train --out {args.out} --data {args.data} --steps {args.steps}"
        f" --seed {args.seed} --batch-size {args.batch_size} --lr {args.lr} --size {size} --growth {args.growth}"
        + (f" --train-images {args.train_images}" if synthetic else "")
    )
    card = {
        "name": Path(args.out).stem,
        "task": "probabilistic partial-segmentation proposals (Wong, Guttag, Dalca 2022), conditional VAE",
        "data": "synthetic disks, paper Section 3" if synthetic else f"{Path(args.data).name} imagesTr (luminance), disc or cup",
        "input_size": [size, size],
        "input": "image normalised to [0, 1] (percentiles 0.5 / 99.5), partialness mask x_m, segmentation mask x_s",
        "output": "partialness mask y^_m >= x_m, segmentation mask y^_s (= x_s on x_m, inside y^_m)",
        "training_command": command,
        "seed": args.seed,
        "growth": args.growth,
        "steps": args.steps,
        "train_images": int(images.images.shape[0]),
        "train_seconds": round(time.time() - started, 1),
        "final_loss": log[-1],
        "torch": torch.__version__,
        "created": datetime.date.today().isoformat(),
    }
    card = save_proposal_model(model, Path(args.out), card)
    print(f"wrote {args.out} (sha256 {card['sha256'][:12]}...) and {Path(args.out).with_suffix('.json')}")
    return 0


def _eval_command(args: argparse.Namespace) -> int:
    """``proposals-eval``: the paper's metrics on held-out inputs; optional JSON, figure and card update."""
    torch.set_num_threads(args.threads)
    model = load_proposal_model(args.model)
    size = model.config.input_size
    images = load_images(args.data, "Ts", size, args.n, args.seed)
    started = time.time()
    metrics = evaluate(model, images, args.n, args.k, args.seed, growth=model.card.get("growth", "random"))
    metrics["seconds"] = round(time.time() - started, 1)
    metrics["command"] = (
        f"python -m OAIMSSegment proposals-eval --model {args.model} --data {args.data} --n {args.n} --k {args.k} --seed {args.seed}"
    )
    print(json.dumps(metrics, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(metrics, indent=2) + "\n")
    if args.figure:
        proposal_figure(model, images, Path(args.figure), args.seed)
    if args.update_card:
        _, card_path = _resolve(args.model)
        if card_path is None:
            raise ModelError(f"{args.model} has no model card to update")
        card = json.loads(card_path.read_text())
        card.setdefault("metrics", {})[args.data if args.data == "synthetic" else Path(args.data).name] = metrics
        card_path.write_text(json.dumps(card, indent=2) + "\n")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``proposals-train`` and ``proposals-eval``; each parser's ``func`` returns an exit code."""
    train_parser = subparsers.add_parser("proposals-train", help="train the probabilistic partial-segmentation model")
    train_parser.add_argument("--out", required=True, help="weights file MODEL.pt (its card goes to MODEL.json)")
    train_parser.add_argument("--data", default="synthetic", help="'synthetic' (paper's disks) or a 2D nnU-Net dataset folder")
    train_parser.add_argument("--steps", type=_positive_int, default=3000)
    train_parser.add_argument("--seed", type=int, default=0)
    train_parser.add_argument("--batch-size", type=_positive_int, default=64)
    train_parser.add_argument("--lr", type=float, default=1e-3)
    train_parser.add_argument("--size", type=int, default=0, help="model input side (default 32 synthetic, 64 dataset)")
    train_parser.add_argument("--train-images", type=_positive_int, default=1000, help="synthetic training images (paper: 1,000)")
    train_parser.add_argument(
        "--growth", choices=("random", "border"), default="random", help="target growth: 'random' (paper) or at the border of x_m"
    )
    train_parser.add_argument("--threads", type=_positive_int, default=1, help="torch CPU threads")
    train_parser.set_defaults(func=_train_command)

    eval_parser = subparsers.add_parser("proposals-eval", help="evaluate proposals on held-out inputs (paper Section 3)")
    eval_parser.add_argument("--model", default="proposals-synthetic-disks", help="shipped model name or MODEL.pt")
    eval_parser.add_argument("--data", default="synthetic", help="'synthetic' or a 2D nnU-Net dataset folder (its imagesTs)")
    eval_parser.add_argument("--n", type=_positive_int, default=1000, help="held-out inputs (paper: 1,000)")
    eval_parser.add_argument("--k", type=_positive_int, default=3, help="proposals per input")
    eval_parser.add_argument("--seed", type=int, default=0)
    eval_parser.add_argument("--json", help="write the metrics to OUT.json")
    eval_parser.add_argument("--figure", help="write a Figure-3-like PNG")
    eval_parser.add_argument("--update-card", action="store_true", help="record the metrics in the model card")
    eval_parser.add_argument("--threads", type=_positive_int, default=1, help="torch CPU threads")
    eval_parser.set_defaults(func=_eval_command)
