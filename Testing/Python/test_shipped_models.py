"""Shipped models: card, checksum, and a sane segmentation of real images with simulated clicks."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import require_shared_data
from OAIMSSegment.clicks import correction_click, localization_click
from OAIMSSegment.data import NnUNetDataset, synthetic_samples
from OAIMSSegment.files import sha256_file
from OAIMSSegment.metrics import class_dice, mean_foreground
from OAIMSSegment.model import list_models, load_model, MODELS_DIR
from OAIMSSegment.session import AdaptConfig, InteractiveSession

SHIPPED = {
    "demo-synthetic-blobs": None,
    "brain-lesion-flair": "Dataset001_BraTS18_FLAIR",
    "brain-lesion-robust": "Dataset005_LGG_FLAIR",  # trained on BraTS18 + LGG FLAIR; checked on the larger collection
    "fundus-disc-cup": "Dataset003_DrishtiGS",
    "fundus-disc-cup-robust": "Dataset003_DrishtiGS",  # fine-tuned on Drishti-GS imagesTr only
}


def clicked_dice(session, sample, clicks: int, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    session.start(sample.image)
    click = localization_click(sample.label, rng)
    for _ in range(clicks):
        mask = session.add_click(click.position, click.label).mask
        click = correction_click(mask, sample.label, session.card.num_classes)
        if click is None:
            break
    return mean_foreground(class_dice(mask, sample.label, session.card.labels), session.card.labels)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_model_card_and_checksum(name):
    assert name in [card.name for card in list_models()], f"{name} is not shipped"
    model = load_model(name)
    card = model.card
    assert sha256_file(MODELS_DIR / card.weights) == card.sha256
    assert (MODELS_DIR / card.weights).stat().st_size < 10 * 2**20  # small enough to ship
    assert card.training["command"] and card.training["seed"] == 0
    assert card.metrics, f"{name}: the card records no measured Dice"


@pytest.mark.data
@pytest.mark.parametrize("name", ["brain-lesion-flair", "brain-lesion-robust", "fundus-disc-cup", "fundus-disc-cup-robust"])
def test_shipped_model_segments_real_images(name):
    dataset = NnUNetDataset(require_shared_data(SHIPPED[name]))
    samples = [s for s in dataset.samples("Ts", min_foreground=300)]
    samples = samples[:: max(1, len(samples) // 6)][:6]
    session = InteractiveSession(load_model(name), "frozen")
    scores = [clicked_dice(session, sample, clicks=5) for sample in samples]
    # Measured 0.91 (brain), 0.80 (brain-lesion-robust, on LGG FLAIR) and 0.94 (fundus) with the
    # shipped models; an untrained network scores near 0. Full measured quality is in the model cards.
    assert np.mean(scores) > (0.75 if name == "brain-lesion-robust" else 0.8), scores


def test_demo_model_adapts_to_the_shifted_site_and_guard_lets_ordinary_updates_pass():
    model = load_model("demo-synthetic-blobs")
    session = InteractiveSession(model, "pi+mi", AdaptConfig())
    applied = 0
    for sample in synthetic_samples(6, "target", seed=5):
        clicked_dice(session, sample, clicks=4)
        applied += session.accept().applied
    assert applied >= 5  # the drift guard (max_dice_drop 0.1) rejects only harmful updates


def test_drift_guard_rejects_a_collapsing_update():
    model = load_model("demo-synthetic-blobs")
    session = InteractiveSession(model, "pi", AdaptConfig(lr=5.0))  # an absurd step size
    sample = synthetic_samples(1, "source", seed=3)[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clicked_dice(session, sample, clicks=3)
    result = session.accept()
    assert not result.applied and ("Dice" in result.reason or "non-finite" in result.reason)
    assert all(np.array_equal(before[k].numpy(), v.numpy()) for k, v in model.state_dict().items())
