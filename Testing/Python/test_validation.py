"""Session API input checks (issue 20 item 6): accepted masks and click labels/positions are
refused with a specific error before the session uses them; valid input drives a real session."""

from __future__ import annotations

import numpy as np
import pytest

from OAIMSSegment.errors import InvalidClickError, InvalidMaskError, OAIMSError
from OAIMSSegment.session import InteractiveSession
from OAIMSSegment.validation import accepted_mask, click_input


def _with(value, at=(3, 4), dtype=np.float64) -> np.ndarray:
    mask = np.zeros((64, 64), dtype)
    mask[10:20, 10:20] = 1
    mask[at] = value
    return mask


@pytest.mark.parametrize("mask, message", [
    (_with(np.nan), r"1 NaN or infinite value\(s\) \(first at pixel \(3, 4\)\)"),
    (_with(np.inf), "NaN or infinite"),
    (_with(0.5), r"non-integer labels \(e.g. 0.5 at pixel \(3, 4\)\)"),
    (_with(2, dtype=np.int64), r"labels \[2\] outside the model's classes 0..1"),
    (_with(-1, dtype=np.int64), r"labels \[-1\] outside"),
    (np.zeros((64, 63)), r"shape \(64, 63\), the image is \(64, 64\)"),
    (np.zeros((1, 64, 64)), "shape"),
    (np.array([["a"] * 64] * 64), "numeric"),
    (None, "None"),
])
def test_bad_accepted_masks_are_refused(mask, message):
    with pytest.raises(InvalidMaskError, match=message):
        accepted_mask(mask, (64, 64), 2)
    assert issubclass(InvalidMaskError, OAIMSError) and issubclass(InvalidMaskError, ValueError)


def test_good_masks_become_int64_class_maps():
    assert accepted_mask(_with(1.0), (64, 64), 2).dtype == np.int64
    boolean = accepted_mask(_with(1, dtype=np.int64).astype(bool), (64, 64), 2)
    assert boolean.dtype == np.int64 and int(boolean.sum()) == 101
    assert int(accepted_mask(_with(2, dtype=np.uint8), (64, 64), 3).max()) == 2


@pytest.mark.parametrize("position, label, message", [
    (None, 1, "pair of numbers, got None"),
    (5, 1, "pair of numbers, got 5"),
    ("ab", 1, "pair of numbers"),
    ((None, 3), 1, "must hold numbers"),
    ((float("nan"), 3), 1, "finite"),
    ((3, 4), None, "whole class number .*got None"),
    ((3, 4), float("nan"), "whole class number .*got nan"),
    ((3, 4), 0.7, "whole class number .*got 0.7"),
    ((3, 4), True, "whole class number"),
    ((3, 4), "1", "whole class number"),
    ((3, 4), 2, r"label 2 is not a class of this model \(0..1\)"),
    ((3, 4), -1, "label -1 is not a class"),
])
def test_bad_clicks_are_refused(position, label, message):
    with pytest.raises(InvalidClickError, match=message):
        click_input(position, label, 2)


def test_valid_input_drives_a_real_session(tiny_model, disk_image):
    image, truth = disk_image
    session = InteractiveSession(tiny_model, method="pi")
    session.start(image)
    position, label = click_input(np.array([30.0, 34.0]), np.float32(1.0), session.card.num_classes)
    assert position == (30.0, 34.0) and label == 1 and type(label) is int
    result = session.add_click(position, label)
    assert result.mask.shape == (64, 64)
    outcome = session.accept(mask=accepted_mask(truth.astype(np.float32), image.shape, session.card.num_classes))
    assert outcome.applied
