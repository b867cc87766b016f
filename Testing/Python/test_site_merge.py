"""Several workstations on one site keep every update (issue 20, item 1): the merge of
``SiteSession.save_update`` on real models and stores, and the real Slicer Logic in separate processes."""

from __future__ import annotations

import copy
import importlib.util
import multiprocessing
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_card
from OAIMSSegment.model import ClickSegmenter, save_model
from OAIMSSegment.session import AdaptConfig, InteractiveSession
from OAIMSSegment.site_merge import carry_update
from OAIMSSegment.site_session import SiteSession
from OAIMSSegment.store import SiteModelStore

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def workstation(store, site: str = "hospital-a") -> SiteSession:
    """A workstation: the same pretrained tiny model (seed 0) on the site ``site`` of ``store``; a
    learning rate of 1e-3 makes each update far larger than the tolerance it is checked to."""
    torch.manual_seed(0)
    session = InteractiveSession(ClickSegmenter(tiny_card(sha256="ab" * 32)), "pi+mi", AdaptConfig(lr=1e-3))
    return SiteSession(session, store, site)


def accept_image(site: SiteSession, image: np.ndarray, clicks):
    site.session.start(image)
    for position, label in clicks:
        site.session.add_click(position, label)
    return site.accept()


def weights(site: SiteSession) -> dict:
    return {k: v.clone() for k, v in site.session.model.state_dict().items()}


def test_an_update_computed_on_an_older_version_is_added_to_the_newest(tmp_path, disk_image):
    image, _ = disk_image
    shifted = np.roll(image, (6, -5), axis=(0, 1))
    a, b = workstation(tmp_path / "sites"), workstation(tmp_path / "sites")
    pretrained = weights(a)
    accepted_a = accept_image(a, image, [((30, 34), 1), ((5, 5), 0)])
    assert (accepted_a.version, accepted_a.merged_onto) == (1, None)
    delta_a = {k: v - pretrained[k] for k, v in weights(a).items()}

    # B still holds version 0: its update is carried onto A's version 1.
    accepted_b = accept_image(b, shifted, [((36, 29), 1), ((60, 2), 0), ((40, 30), 1)])
    assert accepted_b.saved and (accepted_b.version, accepted_b.merged_onto, accepted_b.images) == (2, 1, 2)
    assert "added to version 1, saved meanwhile by another workstation" in accepted_b.message
    # B alone: the same image and clicks from the pretrained model on a site of its own.
    alone = workstation(tmp_path / "alone")
    accept_image(alone, shifted, [((36, 29), 1), ((60, 2), 0), ((40, 30), 1)])
    delta_b = {k: v - pretrained[k] for k, v in weights(alone).items()}
    assert min(max(float(d.abs().max()) for d in delta.values()) for delta in (delta_a, delta_b)) > 1e-3  # >> atol

    site_model = b.site_model
    saved = site_model.load_current()
    for key, value in saved["model"].items():
        torch.testing.assert_close(value - pretrained[key], delta_a[key] + delta_b[key], atol=1e-6, rtol=0)
        assert torch.equal(b.session.model.state_dict()[key], value)  # B goes on from the merged weights
    # Adam: B's steps replayed after A's (from a fresh optimizer: steps add, moments decay then add).
    beta1, beta2 = b.session.optimizer.param_groups[0]["betas"]
    opt_a, opt_alone = a.session.optimizer.state_dict()["state"], alone.session.optimizer.state_dict()["state"]
    for index, merged in saved["optimizer"]["state"].items():
        steps = float(opt_alone[index]["step"])
        assert float(merged["step"]) == float(opt_a[index]["step"]) + steps
        torch.testing.assert_close(merged["exp_avg"], beta1 ** steps * opt_a[index]["exp_avg"] + opt_alone[index]["exp_avg"])
        torch.testing.assert_close(merged["exp_avg_sq"], beta2 ** steps * opt_a[index]["exp_avg_sq"] + opt_alone[index]["exp_avg_sq"])
    assert b.session.optimizer.state_dict()["state"][0]["step"] == saved["optimizer"]["state"][0]["step"]

    # B's next image was computed on version 2, still the newest: no merge.
    assert accept_image(b, image, [((30, 34), 1), ((5, 5), 0)]).merged_onto is None
    lines = [e for e in site_model.history() if e["action"] == "adapt"]
    assert [(e["version"], e["parent"], e["based_on"], e["merged"], e["images"]) for e in lines] == [
        (1, 0, 0, False, 1), (2, 1, 0, True, 2), (3, 2, 2, False, 3)]
    assert [(v.version, v.parent, v.based_on, v.merged, v.images) for v in site_model.versions()] == [
        (1, 0, 0, False, 1), (2, 1, 0, True, 2), (3, 2, 2, False, 3)]

    # Another workstation rolled the site back to A's version 1: A's next update applies as it is.
    b.rollback(1)
    again = accept_image(a, shifted, [((36, 29), 1), ((60, 2), 0)])
    assert (again.version, again.merged_onto) == (4, None)
    assert (site_model.versions()[-1].parent, site_model.versions()[-1].based_on) == (1, 1)


def test_carried_adam_state_is_adam_replaying_the_same_gradients_after_the_newest():
    """With fixed gradients Adam's moments do not depend on the weights, so the carried state must
    equal real ``torch.optim.Adam`` taking this workstation's gradient steps after the newest version's."""
    torch.manual_seed(0)
    gradients = [torch.randn(5, 3) for _ in range(7)]

    def adam_after(state: dict | None, steps: list) -> dict:
        weight = torch.nn.Parameter(torch.zeros(5, 3))
        optimizer = torch.optim.Adam([weight], lr=1e-2)
        if state is not None:
            optimizer.load_state_dict(copy.deepcopy(state))
        for gradient in steps:
            weight.grad = gradient.clone()
            optimizer.step()
        # Copies, as InteractiveSession.state_dict takes: Adam increments its step tensors in place.
        return {"model": {"w": weight.detach().clone()}, "optimizer": copy.deepcopy(optimizer.state_dict())}

    based_on = adam_after(None, gradients[:2])          # the version both workstations started from
    newest = adam_after(based_on["optimizer"], gradients[2:4])  # another workstation's two steps
    mine = adam_after(based_on["optimizer"], gradients[4:])     # this workstation's three
    replayed = adam_after(newest["optimizer"], gradients[4:])
    carried = carry_update(newest, based_on, mine)
    for key in ("step", "exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(carried["optimizer"]["state"][0][key], replayed["optimizer"]["state"][0][key])
    torch.testing.assert_close(carried["model"]["w"], newest["model"]["w"] + mine["model"]["w"] - based_on["model"]["w"])
    # A fresh optimizer (version 0, a milestone) counts as step 0 with zero moments.
    fresh = carry_update({"model": newest["model"]}, based_on, mine)["optimizer"]["state"][0]
    assert float(fresh["step"]) == 3.0
    torch.testing.assert_close(fresh["exp_avg"], adam_after(None, gradients[4:])["optimizer"]["state"][0]["exp_avg"])
