"""Clicks, guidance maps and the simulated clinician (OAIMS paper, Section 2.2 and Appendix A.2).

Conventions
-----------
* A :class:`Click` is an integer array index into the 2D image, ``(row, col)`` in pixels,
  plus a class label: ``0`` is background, ``1..K-1`` are foreground classes.
* Guidance maps have one channel per class, foreground classes first then background:
  binary models get the paper's two maps ``(fg, bg)``; a 3-class fundus model gets
  ``(rim, cup, bg)``. Each map is zero except at its clicks, Gaussian-smoothed and
  normalised to ``[0, 1]`` by its maximum (as ICNN / the paper describe).

Where the simulated clinician clicks
------------------------------------
* Localization click (first click of an image): a random pixel inside the target
  foreground (any foreground class), as in the paper (Appendix A.2).
* Inference correction click: in the largest erroneous connected component (false
  positives and false negatives of every class compete by size), at the pixel
  *farthest from the component's border* (maximum of the Euclidean distance
  transform). A clinician clicks in the middle of a wrong region, not on its edge; the
  interior point is unambiguous under 1-2 px boundary uncertainty, and makes the
  benchmark deterministic for a given prediction.
* Training clicks and PI stage-2 clicks (``GenerateClicks``): error components ranked by
  size, one uniformly random pixel in each, the first ``K`` taken.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from scipy import ndimage

from OAIMSSegment.errors import InvalidClickError


@dataclass(frozen=True)
class Click:
    """One click: ``position`` is an array index ``(row, col)`` in pixels; ``label`` a class index."""

    position: tuple[int, ...]
    label: int

    @property
    def is_foreground(self) -> bool:
        return self.label != 0


def validate_click(click: Click, shape: Sequence[int], num_classes: int) -> Click:
    """Return ``click`` with integer coordinates, or raise :class:`InvalidClickError`.

    Args:
        click: the click to check; coordinates may be floats (rounded to the nearest pixel).
        shape: spatial shape of the image, e.g. ``(H, W)``.
        num_classes: number of classes of the model, background included.
    """
    if len(click.position) != len(shape):
        raise InvalidClickError(
            f"click {tuple(click.position)} has {len(click.position)} coordinates; the image is {len(shape)}D"
        )
    coords = []
    for value in click.position:
        value = float(value)
        if not math.isfinite(value):
            raise InvalidClickError(f"click coordinates must be finite, got {tuple(click.position)}")
        coords.append(int(round(value)))
    if any(c < 0 or c >= n for c, n in zip(coords, shape)):
        raise InvalidClickError(f"click {tuple(coords)} is outside the image of size {tuple(shape)}")
    if not 0 <= int(click.label) < num_classes:
        raise InvalidClickError(f"click label {click.label} is not a class of this model (0..{num_classes - 1})")
    return Click(tuple(coords), int(click.label))


def guidance_channel(label: int, num_classes: int) -> int:
    """Guidance channel of a class: foreground classes ``1..K-1`` first, background last."""
    return num_classes - 1 if label == 0 else label - 1


def click_offsets(clicks: Sequence[Click], shape: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """Signed offset of every pixel from every click along each axis, in pixels.

    The one distance grid behind the guidance maps, the CCG weights and the click stamps.

    Args:
        clicks: ``N`` clicks in array-index coordinates of an image of spatial ``shape``.
        shape: spatial shape ``(H, W)`` (or ``(D, H, W)``), ``D`` axes in all.

    Returns:
        Tensor ``(D, N, *shape)``, float32: ``[d, n, i, j] = (i, j)[d] - clicks[n].position[d]``.
    """
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float32, device=device) for n in shape], indexing="ij")
    centres = torch.tensor([c.position for c in clicks], dtype=torch.float32, device=device).view(len(clicks), len(shape))
    return torch.stack([g.unsqueeze(0) - centres[:, d].view(-1, *[1] * len(shape)) for d, g in enumerate(grids)])


def click_gaussians(offsets: torch.Tensor, sigma: float) -> torch.Tensor:
    """``exp(-|offset|^2 / (2 sigma^2))`` of :func:`click_offsets` output: ``(N, *shape)``, float32."""
    squared = (offsets**2).sum(dim=0)
    return torch.exp(-squared / (2.0 * sigma**2))


def guidance_maps(
    clicks: Sequence[Click],
    shape: Sequence[int],
    num_classes: int,
    sigma: float,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Encode clicks as guidance maps.

    Args:
        clicks: clicks in array-index coordinates of an image of spatial ``shape``.
        shape: spatial shape ``(H, W)`` (or ``(D, H, W)``).
        num_classes: classes of the model, background included (2 for a binary model).
        sigma: Gaussian smoothing of each click, in pixels.

    Returns:
        Tensor ``(num_classes, *shape)``, float32, each channel in ``[0, 1]``: the sum of
        the channel's click Gaussians divided by its maximum (all zeros without clicks).
    """
    maps = torch.zeros((num_classes, *shape), dtype=torch.float32, device=device)
    if not clicks:
        return maps
    gaussians = click_gaussians(click_offsets(clicks, shape, device), sigma)
    channels = torch.tensor([guidance_channel(c.label, num_classes) for c in clicks], device=device)
    maps.index_add_(0, channels, gaussians)
    peak = maps.flatten(1).amax(dim=1).clamp_min(1e-12)
    return maps / peak.view(-1, *[1] * len(shape))


def stamp_clicks(labels: torch.Tensor, clicks: Sequence[Click], radius: float) -> torch.Tensor:
    """A copy of the class map ``labels`` ``(H, W)`` with every pixel within ``radius`` pixels
    (Euclidean) of a click set to that click's class; later clicks win where disks overlap.

    A click is the user's statement about the pixels under it; this makes a pseudo label
    agree with it there (``radius = 0``: the clicked pixel only).
    """
    stamped = labels.clone()
    if not clicks:
        return stamped
    squared = (click_offsets(clicks, labels.shape, labels.device) ** 2).sum(dim=0)
    for click, distance in zip(clicks, squared):
        stamped[distance <= radius**2] = click.label
    return stamped


def error_components(prediction: np.ndarray, target: np.ndarray, num_classes: int) -> list[tuple[np.ndarray, int]]:
    """Erroneous connected components, largest first.

    For each class ``k``, the pixels that should be ``k`` but are predicted otherwise
    (for a binary task: false negatives for ``k = 1``, false positives for ``k = 0``),
    split into connected components (8-connectivity in 2D).

    Returns:
        ``[(component mask (H, W) bool, class k), ...]`` sorted by size, largest first.
    """
    components = []
    structure = ndimage.generate_binary_structure(target.ndim, target.ndim)
    for k in range(num_classes):
        wrong = (target == k) & (prediction != k)
        if not wrong.any():
            continue
        labelled, count = ndimage.label(wrong, structure=structure)
        sizes = np.bincount(labelled.ravel(), minlength=count + 1)
        for index in range(1, count + 1):
            components.append((sizes[index], k, labelled == index))
    components.sort(key=lambda item: -item[0])
    return [(mask, k) for _, k, mask in components]


def interior_point(mask: np.ndarray) -> tuple[int, ...]:
    """The pixel of ``mask`` farthest from its border (the image edge counts as border; the
    first in array order among ties; the origin for an empty mask).

    The distance transform runs on the mask's bounding box padded by one pixel: every pixel
    outside the box is border, so the nearest border pixel of any pixel inside is in the padded
    box, and the distances and the order of ties are those of the whole image (issue 21: a
    propagated slice's seeds cost a transform per component)."""
    found = np.nonzero(mask)
    if not found[0].size:
        return tuple(0 for _ in np.shape(mask))
    low = [int(axis.min()) for axis in found]
    box = np.asarray(mask)[tuple(slice(start, int(axis.max()) + 1) for start, axis in zip(low, found))]
    distance = ndimage.distance_transform_edt(np.pad(box, 1))[tuple(slice(1, -1) for _ in box.shape)]
    return tuple(int(i) + start for i, start in zip(np.unravel_index(int(np.argmax(distance)), box.shape), low))


def random_point(mask: np.ndarray, rng: np.random.Generator) -> tuple[int, ...]:
    """A uniformly random pixel of a non-empty ``mask``."""
    indices = np.flatnonzero(mask)
    return tuple(int(i) for i in np.unravel_index(int(rng.choice(indices)), mask.shape))


def localization_click(target: np.ndarray, rng: np.random.Generator) -> Click:
    """The first click: a random pixel inside the target foreground, labelled with its class."""
    foreground = target > 0
    if not foreground.any():
        raise InvalidClickError("the target has no foreground to place a localization click in")
    position = random_point(foreground, rng)
    return Click(position, int(target[position]))


def correction_click(prediction: np.ndarray, target: np.ndarray, num_classes: int) -> Click | None:
    """Inference correction click: interior point of the largest error component (None if perfect)."""
    components = error_components(prediction, target, num_classes)
    if not components:
        return None
    mask, k = components[0]
    return Click(interior_point(mask), k)


def ranked_error_clicks(
    prediction: np.ndarray, target: np.ndarray, num_classes: int, max_clicks: int, rng: np.random.Generator
) -> list[Click]:
    """Training / PI stage-2 clicks: one random pixel in each error component, largest first, at most ``max_clicks``.

    This is ``RankAndGenerateClicks`` + ``SelectFirstM`` of Algorithm 2 and
    ``GenerateClicks(P1, Pfinal, T)`` of Algorithm 1.
    """
    components = error_components(prediction, target, num_classes)[:max_clicks]
    return [Click(random_point(mask, rng), k) for mask, k in components]


def wrong_click(prediction: np.ndarray, target: np.ndarray, num_classes: int, rng: np.random.Generator) -> Click | None:
    """A mistaken click (robustness tests, paper Section 3.3).

    A random pixel the model already got right, given a wrong class: it asks for a
    correction that should not be made.
    """
    correct = prediction == target
    if not correct.any():
        return None
    position = random_point(correct, rng)
    true_label = int(target[position])
    wrong_labels = [k for k in range(num_classes) if k != true_label]
    return Click(position, int(rng.choice(wrong_labels)))
