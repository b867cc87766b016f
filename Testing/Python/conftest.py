"""Shared fixtures: tiny real models and datasets written to temporary folders."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

# Two cores on CI: keep torch from oversubscribing them.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"


def tiny_card(channels: int = 1, labels: dict[str, int] | None = None, **kwargs):
    from OAIMSSegment.model import ModelCard

    return ModelCard(
        name=kwargs.pop("name", "tiny"),
        task="test",
        image_channels=channels,
        labels=labels or {"background": 0, "lesion": 1},
        network=kwargs.pop("network", {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1, "norm": "instance"}),
        **kwargs,
    )


@pytest.fixture
def tiny_model():
    from OAIMSSegment.model import ClickSegmenter

    torch.manual_seed(0)
    return ClickSegmenter(tiny_card())


@pytest.fixture
def disk_image():
    """A 64x64 image with a bright disk (radius 12 at (30, 34)) and its mask."""
    rows, cols = np.mgrid[0:64, 0:64]
    mask = ((rows - 30) ** 2 + (cols - 34) ** 2 <= 144).astype(np.int64)
    rng = np.random.default_rng(0)
    image = (mask * 2.0 + 0.2 * rng.standard_normal((64, 64))).astype(np.float32)
    return image, mask


def write_nnunet_dataset(root: Path, kind: str = "nifti", n: int = 3, rgb: bool = False, depth: int = 6) -> Path:
    """A small nnU-Net raw dataset (NIfTI volumes of ``depth`` x 48 x 48 or PNG images) with disks as
    foreground (in a volume: a radius-8 disk on axial slices 2-4, so 17 coronal and 17 sagittal slices)."""
    rng = np.random.default_rng(1)
    (root / "imagesTs").mkdir(parents=True)
    (root / "labelsTs").mkdir(parents=True)
    ending = ".nii.gz" if kind == "nifti" else ".png"
    channels = {"0": "R", "1": "G", "2": "B"} if rgb else {"0": "FLAIR"}
    labels = {"background": 0, "rim": 1, "cup": 2} if rgb else {"background": 0, "lesion": 1}
    (root / "dataset.json").write_text(json.dumps({"channel_names": channels, "labels": labels, "file_ending": ending}))
    for i in range(n):
        if kind == "nifti":
            zz, yy, xx = np.mgrid[0:depth, 0:48, 0:48]
            mask = ((yy - 24) ** 2 + (xx - 20 - i) ** 2 <= 64) & (zz >= 2) & (zz <= 4)
            image = (mask * 3.0 + 1.0 + 0.1 * rng.standard_normal(mask.shape)).astype(np.float32)
            sitk.WriteImage(sitk.GetImageFromArray(image), str(root / "imagesTs" / f"case{i}_0000{ending}"))
            sitk.WriteImage(sitk.GetImageFromArray(mask.astype(np.uint8)), str(root / "labelsTs" / f"case{i}{ending}"))
        else:
            yy, xx = np.mgrid[0:40, 0:40]
            distance = (yy - 20) ** 2 + (xx - 20) ** 2
            label = np.where(distance <= 36, 2, np.where(distance <= 144, 1, 0)).astype(np.uint8)
            rgb_image = np.stack([label * 80 + 20, label * 60 + 10, 30 + 0 * label], -1).astype(np.uint8)
            rgb_image = np.clip(rgb_image + rng.integers(0, 10, rgb_image.shape), 0, 255).astype(np.uint8)
            sitk.WriteImage(sitk.GetImageFromArray(rgb_image, isVector=True), str(root / "imagesTs" / f"eye{i}_0000{ending}"))
            sitk.WriteImage(sitk.GetImageFromArray(label), str(root / "labelsTs" / f"eye{i}{ending}"))
    return root


def require_shared_data(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real data {path} is absent (it sits beside the repository as ../shared/data)")
    return path
