"""The method registry and the session's use of it: flags, a method added as one class, the
per-click step records, reconfigure keeping what it should, and one Dice for the PI guard."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO
from OAIMSSegment import methods
from OAIMSSegment.clicks import Click, click_gaussians, click_offsets, guidance_maps, squared_distances
from OAIMSSegment.model import load_model
from OAIMSSegment.metrics import mean_foreground_dice
from OAIMSSegment.session import METHODS, AdaptConfig, InteractiveSession


def weights(model):
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


def two_clicks(model, image, method, lr):
    """A session of ``method`` on ``image`` after a foreground click in the disk and a background one."""
    session = InteractiveSession(model, method, AdaptConfig(lr=lr))
    session.start(image)
    session.add_click((30, 34), 1)
    session.add_click((5, 5), 0)
    return session


def test_registry_is_the_one_list_of_methods_and_describes_each():
    described = methods.describe_methods()
    assert [m.name for m in described] == list(METHODS) == list(methods.METHODS)
    assert len(METHODS) == 16 and all(m.description for m in described)
    flags = {m.name: (m.mi, m.pi) for m in described}
    assert flags["frozen"] == (False, False) and flags["pi+mi"] == (True, True)
    assert flags["mi"] == (True, False) and flags["pi"] == (False, True)
    assert flags["ia+sa"] == flags["tsca"] == (True, False)
    assert flags["ce-pi"] == flags["ent-pi"] == (False, True) and flags["ent-mi+pi"] == (True, True)
    assert all(flags[name] == (True, True) for name in METHODS if name.startswith("pi+mi/"))
    with pytest.raises(ValueError, match="unknown method 'magic'; choose one of frozen, mi"):
        methods.get_method("magic")


def test_registry_lists_without_importing_a_model_or_slicer():
    code = "import sys; from OAIMSSegment.methods import describe_methods; describe_methods(); print(sorted(m for m in ('slicer', 'qt', 'OAIMSSegment.mrml') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", METHODS)
def test_session_flags_and_config_come_from_the_method_class(tiny_model, name):
    session = InteractiveSession(tiny_model, name)
    method = methods.get_method(name)
    assert isinstance(session.adaptation, method) and session.method == name
    assert (session.mi_enabled, session.pi_enabled) == (method.mi, method.pi)
    for field, value in method.overrides.items():
        assert getattr(session.config, field) == value


def test_click_before_any_adaptation_changes_no_weight_for_methods_without_mi(tiny_model, disk_image):
    image, _ = disk_image
    start = weights(tiny_model)
    for name in (m.name for m in methods.describe_methods() if not m.mi):
        session = InteractiveSession(tiny_model, name, AdaptConfig(lr=1e-2))
        session.start(image)
        for position, label in [((30, 34), 1), ((5, 5), 0), ((42, 34), 1)]:
            assert session.add_click(position, label).adapt_ms == 0
        session.discard()
        assert torch.equal(start, weights(tiny_model)), name


class ClickedPixelsOnly(methods.AdaptationMethod):
    """A baseline written for this test: cross-entropy on the clicked pixels after each click."""

    name = "clicked-ce"
    description = "test baseline"
    mi = True

    def mi_loss(self, session, clicks):
        rows, cols, labels = methods.clicked_pixels(clicks)
        logits = session.train_logits(clicks)
        return torch.nn.functional.binary_cross_entropy_with_logits(logits[0, 0, rows, cols], labels.float())


def test_a_new_baseline_is_one_class_and_one_registry_line(tiny_model, disk_image, monkeypatch):
    monkeypatch.setitem(methods.METHODS, ClickedPixelsOnly.name, ClickedPixelsOnly)
    image, _ = disk_image
    session = InteractiveSession(tiny_model, "clicked-ce", AdaptConfig(lr=1e-2))
    session.start(image)
    session.add_click((30, 34), 1)
    before = weights(tiny_model)
    second = session.add_click((5, 5), 0)
    assert second.loss is not None and second.adapt_ms > 0 and not torch.equal(before, weights(tiny_model))
    assert not session.accept().applied  # no PI: the session says so instead of calling pi_update
    assert "clicked-ce" in [m.name for m in methods.describe_methods()]


def test_each_click_is_one_step_record_and_undo_pops_it(tiny_model, disk_image):
    image, _ = disk_image
    session = InteractiveSession(tiny_model, "pi+mi", AdaptConfig(lr=1e-2))
    session.start(image)
    first = session.add_click((30.4, 33.6), 1)
    before_mi = weights(tiny_model)
    session.add_click((5, 5), 0)
    assert not torch.equal(weights(tiny_model), before_mi)
    steps = session.steps
    assert [s.click for s in steps] == session.clicks == [Click((30, 34), 1), Click((5, 5), 0)]
    assert [s.working_click for s in steps] == session.working_clicks
    assert steps[0].snapshot is None and steps[1].snapshot is not None  # no MI on an image's first click
    assert steps[0].result is first and steps[1].labels.shape == session.prepared.tensor.shape[-2:]
    assert np.array_equal(steps[1].labels.numpy().astype(np.uint8)[:64, :64], steps[1].result.mask)
    assert np.array_equal(session.undo(), first.mask) and session.steps == steps[:1]
    assert torch.equal(weights(tiny_model), before_mi)  # the MI step of the undone click is reverted


def test_a_failed_click_records_nothing_and_keeps_the_weights(tiny_model, disk_image, monkeypatch):
    image, _ = disk_image
    session = InteractiveSession(tiny_model, "pi+mi", AdaptConfig(lr=1e-2))
    session.start(image)
    session.add_click((30, 34), 1)
    before = weights(tiny_model)
    monkeypatch.setattr(session, "predict_logits", lambda clicks: (_ for _ in ()).throw(RuntimeError("out of memory")))
    with pytest.raises(RuntimeError, match="out of memory"):
        session.add_click((5, 5), 0)
    assert len(session.steps) == 1 and torch.equal(before, weights(tiny_model))


def test_reconfigure_rebuilds_only_what_changes(tiny_model, disk_image):
    session = two_clicks(tiny_model, disk_image[0], "tsca", 1e-3)
    session.accept()
    teacher, optimizer = session.adaptation, session.optimizer
    session.reconfigure(config=AdaptConfig(lr=2e-3))
    assert session.adaptation is teacher and session.optimizer is optimizer  # same method: same teacher, same Adam
    assert optimizer.param_groups[0]["lr"] == 2e-3
    session.reconfigure("pi+mi/sigma0")
    assert session.config.sigma == 0.0 and session.config.lr == 2e-3 and "teacher" not in session.state_dict()
    session.reconfigure("pi+mi")  # the variant's override does not outlive the variant
    assert session.config.sigma == AdaptConfig.sigma and session.dice_focal.alpha == session.config.alpha


def test_tsca_teacher_predicts_and_travels_in_the_state(tiny_model, disk_image):
    session = two_clicks(tiny_model, disk_image[0], "tsca", 1e-2)
    assert session.adaptation.predictor(session) is session.adaptation.teacher
    state = session.state_dict()
    teacher = torch.cat([v.flatten().float() for v in state["teacher"].values()])
    student = torch.cat([v.flatten().float() for v in state["model"].values()])
    assert not torch.equal(teacher, student)  # the EMA teacher lags the student
    session.discard()
    session.load_state_dict(state)
    assert all(torch.equal(v, state["teacher"][k]) for k, v in session.adaptation.teacher.state_dict().items())


def test_pi_guard_dice_is_the_exact_count_ratio():
    rng = np.random.default_rng(3)
    for _ in range(50):
        k = int(rng.integers(2, 4))
        p, t = (torch.as_tensor(rng.integers(0, k, (23, 31))) for _ in range(2))
        expected = [2.0 * float(((p == c) & (t == c)).sum()) / int((p == c).sum() + (t == c).sum())
                    for c in range(1, k) if bool((p == c).any() or (t == c).any())]
        assert mean_foreground_dice(p, t, k) == float(np.mean(expected))
    empty = torch.zeros(4, 4, dtype=torch.long)
    assert mean_foreground_dice(empty, empty, 3) == 1.0


def test_click_offsets_are_the_signed_pixel_offsets_per_axis():
    rows, cols = click_offsets([Click((1, 2), 1), Click((0, 0), 0)], (3, 4))
    assert rows.shape == (2, 3, 1) and cols.shape == (2, 1, 4) and rows.dtype == cols.dtype == torch.float32
    assert rows[0, 2, 0] == 1 and cols[0, 0, 3] == 1 and cols[1, 0, 3] == 3
    assert squared_distances((rows, cols))[1, 2, 3] == 2**2 + 3**2
    gaussians = click_gaussians((rows, cols), 1.0)
    assert gaussians.shape == (2, 3, 4) and gaussians[0, 1, 2] == 1.0 and gaussians[1, 1, 1] == pytest.approx(np.exp(-1.0))
    assert [axis.shape for axis in click_offsets([Click((1, 1, 1), 1)], (2, 3, 4))] == [(1, 2, 1, 1), (1, 1, 3, 1), (1, 1, 1, 4)]


def test_separable_click_gaussians_equal_the_joint_gaussian():
    clicks = [Click((5, 70), 1), Click((200, 3), 0), Click((128, 128), 1)]
    rows, cols = click_offsets(clicks, (256, 240))
    joint = torch.exp(-(rows**2 + cols**2) / (2.0 * 5.0**2))
    assert torch.allclose(click_gaussians((rows, cols), 5.0), joint, rtol=1e-6, atol=1e-7)
    # The shipped brain model sees the same thing: its logits move by float rounding only, its mask not at all.
    model = load_model("brain-lesion-flair").eval()
    image = np.random.default_rng(3).normal(size=(240, 240)).astype(np.float32)
    image[60:120, 80:150] += 3.0
    prepared = model.prepare(image)
    working = [model.working_click(prepared, click) for click in clicks]
    maps = guidance_maps(working, prepared.tensor.shape[-2:], 2, model.card.guidance_sigma)
    rows, cols = click_offsets(working, prepared.tensor.shape[-2:])
    joint_maps = torch.zeros_like(maps).index_add_(
        0, torch.tensor([0 if c.label else 1 for c in working]), torch.exp(-(rows**2 + cols**2) / (2.0 * model.card.guidance_sigma**2)))
    joint_maps = joint_maps / joint_maps.flatten(1).amax(dim=1).view(-1, 1, 1)
    with torch.no_grad():
        separable, exact = (model(torch.cat([prepared.tensor, g[None]], dim=1)) for g in (maps, joint_maps))
    assert float((separable - exact).abs().max()) < 1e-4
    assert torch.equal(separable > 0, exact > 0)



@pytest.mark.parametrize("with_localization", [False, True])
def test_pi_stage2_gives_the_localization_click_only_when_asked(tiny_model, disk_image, with_localization):
    """Algorithm 1 (the default) feeds stage 2 the generated clicks alone; ``stage2_localization``
    feeds them after the image's localization click, as pretraining does. The CCG term and the
    generated clicks are the same either way, so the two updates differ only by that click."""
    image, mask = disk_image
    session = InteractiveSession(tiny_model, "pi", AdaptConfig(lr=1e-3, stage2_localization=with_localization))
    assert not AdaptConfig().stage2_localization  # the paper's algorithm unless asked
    seen: list[list[Click]] = []
    train_logits = session.train_logits
    session.train_logits = lambda clicks: seen.append(list(clicks)) or train_logits(clicks)
    session.start(image)
    session.add_click((30, 34), 1)
    session.add_click((5, 5), 0)
    first = session.working_clicks[0]
    result = session.accept(mask)
    assert result.applied and set(result.losses) == {"stage1", "stage2"}  # the untrained model leaves errors to click
    stage1, stage2 = seen
    assert stage1 == [first]
    generated = stage2[1:] if with_localization else stage2
    assert generated and first not in generated  # clicks in P_1's errors, not where c_1 already is right
    assert (stage2[0] == first) == with_localization


@pytest.mark.parametrize("name", ["pi/stage2-c1", "pi+mi/stage2-c1"])
def test_the_stage2_c1_methods_are_pi_and_pi_mi_with_the_localization_click_in_stage_2(tiny_model, name):
    """The named variants that ``evaluate`` runs beside Algorithm 1's PI and PI+MI on real data."""
    base = InteractiveSession(tiny_model, name.split("/")[0], AdaptConfig(lr=1e-3))
    session = InteractiveSession(tiny_model, name, AdaptConfig(lr=1e-3))
    assert session.config.stage2_localization and not base.config.stage2_localization
    assert (session.mi_enabled, session.pi_enabled) == (base.mi_enabled, base.pi_enabled)
