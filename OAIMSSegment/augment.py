"""Named, seeded training augmentation recipes (MONAI transforms) for pretraining.

A recipe acts on one training item in the model's working space: a normalised image
``(C, H, W)`` and its class map ``(H, W)``. Intensity transforms run on the image rescaled to
[0, 1] (positive values, as a scanner writes them: a bias field multiplies, a gamma curve
needs non-negative input), and the result is normalised again with the card's method, so
the network sees exactly what inference would give it for such a scan. Spatial transforms
move image and label together (bilinear image, nearest label).

Every call takes its randomness from the caller's ``numpy.random.Generator``, so a seeded
(and resumed) run draws the same augmentations.

``"fundus"`` is the recipe for RGB photographs: the per-image, per-channel normalisation
(``robust_percentile``) already removes what a camera's exposure and white balance do (a gain
and an offset per channel), so the recipe draws what it cannot remove: a tone curve per channel,
saturation and hue (mixing of the channels), uneven illumination and vignetting (a smooth
multiplicative field), defocus blur, sensor noise, JPEG compression, and another field of view
(scale, zoom, rotation).

``"sequences"`` is ``"scanner"`` plus random *non-monotone* intensity maps (:class:`RandGlobalIntensityNonlineard`,
the GIN augmentation of Ouyang et al., "Causality-inspired single-source domain generalization for medical image
segmentation", IEEE TMI 2022): another MR sequence does not just bend the intensity scale (which a monotone curve
covers) but reorders the tissues (FLAIR's bright lesion and dark CSF against T1's dark lesion and dark CSF), and a
shallow random convolutional network with leaky ReLUs draws such reorderings, with local texture changes.
"""

from __future__ import annotations

import math
from typing import Callable, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import (
    Compose,
    MapTransform,
    RandomizableTransform,
    RandAdjustContrastd,
    RandAffined,
    RandBiasFieldd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandGibbsNoised,
    RandHistogramShiftd,
    RandZoomd,
)

from OAIMSSegment.colour import jpeg
from OAIMSSegment.errors import InvalidImageError, ModelError
from OAIMSSegment.model import normalize


def _scanner_intensities() -> Compose:
    """What another scanner, sequence or site does to intensities: bias field, gamma/contrast,
    a monotone histogram curve, noise, blur and ringing. Keys ``image`` only; input in [0, 1]."""
    return Compose([
        RandBiasFieldd(keys="image", prob=0.4, coeff_range=(0.0, 0.4), degree=3),
        RandAdjustContrastd(keys="image", prob=0.5, gamma=(0.6, 1.6)),
        RandHistogramShiftd(keys="image", prob=0.3, num_control_points=(4, 10)),
        RandGaussianSmoothd(keys="image", prob=0.2, sigma_x=(0.3, 1.2), sigma_y=(0.3, 1.2)),
        RandGibbsNoised(keys="image", prob=0.15, alpha=(0.0, 0.5)),
        RandGaussianNoised(keys="image", prob=0.3, mean=0.0, std=0.04),
    ])


class _RandImageTransformd(RandomizableTransform, MapTransform):
    """A random transform drawn once a call (``randomize``) and applied to each image key
    (:meth:`apply`, on the float ``(C, H, W)`` image)."""

    def __init__(self, keys: Sequence[Hashable] | Hashable, prob: float) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)

    def apply(self, image: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        out = dict(data)
        self.randomize()
        if not self._do_transform:
            return out
        for key in self.key_iterator(out):
            out[key] = self.apply(torch.as_tensor(out[key]).float())
        return out


class RandGlobalIntensityNonlineard(_RandImageTransformd):
    """A random non-monotone intensity map (GIN) of images ``(C, H, W)`` in [0, 1]: a fresh shallow
    convolutional network (``layers`` convolutions, ``width`` hidden channels, kernels 1 or 3 drawn per layer,
    N(0, 1) weights, leaky ReLU between them), its output rescaled to [0, 1] and mixed with the input by a
    random weight ``alpha`` (so the map ranges from the identity to a new contrast).

    Args:
        keys: the image keys.
        prob: probability of changing an image.
        layers: convolutions in the network.
        width: hidden channels.
    """

    def __init__(self, keys: Sequence[Hashable] | Hashable, prob: float = 0.3, layers: int = 4, width: int = 2) -> None:
        super().__init__(keys, prob)
        self.layers, self.width = layers, width
        self._seed = 0
        self._alpha = 1.0

    def randomize(self, data: object = None) -> None:
        super().randomize(None)
        if self._do_transform:
            self._seed = int(self.R.randint(2**31))
            self._alpha = float(self.R.uniform(0.0, 1.0))

    def _network_output(self, image: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self._seed)
        channels = image.shape[0]
        x = image[None]
        for layer in range(self.layers):
            out_channels = channels if layer == self.layers - 1 else self.width
            kernel = 1 if torch.rand((), generator=generator) < 0.5 else 3
            weight = torch.randn(out_channels, x.shape[1], kernel, kernel, generator=generator)
            bias = torch.randn(out_channels, generator=generator)
            x = torch.nn.functional.conv2d(x, weight, bias, padding=kernel // 2)
            if layer < self.layers - 1:
                x = torch.nn.functional.leaky_relu(x, 0.2)
        x = x[0]
        low, high = x.amin(dim=(-2, -1), keepdim=True), x.amax(dim=(-2, -1), keepdim=True)
        return (x - low) / (high - low).clamp_min(1e-6)

    def apply(self, image: torch.Tensor) -> torch.Tensor:
        return self._alpha * self._network_output(image) + (1.0 - self._alpha) * image


def _geometry(rotate: float = np.pi / 12, scale: float = 0.15, max_zoom: float = 1.4, zoom_prob: float = 0.2) -> Compose:
    """Rotation up to ``rotate`` radians, scaling by 1 +- ``scale`` (the structure at several
    resolutions) and a zoom-in crop up to ``max_zoom``; keys image + label."""
    return Compose([
        RandAffined(keys=("image", "label"), prob=0.5, rotate_range=(rotate,), scale_range=(scale, scale),
                    mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandZoomd(keys=("image", "label"), prob=zoom_prob, min_zoom=1.0, max_zoom=max_zoom, mode=("bilinear", "nearest"),
                  keep_size=True),
    ])


def colour_matrix(saturation: float, hue: float) -> np.ndarray:
    """The 3x3 RGB mixing matrix of a hue rotation by ``hue`` radians about the grey axis, then a
    saturation change by the factor ``saturation`` (0: grey, 1: unchanged). Grey stays grey."""
    grey = np.full((3, 3), 1.0 / 3.0)
    axis = np.ones(3) / math.sqrt(3.0)
    cross = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    rotation = np.eye(3) + math.sin(hue) * cross + (1.0 - math.cos(hue)) * cross @ cross  # Rodrigues
    return (saturation * np.eye(3) + (1.0 - saturation) * grey) @ rotation


class RandCameraColourd(_RandImageTransformd):
    """Another camera's colour response on RGB images ``(3, H, W)`` in [0, 1]: a gamma curve per
    channel, then a hue rotation and a saturation change (:func:`colour_matrix`); clipped to [0, 1].

    Args:
        keys: the image keys.
        prob: probability of changing an image.
        gamma: range of each channel's gamma exponent.
        saturation: range of the saturation factor.
        hue: largest hue rotation, radians.
    """

    def __init__(self, keys: Sequence[Hashable] | Hashable, prob: float = 0.8, gamma: tuple[float, float] = (0.7, 1.4),
                 saturation: tuple[float, float] = (0.5, 1.5), hue: float = 0.3) -> None:
        super().__init__(keys, prob)
        self.gamma, self.saturation, self.hue = gamma, saturation, hue
        self._gammas = np.ones(3)
        self._matrix = np.eye(3)

    def randomize(self, data: object = None) -> None:
        super().randomize(None)
        if self._do_transform:
            self._gammas = self.R.uniform(*self.gamma, size=3)
            self._matrix = colour_matrix(self.R.uniform(*self.saturation), self.R.uniform(-self.hue, self.hue))

    def apply(self, image: torch.Tensor) -> torch.Tensor:
        if image.shape[0] != 3:
            raise InvalidImageError(f"colour augmentation needs RGB images (3, H, W), got shape {tuple(image.shape)}")
        gammas = torch.as_tensor(self._gammas, dtype=torch.float32)[:, None, None]
        curved = image.clamp(0.0, 1.0) ** gammas
        return torch.einsum("ij,jhw->ihw", torch.as_tensor(self._matrix, dtype=torch.float32), curved).clamp(0.0, 1.0)


class RandJpegd(_RandImageTransformd):
    """JPEG compression (8-bit, in memory) of images ``(3, H, W)`` in [0, 1] at a random quality."""

    def __init__(self, keys: Sequence[Hashable] | Hashable, prob: float = 0.3, quality: tuple[int, int] = (20, 90)) -> None:
        super().__init__(keys, prob)
        self.quality = quality
        self._quality = quality[1]

    def randomize(self, data: object = None) -> None:
        super().randomize(None)
        if self._do_transform:
            self._quality = int(self.R.randint(self.quality[0], self.quality[1] + 1))

    def apply(self, image: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(jpeg(255.0 * image.numpy(), self._quality) / 255.0)


def _camera_colours() -> Compose:
    """What another fundus camera, its illumination and its file format do to an RGB photograph
    in [0, 1]: colour response, uneven illumination / vignetting, defocus, noise, JPEG."""
    return Compose([
        RandCameraColourd(keys="image", prob=0.8, gamma=(0.6, 1.6), saturation=(0.5, 1.5), hue=0.3),
        RandBiasFieldd(keys="image", prob=0.5, coeff_range=(0.0, 0.5), degree=3),
        RandGaussianSmoothd(keys="image", prob=0.3, sigma_x=(0.5, 2.5), sigma_y=(0.5, 2.5)),
        RandGaussianNoised(keys="image", prob=0.3, mean=0.0, std=0.03),
        RandJpegd(keys="image", prob=0.3, quality=(20, 90)),
    ])


class Recipe:
    """A named augmentation: ``recipe(image (C, H, W), label (H, W), rng) -> (image, label)``.

    Args:
        normalization: the model card's method, applied again after the intensity transforms.
        intensity: scanner-like intensity transforms on the [0, 1]-rescaled image.
        geometry: joint spatial transforms of image and label.
    """

    def __init__(self, normalization: str, intensity: Compose | None, geometry: Compose | None) -> None:
        if intensity is not None and normalization == "zscore_nonzero":
            # The [0, 1] rescale gives the zero background a value; that normalisation needs it at 0.
            raise ModelError("intensity augmentation needs a normalisation without a background value "
                             "(robust_percentile or zscore), not zscore_nonzero")
        self.normalization = normalization
        self.intensity = intensity
        self.geometry = geometry

    def __call__(self, image: torch.Tensor, label: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if self.geometry is not None:
            self.geometry.set_random_state(seed=int(rng.integers(2**31)))
            moved = self.geometry({"image": image, "label": label[None].float()})
            moved_label = torch.as_tensor(moved["label"])[0].round().long()
            if bool((moved_label > 0).any()) or not bool((label > 0).any()):
                # a move that takes all of the target out of view leaves nothing to click: keep the image as it was
                image, label = torch.as_tensor(moved["image"]), moved_label
        if self.intensity is not None:
            self.intensity.set_random_state(seed=int(rng.integers(2**31)))
            low, high = image.amin(dim=(-2, -1), keepdim=True), image.amax(dim=(-2, -1), keepdim=True)
            unit = (image - low) / (high - low).clamp_min(1e-6)
            changed = torch.as_tensor(self.intensity({"image": unit})["image"]).float().clamp_min(0.0)
            try:
                image = torch.from_numpy(normalize(changed.numpy(), self.normalization))
            except InvalidImageError:  # a curve that flattened the image: keep it as it was
                pass
        return image.float().contiguous(), label.contiguous()


#: Recipes for RGB photographs only (their colour transforms mix three channels).
RGB_RECIPES = ("fundus",)

#: Recipe name -> factory taking the card's normalisation.
RECIPES: dict[str, Callable[[str], Recipe]] = {
    "none": lambda normalization: Recipe(normalization, None, None),
    "intensity": lambda normalization: Recipe(normalization, _scanner_intensities(), None),
    "scanner": lambda normalization: Recipe(normalization, _scanner_intensities(), _geometry()),
    "sequences": lambda normalization: Recipe(
        normalization, Compose([RandGlobalIntensityNonlineard(keys="image", prob=0.3), _scanner_intensities()]), _geometry()),
    "fundus": lambda normalization: Recipe(normalization, _camera_colours(),
                                           _geometry(rotate=np.pi / 8, scale=0.2, max_zoom=1.5, zoom_prob=0.3)),
}
