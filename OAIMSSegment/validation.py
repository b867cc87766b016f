"""Checks of what a caller hands the session API, before any of it is used.

An accepted mask with a NaN must not be read as "empty" (and the image closed), a click label
of 0.7 must not silently become background, and a ``None`` position must not surface as a
``TypeError`` from deep inside numpy. Each function returns the input in canonical form or
raises one specific :class:`~OAIMSSegment.errors.OAIMSError` naming what is wrong.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import numpy as np

from OAIMSSegment.errors import InvalidClickError, InvalidMaskError

__all__ = ["accepted_mask", "click_input"]


def accepted_mask(mask: Any, shape: Sequence[int], num_classes: int) -> np.ndarray:
    """The accepted class map as int64 ``(H, W)``, or :class:`InvalidMaskError`.

    Args:
        mask: the clinician's mask at the image's original size: integer classes, or floats
            that are whole numbers (a label map read back from a float volume); bool for binary.
        shape: ``(H, W)`` of the open image.
        num_classes: classes of the model, background included.
    """
    if mask is None:
        raise InvalidMaskError("the accepted mask is None; pass a class map of the image (or no mask at all)")
    array = np.asarray(mask)
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise InvalidMaskError(f"the accepted mask must be numeric, got dtype {array.dtype}")
    if array.shape != tuple(shape):
        raise InvalidMaskError(f"the accepted mask has shape {array.shape}, the image is {tuple(shape)}")
    if np.issubdtype(array.dtype, np.complexfloating):
        raise InvalidMaskError("the accepted mask must hold real class labels, got complex values")
    if np.issubdtype(array.dtype, np.floating):
        bad = ~np.isfinite(array)
        if bad.any():
            row, col = np.argwhere(bad)[0]
            raise InvalidMaskError(
                f"the accepted mask has {int(bad.sum())} NaN or infinite value(s) (first at pixel ({row}, {col})); "
                "nothing was accepted"
            )
        fractional = array != np.round(array)
        if fractional.any():
            row, col = np.argwhere(fractional)[0]
            raise InvalidMaskError(
                f"the accepted mask holds non-integer labels (e.g. {float(array[row, col]):g} at pixel ({row}, {col}))"
            )
    labels = array.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise InvalidMaskError(
            f"the accepted mask has labels {sorted(set(np.unique(labels).tolist()) - set(range(num_classes)))} "
            f"outside the model's classes 0..{num_classes - 1}"
        )
    return labels


def _integer(value: Any) -> int | None:
    """``value`` as an int if it is a whole real number (not bool), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    number = float(value)
    if not math.isfinite(number) or number != int(number):
        return None
    return int(number)


def click_input(position: Any, label: Any, num_classes: int) -> tuple[tuple[float, ...], int]:
    """``(position, label)`` of a click as a tuple of finite floats and an int class, or
    :class:`InvalidClickError`. Whether the position lies inside the image is checked later,
    against the open image (:func:`OAIMSSegment.clicks.validate_click`).

    Args:
        position: ``(row, col)`` pixel index (floats are rounded later).
        label: class index of the click (0: background); 1.0 is accepted, 0.7 is not.
        num_classes: classes of the model, background included.
    """
    if position is None or isinstance(position, (str, bytes)):
        raise InvalidClickError(f"click position must be a (row, col) pair of numbers, got {position!r}")
    try:
        coordinates = tuple(position)
    except TypeError:
        raise InvalidClickError(f"click position must be a (row, col) pair of numbers, got {position!r}") from None
    for value in coordinates:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise InvalidClickError(f"click position must hold numbers, got {position!r}")
        if not math.isfinite(float(value)):
            raise InvalidClickError(f"click coordinates must be finite, got {coordinates}")
    index = _integer(label)
    if index is None:
        raise InvalidClickError(f"click label must be a whole class number (0..{num_classes - 1}), got {label!r}")
    if not 0 <= index < num_classes:
        raise InvalidClickError(f"click label {index} is not a class of this model (0..{num_classes - 1})")
    return tuple(float(v) for v in coordinates), index
