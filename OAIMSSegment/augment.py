"""Named, seeded training augmentation recipes (MONAI transforms) for pretraining.

A recipe acts on one training item in the model's working space: a normalised image
``(C, H, W)`` and its class map ``(H, W)``. Intensity transforms run on the image rescaled to
[0, 1] (positive values, as a scanner writes them: a bias field multiplies, a gamma curve
needs non-negative input), and the result is normalised again with the card's method, so
the network sees exactly what inference would give it for such a scan. Spatial transforms
move image and label together (bilinear image, nearest label).

Every call takes its randomness from the caller's ``numpy.random.Generator``, so a seeded
(and resumed) run draws the same augmentations.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandBiasFieldd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandGibbsNoised,
    RandHistogramShiftd,
    RandZoomd,
)

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


def _geometry() -> Compose:
    """Rotation, scaling (the structure at several resolutions) and a zoom-in crop; keys image + label."""
    return Compose([
        RandAffined(keys=("image", "label"), prob=0.5, rotate_range=(np.pi / 12,), scale_range=(0.15, 0.15),
                    mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandZoomd(keys=("image", "label"), prob=0.2, min_zoom=1.0, max_zoom=1.4, mode=("bilinear", "nearest"),
                  keep_size=True),
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


#: Recipe name -> factory taking the card's normalisation.
RECIPES: dict[str, Callable[[str], Recipe]] = {
    "none": lambda normalization: Recipe(normalization, None, None),
    "intensity": lambda normalization: Recipe(normalization, _scanner_intensities(), None),
    "scanner": lambda normalization: Recipe(normalization, _scanner_intensities(), _geometry()),
}
