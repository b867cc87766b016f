"""Fundus photographs from other cameras (issue 17, item 3): the colour-jittered evaluation copy,
the ``fundus`` augmentation recipe of pretraining, and per-channel ``robust_percentile`` on RGB."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import write_nnunet_dataset
from OAIMSSegment.augment import RECIPES, RandCameraColourd, RandJpegd, colour_matrix
from OAIMSSegment.cli import main
from OAIMSSegment.colour import colour_jitter, jitter_rng, jpeg
from OAIMSSegment.errors import InvalidImageError
from OAIMSSegment.model import normalize


def fundus_like_image(seed: int = 0, size: int = 96) -> np.ndarray:
    """A (3, size, size) 8-bit RGB photograph: orange-red fundus, a pale disc, a white cup, dark vessels, noise."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:size, 0:size] / size
    radius = np.hypot(rows - 0.5, cols - 0.52)
    disc, cup = radius < 0.25, radius < 0.12
    vessel = np.abs(cols - 0.45 - 0.1 * np.sin(6 * rows)) < 0.02
    base = np.array([150.0, 60.0, 20.0])[:, None, None] * (1.0 - 0.6 * radius)
    image = base + disc * np.array([70.0, 90.0, 50.0])[:, None, None] + cup * np.array([30.0, 60.0, 60.0])[:, None, None]
    image = image * np.where(vessel, 0.55, 1.0) + 4.0 * rng.standard_normal((3, size, size))
    return np.clip(np.round(image), 0, 255).astype(np.float32)


def fundus_label(size: int = 96) -> np.ndarray:
    rows, cols = np.mgrid[0:size, 0:size] / size
    radius = np.hypot(rows - 0.5, cols - 0.52)
    return np.where(radius < 0.12, 2, np.where(radius < 0.25, 1, 0)).astype(np.int64)


def test_colour_jitter_is_seeded_by_seed_and_case_name_and_stays_8_bit():
    image = fundus_like_image()
    first = colour_jitter(image, jitter_rng(0, "eye1"))
    assert first.shape == image.shape and first.dtype == np.float32
    assert np.array_equal(first, colour_jitter(image, jitter_rng(0, "eye1")))  # the same copy every run
    assert np.array_equal(first, np.round(first)) and first.min() >= 0 and first.max() <= 255
    others = [colour_jitter(image, jitter_rng(seed, name)) for seed, name in ((1, "eye1"), (0, "eye2"))]
    assert all(not np.array_equal(first, other) for other in others)
    # it changes colours, not just brightness: the channels' ratios move
    ratios = [(out[0].mean() / out[1].mean()) for out in (image, first, *others)]
    assert np.ptp(ratios) > 0.02, ratios


@pytest.mark.parametrize("image, message", [
    (np.zeros((1, 32, 32), np.float32), "RGB"),
    (np.full((3, 32, 32), np.nan, np.float32), "NaN"),
])
def test_colour_jitter_refuses_what_is_not_an_rgb_photograph(image, message):
    with pytest.raises(InvalidImageError, match=message):
        colour_jitter(image, jitter_rng(0, "eye"), "eye")


def test_jpeg_round_trip_degrades_with_lower_quality():
    image = fundus_like_image()
    errors = [float(np.abs(jpeg(image, quality) - image).mean()) for quality in (95, 50, 10)]
    assert 0 < errors[0] < errors[1] < errors[2], errors


def test_colour_matrix_keeps_grey_and_removes_colour_at_zero_saturation():
    assert np.allclose(colour_matrix(1.0, 0.0), np.eye(3))
    grey = np.array([0.4, 0.4, 0.4])
    assert np.allclose(colour_matrix(1.3, 0.25) @ grey, grey)
    assert np.allclose(colour_matrix(0.0, 0.0) @ np.array([0.9, 0.3, 0.0]), [0.4, 0.4, 0.4])
    # a hue rotation keeps the distance from grey (saturation 1): it turns colours, it does not fade them
    red = np.array([0.9, 0.3, 0.0])
    turned = colour_matrix(1.0, 0.3) @ red
    assert not np.allclose(turned, red) and np.isclose(np.linalg.norm(turned - turned.mean()), np.linalg.norm(red - red.mean()))


def test_camera_colour_and_jpeg_transforms_are_seeded_in_range_and_want_rgb():
    unit = torch.from_numpy(fundus_like_image() / 255.0).float()
    for transform in (RandCameraColourd("image", prob=1.0), RandJpegd("image", prob=1.0)):
        outputs = []
        for seed in (5, 5, 6):
            transform.set_random_state(seed=seed)
            outputs.append(torch.as_tensor(transform({"image": unit})["image"]))
        assert torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[0], outputs[2])
        assert outputs[0].shape == unit.shape and float(outputs[0].min()) >= 0 and float(outputs[0].max()) <= 1
        assert float((outputs[0] - unit).abs().mean()) > 1e-3
    with pytest.raises(InvalidImageError, match="RGB"):
        RandCameraColourd("image", prob=1.0)({"image": unit[:1]})


def test_fundus_recipe_is_seeded_keeps_labels_aligned_and_renormalises():
    image = torch.from_numpy(normalize(fundus_like_image(), "robust_percentile"))
    label = torch.from_numpy(fundus_label())
    recipe = RECIPES["fundus"]("robust_percentile")
    first = recipe(image, label, np.random.default_rng(3))
    again = recipe(image, label, np.random.default_rng(3))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    outputs = [recipe(image, label, np.random.default_rng(seed)) for seed in range(8)]
    assert sum(not torch.equal(out[0], image) for out in outputs) >= 6
    assert any(not torch.equal(out[1], label) for out in outputs)  # the geometry moves the label too
    for out_image, out_label in outputs:
        assert out_image.shape == image.shape and set(out_label.unique().tolist()) <= {0, 1, 2}
        assert bool((out_label == 2).any())  # the cup is never moved out of view
        for channel in out_image:  # each channel renormalised on its own, as inference would
            assert abs(float(channel.mean())) < 1e-3 and abs(float(channel.std()) - 1.0) < 1e-2
        if torch.equal(out_label, label):  # no move: the cup stays brighter than the fundus in the green channel
            assert float(out_image[1][out_label == 2].mean()) > float(out_image[1][out_label == 0].mean())


def test_per_channel_robust_percentile_removes_exposure_and_white_balance():
    image = fundus_like_image()
    reference = normalize(image, "robust_percentile")
    gains, offsets = np.array([0.7, 1.1, 1.6]), np.array([5.0, -3.0, 12.0])
    camera = image * gains[:, None, None] + offsets[:, None, None]  # another exposure and white balance
    assert np.abs(normalize(camera.astype(np.float32), "robust_percentile") - reference).max() < 1e-4
    sixteen_bit = image * 257.0  # the same photograph stored as 16-bit
    assert np.abs(normalize(sixteen_bit.astype(np.float32), "robust_percentile") - reference).max() < 1e-4
    # a few saturated pixels (a flash reflex) move a plain z-score, not the clipped one
    flashed = image.copy()
    flashed[:, :3, :3] = 4000.0
    inside = (slice(None), slice(10, None), slice(10, None))
    assert np.abs(normalize(flashed, "robust_percentile")[inside] - reference[inside]).max() < 0.05
    assert np.abs(normalize(flashed, "zscore")[inside] - normalize(image, "zscore")[inside]).max() > 0.3


def test_evaluate_on_a_colour_jittered_copy_is_recorded_and_leaves_the_files(tmp_path):
    from OAIMSSegment.model import ClickSegmenter, save_model
    from conftest import tiny_card

    root = write_nnunet_dataset(tmp_path / "eyes", "png", n=2, rgb=True)
    before = {path.name: path.read_bytes() for path in (root / "imagesTs").iterdir()}
    weights = tmp_path / "eyes.pt"
    torch.manual_seed(0)
    save_model(ClickSegmenter(tiny_card(3, {"background": 0, "rim": 1, "cup": 2}, normalization="robust_percentile")), weights)
    summaries = {}
    for name, extra in (("plain", []), ("jitter", ["--colour-jitter", "0"]), ("again", ["--colour-jitter", "0"])):
        out = tmp_path / f"{name}.json"
        assert main(["evaluate", "--model", str(weights), "--dataset", str(root), "--methods", "frozen",
                     "--clicks", "2", "--json", str(out), *extra]) == 0
        summaries[name] = json.loads(out.read_text())
    assert summaries["jitter"]["colour_jitter"] == 0 and "colour_jitter" not in summaries["plain"]
    assert summaries["jitter"]["dataset"].endswith("(colour jitter, seed 0)")
    assert summaries["jitter"]["results"] == summaries["again"]["results"]  # the same copy each run
    assert summaries["jitter"]["results"] != summaries["plain"]["results"]
    assert before == {path.name: path.read_bytes() for path in (root / "imagesTs").iterdir()}


def test_colour_jitter_and_the_fundus_recipe_refuse_grey_data_in_one_line(tmp_path, capsys):
    from OAIMSSegment.model import ClickSegmenter, save_model
    from conftest import tiny_card

    grey = write_nnunet_dataset(tmp_path / "grey", "nifti", n=1)
    weights = tmp_path / "grey.pt"
    save_model(ClickSegmenter(tiny_card()), weights)
    assert main(["evaluate", "--model", str(weights), "--dataset", str(grey), "--colour-jitter", "0",
                 "--json", str(tmp_path / "x.json")]) == 2
    assert "--colour-jitter needs an RGB dataset" in capsys.readouterr().err
    for kind in ("images", "labels"):
        (grey / f"{kind}Ts").rename(grey / f"{kind}Tr")
    assert main(["pretrain", "--dataset", str(grey), "--steps", "1", "--batch-size", "1", "--channels", "8,16,32",
                 "--normalization", "robust_percentile", "--augment", "fundus", "--out", str(tmp_path / "m.pt")]) == 2
    assert "for RGB photographs" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()


def test_robust_percentile_gives_a_constant_colour_channel_zero_and_refuses_an_all_constant_image():
    image = fundus_like_image()
    image[2] = 0.0  # a jittered or red-free photograph whose blue channel is empty
    out = normalize(image, "robust_percentile")
    assert np.array_equal(out[2], np.zeros_like(out[2]))
    assert np.allclose(out[:2], normalize(image[:2], "robust_percentile"))  # the other channels as before
    with pytest.raises(InvalidImageError, match="constant"):
        normalize(np.full((3, 32, 32), 9.0, np.float32), "robust_percentile")
