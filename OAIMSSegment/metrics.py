"""Segmentation metrics used by the session's drift guard, the benchmarks and the proposals.

Dice per class comes from MONAI (``compute_dice``); what the engine adds is how an empty class
is scored and how classes are averaged, stated once here:

* :func:`class_dice`: per foreground class, a class empty in both maps scores 1.0 (the
  benchmark's convention, as MONAI's ``ignore_empty=False``).
* :func:`mean_foreground_dice`: the mean over the foreground classes present in either map
  (1.0 when every class is empty in both), used by the PI drift guard.
* :func:`pairwise_dice`: Dice between every pair of binary masks of two sets (proposals).
* :func:`number_of_clicks`: NoC@threshold of the click benchmarks.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from monai.metrics import compute_dice

__all__ = ["per_class_dice", "class_dice", "mean_foreground", "mean_foreground_dice", "pairwise_dice", "number_of_clicks"]

#: Clicks counted for an image that never reaches the threshold (the paper's cap).
NOC_CAP = 20


def _one_hot(labels: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """``(H, W)`` (or ``(D, H, W)``) integer labels -> ``(1, K, ...)`` one-hot of ``dtype``."""
    one_hot = torch.nn.functional.one_hot(labels.long(), num_classes)
    return one_hot.movedim(-1, 0)[None].to(dtype)


def per_class_dice(
    prediction: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    num_classes: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dice of each class ``(K,)`` (background included) between two class maps of one shape.

    A class empty in both maps scores 1.0. ``dtype`` is the precision of the ratio of pixel
    counts (float32: the benchmarks' tables; float64: exactly ``2 |P & T| / (|P| + |T|)``).
    """
    prediction = torch.as_tensor(np.asarray(prediction).astype(np.int64)) if isinstance(prediction, np.ndarray) else prediction
    target = torch.as_tensor(np.asarray(target).astype(np.int64)) if isinstance(target, np.ndarray) else target
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
    return compute_dice(
        _one_hot(prediction, num_classes, dtype), _one_hot(target, num_classes, dtype),
        include_background=True, ignore_empty=False,
    )[0]


def class_dice(mask: np.ndarray, target: np.ndarray, labels: Mapping[str, int]) -> dict[str, float]:
    """Dice per foreground class name, plus ``disc`` (= rim + cup) when both exist.

    A class empty in both prediction and target scores 1.0.
    """
    scores = per_class_dice(mask, target, len(labels))
    names = {index: name for name, index in labels.items()}
    result = {names[k]: float(scores[k]) for k in range(1, len(labels))}
    if "rim" in labels and "cup" in labels:
        result["disc"] = float(per_class_dice(np.asarray(mask) > 0, np.asarray(target) > 0, 2)[1])
    return result


def mean_foreground(scores: Mapping[str, float], labels: Mapping[str, int]) -> float:
    """Mean of :func:`class_dice` over the foreground classes (``disc`` excluded)."""
    return float(np.mean([scores[name] for name, index in labels.items() if index > 0]))


def mean_foreground_dice(prediction: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Dice averaged over the foreground classes present in either map (1.0 when both are empty),
    in double precision: the PI guard compares it with a threshold."""
    scores = per_class_dice(prediction, target, num_classes, torch.float64)
    present = [k for k in range(1, num_classes) if bool((prediction == k).any() or (target == k).any())]
    return float(np.mean([float(scores[k]) for k in present])) if present else 1.0


def pairwise_dice(masks: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Binary Dice between each row of ``masks (P, N)`` and each row of ``targets (C, N)`` -> ``(P, C)``.

    Two empty masks score 1.0.
    """
    masks, targets = np.asarray(masks).astype(np.int64), np.asarray(targets).astype(np.int64)
    intersection = masks @ targets.T
    total = masks.sum(axis=1)[:, None] + targets.sum(axis=1)[None, :]
    return np.where(total == 0, 1.0, 2.0 * intersection / np.maximum(total, 1))


def number_of_clicks(curves: np.ndarray, threshold: float, cap: int = NOC_CAP) -> float:
    """Mean clicks to reach ``threshold`` Dice over ``curves (images, clicks)``; an image that
    never does counts as ``cap``."""
    reached = np.asarray(curves) >= threshold
    counts = np.where(reached.any(axis=1), reached.argmax(axis=1) + 1, cap)
    return float(counts.mean())
