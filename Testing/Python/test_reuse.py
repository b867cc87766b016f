"""Issue 21: forward passes reused (kept graphs, P_t^initial once, the PI guard's "before") give
the same weights and masks as the old path (``reuse_graphs=False``), on the tiny model and the
shipped brain model; they are used only for the same computation; two-phase feedback; and the
session's input checks (issue 20 item 6)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from OAIMSSegment.errors import InvalidClickError, InvalidMaskError
from OAIMSSegment.model import load_model
from OAIMSSegment.reuse import saved_tensor_bytes, train_equals_eval, weights_version
from OAIMSSegment.session import AdaptConfig, InteractiveSession

#: Clicks (original pixels, label) of the 64 x 64 disk image; None is an undo.
CLICKS = [((30, 34), 1), ((5, 5), 0), ((40, 44), 1), None, ((20, 25), 1), ((60, 2), 0)]


def forward_counter(model) -> list[int]:
    """A list whose length is the number of forward passes ``model`` has run since."""
    calls: list[int] = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


def run(model, image, method, reuse, clicks=CLICKS, lr=1e-2):
    """Masks, probabilities and losses of each click, the weights after each, and the accept."""
    session = InteractiveSession(model, method, AdaptConfig(lr=lr), reuse_graphs=reuse)
    session.start(image)
    masks, probabilities, losses, weights = [], [], [], []
    for click in clicks:
        if click is None:
            masks.append(session.undo())
        else:
            result = session.add_click(*click)
            masks.append(result.mask)
            probabilities.append(result.probabilities)
            losses.append(result.loss)
        weights.append([p.detach().clone() for p in model.parameters()])
    accepted = session.accept()
    weights.append([p.detach().clone() for p in model.parameters()])
    return masks, probabilities, losses, weights, accepted


def assert_same_path(model, image, method, clicks=CLICKS, lr=1e-2):
    """The old and the new path agree bit for bit (the same operations on the same numbers:
    no tolerance is needed on CPU)."""
    old = run(copy.deepcopy(model), image, method, False, clicks, lr)
    new = run(copy.deepcopy(model), image, method, True, clicks, lr)
    assert len(old[0]) == len(new[0]) == len(clicks) and len(old[3]) == len(new[3]) == len(clicks) + 1
    assert all(np.array_equal(a, b) for a, b in zip(old[0], new[0]))
    assert all(np.array_equal(a, b) for a, b in zip(old[1], new[1]))
    assert old[2] == new[2]
    assert all(torch.equal(a, b) for before, after in zip(old[3], new[3]) for a, b in zip(before, after))
    summary = lambda accepted: (accepted.applied, accepted.reason, accepted.losses, accepted.dice_before, accepted.dice_after)  # noqa: E731
    assert summary(old[4]) == summary(new[4])
    return old, new


@pytest.mark.parametrize("method", ["pi+mi", "mi", "pi", "pi+mi/click-label", "tsca", "ia+sa", "ce-mi+pi"])
def test_reused_passes_give_the_same_weights_and_masks_as_the_old_path(tiny_model, disk_image, method):
    old, new = assert_same_path(tiny_model, disk_image[0], method)
    if method != "pi":  # the clicks did move the weights: the comparison is not between two frozen models
        assert not torch.equal(old[3][0][0], old[3][-2][0])


def test_shipped_brain_model_gives_the_same_weights_and_masks_with_reuse():
    model = load_model("brain-lesion-flair")
    rows, cols = np.mgrid[0:96, 0:96]
    rng = np.random.default_rng(3)
    image = (100.0 + 20 * rng.standard_normal((96, 96)) + 150.0 * ((rows - 40) ** 2 + (cols - 50) ** 2 < 150)).astype(np.float32)
    clicks = [((40, 50), 1), ((10, 10), 0), ((45, 60), 1)]
    old, new = assert_same_path(model, image, "pi+mi", clicks, lr=1e-4)
    assert old[4].applied and not torch.equal(old[3][0][0], old[3][-1][0])


def test_an_mi_click_runs_two_forward_passes_and_an_accept_three(tiny_model, disk_image):
    counts = {}
    for reuse in (False, True):
        model = copy.deepcopy(tiny_model)
        calls = forward_counter(model)
        session = InteractiveSession(model, "pi+mi", AdaptConfig(lr=1e-2), reuse_graphs=reuse)
        session.start(disk_image[0])
        session.add_click((30, 34), 1)
        before = len(calls)
        session.add_click((5, 5), 0)
        mi = len(calls) - before
        feedback = []
        session.add_click((40, 44), 1, on_first_feedback=feedback.append)
        with_feedback = len(calls) - before - mi
        before = len(calls)
        assert session.accept().applied
        counts[reuse] = (mi, with_feedback, len(calls) - before)
    # old: P_t^initial, P_{t-1}, P_t (+1 for a first feedback); PI: guard, stage-1 labels, stage 1, stage 2, guard
    assert counts == {False: (3, 4, 5), True: (2, 2, 3)}


def test_a_kept_graph_is_not_used_after_undo_or_a_weight_change(tiny_model, disk_image):
    calls = forward_counter(tiny_model)
    session = InteractiveSession(tiny_model, "pi+mi", AdaptConfig(lr=1e-2))
    session.start(disk_image[0])
    session.add_click((30, 34), 1)
    session.add_click((5, 5), 0)
    assert session._kept is not None
    session.undo()
    assert session._kept is None
    before = len(calls)
    session.add_click((5, 5), 0)
    assert len(calls) - before == 3  # P_{t-1} recomputed: the graph of the undone click is gone
    session.model.load_state_dict(session.state_dict()["model"])  # same values, but written in place
    assert session._kept is not None
    before = len(calls)
    session.add_click((40, 44), 1)
    assert len(calls) - before == 3  # the version check saw the write


def test_a_network_with_active_dropout_is_never_reused(tiny_model, disk_image):
    assert train_equals_eval(tiny_model.net)
    tiny_model.net.model[0].conv.unit0.adn.add_module("D", torch.nn.Dropout(0.5))
    assert not train_equals_eval(tiny_model.net)
    calls = forward_counter(tiny_model)
    session = InteractiveSession(tiny_model, "pi+mi", AdaptConfig(lr=1e-2))
    session.start(disk_image[0])
    session.add_click((30, 34), 1)
    before = len(calls)
    session.add_click((5, 5), 0)
    assert len(calls) - before == 3 and session._kept is None


def test_weights_version_moves_with_every_in_place_write(tiny_model, disk_image):
    session = InteractiveSession(tiny_model, "pi+mi", AdaptConfig(lr=1e-2))
    start = weights_version(tiny_model)
    session.start(disk_image[0])
    session.add_click((30, 34), 1)
    assert weights_version(tiny_model) == start  # predictions and snapshots write nothing
    session.add_click((5, 5), 0)
    stepped = weights_version(tiny_model)
    assert all(b > a for a, b in zip(start, stepped))
    session.undo()
    assert all(b > a for a, b in zip(stepped, weights_version(tiny_model)))


def test_saved_tensor_bytes_measures_a_graph_and_not_the_weights(tiny_model, disk_image):
    session = InteractiveSession(tiny_model, "pi+mi")
    session.start(disk_image[0])
    logits, graph = saved_tensor_bytes(lambda: session.train_logits(session.working_clicks), exclude=tiny_model)
    assert logits.requires_grad and graph > 64 * 64 * 4 * 8  # at least the first layer's 8 channels
    with torch.no_grad():
        _, nothing = saved_tensor_bytes(lambda: session.predict_logits([]))
    assert nothing == 0


def test_first_feedback_is_the_new_click_with_the_old_weights(tiny_model, disk_image):
    image, _ = disk_image
    reference = InteractiveSession(copy.deepcopy(tiny_model), "frozen")
    reference.start(image)
    session = InteractiveSession(tiny_model, "pi+mi", AdaptConfig(lr=1e-2))
    session.start(image)
    seen = []
    first = session.add_click((30, 34), 1, on_first_feedback=seen.append)
    assert seen == [first]  # no MI step: the first feedback is the result
    reference.add_click((30, 34), 1)
    second = session.add_click((5, 5), 0, on_first_feedback=seen.append)
    preview = seen[1]
    assert np.array_equal(preview.mask, reference.add_click((5, 5), 0).mask)  # old weights, new click
    assert preview.loss is None and preview.adapt_ms == 0 and second.loss is not None
    assert preview.latency_ms < second.latency_ms and not np.array_equal(preview.probabilities, second.probabilities)

    def refuse(result):
        raise RuntimeError("panel closed")

    stepped = [p.detach().clone() for p in tiny_model.parameters()]
    with pytest.raises(RuntimeError, match="panel closed"):
        session.add_click((40, 44), 1, on_first_feedback=refuse)
    assert len(session.steps) == 2 and all(torch.equal(a, b) for a, b in zip(stepped, tiny_model.parameters()))


@pytest.mark.parametrize("position, label, message", [
    (None, 1, "pair of numbers, got None"),
    ((30, 34), float("nan"), "whole class number .*got nan"),
    ((30, 34), 0.7, "whole class number .*got 0.7"),
])
def test_a_bad_click_is_refused_and_records_nothing(tiny_model, disk_image, position, label, message):
    session = InteractiveSession(tiny_model, "pi+mi", AdaptConfig(lr=1e-2))
    session.start(disk_image[0])
    session.add_click((30, 34), 1)
    with pytest.raises(InvalidClickError, match=message):
        session.add_click(position, label)
    assert len(session.steps) == 1
    assert session.add_click((5.0, 5.0), 0.0).click.label == 0  # whole-number floats are classes


def test_a_bad_accepted_mask_is_refused_and_keeps_the_image_open(tiny_model, disk_image):
    image, truth = disk_image
    session = InteractiveSession(tiny_model, "pi")
    session.start(image)
    session.add_click((30, 34), 1)
    mask = truth.astype(np.float32)
    mask[3, 4] = np.nan
    with pytest.raises(InvalidMaskError, match=r"NaN or infinite value\(s\) \(first at pixel \(3, 4\)\)"):
        session.accept(mask)
    with pytest.raises(InvalidMaskError, match="outside the model's classes"):
        session.accept(truth * 2)
    with pytest.raises(InvalidMaskError, match="shape"):
        session.accept(truth[:, :10])
    assert session.active and session.accept(truth.astype(np.float32)).applied
