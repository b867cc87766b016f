"""Datasets: nnU-Net v2 raw layout (NIfTI volumes cut into 2D slices, PNG images) and synthetic data.

An nnU-Net raw dataset is a folder with ``dataset.json`` (``channel_names``, ``labels``,
``file_ending``), ``imagesTr/`` + ``labelsTr/`` and optionally ``imagesTs/`` + ``labelsTs/``.
Images are ``<case>_<channel:04d><ending>``; an RGB PNG is one file holding R, G, B.
Everything is returned as :class:`Sample` s of channels-first 2D arrays.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from OAIMSSegment.errors import DatasetError

#: Volume axis (numpy order z, y, x of a SimpleITK array) that each slicing orientation cuts.
SLICE_AXES = {"axial": 0, "coronal": 1, "sagittal": 2}


@dataclass
class Sample:
    """One 2D image with its ground truth.

    Attributes:
        image: ``(C, H, W)`` float32 raw intensities.
        label: ``(H, W)`` int64 class map.
        name: case name, plus ``:<slice index>`` for a slice of a volume.
    """

    image: np.ndarray
    label: np.ndarray
    name: str


class NnUNetDataset:
    """An nnU-Net v2 raw dataset folder.

    Raises:
        DatasetError: missing folder or ``dataset.json``; a ``dataset.json`` that is not an
            object, lacks a key the layout requires, has labels that are not integers (or are
            nnU-Net region lists), or channel keys other than ``"0".."C-1"``; when a case is
            read: a 4D or zero-size image or label, sizes that differ, unknown label values.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"dataset folder {self.root} does not exist")
        meta_path = self.root / "dataset.json"
        if not meta_path.is_file():
            raise DatasetError(f"{self.root} is not an nnU-Net raw dataset: dataset.json is missing")
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError as error:
            raise DatasetError(f"{meta_path} is not valid JSON: {error}") from error
        if not isinstance(meta, dict):
            raise DatasetError(f"{meta_path} must hold a JSON object, got {type(meta).__name__} {meta!r:.40}")
        missing = [key for key in ("channel_names", "labels", "file_ending") if key not in meta]
        if missing:
            raise DatasetError(f"{meta_path} lacks required key(s): {', '.join(missing)}")
        self.meta = meta
        if not isinstance(meta["file_ending"], str) or not meta["file_ending"].startswith("."):
            raise DatasetError(f"{meta_path}: file_ending must be a string like '.nii.gz', got {meta['file_ending']!r}")
        self.file_ending: str = meta["file_ending"]
        self.labels: dict[str, int] = _labels(meta["labels"], meta_path)
        self.channel_names = _channel_names(meta["channel_names"], meta_path)

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def rgb(self) -> bool:
        """One RGB file per case (PNG fundus photographs)."""
        return [name.upper() for name in self.channel_names] == ["R", "G", "B"]

    @property
    def image_channels(self) -> int:
        return len(self.channel_names)

    def cases(self, split: str = "Tr") -> list[str]:
        """Case names of ``split`` (``"Tr"`` or ``"Ts"``) that have a label file."""
        if split not in ("Tr", "Ts"):
            raise DatasetError(f"split must be 'Tr' or 'Ts', got {split!r}")
        images = self.root / f"images{split}"
        if not images.is_dir():
            raise DatasetError(f"{self.root} has no images{split}/ folder")
        suffix = f"_0000{self.file_ending}"
        cases = sorted(p.name[: -len(suffix)] for p in images.glob(f"*{suffix}"))
        labelled = [c for c in cases if (self.root / f"labels{split}" / f"{c}{self.file_ending}").is_file()]
        if not labelled:
            raise DatasetError(f"{images} holds no labelled cases (expected <case>_0000{self.file_ending})")
        return labelled

    def load_case(self, case: str, split: str = "Tr") -> tuple[np.ndarray, np.ndarray]:
        """``(image (C, *spatial) float32, label (*spatial) int64)`` in numpy (z, y, x) / (y, x) order."""
        label = sitk.GetArrayFromImage(_read(self.root / f"labels{split}" / f"{case}{self.file_ending}"))
        if self.rgb:
            rgb = sitk.GetArrayFromImage(_read(self.root / f"images{split}" / f"{case}_0000{self.file_ending}"))
            if rgb.ndim != 3 or rgb.shape[-1] < 3:
                raise DatasetError(f"{case}: expected an RGB image, got array shape {rgb.shape}")
            image = np.moveaxis(rgb[..., :3], -1, 0)
        else:
            image = np.stack([
                sitk.GetArrayFromImage(_read(self.root / f"images{split}" / f"{case}_{c:04d}{self.file_ending}"))
                for c in range(self.image_channels)
            ])
        if label.ndim == 3 and label.shape[-1] in (3, 4) and image.ndim == 3:
            label = label[..., 0]  # a label PNG saved as RGB(A): all channels equal
        if image.ndim - 1 not in (2, 3) or label.ndim not in (2, 3):
            raise DatasetError(
                f"{case}: image {image.shape[1:]} and label {label.shape} must be 2D or 3D "
                f"(a {max(image.ndim - 1, label.ndim)}D file cannot be cut into 2D slices)"
            )
        if image.size == 0 or label.size == 0:
            raise DatasetError(f"{case}: image {image.shape[1:]} or label {label.shape} has a zero-size dimension")
        if image.shape[1:] != label.shape:
            raise DatasetError(f"{case}: image {image.shape[1:]} and label {label.shape} sizes differ")
        unknown = set(np.unique(label).tolist()) - set(self.labels.values())
        if unknown:
            raise DatasetError(f"{case}: label values {sorted(unknown)} are not in dataset.json labels")
        return image.astype(np.float32), label.astype(np.int64)

    def samples(
        self, split: str = "Tr", axis: str = "axial", min_foreground: int = 1, max_cases: int | None = None
    ) -> Iterator[Sample]:
        """2D samples: each 2D case as it is; each 3D case as slices along ``axis`` having at
        least ``min_foreground`` foreground pixels, named ``case:index`` (axial) or
        ``case:axis:index``."""
        if axis not in SLICE_AXES:
            raise DatasetError(f"axis must be one of {', '.join(SLICE_AXES)}, got {axis!r}")
        for case in self.cases(split)[:max_cases]:
            image, label = self.load_case(case, split)
            if label.ndim == 2:
                if int((label > 0).sum()) >= min_foreground:
                    yield Sample(image, label, case)
                continue
            along = SLICE_AXES[axis]
            prefix = case if axis == "axial" else f"{case}:{axis}"
            counts = (label > 0).sum(axis=tuple(a for a in range(3) if a != along))
            for index in np.flatnonzero(counts >= max(1, min_foreground)):
                yield Sample(
                    np.ascontiguousarray(np.take(image, index, axis=along + 1)),
                    np.ascontiguousarray(np.take(label, index, axis=along)),
                    f"{prefix}:{index}",
                )


def _labels(labels: object, meta_path: Path) -> dict[str, int]:
    """``dataset.json`` labels as class name -> integer index (nnU-Net region lists are refused)."""
    if not isinstance(labels, dict):
        raise DatasetError(f"{meta_path}: labels must map class names to integers, got {type(labels).__name__} {labels!r:.60}")
    checked = {}
    for name, value in labels.items():
        if isinstance(value, list):
            raise DatasetError(f"{meta_path}: label {name!r} is a region ({value}); region-based labels are not supported")
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise DatasetError(f"{meta_path}: label {name!r} must be an integer class index, got {value!r}")
        checked[str(name)] = value
    return checked


def _channel_names(channels: object, meta_path: Path) -> list[str]:
    """``dataset.json`` channel names in channel order; keys must be the integers 0..C-1."""
    if not isinstance(channels, dict) or not channels:
        raise DatasetError(f"{meta_path}: channel_names must map '0', '1', ... to names, got {channels!r:.60}")
    bad = [key for key in channels if not str(key).isdigit()]
    if bad:
        raise DatasetError(f"{meta_path}: channel_names keys must be integers 0..{len(channels) - 1}, got {bad[0]!r}")
    if sorted(int(key) for key in channels) != list(range(len(channels))):
        raise DatasetError(f"{meta_path}: channel_names keys must be 0..{len(channels) - 1}, got {sorted(channels)}")
    return [str(channels[key]) for key in sorted(channels, key=int)]


def _read(path: Path) -> sitk.Image:
    if not path.is_file():
        raise DatasetError(f"missing file {path}")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise DatasetError(f"cannot read {path}: {error}") from error


# -- synthetic data ---------------------------------------------------------------------------


def _synthetic_scene(rng: np.random.Generator, size: int) -> tuple[list[np.ndarray], list[float]]:
    """Three separate elliptic blobs (at least 2 px apart), of which the first is the target.

    Returns:
        ``blobs``: three ``(size, size)`` bool masks, and ``values``: their noise-free
        brightness in [0.2, 1] (the target 0.55-1.0, each other blob at least 0.25 brighter or
        darker than it; the background is 0).
    """
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    while True:
        blobs = []
        for _ in range(3):
            centre = rng.uniform(0.2 * size, 0.8 * size, 2)
            radii = rng.uniform(0.08 * size, 0.18 * size, 2)
            angle = rng.uniform(0, np.pi)
            dr, dc = rows - centre[0], cols - centre[1]
            u = dr * np.cos(angle) + dc * np.sin(angle)
            v = -dr * np.sin(angle) + dc * np.cos(angle)
            blobs.append((u / radii[0]) ** 2 + (v / radii[1]) ** 2 <= 1.0)
        grown = [ndimage.binary_dilation(blob, iterations=2) for blob in blobs[:2]]
        if not (grown[0] & (blobs[1] | blobs[2])).any() and not (grown[1] & blobs[2]).any():
            break
    target = rng.uniform(0.55, 1.0)
    values = [target]
    for _ in blobs[1:]:
        value = rng.uniform(0.2, 1.0)
        while abs(value - target) < 0.25:
            value = rng.uniform(0.2, 1.0)
        values.append(value)
    return blobs, values


#: Target site: width (pixels) of each blob's bright rim, and its core's brightness as a fraction of the rim's.
TARGET_RIM_PX, TARGET_CORE_FRACTION = 3, 0.1


def synthetic_sample(rng: np.random.Generator, domain: str = "source", size: int = 96) -> Sample:
    """A synthetic image of three blobs, one of which is the target (in the spirit of the
    synthetic disks of Wong et al.), as the ``"source"`` site or a shifted ``"target"`` site
    sees it.

    Source: uniformly bright blobs on a dark background, little noise. Target (the "new
    site"): the same blobs are *ring-enhancing*, as lesions with a necrotic core on
    contrast-enhanced MRI: a bright rim of :data:`TARGET_RIM_PX` pixels around a dark core
    (:data:`TARGET_CORE_FRACTION` of the rim's brightness), and the whole blob, core included,
    is the object. The geometry is drawn first, so one seed gives the same scene at both sites.

    Returns:
        :class:`Sample` with image ``(1, size, size)`` and label ``(size, size)`` in {0, 1}.
    """
    if domain not in ("source", "target"):
        raise ValueError(f"domain must be 'source' or 'target', got {domain!r}")
    blobs, values = _synthetic_scene(rng, size)
    image = np.zeros((size, size), np.float32)
    for blob, value in zip(blobs, values):
        image[blob] = value
        if domain == "target":
            image[ndimage.binary_erosion(blob, iterations=TARGET_RIM_PX)] = TARGET_CORE_FRACTION * value
    image = image + 0.05 * rng.standard_normal((size, size))
    return Sample(image[None].astype(np.float32), blobs[0].astype(np.int64), f"synthetic-{domain}")


def synthetic_samples(n: int, domain: str, seed: int, size: int = 96) -> list[Sample]:
    """``n`` seeded synthetic samples of one domain."""
    rng = np.random.default_rng(seed)
    samples = [synthetic_sample(rng, domain, size) for _ in range(n)]
    for index, sample in enumerate(samples):
        sample.name = f"synthetic-{domain}-{seed}-{index:04d}"
    return samples
