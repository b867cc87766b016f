"""Data for the probabilistic partial-segmentation model (Wong, Guttag, Dalca, NeurIPS 2022 workshop).

Everything here is numpy and seeded through ``np.random.Generator``; nothing touches torch.
:func:`load_images` picks the images of a ``--data`` argument (synthetic or a dataset folder).

Synthetic disks (paper Section 3, "Data")
-----------------------------------------
* An image is ``size x size`` (paper: 32) with three non-overlapping disks of random radius
  and random intensity on a zero background.
* The *possible ground truths* of an image are the subsets of its disks; a training
  ground truth is one non-empty subset drawn uniformly (each disk on with probability 1/2,
  the empty draw redrawn).

Partial segmentation pairs (paper: "intersection of the ground truth with random shapes")
-----------------------------------------------------------------------------------------
A *random shape* is SynthMorph-style smooth noise (Gaussian-filtered white noise) cut at
a random quantile, i.e. a few random blobs covering a random fraction of the image.
* input partialness ``x_m = A``, input segmentation ``x_s = gt & A``;
* target partialness ``y_m = A | B`` (so ``y_m >= x_m``), target segmentation ``y_s = gt & y_m``,
  for two independent random shapes ``A`` and ``B``.
``A`` may be empty (a first step from nothing), ``B`` never is.

Real 2D data
------------
:func:`load_fundus_dataset` reads an nnU-Net raw RGB-PNG dataset (e.g. Drishti-GS: labels
0 background, 1 rim, 2 cup), turns each image to luminance and resizes it. Its possible
ground truths are the two nested structures a user may mean: the disc (rim + cup) and the cup.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from OAIMSSegment.data import NnUNetDataset
from OAIMSSegment.errors import DatasetError

#: (min, max) disk radius in pixels, for a 32-pixel image; scaled with the image size.
DISK_RADIUS = (3.0, 7.0)
#: (min, max) disk intensity; the background is 0.
DISK_INTENSITY = (0.2, 1.0)
#: (min, max) fraction of the image covered by the input partialness shape ``A``.
INPUT_FRACTION = (0.0, 0.3)
#: (min, max) fraction of the image covered by the growth shape ``B``.
GROWTH_FRACTION = (0.03, 0.2)
#: (min, max) fraction of the image covered by the random shape that ``growth="object"`` cuts
#: out of the ground truth's neighbourhood (chosen with :data:`OBJECT_MARGIN` so that the
#: targets add the paper's 52 foreground / 31 background pixels; the paper gives no shapes).
OBJECT_GROWTH_FRACTION = (0.2, 0.8)
#: Margins (pixels of a 32-pixel image, one drawn per pair) of the ground truth's neighbourhood.
OBJECT_MARGIN = (1, 2)
#: Target growth modes of :func:`make_pairs`.
GROWTH_MODES = ("random", "border", "object")
#: (min, max) Gaussian smoothing of the shape noise, in pixels of a 32-pixel image.
SHAPE_SMOOTHING = (2.0, 4.0)
#: Weights of R, G, B in the luminance of a colour image (ITU-R BT.601), in training and inference.
LUMINANCE = np.array([0.299, 0.587, 0.114])


@dataclass
class ImageSet:
    """Images and their possible ground truths.

    Attributes:
        images: ``(N, H, W)`` float32, each normalised to ``[0, 1]`` (:func:`normalise_image`).
        objects: ``(N, K, H, W)`` bool, the K structures of each image whose subsets (synthetic
            disks, ``subsets=True``) or which themselves (fundus disc / cup, ``subsets=False``)
            are the possible ground truths.
        subsets: True when every subset of ``objects`` is a possible ground truth.
    """

    images: np.ndarray
    objects: np.ndarray
    subsets: bool

    def candidates(self, index: int) -> np.ndarray:
        """Possible ground truths of image ``index``: ``(C, H, W)`` bool (all 2^K subsets, or the K objects)."""
        objects = self.objects[index]
        if not self.subsets:
            return objects
        k = objects.shape[0]
        picks = (np.arange(2**k)[:, None] >> np.arange(k)[None, :]) & 1
        return np.einsum("ck,khw->chw", picks, objects.astype(np.int64)) > 0

    def sample_ground_truths(self, indices: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One training ground truth per image in ``indices``: ``(B, H, W)`` bool.

        Subsets: a uniformly random non-empty subset of the objects. Otherwise: one object,
        uniformly.
        """
        objects = self.objects[indices]
        b, k = objects.shape[:2]
        if self.subsets:
            picks = rng.random((b, k)) < 0.5
            empty = ~picks.any(axis=1)
            while empty.any():  # redraw empty subsets: the user always segments something
                picks[empty] = rng.random((int(empty.sum()), k)) < 0.5
                empty = ~picks.any(axis=1)
        else:
            picks = np.zeros((b, k), dtype=bool)
            picks[np.arange(b), rng.integers(0, k, size=b)] = True
        return (objects & picks[:, :, None, None]).any(axis=1)


def normalise_image(image: np.ndarray) -> np.ndarray:
    """Robust intensity normalisation to ``[0, 1]``: percentiles 0.5 / 99.5 mapped to 0 / 1, clipped.

    ``image`` is ``(H, W)``; returns float32 ``(H, W)``. A constant image becomes zeros.
    Used for training and inference alike, so a caller may pass raw intensities.
    """
    image = np.asarray(image, dtype=np.float64)
    low, high = np.percentile(image, [0.5, 99.5])
    if high <= low:
        low, high = float(image.min()), float(image.max())
    if high <= low:
        return np.zeros(image.shape, dtype=np.float32)
    return np.clip((image - low) / (high - low), 0.0, 1.0).astype(np.float32)


def make_disk_images(n: int, size: int, rng: np.random.Generator) -> ImageSet:
    """``n`` synthetic images of three non-overlapping random disks (paper Section 3).

    Returns an :class:`ImageSet` with ``images (n, size, size)`` and ``objects (n, 3, size, size)``.
    """
    scale = size / 32.0
    r_min, r_max = DISK_RADIUS[0] * scale, DISK_RADIUS[1] * scale
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64)
    images = np.zeros((n, size, size), dtype=np.float32)
    objects = np.zeros((n, 3, size, size), dtype=bool)
    for i in range(n):
        disks: list[tuple[float, float, float]] = []
        while len(disks) < 3:
            radius = rng.uniform(r_min, r_max)
            centre = rng.uniform(radius, size - radius, size=2)
            # A one-pixel gap keeps every disk a separate object, so a subset is well defined.
            if all(np.hypot(*(centre - (r, c))) > radius + q + 1.0 for r, c, q in disks):
                disks.append((float(centre[0]), float(centre[1]), float(radius)))
            elif rng.random() < 0.02:  # rare dead end (big disks placed first): start this image over
                disks = []
        for d, (r, c, radius) in enumerate(disks):
            mask = (rows - r) ** 2 + (cols - c) ** 2 <= radius**2
            objects[i, d] = mask
            images[i][mask] = rng.uniform(*DISK_INTENSITY)
        images[i] = normalise_image(images[i])
    return ImageSet(images=images, objects=objects, subsets=True)


def random_shapes(n: int, size: int, fraction: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """``n`` random blob shapes ``(n, size, size)`` bool, each covering a fraction drawn from ``fraction``.

    Smooth noise (white noise, Gaussian-filtered with a random width) thresholded at the
    quantile that leaves the drawn fraction of pixels on (SynthMorph-style label shapes).
    """
    scale = size / 32.0
    noise = rng.standard_normal((n, size, size))
    shapes = np.zeros((n, size, size), dtype=bool)
    fractions = rng.uniform(*fraction, size=n)
    for i in range(n):
        if fractions[i] <= 0.0:
            continue
        sigma = rng.uniform(*SHAPE_SMOOTHING) * scale
        field = ndimage.gaussian_filter(noise[i], sigma, mode="wrap")
        shapes[i] = field > np.quantile(field, 1.0 - fractions[i])
    return shapes


def make_pairs(ground_truths: np.ndarray, rng: np.random.Generator, growth: str = "random") -> dict[str, np.ndarray]:
    """Input / target partial segmentations for ground truths ``(B, H, W)`` bool.

    Args:
        growth: ``"random"`` (the paper: ``B`` anywhere), ``"border"`` (``B`` restricted to a
            band of 2-5 px around ``x_m``, so that the target grows from what is decided, as a
            user would; where that leaves nothing, e.g. ``x_m`` empty, ``B`` stays unrestricted)
            or ``"object"`` (``B`` = the ground truth dilated by 1-2 px, intersected with a
            random shape covering 20-80 % of the image: the user decides part of the structure
            they mean and its rim; where that leaves nothing, the whole dilated ground truth).
            The inputs ``x_m, x_s`` are drawn identically in all modes.

    Returns bool arrays ``x_m, x_s, y_m, y_s``, each ``(B, H, W)``, with
    ``x_m <= y_m``, ``x_s = gt & x_m`` and ``y_s = gt & y_m``.
    """
    if growth not in GROWTH_MODES:
        raise ValueError(f"growth must be one of {GROWTH_MODES}, got {growth!r}")
    b, size = ground_truths.shape[0], ground_truths.shape[-1]
    x_m = random_shapes(b, size, INPUT_FRACTION, rng)
    grow = random_shapes(b, size, GROWTH_FRACTION, rng)
    if growth == "border":
        wide = random_shapes(b, size, (0.3, 0.8), rng)
        for i in range(b):
            width = int(round(rng.uniform(2.0, 5.0) * size / 32.0))
            band = ndimage.binary_dilation(x_m[i], iterations=width) & ~x_m[i] & wide[i]
            if band.any():
                grow[i] = band
    elif growth == "object":
        cut = random_shapes(b, size, OBJECT_GROWTH_FRACTION, rng)
        for i in range(b):
            margin = int(round(rng.choice(OBJECT_MARGIN) * size / 32.0))
            near = ndimage.binary_dilation(ground_truths[i], iterations=max(margin, 1))
            grow[i] = near & cut[i] if (near & cut[i]).any() else near
    y_m = x_m | grow
    return {"x_m": x_m, "x_s": ground_truths & x_m, "y_m": y_m, "y_s": ground_truths & y_m}


def _resize(array: np.ndarray, size: int, order: int) -> np.ndarray:
    """Resize a 2D ``array`` to ``(size, size)``: ``order=1`` linear (images), ``0`` nearest (labels)."""
    zoom = (size / array.shape[0], size / array.shape[1])
    return ndimage.zoom(array, zoom, order=order, grid_mode=True, mode="grid-constant" if order == 0 else "nearest")


def load_fundus_dataset(root: Path, split: str, size: int) -> ImageSet:
    """A 2D nnU-Net raw dataset of RGB PNGs with labels 0 / 1 / 2 (e.g. Drishti-GS), resized.

    Args:
        root: the dataset folder holding ``dataset.json``, ``imagesTr``/``labelsTr``, ``imagesTs``/``labelsTs``
            (read by :class:`OAIMSSegment.data.NnUNetDataset`).
        split: ``"Tr"`` or ``"Ts"``.
        size: side of the square model input; images are resized linearly, labels nearest.

    Returns:
        :class:`ImageSet` with luminance ``images (N, size, size)`` and ``objects (N, 2, size, size)``:
        the disc (label >= 1) and the cup (label 2); ``subsets=False``.

    Raises:
        DatasetError: missing folders or ``dataset.json``, non-PNG data, unreadable files,
            labels other than 0 / 1 / 2, or no image pairs.
    """
    dataset = NnUNetDataset(root)
    if dataset.file_ending != ".png":
        raise DatasetError(f"{dataset.root}: proposals need 2D PNG data, dataset.json says file_ending={dataset.file_ending!r}")
    images, objects = [], []
    for case in dataset.cases(split):
        image, label = dataset.load_case(case, split)
        if label.ndim != 2 or not set(np.unique(label)).issubset({0, 1, 2}):
            raise DatasetError(f"{case}: expected a 2D label map with values 0 / 1 / 2")
        # (C, H, W) -> (H, W, C) float64, the array the luminance weights were applied to before
        pixels = np.ascontiguousarray(np.moveaxis(image, 0, -1)).astype(np.float64)
        grey = pixels[..., :3] @ LUMINANCE if pixels.shape[-1] >= 3 else pixels[..., 0]
        images.append(normalise_image(_resize(grey, size, order=1)))
        small = _resize(label, size, order=0)
        objects.append(np.stack([small >= 1, small == 2]))
    return ImageSet(images=np.stack(images).astype(np.float32), objects=np.stack(objects), subsets=False)


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
