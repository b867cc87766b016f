"""``argparse`` types for the command line: each refuses a bad value with one specific line.

Used as ``type=`` so that a bad option is refused while parsing, before any model, dataset
or output is touched (``--working-size 100000`` must not first allocate 40 GB, an
unwritable ``--json`` must not be found only after the run).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path
from typing import Callable

from OAIMSSegment.data import SLICE_AXES
from OAIMSSegment.model import MIN_SIDE as MIN_WORKING_SIZE

__all__ = [
    "MIN_WORKING_SIZE", "MAX_WORKING_SIZE", "positive_int", "non_negative_int", "finite_float", "positive_float", "non_negative_float",
    "probability", "image_side", "working_size", "slice_axes", "int_list", "name_list", "writable_file",
]

#: Largest working size (longer image side, pixels) accepted on the command line: 4096 px is
#: 8x the shipped models' 512 px bound, and the U-Net's activations grow with its square.
MAX_WORKING_SIZE = 4096


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def finite_float(text: str) -> float:
    """A number that is not NaN or infinite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _at_least(parse: Callable[[str], float], low: float, inclusive: bool, rule: str) -> Callable[[str], float]:
    """An argparse type: ``parse(text)``, refused unless it is >= ``low`` (> ``low`` if not ``inclusive``)."""

    def check(text: str) -> float:
        value = parse(text)
        if value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    check.__name__ = rule.replace(" ", "_")
    return check


#: Counts (images, seeds, steps): an integer >= 1.
positive_int = _at_least(_integer, 1, True, "at least 1")
non_negative_int = _at_least(_integer, 0, True, "0 or more")
#: Learning rates, sigmas: a finite number > 0.
positive_float = _at_least(finite_float, 0.0, False, "greater than 0")
#: Loss weights: a finite number >= 0.
non_negative_float = _at_least(finite_float, 0.0, True, "0 or more")


def probability(text: str) -> float:
    """A finite number in [0, 1]."""
    value = finite_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def image_side(text: str) -> int:
    """An image side of :data:`MIN_WORKING_SIZE`..:data:`MAX_WORKING_SIZE` pixels."""
    value = _integer(text)
    if not MIN_WORKING_SIZE <= value <= MAX_WORKING_SIZE:
        raise argparse.ArgumentTypeError(f"must be {MIN_WORKING_SIZE}..{MAX_WORKING_SIZE} px, got {value}")
    return value


def working_size(text: str) -> int:
    """0 (native resolution) or a longer image side of :data:`MIN_WORKING_SIZE`..:data:`MAX_WORKING_SIZE` pixels."""
    if non_negative_int(text) == 0:
        return 0
    try:
        return image_side(text)
    except argparse.ArgumentTypeError as refused:
        raise argparse.ArgumentTypeError(f"{refused} (or 0: native resolution)") from None


def slice_axes(text: str) -> list[str]:
    """Comma-separated slicing orientations of 3D volumes, each once, e.g. ``axial,coronal``."""
    axes = [part.strip() for part in text.split(",")]
    unknown = [axis for axis in axes if axis not in SLICE_AXES]
    if unknown or len(set(axes)) != len(axes):
        raise argparse.ArgumentTypeError(
            f"expected distinct orientations among {', '.join(SLICE_AXES)}, comma-separated; got {text!r}")
    return axes


def int_list(text: str) -> list[int]:
    """Comma-separated integers >= 1, e.g. U-Net channels ``16,32,64``."""
    parts = [part.strip() for part in text.split(",")]
    try:
        values = [int(part) for part in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return values


def name_list(text: str) -> list[str]:
    """Comma-separated names (empty items dropped); at least one."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"is an empty list: {text!r}")
    return names


def writable_file(text: str) -> Path:
    """A file path that can be written: not a folder, and the nearest existing folder above it
    accepts a new file (checked by creating and removing one; folders are not created yet)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text}: {folder} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".oaims-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise argparse.ArgumentTypeError(f"cannot write {text}: {error.strerror or error} ({folder})") from None
    return path
