"""The site workflow (SiteSession) on real models, real site stores in tmp_path and the evaluate command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import tiny_card, write_nnunet_dataset
from OAIMSSegment.cli import main
from OAIMSSegment.errors import SessionStateError, StoreError
from OAIMSSegment.model import ClickSegmenter, save_model
from OAIMSSegment.session import InteractiveSession
from OAIMSSegment.site_session import IMAGES_KEY, SiteSession
from OAIMSSegment.store import SiteModelStore


def site_session(tmp_path, site: str = "hospital-a", method: str = "pi+mi", seed: int = 0) -> SiteSession:
    torch.manual_seed(seed)
    return SiteSession(InteractiveSession(ClickSegmenter(tiny_card(sha256="ab" * 32)), method), tmp_path / "sites", site)


def segment(site: SiteSession, image: np.ndarray, clicks) -> None:
    site.session.start(image)
    for position, label in clicks:
        site.session.add_click(position, label)


def weights(site: SiteSession) -> dict:
    return {k: v.clone() for k, v in site.session.model.state_dict().items()}


def test_accept_saves_a_version_with_its_history_and_image_count(tmp_path, disk_image):
    image, _ = disk_image
    site = site_session(tmp_path)
    assert (site.version, site.images, site.problem) == (0, 0, "")
    segment(site, image, [((30, 34), 1), ((5, 5), 0)])
    first = site.accept()
    assert first.adapted and first.saved and first.version == 1 and first.images == 1
    assert first.message == "site 'hospital-a' is now at version 1 (1 images)"
    segment(site, image, [((30, 34), 1), ((40, 40), 1), ((2, 60), 0)])
    second = site.accept()
    assert (second.version, second.images, site.saved) == (2, 2, [1, 2])
    lines = [e for e in site.site_model.history() if e["action"] == "adapt"]
    assert [(e["version"], e["parent"], e["based_on"], e["images"], e["clicks"]) for e in lines] == [(1, 0, 0, 1, 2), (2, 1, 1, 2, 3)]
    for entry, accepted in zip(lines, (first, second)):
        assert entry["method"] == "pi+mi" and entry["pi_applied"] == accepted.outcome.applied
        assert entry["dice_before"] == pytest.approx(accepted.outcome.dice_before)
        assert entry["dice_after"] == pytest.approx(accepted.outcome.dice_after)
    assert site.site_model.load_current()[IMAGES_KEY] == 2  # the count travels with the weights
    info = site.info()
    assert (info.version, info.images, info.versions, info.model, info.method) == (2, 2, [1, 2], "tiny", "pi+mi")

    # Another workstation's session on the same site resumes version 2 with its count.
    other = site_session(tmp_path, seed=1)
    assert (other.version, other.images) == (2, 2)
    assert all(torch.equal(weights(other)[k], v) for k, v in weights(site).items())


def test_an_image_that_did_not_change_the_model_saves_nothing(tmp_path, disk_image):
    image, _ = disk_image
    frozen = site_session(tmp_path, method="frozen")
    segment(frozen, image, [((30, 34), 1), ((5, 5), 0)])
    accepted = frozen.accept()
    assert not accepted.adapted and not accepted.saved and accepted.version is None
    assert accepted.message == "the model did not change; no new site version"
    mi_only = site_session(tmp_path, method="mi")
    segment(mi_only, image, [((30, 34), 1)])  # MI adapts from the second click on: one click changes nothing
    assert not mi_only.accept().saved
    segment(mi_only, image, [((30, 34), 1), ((5, 5), 0)])
    accepted = mi_only.accept()
    assert accepted.adapted and not accepted.outcome.applied and accepted.saved and accepted.version == 1
    assert [e["version"] for e in mi_only.site_model.history() if e["action"] == "adapt"] == [1]


def test_rollback_reset_export_import_and_info(tmp_path, disk_image):
    image, _ = disk_image
    site = site_session(tmp_path)
    pretrained = weights(site)
    after = []
    for _ in range(2):
        segment(site, image, [((30, 34), 1), ((5, 5), 0)])
        site.accept()
        after.append(weights(site))
    site.rollback(1)
    assert (site.version, site.images, site.info().version) == (1, 1, 1)
    assert all(torch.equal(weights(site)[k], v) for k, v in after[0].items())
    archive = site.export(tmp_path / "a.oaims.zip")
    other = site_session(tmp_path, site="hospital-b")
    assert other.import_archive(archive) == 1
    assert (other.version, other.images) == (1, 1)  # the count came with the weights
    assert all(torch.equal(weights(other)[k], v) for k, v in after[0].items())
    site.reset()
    assert (site.version, site.images, site.info().version, site.info().versions) == (0, 0, 0, [1, 2])
    assert all(torch.equal(weights(site)[k], v) for k, v in pretrained.items())
    assert SiteSession.sites(tmp_path / "sites") == ["hospital-a", "hospital-b"]
    site.session.start(image)
    with pytest.raises(SessionStateError, match="accept or discard"):
        site.rollback(2)


def test_an_import_whose_optimizer_state_does_not_fit_is_refused_before_it_is_committed(tmp_path, disk_image):
    image, _ = disk_image
    source = site_session(tmp_path)
    segment(source, image, [((30, 34), 1), ((5, 5), 0)])
    source.accept()
    state = source.site_model.load_current()
    state["optimizer"]["param_groups"][0]["params"] = [0]  # one parameter where the model has many
    bad = SiteModelStore(tmp_path / "forged").open("hospital-a", "tiny", "ab" * 32)
    bad.save_version(state, {})
    archive = bad.export(tmp_path / "bad.oaims.zip")
    target = site_session(tmp_path, site="hospital-c")
    with pytest.raises(StoreError, match="do not fit"):
        target.import_archive(archive)
    assert target.site_model.current_version == 0 and target.info().versions == []


def test_sites_saved_before_the_count_was_kept_read_it_from_the_history(tmp_path, disk_image):
    store = SiteModelStore(tmp_path / "sites").open("hospital-a", "tiny", "ab" * 32)
    old = site_session(tmp_path, site="scratch")
    image, _ = disk_image
    segment(old, image, [((30, 34), 1), ((5, 5), 0)])
    old.accept()
    legacy = {k: v for k, v in old.site_model.load_current().items() if k != IMAGES_KEY}
    store.save_version(legacy, {"images": 7, "clicks": 2, "method": "pi+mi", "pi_applied": True})
    site = site_session(tmp_path)
    assert (site.version, site.images, site.info().images) == (1, 7, 7)
    segment(site, image, [((30, 34), 1), ((5, 5), 0)])
    assert site.accept().images == 8


def test_a_current_version_that_does_not_fit_falls_back_to_the_newest_that_loads(tmp_path, disk_image):
    store = SiteModelStore(tmp_path / "sites").open("hospital-a", "tiny", "ab" * 32)
    torch.manual_seed(0)
    other = ClickSegmenter(tiny_card(network={"channels": [4, 8], "strides": [2], "num_res_units": 0, "norm": "instance"}))
    store.save_version({"model": other.state_dict()}, {})
    site = site_session(tmp_path)  # only version 1, of another architecture: back to the pretrained weights
    assert "version 1 of site 'hospital-a' does not fit model 'tiny'" in site.info().problem
    assert site.version == 0 and site.info().in_use == 0 and site.site_model is not None
    torch.manual_seed(0)
    pretrained = ClickSegmenter(tiny_card()).state_dict()
    assert all(torch.equal(site.session.model.state_dict()[k], v) for k, v in pretrained.items())

    image, _ = disk_image
    segment(site, image, [((30, 34), 1), ((5, 5), 0)])
    good = site.accept()
    assert good.saved and good.version == 2
    adapted = {k: v.clone() for k, v in site.session.model.state_dict().items()}
    store.save_version({"model": other.state_dict()}, {})  # version 3 does not fit again
    reopened = site_session(tmp_path)
    info = reopened.info()
    assert (info.version, info.in_use, reopened.version) == (3, 2, 2)
    assert "version 3" in info.problem and "using version 2" in info.problem
    assert all(torch.equal(reopened.session.model.state_dict()[k], v) for k, v in adapted.items())
    segment(reopened, image, [((30, 34), 1), ((5, 5), 0)])
    assert reopened.accept().saved  # the site is not bricked: work goes on and is kept


def test_an_unusable_store_keeps_the_adapted_weights_and_says_nothing_was_saved(tmp_path, disk_image):
    blocker = tmp_path / "sites"
    blocker.write_text("a file where the store folder should be")
    site = site_session(tmp_path)
    assert site.problem and site.site_model is None and site.info().problem == site.problem
    image, _ = disk_image
    segment(site, image, [((30, 34), 1), ((5, 5), 0)])
    accepted = site.accept()
    assert accepted.adapted and not accepted.saved and "NOT saved" in accepted.message and site.images == 1
    with pytest.raises(StoreError):
        site.reset()


def test_evaluate_accepts_every_image_into_a_site_and_continues_from_it(tmp_path):
    torch.manual_seed(0)
    save_model(ClickSegmenter(tiny_card()), tmp_path / "tiny.pt")
    root = write_nnunet_dataset(tmp_path / "ds", "nifti", n=2)
    common = ["evaluate", "--model", str(tmp_path / "tiny.pt"), "--dataset", str(root), "--methods", "pi+mi",
              "--clicks", "3", "--max-images", "2"]
    assert main([*common, "--json", str(tmp_path / "plain.json")]) == 0
    sites = tmp_path / "sites"
    assert main([*common, "--site-store", str(sites), "--site", "bench", "--json", str(tmp_path / "site.json")]) == 0
    plain, run = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("plain", "site"))
    # From a fresh site, accepting through the site gives exactly the benchmark's figures.
    assert run["results"]["pi+mi"]["dice"] == plain["results"]["pi+mi"]["dice"]
    assert run["site"]["saved_versions"] == [1, 2] and run["site"]["version"] == 2 and run["site"]["images"] == 2
    history = [json.loads(line) for line in (sites / "bench" / "tiny" / "history.jsonl").read_text().splitlines()]
    adapts = [e for e in history if e["action"] == "adapt"]
    assert [(e["version"], e["based_on"], e["images"], e["clicks"]) for e in adapts] == [(1, 0, 1, 3), (2, 1, 2, 3)]
    # A second run continues from version 2: other figures, versions 3 and 4.
    assert main([*common, "--site-store", str(sites), "--site", "bench", "--json", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["site"]["saved_versions"] == [3, 4] and again["site"]["images"] == 4
    assert again["results"]["pi+mi"]["dice"] != plain["results"]["pi+mi"]["dice"]


def test_evaluate_site_options_are_checked(tmp_path, capsys):
    torch.manual_seed(0)
    save_model(ClickSegmenter(tiny_card()), tmp_path / "tiny.pt")
    root = write_nnunet_dataset(tmp_path / "ds", "nifti", n=1)
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    for args, message in [
        (["--site", "bench"], "--site needs --site-store"),
        (["--site-store", str(tmp_path / "s"), "--methods", "frozen,pi"], "one method and one seed"),
        (["--site-store", str(tmp_path / "s"), "--seeds", "2"], "one method and one seed"),
        (["--site-store", str(tmp_path / "s"), "--site", "../x"], "invalid site name"),
        (["--site-store", str(blocker / "s")], "creating site"),
    ]:
        code = main(["evaluate", "--model", str(tmp_path / "tiny.pt"), "--dataset", str(root), "--clicks", "2",
                     "--methods", "pi+mi", *args, "--json", str(tmp_path / "x.json")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("error:") and message in err and "\n" not in err, (args, err)
    assert not (tmp_path / "x.json").exists()
