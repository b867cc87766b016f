"""Guidance maps and the simulated clinician on hand-built masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from OAIMSSegment.clicks import (
    Click,
    correction_click,
    error_components,
    guidance_maps,
    interior_point,
    localization_click,
    ranked_error_clicks,
    stamp_clicks,
    validate_click,
    wrong_click,
)
from OAIMSSegment.errors import InvalidClickError


def test_guidance_maps_channels_and_normalisation():
    maps = guidance_maps([Click((5, 6), 1), Click((20, 20), 0), Click((21, 20), 0)], (32, 32), 2, sigma=2.0)
    assert maps.shape == (2, 32, 32) and maps.dtype == torch.float32
    assert float(maps[0].max()) == pytest.approx(1.0) and maps[0].argmax() == 5 * 32 + 6  # fg first
    assert float(maps[1].max()) == pytest.approx(1.0) and float(maps[1, 5, 6]) < 1e-6  # bg last
    assert float(maps.min()) >= 0.0
    assert torch.equal(guidance_maps([], (8, 8), 3, 2.0), torch.zeros(3, 8, 8))
    three = guidance_maps([Click((4, 4), 2)], (8, 8), 3, 1.0)
    assert float(three[1, 4, 4]) == 1.0 and float(three[0].sum()) == 0.0 and float(three[2].sum()) == 0.0


@pytest.mark.parametrize(
    "click, message",
    [(Click((40, 2), 1), "outside"), (Click((float("nan"), 2), 1), "finite"), (Click((1, 2), 5), "class"), (Click((1,), 1), "coordinates")],
)
def test_validate_click_rejects_bad_clicks(click, message):
    with pytest.raises(InvalidClickError, match=message):
        validate_click(click, (32, 32), 2)


def test_correction_click_goes_to_the_middle_of_the_largest_error():
    target = np.zeros((50, 50), np.int64)
    target[10:30, 10:30] = 1  # 20x20 object
    prediction = target.copy()
    prediction[10:30, 10:18] = 0  # false negative strip 20x8: the largest error
    prediction[40:43, 40:43] = 1  # small false positive 3x3
    click = correction_click(prediction, target, 2)
    assert click.label == 1
    assert 10 <= click.position[0] < 30 and 10 <= click.position[1] < 18
    assert click.position[1] in (13, 14)  # farthest from the strip's border
    components = error_components(prediction, target, 2)
    assert [int(mask.sum()) for mask, _ in components] == [160, 9]
    assert [k for _, k in components] == [1, 0]
    assert correction_click(target, target, 2) is None


def test_interior_point_treats_the_image_edge_as_border():
    mask = np.zeros((10, 30), bool)
    mask[:, :12] = True
    row, col = interior_point(mask)
    # 5 px from the image's top/bottom edges and from the mask's left edge (the image edge) is the maximum
    assert row in (4, 5) and 4 <= col <= 7


def test_ranked_clicks_are_ordered_limited_and_seeded():
    target = np.zeros((60, 60), np.int64)
    prediction = np.zeros_like(target)
    sizes = [(5, 5), (10, 10), (3, 3), (7, 7)]
    for i, (h, w) in enumerate(sizes):
        target[5 + 14 * i : 5 + 14 * i + h, 5 : 5 + w] = 1
    clicks = ranked_error_clicks(prediction, target, 2, 3, np.random.default_rng(0))
    assert len(clicks) == 3
    rows = [c.position[0] for c in clicks]
    assert 19 <= rows[0] < 29 and 47 <= rows[1] < 54 and 5 <= rows[2] < 10  # sizes 100, 49, 25
    again = ranked_error_clicks(prediction, target, 2, 3, np.random.default_rng(0))
    assert clicks == again


def test_localization_and_wrong_clicks():
    target = np.zeros((20, 20), np.int64)
    target[5:9, 5:9] = 2
    rng = np.random.default_rng(3)
    for _ in range(10):
        click = localization_click(target, rng)
        assert target[click.position] == 2 and click.label == 2
    wrong = wrong_click(target, target, 3, rng)
    assert wrong.label != target[wrong.position]
    with pytest.raises(InvalidClickError):
        localization_click(np.zeros((4, 4), np.int64), rng)


def test_stamp_clicks_sets_a_disk_to_the_click_class_and_nothing_else():
    labels = torch.zeros((20, 20), dtype=torch.long)
    stamped = stamp_clicks(labels, [Click((10, 10), 1)], radius=3.0)
    rows, cols = torch.nonzero(stamped, as_tuple=True)
    distances = ((rows - 10) ** 2 + (cols - 10) ** 2).float().sqrt()
    assert distances.max() <= 3.0 and int(stamped.sum()) == 29  # the lattice points of a radius-3 disk
    assert int(labels.sum()) == 0  # the input is not modified
    only_pixel = stamp_clicks(torch.ones((5, 5), dtype=torch.long), [Click((0, 4), 0)], radius=0.0)
    assert int(only_pixel[0, 4]) == 0 and int(only_pixel.sum()) == 24


def test_interior_point_on_the_bounding_box_is_the_whole_image_transform():
    """Issue 21: the transform on the mask's padded bounding box gives the whole image's answer,
    ties (first in array order) and masks touching the image edge included."""
    from scipy import ndimage

    from OAIMSSegment.clicks import interior_point

    def whole_image(mask):
        distance = ndimage.distance_transform_edt(np.pad(mask, 1))[tuple(slice(1, -1) for _ in mask.shape)]
        return tuple(int(i) for i in np.unravel_index(int(np.argmax(distance)), mask.shape))

    rng = np.random.default_rng(0)
    masks = [np.zeros((40, 50), bool), np.ones((12, 12), bool)]
    for _ in range(40):
        mask = ndimage.binary_opening(rng.random((40, 50)) > rng.uniform(0.3, 0.7))
        masks.append(mask)
    square = np.zeros((30, 30), bool)
    square[0:6, 10:20] = True  # on the edge, many tied maxima
    masks += [square, rng.random((8, 20, 20)) > 0.5]
    for mask in masks:
        assert interior_point(mask) == whole_image(mask)
