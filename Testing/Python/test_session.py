"""The online session (Algorithm 1): MI and PI change the weights and lower their own loss,
undo restores, frozen never adapts, and bad input is refused clearly."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import tiny_card
from OAIMSSegment.clicks import Click, stamp_clicks
from OAIMSSegment.errors import InvalidClickError, InvalidImageError, ModelError, SessionStateError
from OAIMSSegment.losses import DiceFocal, ccg_loss
from OAIMSSegment.model import hard_labels
from OAIMSSegment.session import DEFAULT_LR, METHODS, AdaptConfig, InteractiveSession, method_name


def weights(model):
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


def oaims_loss(model, prepared, clicks, pseudo, config, latest):
    """L_DF + beta L_CCG of the prediction from ``clicks`` against ``pseudo`` (Algorithm 1, line 18)."""
    model.train()
    logits = model.logits(prepared, clicks)
    loss = DiceFocal(True, config.alpha)(logits, pseudo[None]) + config.beta * ccg_loss(
        logits, pseudo[None], [latest], config.sigma
    )
    return float(loss.detach())


def test_learning_rate_comes_from_the_card_unless_given(tiny_model):
    assert InteractiveSession(tiny_model, "pi+mi").config.lr == DEFAULT_LR
    tiny_model.card.adaptation_lr = 2e-4
    session = InteractiveSession(tiny_model, "pi+mi")
    assert session.config.lr == 2e-4 and session.optimizer.param_groups[0]["lr"] == 2e-4
    session.reconfigure("ia+sa", AdaptConfig(beta=100.0))
    assert session.optimizer.param_groups[0]["lr"] == 2e-4
    session.reconfigure("pi", AdaptConfig(lr=1e-3))
    assert session.optimizer.param_groups[0]["lr"] == 1e-3
    with pytest.raises(ModelError, match="adaptation_lr"):
        tiny_card(adaptation_lr=5.0)


def test_mi_click_changes_weights_and_lowers_its_own_loss(tiny_model, disk_image):
    image, _ = disk_image
    config = AdaptConfig(lr=1e-3)
    session = InteractiveSession(tiny_model, "mi", config)
    session.start(image)
    first = session.add_click((30, 34), 1)
    assert first.adapt_ms == 0 and first.loss is None  # nothing to correct on the first click
    before = weights(tiny_model)
    frozen = copy.deepcopy(tiny_model).eval()
    clicks = [Click((30, 34), 1), Click((5, 5), 0)]
    with torch.no_grad():
        pseudo = hard_labels(frozen.logits(session.prepared, clicks))[0]
    loss_before = oaims_loss(frozen, session.prepared, clicks[:1], pseudo, config, clicks[1:])
    result = session.add_click((5, 5), 0)
    assert result.loss == pytest.approx(loss_before, rel=1e-4)
    assert not torch.equal(before, weights(tiny_model))
    assert oaims_loss(tiny_model, session.prepared, clicks[:1], pseudo, config, clicks[1:]) < loss_before


def test_click_label_variant_makes_the_mi_pseudo_label_agree_with_the_click(tiny_model, disk_image):
    image, _ = disk_image
    session = InteractiveSession(tiny_model, "pi+mi/click-label", AdaptConfig(lr=1e-3))
    assert session.config.mi_click_label and not AdaptConfig().mi_click_label
    session.start(image)
    session.add_click((30, 34), 1)
    frozen = copy.deepcopy(tiny_model).eval()
    clicks = [Click((30, 34), 1), Click((5, 5), 0)]  # a background click where the model says foreground
    with torch.no_grad():
        pseudo = hard_labels(frozen.logits(session.prepared, clicks))[0]
    assert int(pseudo[5, 5]) == 1  # the model ignores the click
    stamped = stamp_clicks(pseudo, clicks[1:], session.config.sigma)
    expected = oaims_loss(frozen, session.prepared, clicks[:1], stamped, session.config, clicks[1:])
    unstamped = oaims_loss(frozen, session.prepared, clicks[:1], pseudo, session.config, clicks[1:])
    assert session.add_click((5, 5), 0).loss == pytest.approx(expected, rel=1e-4)
    assert expected > unstamped


def test_pi_accept_changes_weights_and_fits_the_accepted_mask(tiny_model, disk_image):
    image, mask = disk_image
    session = InteractiveSession(tiny_model, "pi", AdaptConfig(lr=1e-3, max_dice_drop=1.0))
    session.start(image)
    session.add_click((30, 34), 1)
    session.add_click((30, 47), 1)
    session.add_click((2, 2), 0)
    before = weights(tiny_model)
    result = session.accept(mask)  # the clinician's edited mask is the pseudo ground truth
    assert result.applied, result.reason
    assert set(result.losses) == {"stage1", "stage2"}
    assert not torch.equal(before, weights(tiny_model))
    # stage 1 again on the same image: its loss must have gone down
    prepared = tiny_model.prepare(image)
    tiny_model.train()
    target = torch.as_tensor(mask)[None]
    with torch.no_grad():
        after = float(DiceFocal(True)(tiny_model.logits(prepared, [Click((30, 34), 1)]), target))
    assert after < result.losses["stage1"]


def test_undo_restores_prediction_and_weights(tiny_model, disk_image):
    image, _ = disk_image
    session = InteractiveSession(tiny_model, "pi+mi", AdaptConfig(lr=1e-2))
    session.start(image)
    session.add_click((30, 34), 1)
    second = session.add_click((10, 50), 0)
    state = weights(tiny_model)
    session.add_click((40, 30), 1)
    assert not torch.equal(state, weights(tiny_model))
    restored = session.undo()
    assert np.array_equal(restored, second.mask)
    assert torch.equal(state, weights(tiny_model))
    assert len(session.clicks) == 2


def test_discard_reverts_every_update_of_the_image(tiny_model, disk_image):
    image, _ = disk_image
    start = weights(tiny_model)
    session = InteractiveSession(tiny_model, "pi+mi", AdaptConfig(lr=1e-2))
    session.start(image)
    for position, label in [((30, 34), 1), ((5, 5), 0), ((40, 40), 1)]:
        session.add_click(position, label)
    session.discard()
    assert torch.equal(start, weights(tiny_model)) and not session.active


def test_frozen_never_changes_weights(tiny_model, disk_image):
    image, mask = disk_image
    start = weights(tiny_model)
    session = InteractiveSession(tiny_model, "frozen")
    for _ in range(2):
        session.start(image)
        session.add_click((30, 34), 1)
        session.add_click((5, 5), 0)
        result = session.accept(mask)
        assert not result.applied
    assert torch.equal(start, weights(tiny_model))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_and_keeps_weights_finite(tiny_model, disk_image, method):
    image, _ = disk_image
    session = InteractiveSession(tiny_model, method, AdaptConfig(lr=1e-3))
    session.start(image)
    for position, label in [((30, 34), 1), ((5, 5), 0), ((42, 34), 1)]:
        result = session.add_click(position, label)
        assert result.mask.shape == (64, 64) and result.probabilities.shape == (2, 64, 64)
        assert np.allclose(result.probabilities.sum(axis=0), 1.0, atol=1e-5)
    session.accept()
    assert all(torch.isfinite(p).all() for p in tiny_model.parameters())


def test_state_dict_round_trip_keeps_optimizer_state(tiny_model, disk_image):
    image, _ = disk_image
    session = InteractiveSession(tiny_model, "pi+mi", AdaptConfig(lr=1e-3))
    session.start(image)
    session.add_click((30, 34), 1)
    session.add_click((5, 5), 0)
    session.accept()
    state = session.state_dict()
    assert state["optimizer"]["state"]  # Adam moments exist and travel with the weights
    other = InteractiveSession(copy.deepcopy(tiny_model), "pi+mi")
    other.reset_weights()
    other.load_state_dict(state)
    assert torch.equal(weights(other.model), weights(tiny_model))
    session.reset_weights()
    assert torch.equal(weights(tiny_model), torch.cat([v.flatten() for k, v in session.pretrained.items() if k in dict(tiny_model.named_parameters())]))
    session.load_state_dict(state)
    assert session.optimizer.state_dict()["state"]
    session.load_state_dict({"model": state["model"]})  # a site store milestone: weights only
    assert torch.equal(weights(tiny_model), weights(other.model))
    assert not session.optimizer.state_dict()["state"]  # fresh Adam, not the moments of other weights


def test_method_switches():
    assert method_name(True, True) == "pi+mi" and method_name(False, False) == "frozen"
    assert method_name(True, False) == "mi" and method_name(False, True) == "pi"


def test_bad_input_is_refused_clearly(tiny_model, disk_image):
    image, _ = disk_image
    session = InteractiveSession(tiny_model)
    with pytest.raises(SessionStateError, match="start"):
        session.add_click((1, 1), 1)
    for bad, message in [
        (np.full((64, 64), np.nan), "NaN"),
        (np.ones((64, 64)), "constant"),
        (np.random.rand(3, 64, 64), "channel"),
        (np.random.rand(2, 3, 64, 64), "2D image"),
        (np.random.rand(8, 64), "smallest"),
    ]:
        with pytest.raises(InvalidImageError, match=message):
            session.start(bad)
    session.start(image)
    with pytest.raises(InvalidClickError, match="outside"):
        session.add_click((64, 3), 1)
    with pytest.raises(InvalidClickError, match="finite"):
        session.add_click((float("inf"), 3), 1)
    with pytest.raises(SessionStateError, match="no clicks"):
        session.accept()
    session.add_click((30, 34), 1)
    result = session.accept(np.zeros((64, 64), np.int64))
    assert not result.applied and "empty" in result.reason
    with pytest.raises(ValueError, match="unknown method"):
        InteractiveSession(tiny_model, "magic")


def test_images_of_any_size_and_resized_working_space(disk_image):
    from conftest import tiny_card
    from OAIMSSegment.model import ClickSegmenter

    model = ClickSegmenter(tiny_card(channels=3, labels={"background": 0, "rim": 1, "cup": 2},
                                     normalization="zscore", working_size=48))
    session = InteractiveSession(model, "pi+mi")
    rgb = np.random.default_rng(0).random((3, 37, 101)).astype(np.float32)
    session.start(rgb)
    result = session.add_click((20, 90), 2)
    assert result.mask.shape == (37, 101) and result.probabilities.shape == (3, 37, 101)
    assert session.prepared.tensor.shape[-2:] == (20, 48)  # 37x101 -> 18x48 working, padded to 4


def test_reconfigure_keeps_weights_optimizer_and_pretrained(tiny_model, disk_image):
    image, _ = disk_image
    pretrained = weights(tiny_model)
    session = InteractiveSession(tiny_model, "pi+mi", AdaptConfig(lr=1e-3))
    session.start(image)
    session.add_click((30, 34), 1)
    session.add_click((5, 5), 0)
    with pytest.raises(SessionStateError, match="accept or discard"):
        session.reconfigure("frozen")
    session.accept()
    adapted = weights(tiny_model)
    session.reconfigure("tsca", AdaptConfig(lr=5e-4))
    assert session.method == "tsca" and session.optimizer.param_groups[0]["lr"] == 5e-4
    assert torch.equal(adapted, weights(tiny_model)) and session.optimizer.state_dict()["state"]
    session.reset_weights()
    assert torch.equal(pretrained, weights(tiny_model))
