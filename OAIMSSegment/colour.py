"""Colour photographs as another camera would take them: JPEG compression and colour jitter (PIL).

Images are channels-first RGB ``(3, H, W)`` float arrays on the 8-bit scale [0, 255], as
:class:`~OAIMSSegment.data.NnUNetDataset` reads a fundus PNG. :func:`colour_jitter` gives the
seeded, colour-jittered copy of an evaluation set (``evaluate --colour-jitter SEED``): the
dataset's files are never changed, each image is jittered on the fly with a random generator
seeded by the seed and the case name, so every run and every model sees the same copy.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image, ImageEnhance

from OAIMSSegment.errors import InvalidImageError

#: Ranges of the evaluation jitter: brightness, contrast and saturation factors (1: unchanged;
#: PIL ``ImageEnhance``) and a hue shift in turns of the colour circle (as torchvision's ColorJitter).
JITTER_BRIGHTNESS = (0.6, 1.4)
JITTER_CONTRAST = (0.6, 1.4)
JITTER_SATURATION = (0.6, 1.4)
JITTER_HUE = (-0.05, 0.05)


def to_pil(image: np.ndarray, name: str = "image") -> Image.Image:
    """``(3, H, W)`` on [0, 255] -> an 8-bit RGB PIL image (values rounded and clipped to [0, 255]).

    Raises:
        InvalidImageError: not three channels, or NaN / infinite values.
    """
    array = np.asarray(image, dtype=np.float64)
    if array.ndim != 3 or array.shape[0] != 3:
        raise InvalidImageError(f"{name}: colour transforms need an RGB image (3, H, W), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise InvalidImageError(f"{name}: image contains NaN or infinite values")
    return Image.fromarray(np.clip(np.round(array), 0, 255).astype(np.uint8).transpose(1, 2, 0), mode="RGB")


def from_pil(image: Image.Image) -> np.ndarray:
    """An RGB PIL image -> ``(3, H, W)`` float32 on [0, 255]."""
    return np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1).copy()


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """``(3, H, W)`` on [0, 255] through an in-memory JPEG round trip at ``quality`` (1..95)."""
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    return from_pil(Image.open(buffer))


def shift_hue(image: Image.Image, turns: float) -> Image.Image:
    """Rotate every pixel's hue by ``turns`` of the colour circle (HSV), saturation and value kept."""
    if turns == 0.0:
        return image
    hsv = np.asarray(image.convert("HSV")).copy()
    hsv[..., 0] = ((hsv[..., 0].astype(np.int64) + int(round(turns * 256))) % 256).astype(np.uint8)
    return Image.fromarray(hsv, mode="HSV").convert("RGB")


def jitter_rng(seed: int, name: str) -> np.random.Generator:
    """A generator that depends only on ``seed`` and the case ``name`` (not on the order of the cases)."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return np.random.default_rng([int(seed), int.from_bytes(digest[:8], "little")])


def colour_jitter(image: np.ndarray, rng: np.random.Generator, name: str = "image") -> np.ndarray:
    """A colour-jittered copy of an RGB photograph ``(3, H, W)`` on [0, 255]: random brightness,
    contrast, saturation (PIL ``ImageEnhance``) and hue (HSV) in the ``JITTER_*`` ranges, applied
    in that order; returns ``(3, H, W)`` float32 on [0, 255] (8-bit values)."""
    picture = to_pil(image, name)
    for enhancer, factors in ((ImageEnhance.Brightness, JITTER_BRIGHTNESS), (ImageEnhance.Contrast, JITTER_CONTRAST),
                              (ImageEnhance.Color, JITTER_SATURATION)):
        picture = enhancer(picture).enhance(float(rng.uniform(*factors)))
    return from_pil(shift_hue(picture, float(rng.uniform(*JITTER_HUE))))

