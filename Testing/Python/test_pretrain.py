"""Pretraining (Algorithm 2): seeded, resumable, and the intensity-curve augmentation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import OAIMSSegment.pretrain as pretraining
from conftest import tiny_card
from OAIMSSegment.data import synthetic_samples
from OAIMSSegment.pretrain import PretrainConfig, pretrain, remap_intensities


def _brain_like_image() -> torch.Tensor:
    """``(1, 48, 48)``: a z-scored 'brain' disk on a zero background, with a bright lesion."""
    rows, cols = np.mgrid[0:48, 0:48]
    brain = (rows - 24) ** 2 + (cols - 24) ** 2 <= 400
    lesion = (rows - 20) ** 2 + (cols - 28) ** 2 <= 25
    rng = np.random.default_rng(3)
    image = np.where(brain, 1.0 + 2.0 * lesion + 0.3 * rng.standard_normal((48, 48)), 0.0)
    image[brain] = (image[brain] - image[brain].mean()) / image[brain].std()
    return torch.tensor(image[None], dtype=torch.float32)


def test_intensity_curves_are_monotone_seeded_and_keep_the_background():
    image = _brain_like_image()
    inside = image[0] != 0
    directions = set()
    for seed in range(12):
        out = remap_intensities(image, np.random.default_rng(seed))
        assert torch.equal(out, remap_intensities(image, np.random.default_rng(seed)))
        assert bool((out[0][~inside] == 0).all())
        values = out[0][inside]
        assert abs(float(values.mean())) < 1e-4 and abs(float(values.std()) - 1.0) < 1e-3
        # A monotone curve keeps (or exactly reverses) the order of the intensities.
        order = torch.argsort(image[0][inside])
        steps = torch.diff(values[order])
        assert bool((steps >= -1e-5).all()) or bool((steps <= 1e-5).all())
        directions.add("up" if float(steps.sum()) > 0 else "down")
    assert directions == {"up", "down"}


def _config(**overrides) -> PretrainConfig:
    settings = dict(steps=6, batch_size=2, crop=None, max_clicks=3, checkpoint_every=3, seed=5, iterative=1,
                    intensity_remap=0.5)
    settings.update(overrides)
    return PretrainConfig(**settings)


def _interrupted_then_resumed(monkeypatch, samples, out, config: PretrainConfig, steps_done: int):
    """Run ``pretrain`` to ``out``, interrupt it after ``steps_done`` steps, then resume it to the end."""
    real_step, calls = pretraining.train_step, []

    def interrupted(*args, **kwargs):
        if len(calls) == steps_done:
            raise KeyboardInterrupt
        calls.append(1)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(pretraining, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_card(), samples, out, config, resume=True)
    assert not out.exists() and out.with_suffix(".ckpt").exists()
    monkeypatch.setattr(pretraining, "train_step", real_step)
    return pretrain(tiny_card(), samples, out, config, resume=True)


def test_pretraining_is_seeded_resumable_and_recorded_in_the_card(tmp_path, monkeypatch):
    samples = synthetic_samples(6, "source", seed=0, size=48)
    whole = pretrain(tiny_card(), samples, tmp_path / "whole.pt", _config(), resume=False)
    card = json.loads((tmp_path / "whole.json").read_text())
    assert card["training"]["intensity_remap"] == 0.5 and card["training"]["steps"] == 6
    assert card["sha256"] == whole.sha256

    # Interrupt a second run after its first checkpoint (step 3), then resume it.
    resumed = _interrupted_then_resumed(monkeypatch, samples, tmp_path / "resumed.pt", _config(), steps_done=4)
    assert resumed.sha256 == whole.sha256

    other = pretrain(tiny_card(), samples, tmp_path / "other.pt", _config(intensity_remap=0.0), resume=False)
    assert other.sha256 != whole.sha256


def test_pretrain_command_records_the_adaptation_lr_and_refuses_bad_options(tmp_path, capsys):
    from OAIMSSegment.cli import main
    from OAIMSSegment.model import load_model
    from OAIMSSegment.session import InteractiveSession

    base = ["pretrain", "--dataset", "synthetic", "--synthetic-n", "4", "--steps", "1", "--batch-size", "2",
            "--channels", "8,16,32", "--no-resume"]
    for option, message in ((["--intensity-remap", "2"], "--intensity-remap"), (["--adaptation-lr", "7"], "adaptation_lr"),
                            (["--average-last", "1.5"], "--average-last")):
        assert main([*base, "--out", str(tmp_path / "bad.pt"), *option]) == 2
        assert message in capsys.readouterr().err
        assert not list(tmp_path.iterdir())
    assert main([*base, "--out", str(tmp_path / "m.pt"), "--adaptation-lr", "1e-4", "--intensity-remap", "0.5"]) == 0
    model = load_model(tmp_path / "m.pt")
    assert model.card.adaptation_lr == 1e-4 and model.card.training["intensity_remap"] == 0.5
    assert InteractiveSession(model, "pi+mi").optimizer.param_groups[0]["lr"] == 1e-4


def test_bf16_training_is_seeded_recorded_and_keeps_float32_weights(tmp_path):
    samples = synthetic_samples(6, "source", seed=0, size=48)
    first = pretrain(tiny_card(), samples, tmp_path / "a.pt", _config(bf16=True), resume=False)
    again = pretrain(tiny_card(), samples, tmp_path / "b.pt", _config(bf16=True), resume=False)
    full = pretrain(tiny_card(), samples, tmp_path / "c.pt", _config(), resume=False)
    assert first.sha256 == again.sha256 != full.sha256
    assert first.training["bf16"] is True and full.training["bf16"] is False
    state = torch.load(tmp_path / "a.pt", map_location="cpu", weights_only=True)
    assert {tensor.dtype for tensor in state.values()} == {torch.float32}


def test_weight_averaging_saves_the_mean_of_the_last_steps_and_survives_a_resume(tmp_path, monkeypatch):
    samples = synthetic_samples(6, "source", seed=0, size=48)
    real_step, snapshots = pretraining.train_step, []

    def recording(model, *args, **kwargs):
        loss = real_step(model, *args, **kwargs)
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return loss

    monkeypatch.setattr(pretraining, "train_step", recording)
    averaged = pretrain(tiny_card(), samples, tmp_path / "avg.pt", _config(average_last=0.5), resume=False)
    monkeypatch.setattr(pretraining, "train_step", real_step)
    saved = torch.load(tmp_path / "avg.pt", map_location="cpu", weights_only=True)
    last_final = torch.load(tmp_path / "avg.ckpt", map_location="cpu", weights_only=True)["model"]
    assert len(snapshots) == 6 and averaged.training["average_last"] == 0.5
    for name, value in saved.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, torch.stack([s[name] for s in snapshots[3:]]).mean(0))
    assert any(not torch.equal(saved[k], last_final[k]) for k in saved)

    # Interrupted in step 6, its last checkpoint (step 4) holds a partial average: resuming from it
    # saves the weights of an uninterrupted run.
    config = _config(average_last=0.5, checkpoint_every=2)
    whole = pretrain(tiny_card(), samples, tmp_path / "whole.pt", config, resume=False)
    resumed = _interrupted_then_resumed(monkeypatch, samples, tmp_path / "resumed.pt", config, steps_done=5)
    assert resumed.sha256 == whole.sha256


def _training_set(root, **kwargs):
    """A tiny nnU-Net dataset whose cases are its imagesTr/labelsTr."""
    from conftest import write_nnunet_dataset

    write_nnunet_dataset(root, **kwargs)
    for kind in ("images", "labels"):
        (root / f"{kind}Ts").rename(root / f"{kind}Tr")
    return root


def test_pretrain_on_several_datasets_with_an_augmentation_recipe(tmp_path, capsys):
    from OAIMSSegment.cli import main
    from OAIMSSegment.model import load_model

    first, second = _training_set(tmp_path / "A", n=2), _training_set(tmp_path / "B", n=3)
    base = ["pretrain", "--steps", "2", "--batch-size", "2", "--channels", "8,16,32", "--no-resume",
            "--normalization", "robust_percentile", "--augment", "scanner"]
    assert main([*base, "--dataset", str(first), "--dataset", str(second), "--out", str(tmp_path / "m.pt")]) == 0
    card = load_model(tmp_path / "m.pt").card
    assert card.normalization == "robust_percentile" and card.training["augment"] == "scanner"
    assert "A imagesTr (2 cases, axial slices) + B imagesTr (3 cases, axial slices)" in card.training["dataset"]
    assert card.training["samples"] == 3 * 5  # 3 slices with foreground per case
    # a comma list is the same as repeating --dataset; the same seed draws the same augmentations
    assert main([*base, "--dataset", f"{first},{second}", "--out", str(tmp_path / "again.pt")]) == 0
    assert load_model(tmp_path / "again.pt").card.sha256 == card.sha256
    # datasets with other channels or labels cannot train one model
    fundus = _training_set(tmp_path / "eyes", kind="png", n=1, rgb=True)
    assert main([*base, "--dataset", f"{first},{fundus}", "--out", str(tmp_path / "bad.pt")]) == 2
    assert "cannot be trained together" in capsys.readouterr().err
    assert not (tmp_path / "bad.pt").exists()



def test_pretrain_slices_each_dataset_in_the_planes_asked(tmp_path, capsys):
    """``--axis`` once applies to every dataset; once per ``--dataset`` slices each its own way."""
    from OAIMSSegment.cli import main
    from OAIMSSegment.model import load_model

    # 20 x 48 x 48 volumes (coronal and sagittal slices tall enough for the network), foreground on
    # 3 axial, 17 coronal and 17 sagittal slices each
    first, second = _training_set(tmp_path / "A", n=2, depth=20), _training_set(tmp_path / "B", n=3, depth=20)
    base = ["pretrain", "--steps", "1", "--batch-size", "2", "--channels", "8,16,32", "--no-resume",
            "--dataset", str(first), "--dataset", str(second)]
    assert main([*base, "--axis", "axial,coronal", "--axis", "axial", "--out", str(tmp_path / "m.pt")]) == 0
    card = load_model(tmp_path / "m.pt").card
    assert card.training["samples"] == 2 * (3 + 17) + 3 * 3
    assert "A imagesTr (2 cases, axial+coronal slices) + B imagesTr (3 cases, axial slices)" in card.training["dataset"]
    assert main([*base, "--axis", "sagittal", "--out", str(tmp_path / "s.pt")]) == 0
    assert load_model(tmp_path / "s.pt").card.training["samples"] == 5 * 17
    assert "skipped" not in capsys.readouterr().out
    assert main([*base, "--axis", "axial", "--axis", "axial", "--axis", "coronal", "--out", str(tmp_path / "bad.pt")]) == 2
    assert "--axis was given 3 times for 2 dataset(s)" in capsys.readouterr().err
    for bad in ("axial,axial", "oblique"):
        with pytest.raises(SystemExit) as refused:
            main([*base, "--axis", bad, "--out", str(tmp_path / "bad.pt")])
        assert refused.value.code == 2 and "distinct orientations" in capsys.readouterr().err
    assert not (tmp_path / "bad.pt").exists()


def test_a_slice_of_another_plane_is_named_by_its_plane(tmp_path):
    from OAIMSSegment.data import NnUNetDataset

    dataset = NnUNetDataset(_training_set(tmp_path / "A", n=1, depth=20))
    assert [s.name for s in dataset.samples("Tr")] == ["case0:2", "case0:3", "case0:4"]
    coronal = list(dataset.samples("Tr", axis="coronal"))
    assert [s.name for s in coronal] == [f"case0:coronal:{index}" for index in range(16, 33)]
    assert coronal[8].image.shape == (1, 20, 48) and coronal[8].label.sum() == 3 * 17  # the disk's diameter


def test_the_schedule_runs_for_every_short_probe_length():
    """A 20-step probe used to die in OneCycleLR's warm-up (division by zero); every length must run."""
    from OAIMSSegment.pretrain import one_cycle

    for steps in range(1, 81):
        optimizer = torch.optim.Adam(torch.nn.Linear(1, 1).parameters(), lr=1e-3)
        schedule = one_cycle(optimizer, 1e-3, steps)
        rates = []
        for _ in range(steps - 1):
            optimizer.step()
            schedule.step()
            rates.append(optimizer.param_groups[0]["lr"])
        assert all(math.isfinite(rate) and 0 < rate <= 1e-3 + 1e-12 for rate in rates), steps
