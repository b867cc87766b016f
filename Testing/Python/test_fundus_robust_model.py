"""The shipped fundus-disc-cup-robust model on real photographs handed over as other cameras and
pipelines store them: its frozen Dice must not move by more than one point (issue 17, item 3)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import require_shared_data
from test_shipped_models import clicked_dice
from OAIMSSegment.data import NnUNetDataset, Sample
from OAIMSSegment.model import load_model
from OAIMSSegment.session import InteractiveSession

ROBUST = "fundus-disc-cup-robust"


def camera_variants(image: np.ndarray) -> dict[str, np.ndarray]:
    """An 8-bit RGB photograph ``(3, H, W)`` as another camera setting or file format would give it."""
    gains, offsets = np.array([0.8, 0.9, 0.7])[:, None, None], np.array([6.0, 0.0, 3.0])[:, None, None]
    return {
        "as stored": image,
        "white balance and exposure": image * gains + offsets,
        "16-bit": image * 257.0,
        "white balance, 8-bit": np.round(image * gains + offsets),  # gains < 1: nothing clips at 255
    }


@pytest.mark.data
@pytest.mark.parametrize("dataset", ["Dataset003_DrishtiGS", "Dataset004_ORIGA"])
def test_frozen_dice_moves_at_most_one_point_under_white_balance_exposure_and_bit_depth(dataset):
    samples = list(NnUNetDataset(require_shared_data(dataset)).samples("Ts", max_cases=9))[::3]
    session = InteractiveSession(load_model(ROBUST), "frozen")
    assert session.card.normalization == "robust_percentile"
    scores = {name: [] for name in camera_variants(samples[0].image)}
    for index, sample in enumerate(samples):
        for name, image in camera_variants(sample.image).items():
            scores[name].append(clicked_dice(session, Sample(image.astype(np.float32), sample.label, sample.name), 3, index))
    reference = float(np.mean(scores["as stored"]))
    assert reference > 0.7, scores  # the model segments these eyes at all (an untrained network is near 0)
    for name, values in scores.items():
        assert abs(float(np.mean(values)) - reference) <= 0.01, (name, scores)
