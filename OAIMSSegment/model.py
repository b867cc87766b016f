"""The click-guided segmentation network, its model card, and image preparation.

A model is a MONAI U-Net whose input is the image channels plus one guidance map per
class (:func:`OAIMSSegment.clicks.guidance_maps`) and whose output is one logit (binary)
or K logits (multi-class). Everything a caller needs to know about the data the model
expects lives in its :class:`ModelCard`, and the engine applies it: intensity
normalisation, the working resolution, padding to the network's size multiple. Callers
pass raw images and pixel clicks in the image's own coordinates.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import UNet
from torch import nn

from OAIMSSegment.clicks import Click, guidance_maps, validate_click
from OAIMSSegment.errors import InvalidImageError, ModelError
from OAIMSSegment.files import atomic_write_bytes, atomic_write_text, sha256_bytes, sha256_file


def _shipped_models_dir() -> Path:
    """Where the shipped models are: ``OAIMSSegment/Models`` in an installed package (``pip
    install .`` maps ``Resources/Models`` there), else ``Resources/Models`` of the repository
    (the Slicer extension's layout)."""
    package = Path(__file__).resolve().parent
    installed = package / "Models"
    return installed if installed.is_dir() else package.parent / "Resources" / "Models"


#: Shipped model cards and weights (segmentation and proposal models).
MODELS_DIR = _shipped_models_dir()

#: A card's ``"kind"``: a click-guided segmentation model (:class:`ModelCard`) or a proposal
#: model (:mod:`OAIMSSegment.proposals`).
SEGMENTER_KIND = "click-segmenter"
PROPOSALS_KIND = "proposals"

NORMALIZATIONS = ("zscore_nonzero", "zscore", "robust_percentile")

#: Smallest image side the engine accepts (a U-Net with four 2x down-samplings needs 16 px).
MIN_SIDE = 16


@dataclass
class ModelCard:
    """What a model is and what data it expects.

    Attributes:
        name: short identifier, e.g. ``"brain-lesion-flair"``.
        task: one line a clinician understands.
        image_channels: number of image channels (1 for MRI, 3 for RGB fundus photos).
        channel_names: one name per image channel.
        labels: class name -> index; ``"background": 0`` always present.
        normalization: ``"zscore_nonzero"`` (MRI: 0.5-99.5 percentile clip and z-score over
            non-zero pixels, zero background kept at 0), ``"zscore"`` (per channel, all pixels) or
            ``"robust_percentile"`` (per channel: clip to the image's own 0.5-99.5 percentiles, then
            z-score over all pixels; assumes no background value, skull stripping, bit depth or
            scale, and is invariant to any increasing affine change of intensities).
        guidance_sigma: Gaussian smoothing of the click guidance maps, in working pixels.
        working_size: ``None`` to segment at the image's native resolution, or a side length
            in pixels: the image's longer side is resized to it (aspect kept) before the network.
        max_side: at native resolution, larger images are down-scaled to this longer side
            (bounded memory and latency).
        network: keyword arguments of :class:`monai.networks.nets.UNet` (channels, strides,
            num_res_units, norm).
        weights: weights file name, relative to the card.
        sha256: SHA-256 of the weights file.
        training: how the weights were made (dataset, command, seed, steps).
        metrics: measured quality (e.g. Dice after 1/5/10 simulated clicks).
        adaptation_lr: Adam learning rate of online adaptation chosen for this model (by a
            sweep on data the benchmarks do not use, recorded in ``docs/BENCHMARKS.md``);
            None: the engine's default.
        kind: always :data:`SEGMENTER_KIND` (tells this card from a proposal model's).
    """

    name: str
    task: str
    image_channels: int
    labels: dict[str, int]
    normalization: str = "zscore_nonzero"
    channel_names: list[str] = field(default_factory=list)
    guidance_sigma: float = 5.0
    working_size: int | None = None
    max_side: int = 512
    network: dict[str, Any] = field(
        default_factory=lambda: {
            "channels": [16, 32, 64, 128, 256],
            "strides": [2, 2, 2, 2],
            "num_res_units": 2,
            "norm": "instance",
        }
    )
    weights: str = ""
    sha256: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    adaptation_lr: float | None = None
    kind: str = SEGMENTER_KIND

    def __post_init__(self) -> None:
        if self.kind != SEGMENTER_KIND:
            raise ModelError(f"model card {self.name!r}: kind must be {SEGMENTER_KIND!r}, got {self.kind!r}")
        if self.labels.get("background") != 0:
            raise ModelError(f"model card {self.name!r}: labels must map 'background' to 0, got {self.labels}")
        if sorted(self.labels.values()) != list(range(len(self.labels))):
            raise ModelError(f"model card {self.name!r}: label indices must be 0..K-1, got {self.labels}")
        if self.normalization not in NORMALIZATIONS:
            raise ModelError(f"model card {self.name!r}: unknown normalization {self.normalization!r}")
        if self.image_channels < 1:
            raise ModelError(f"model card {self.name!r}: image_channels must be >= 1")
        if self.working_size is not None and self.working_size < MIN_SIDE:
            raise ModelError(
                f"model card {self.name!r}: working_size must be >= {MIN_SIDE} px (or null for native), "
                f"got {self.working_size}"
            )
        if self.adaptation_lr is not None and not 0.0 < self.adaptation_lr < 1.0:
            raise ModelError(f"model card {self.name!r}: adaptation_lr must be in (0, 1), got {self.adaptation_lr}")

    @property
    def num_classes(self) -> int:
        """Classes including background (2 for a binary model)."""
        return len(self.labels)

    @property
    def binary(self) -> bool:
        return self.num_classes == 2

    @property
    def size_multiple(self) -> int:
        return int(np.prod(self.network["strides"]))

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelCard":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as error:
            raise ModelError(f"cannot read model card {path}: {error}") from error
        if not isinstance(data, dict):
            raise ModelError(f"cannot read model card {path}: not a JSON object")
        if card_kind(data) != SEGMENTER_KIND:
            raise ModelError(f"{path} is the card of a {card_kind(data)!r} model, not of a segmentation model")
        try:
            return cls(**data)
        except (ValueError, TypeError) as error:
            raise ModelError(f"cannot read model card {path}: {error}") from error

    def to_json(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(asdict(self), indent=2) + "\n")


@dataclass
class PreparedImage:
    """An image in the network's working space.

    Attributes:
        tensor: normalised image ``(1, C, Hp, Wp)``, zero-padded to the network's multiple.
        original_shape: ``(H, W)`` of the caller's image.
        working_shape: ``(h, w)`` after resizing, before padding.
        scale: working pixels per original pixel.
    """

    tensor: torch.Tensor
    original_shape: tuple[int, int]
    working_shape: tuple[int, int]
    scale: float

    def to_working(self, position: Sequence[float]) -> tuple[int, int]:
        """Original pixel index ``(row, col)`` -> working pixel index (pixel centres map to pixel centres)."""
        h, w = self.working_shape
        row = min(h - 1, max(0, int(math.floor((position[0] + 0.5) * self.scale))))
        col = min(w - 1, max(0, int(math.floor((position[1] + 0.5) * self.scale))))
        return row, col

    def mask_to_working(self, mask: np.ndarray) -> torch.Tensor:
        """Class map ``(H, W)`` -> padded working class map ``(Hp, Wp)`` (long).

        Resampled like the image (pixel centres to pixel centres, anti-aliased when shrinking):
        one-hot, bilinear, then the majority class per working pixel. torch's ``"nearest"``
        mode samples at ``floor(i * H / h)`` instead, which shifts a shrunk mask by almost half
        a working pixel against the image and caps a 240 -> 128 px mask at 0.90 Dice."""
        labels = torch.as_tensor(np.asarray(mask, dtype=np.int64), device=self.tensor.device)
        tensor = labels[None, None].float()
        if self.working_shape != self.original_shape:
            one_hot = F.one_hot(labels, int(labels.max()) + 1).permute(2, 0, 1)[None].float()
            shrink = self.working_shape[0] < self.original_shape[0]
            resized = F.interpolate(one_hot, size=self.working_shape, mode="bilinear", align_corners=False, antialias=shrink)
            tensor = class_map(resized, dim=1)[:, None].float()
        padded = self.tensor.new_zeros((1, 1, *self.tensor.shape[-2:]))
        padded[..., : self.working_shape[0], : self.working_shape[1]] = tensor
        return padded[0, 0].long()

    def logits_to_original(self, logits: torch.Tensor) -> torch.Tensor:
        """Padded working logits ``(1, L, Hp, Wp)`` -> logits at the original size ``(1, L, H, W)``."""
        cropped = logits[..., : self.working_shape[0], : self.working_shape[1]]
        if self.working_shape == self.original_shape:
            return cropped
        return F.interpolate(cropped, size=self.original_shape, mode="bilinear", align_corners=False)


class ClickSegmenter(nn.Module):
    """Click-guided U-Net (ICNN-style input: image channels + one guidance map per class).

    ``forward(x)`` takes ``(B, C + K, H, W)`` with H, W multiples of ``card.size_multiple``
    and returns logits ``(B, 1, H, W)`` (binary) or ``(B, K, H, W)``.
    """

    def __init__(self, card: ModelCard) -> None:
        super().__init__()
        self.card = card
        net = dict(card.network)
        self.net = UNet(
            spatial_dims=2,
            in_channels=card.image_channels + card.num_classes,
            out_channels=1 if card.binary else card.num_classes,
            channels=tuple(net["channels"]),
            strides=tuple(net["strides"]),
            num_res_units=int(net.get("num_res_units", 2)),
            # Instance norm: online updates run on one image at a time, where batch norm's
            # statistics would be meaningless.
            norm=net.get("norm", "instance"),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @property
    def device(self) -> torch.device:
        """Where the weights are (``OAIMSSegment.device.resolve_device``); prepared images go there too."""
        return next(self.parameters()).device

    # -- images -----------------------------------------------------------------------------

    def prepare(self, image: np.ndarray) -> PreparedImage:
        """Validate, normalise, resize and pad a raw image.

        Args:
            image: ``(H, W)`` for single-channel models or channels-first ``(C, H, W)``, any
                numeric dtype, raw intensities (normalisation is the card's, applied here).

        Raises:
            InvalidImageError: wrong dimensionality or channel count, non-finite values,
                constant image, or smaller than 16 px.
        """
        card = self.card
        array = np.asarray(image)
        if array.dtype == bool or not np.issubdtype(array.dtype, np.number):
            raise InvalidImageError(f"image must be numeric, got dtype {array.dtype}")
        if array.ndim == 2:
            array = array[None]
        if array.ndim != 3:
            raise InvalidImageError(
                f"expected a 2D image (H, W) or (C, H, W), got an array of shape {tuple(np.shape(image))}"
            )
        if array.shape[0] != card.image_channels:
            raise InvalidImageError(
                f"model {card.name!r} expects {card.image_channels} image channel(s) "
                f"({', '.join(card.channel_names) or 'n/a'}), got {array.shape[0]} (shape {tuple(array.shape)})"
            )
        height, width = array.shape[1:]
        if min(height, width) < MIN_SIDE:
            raise InvalidImageError(f"image is {height}x{width} px; the smallest supported side is {MIN_SIDE} px")
        array = array.astype(np.float32)
        if not np.isfinite(array).all():
            raise InvalidImageError("image contains NaN or infinite values")
        if float(array.max() - array.min()) == 0.0:
            raise InvalidImageError("image is constant (every pixel the same): there is nothing to segment")

        tensor = torch.from_numpy(normalize(array, card.normalization))[None].to(self.device)
        longer = max(height, width)
        target = card.working_size or min(longer, card.max_side)
        scale = target / longer
        working = (height, width)
        if target != longer:
            working = (max(1, round(height * scale)), max(1, round(width * scale)))
            tensor = F.interpolate(tensor, size=working, mode="bilinear", align_corners=False, antialias=scale < 1)
        multiple = card.size_multiple
        padded = [math.ceil(n / multiple) * multiple for n in working]
        tensor = F.pad(tensor, (0, padded[1] - working[1], 0, padded[0] - working[0]))
        return PreparedImage(tensor.contiguous(), (height, width), working, scale)

    def guidance(self, prepared: PreparedImage, clicks: Sequence[Click]) -> torch.Tensor:
        """Guidance maps ``(1, K, Hp, Wp)`` for clicks given in *working* coordinates."""
        return guidance_maps(clicks, prepared.tensor.shape[-2:], self.card.num_classes, self.card.guidance_sigma,
                             device=prepared.tensor.device)[None]

    def logits(self, prepared: PreparedImage, clicks: Sequence[Click]) -> torch.Tensor:
        """Working-space logits ``(1, 1|K, Hp, Wp)`` for working-space clicks."""
        return self(torch.cat([prepared.tensor, self.guidance(prepared, clicks)], dim=1))

    def working_click(self, prepared: PreparedImage, click: Click) -> Click:
        """Validate a click in original pixel coordinates and map it to working coordinates."""
        click = validate_click(click, prepared.original_shape, self.card.num_classes)
        return Click(prepared.to_working(click.position), click.label)


def normalize(array: np.ndarray, method: str) -> np.ndarray:
    """Intensity normalisation of a ``(C, H, W)`` float32 array (see :class:`ModelCard`).

    Raises:
        InvalidImageError: ``"robust_percentile"`` given a channel that is empty or not finite,
            or an image whose every channel is constant (nothing it could scale); one constant
            channel of a multi-channel image becomes 0.
    """
    if method == "robust_percentile":
        flat = [channel.size > 0 and float(channel.max()) == float(channel.min()) for channel in array]
        if len(array) > 1 and not all(flat):
            # a constant channel of a colour photograph (an empty blue channel) carries nothing: 0, as zscore gives it
            return np.stack([np.zeros_like(channel) if constant else robust_percentile(channel)
                             for channel, constant in zip(array, flat)])
        return np.stack([robust_percentile(channel) for channel in array])
    out = np.zeros_like(array)
    for c, channel in enumerate(array):
        if method == "zscore_nonzero":
            foreground = channel != 0
            if foreground.sum() < 16:
                foreground = np.ones_like(foreground)
            values = channel[foreground]
            low, high = np.percentile(values, [0.5, 99.5])
            clipped = np.clip(values, low, high)
            out[c][foreground] = (clipped - clipped.mean()) / max(float(clipped.std()), 1e-6)
        else:
            out[c] = (channel - channel.mean()) / max(float(channel.std()), 1e-6)
    return out


#: Percentiles that ``"robust_percentile"`` clips each channel to (outliers, hot pixels, skull fat).
ROBUST_PERCENTILES = (0.5, 99.5)


def robust_percentile(channel: np.ndarray) -> np.ndarray:
    """One channel ``(H, W)``, any scale -> clipped to its own 0.5-99.5 percentiles and z-scored
    over all pixels (float32). Any map ``a * x + b`` with ``a > 0`` leaves the result unchanged, so
    it needs no background value, bit depth or intensity unit. When the percentiles coincide (a
    mostly constant image with a small structure) the clip falls back to the full range.

    Raises:
        InvalidImageError: the channel is empty, has a NaN or infinite value, or is constant.
    """
    values = np.asarray(channel, dtype=np.float64)
    if values.size == 0:
        raise InvalidImageError("image is empty (no pixels)")
    if not np.isfinite(values).all():
        raise InvalidImageError("image contains NaN or infinite values: robust_percentile cannot normalise it")
    low, high = np.percentile(values, ROBUST_PERCENTILES)
    if high <= low:
        low, high = float(values.min()), float(values.max())
    if high <= low:
        raise InvalidImageError("image is constant (every pixel the same): robust_percentile cannot normalise it")
    clipped = (np.clip(values, low, high) - low) / (high - low)
    return ((clipped - clipped.mean()) / max(float(clipped.std()), 1e-6)).astype(np.float32)


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities ``(B, K, H, W)`` from one-logit (sigmoid) or K-logit (softmax) outputs."""
    if logits.shape[1] == 1:
        foreground = torch.sigmoid(logits)
        return torch.cat([1.0 - foreground, foreground], dim=1)
    return torch.softmax(logits, dim=1)


def class_map(scores: torch.Tensor, dim: int) -> torch.Tensor:
    """Index (long) of the largest score along ``dim``: ``torch.argmax`` (the first of tied
    maxima; a NaN counts as the maximum), from ``Tensor.max``, which returns the same indices
    and on a CPU runs 20-40x faster across a channel axis (25 ms against 0.6 ms for
    ``(2, 256, 256)`` in torch 2.13, one thread; issue 21)."""
    return scores.max(dim=dim).indices


def hard_labels(logits: torch.Tensor) -> torch.Tensor:
    """Class map ``(B, H, W)`` (long) from logits."""
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).long()
    return class_map(logits, dim=1)


# -- files ----------------------------------------------------------------------------------


def save_model(model: ClickSegmenter, weights_path: str | Path, **card_updates: Any) -> ModelCard:
    """Save weights (atomically) and a card beside them (``<weights>.json``) with their sha256."""
    weights_path = Path(weights_path)
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
    data = buffer.getvalue()
    atomic_write_bytes(weights_path, data)
    card = ModelCard(**{**asdict(model.card), **card_updates})
    card.weights = weights_path.name
    card.sha256 = sha256_bytes(data)
    card.to_json(weights_path.with_suffix(".json"))
    model.card = card
    return card


def card_kind(card: dict[str, Any]) -> str:
    """The kind of model a card describes: its ``"kind"``; a legacy card without one is a
    segmentation model when it has ``image_channels`` and ``labels``, else a proposal model."""
    if "kind" in card:
        return str(card["kind"])
    return SEGMENTER_KIND if "image_channels" in card and "labels" in card else PROPOSALS_KIND


def shipped_cards(kind: str, models_dir: str | Path = MODELS_DIR) -> list[tuple[Path, dict[str, Any]]]:
    """``(card path, card)`` of each model card of ``kind`` in ``models_dir``, sorted by model name
    (the file stem: ``fundus-disc-cup`` before ``fundus-disc-cup-robust``, which a sort of whole file
    names reverses, ``-`` sorting before ``.``)."""
    cards = []
    for path in sorted(Path(models_dir).glob("*.json"), key=lambda card_path: card_path.stem):
        card = json.loads(path.read_text())
        if card_kind(card) == kind:
            cards.append((path, card))
    return cards


def list_models(models_dir: str | Path = MODELS_DIR) -> list[ModelCard]:
    """Cards of the segmentation models shipped in ``Resources/Models`` (proposal models excluded)."""
    return [ModelCard.from_json(path) for path, _ in shipped_cards(SEGMENTER_KIND, models_dir)]


def load_model(name_or_path: str | Path, models_dir: str | Path = MODELS_DIR) -> ClickSegmenter:
    """Load a shipped model by name, or a card (``.json``) / weights (``.pt``, card beside it) by path.

    The card must hold the weights' sha256 and it must match; weights are loaded with ``weights_only=True``
    (no pickled code is ever executed).

    Raises:
        ModelError: unknown name, missing files, a card without a sha256, checksum mismatch,
            or weights that do not fit the card's architecture.
    """
    path = Path(name_or_path)
    if path.suffix == ".pt":
        card_path = path.with_suffix(".json")
    elif path.suffix == ".json":
        card_path = path
    else:
        card_path = Path(models_dir) / f"{name_or_path}.json"
        if not card_path.exists():
            known = ", ".join(card.name for card in list_models(models_dir)) or "none"
            raise ModelError(f"unknown model {str(name_or_path)!r}; shipped models: {known}")
    if not card_path.exists():
        raise ModelError(f"model card {card_path} not found (a weights file needs its card beside it)")
    card = ModelCard.from_json(card_path)
    weights_path = card_path.parent / card.weights
    if not weights_path.is_file():
        raise ModelError(f"weights file {weights_path} of model {card.name!r} not found")
    if not isinstance(card.sha256, str) or len(card.sha256) != 64:
        raise ModelError(
            f"model card {card_path} has no sha256 of its weights ({card.sha256!r}): "
            "weights that cannot be verified are not loaded (save_model writes the checksum)"
        )
    if sha256_file(weights_path) != card.sha256:
        raise ModelError(f"weights {weights_path} do not match the sha256 in the card of {card.name!r} (corrupt or replaced)")
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means unusable weights
        raise ModelError(f"cannot load weights {weights_path}: {error}") from error
    model = ClickSegmenter(card)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as error:
        raise ModelError(f"weights {weights_path} do not fit the architecture of {card.name!r}: {error}") from error
    model.eval()
    return model
