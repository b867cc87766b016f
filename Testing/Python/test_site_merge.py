"""Several workstations on one site keep every update (issue 20, item 1): the merge of
``SiteSession.save_update`` on real models and stores, and the real Slicer Logic in separate processes."""

from __future__ import annotations

import copy
import importlib.util
import multiprocessing
import sys
from pathlib import Path

import numpy as np
import torch

from conftest import tiny_card
from OAIMSSegment.model import ClickSegmenter
from OAIMSSegment.session import AdaptConfig, InteractiveSession
from OAIMSSegment.site_merge import carry_update
from OAIMSSegment.site_session import SiteSession
from OAIMSSegment.store import SiteModelStore

REPO = Path(__file__).resolve().parents[2]


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


# -- the real Slicer Logic, one process per workstation ------------------------------------------------


def _slicer_workstation(store: str, model_path: str, settings: str, accepts: int, start, results) -> None:
    """One workstation: ``OAIMSSegment.py`` loaded as Slicer loads it, on real MRML, accepting
    ``accepts`` slices into the site "default" of ``store``. Puts on ``results`` the sum of its own
    updates (the weights each accept's save starts from, minus those the image started from) and
    the accept reports."""
    torch.set_num_threads(1)
    from test_slicer_module import add_volume, ball_volume

    import slicer
    import slicer_test_doubles

    slicer_test_doubles.install(settings)
    spec = importlib.util.spec_from_file_location("OAIMSSegment", REPO / "OAIMSSegment.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["OAIMSSegment"] = module
    spec.loader.exec_module(module)
    unmerged = []
    save_update = SiteSession.save_update

    def recording(self, outcomes, adapted):  # the workstation's own weights, before any merge
        unmerged.append({k: v.clone() for k, v in self.session.model.state_dict().items()})
        return save_update(self, outcomes, adapted)

    SiteSession.save_update = recording
    logic = module.OAIMSSegmentLogic(storeFolder=store)
    logic.setModel(model_path)
    logic.setAdaptation(lr=1e-3)
    volume = add_volume(slicer.mrmlScene, ball_volume((accepts, 32, 32)), np.eye(4))  # IJK = RAS
    logic.startSegment(volume, slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode"))
    start.wait()  # all three at version 0: the site moves on under each of them
    delta, reports = None, []
    for k in range(accepts):
        before = {key: v.clone() for key, v in logic.session.model.state_dict().items()}
        logic.addClick((16, 16, k), True)
        logic.addClick((2, 2, k), False)
        reports.append(logic.accept())
        own = {key: unmerged[-1][key] - before[key] for key in before}
        delta = own if delta is None else {key: delta[key] + own[key] for key in own}
    # numpy, not tensors: torch would share the tensors' memory with a process that is about to exit.
    results.put({"delta": {key: v.numpy() for key, v in delta.items()}, "reports": reports})


def test_three_slicer_workstations_in_separate_processes_lose_no_update(tmp_path):
    """3 workstations x 10 accepts on one site: 30 versions, and the final weights are the
    pretrained ones plus every workstation's every update."""
    from test_slicer_module import make_model

    from OAIMSSegment.model import load_model

    model_path, accepts = make_model(tmp_path, "tiny-binary", 1, {"background": 0, "lesion": 1}), 10
    store = tmp_path / "sites"
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_slicer_workstation,
                         args=(str(store), model_path, str(tmp_path / f"settings{n}"), accepts, start, results))
             for n in range(3)]
    for p in procs:
        p.start()
    outputs = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    model = load_model(model_path)
    pretrained = model.state_dict()
    site = SiteModelStore(store).open("default", model.card.name, model.card.sha256)
    assert site.current_version == 30 and site.images() == 30

    reports = [r for out in outputs for r in out["reports"]]
    assert all(r["saved"] for r in reports) and sorted(r["version"] for r in reports) == list(range(1, 31))
    lines = [e for e in site.history() if e["action"] == "adapt"]
    assert [e["version"] for e in lines] == list(range(1, 31))
    assert all(e["parent"] == e["version"] - 1 and e["merged"] == (e["based_on"] != e["parent"]) for e in lines)
    assert sum(e["merged"] for e in lines) >= 2  # all three started at version 0, so two first saves merge

    final = site.load_current()["model"]
    for out in outputs:  # each workstation's updates are far above the tolerance below
        assert max(float(np.abs(d).max()) for d in out["delta"].values()) > 1e-3
    for key, value in final.items():
        total = torch.from_numpy(sum(out["delta"][key] for out in outputs))
        torch.testing.assert_close(value - pretrained[key], total, atol=1e-5, rtol=0)
