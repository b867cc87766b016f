"""The ``robust_percentile`` normalisation: invariant to how a site scales and stores intensities,
refuses images it cannot scale; and the named augmentation recipes of pretraining."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_card
from OAIMSSegment.augment import RECIPES, RGB_RECIPES, RandGlobalIntensityNonlineard
from OAIMSSegment.errors import InvalidImageError, ModelError
from OAIMSSegment.model import ClickSegmenter, normalize


def head_like_image(seed: int = 0) -> np.ndarray:
    """A (1, 96, 96) scan-like image: zero air, a skull ring, grey tissue, a bright lesion, noise."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:96, 0:96]
    radius = np.hypot(rows - 48, cols - 46)
    image = np.where(radius < 40, 400.0, 0.0) + np.where((radius > 34) & (radius < 40), 500.0, 0.0)
    image += np.where(np.hypot(rows - 40, cols - 55) < 9, 450.0, 0.0)
    image += np.where(radius < 40, 30.0 * rng.standard_normal((96, 96)), 0.0)
    return image[None].astype(np.float32)


def site_variants(image: np.ndarray) -> dict[str, np.ndarray]:
    """The same scan as other sites and pipelines store it."""
    foreground = image != 0
    zscored = (image - image[foreground].mean()) / image[foreground].std()  # background becomes non-zero
    quantised = np.round(255 * (image - image.min()) / (image.max() - image.min())).astype(np.uint8)
    return {
        "affine": 3.7 * image - 120.0,
        "offset": image + 1000.0,
        "zscore-nonzero-background": zscored,
        "uint8": quantised.astype(np.float32),
    }


@pytest.mark.parametrize("variant", ["affine", "offset", "zscore-nonzero-background", "uint8"])
def test_robust_percentile_does_not_depend_on_intensity_scale_offset_or_bit_depth(variant):
    image = head_like_image()
    reference = normalize(image, "robust_percentile")
    changed = normalize(site_variants(image)[variant], "robust_percentile")
    tolerance = 0.05 if variant == "uint8" else 1e-4  # uint8 rounds to 1/255 of the range
    assert np.abs(changed - reference).max() < tolerance * max(1.0, float(np.abs(reference).max()))
    # the old MRI method is not invariant to a constant offset: that is what this method fixes
    if variant == "offset":
        assert np.abs(normalize(site_variants(image)[variant], "zscore_nonzero") - normalize(image, "zscore_nonzero")).max() > 0.5


def test_robust_percentile_clips_outliers_and_standardises():
    image = head_like_image()
    image[0, 5, 5] = 1e6  # one hot pixel must not squash the rest of the range
    out = normalize(image, "robust_percentile")[0]
    assert abs(float(out.mean())) < 1e-4 and abs(float(out.std()) - 1.0) < 1e-3
    assert out[5, 5] == out.max() and out[5, 5] < 5.0


def test_robust_percentile_handles_a_small_structure_on_a_constant_background():
    image = np.zeros((1, 64, 64), np.float32)
    image[0, 30:33, 30:33] = 7.0  # 9 px: 0.2 % of the image, inside the clipped 0.5 %
    out = normalize(image, "robust_percentile")[0]
    assert out[31, 31] > out[0, 0]


@pytest.mark.parametrize(
    "image, message",
    [
        (np.full((1, 32, 32), np.nan, np.float32), "NaN"),
        (np.full((1, 32, 32), 5.0, np.float32), "constant"),
        (np.zeros((1, 0, 32), np.float32), "empty"),
    ],
)
def test_robust_percentile_refuses_what_it_cannot_normalise(image, message):
    with pytest.raises(InvalidImageError, match=message):
        normalize(image, "robust_percentile")


def test_a_robust_model_predicts_the_same_for_every_site_variant():
    torch.manual_seed(0)
    model = ClickSegmenter(tiny_card(normalization="robust_percentile")).eval()
    image = head_like_image()
    with torch.no_grad():
        reference = model.logits(model.prepare(image[0]), [])
        for name, variant in site_variants(image).items():
            logits = model.logits(model.prepare(variant[0]), [])
            assert torch.allclose(logits, reference, atol=0.05 if name == "uint8" else 1e-3), name


@pytest.mark.parametrize("recipe", sorted(set(RECIPES) - set(RGB_RECIPES)))  # fundus: test_fundus_colour.py
def test_augmentation_recipes_are_seeded_and_keep_image_and_label_aligned(recipe):
    image = torch.from_numpy(normalize(head_like_image(), "robust_percentile"))
    label = torch.from_numpy((head_like_image()[0] > 700).astype(np.int64))
    augment = RECIPES[recipe]("robust_percentile")
    first = augment(image, label, np.random.default_rng(3))
    again = augment(image, label, np.random.default_rng(3))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert first[0].shape == image.shape and first[1].shape == label.shape and first[1].dtype == torch.long
    assert set(first[1].unique().tolist()) <= {0, 1}
    changed = [augment(image, label, np.random.default_rng(seed)) for seed in range(8)]
    if recipe == "none":
        assert all(torch.equal(out[0], image) and torch.equal(out[1], label) for out in changed)
        return
    assert any(not torch.equal(out[0], image) for out in changed)
    for out_image, out_label in changed:  # renormalised as the card's method would
        assert abs(float(out_image.mean())) < 1e-3 and abs(float(out_image.std()) - 1.0) < 1e-2
        if recipe == "intensity":
            assert torch.equal(out_label, label)  # intensities only: the geometry is untouched


def test_gin_maps_reorder_tissues_as_another_sequence_does_and_are_seeded():
    """Three tissues, dark / mid / bright (CSF, brain, lesion on FLAIR). An increasing curve keeps their
    order and a decreasing one reverses it; another sequence (T1: the lesion darker than the brain, CSF
    darkest) is neither, and the GIN maps must draw such orders."""
    image = torch.zeros(1, 48, 48)
    image[:, :, 16:32], image[:, :, 32:] = 0.5, 1.0
    regions = [(slice(None), slice(None), slice(0, 16)), (slice(None), slice(None), slice(16, 32)),
               (slice(None), slice(None), slice(32, 48))]
    gin = RandGlobalIntensityNonlineard(keys="image", prob=1.0)
    orders = set()
    for seed in range(30):
        gin.set_random_state(seed)
        out = gin({"image": image})["image"]
        gin.set_random_state(seed)
        assert torch.equal(out, gin({"image": image})["image"])  # seeded
        assert out.shape == image.shape and bool(torch.isfinite(out).all())
        assert float(out.min()) >= -1e-6 and float(out.max()) <= 1.0 + 1e-6  # a mix of two [0, 1] images
        orders.add(tuple(np.argsort([float(out[r].mean()) for r in regions])))
    assert orders - {(0, 1, 2), (2, 1, 0)}, f"only monotone orders drawn: {orders}"
    never = RandGlobalIntensityNonlineard(keys="image", prob=0.0)
    assert torch.equal(never({"image": image})["image"], image)


def test_intensity_recipes_refuse_a_normalisation_that_needs_a_zero_background():
    with pytest.raises(ModelError, match="zscore_nonzero"):
        RECIPES["scanner"]("zscore_nonzero")


def test_spatial_augmentation_never_moves_the_whole_target_out_of_view():
    image = torch.from_numpy(normalize(head_like_image(), "robust_percentile"))
    label = torch.zeros(96, 96, dtype=torch.long)
    label[1:4, 1:4] = 1  # a target in the corner, which rotations and zooms push out of the image
    augment = RECIPES["scanner"]("robust_percentile")
    kept = [bool((augment(image, label, np.random.default_rng(seed))[1] > 0).any()) for seed in range(40)]
    assert all(kept)  # pretraining needs a foreground pixel for the localization click
