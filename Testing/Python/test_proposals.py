"""Probabilistic partial-segmentation proposals: constraints, loss terms, data, shipped model, API, CLI."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from OAIMSSegment import proposals as P
from OAIMSSegment.errors import DatasetError, InvalidImageError, ModelError, OAIMSError
from OAIMSSegment.files import sha256_file
from OAIMSSegment.metrics import pairwise_dice
from OAIMSSegment.model import card_kind, list_models, load_model
from OAIMSSegment.proposals import data as D

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
DRISHTI = SHARED_DATA / "Dataset003_DrishtiGS"
SHIPPED = "proposals-synthetic-disks"


@pytest.fixture(scope="module")
def shipped() -> P.ProposalModel:
    return P.load_proposal_model(SHIPPED)


def random_partial(b: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random images and input partial segmentations ``(B, 1, S, S)`` with ``x_s <= x_m``."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(b, 1, size, size, generator=g)
    x_m = (torch.rand(b, 1, size, size, generator=g) < 0.4).float()
    x_s = x_m * (torch.rand(b, 1, size, size, generator=g) < 0.5).float()
    return image, x_m, x_s


def assert_constraints(logits: torch.Tensor, x_m: torch.Tensor, x_s: torch.Tensor) -> None:
    soft_m, soft_s = P.compose(logits, x_m, x_s)
    on = x_m > 0.5
    assert torch.all(soft_m >= x_m) and torch.all(soft_s <= soft_m + 1e-7)
    assert torch.equal(soft_s[on], x_s[on]) and torch.all(soft_m[on] == 1)
    m, s = P.binarise(logits, x_m, x_s)
    assert torch.all(m[on]) and torch.equal(s[on], x_s[on] > 0.5)
    assert not torch.any(s & ~m)


# ----------------------------------------------------------------------------- constraints


@pytest.mark.parametrize("which", ["untrained", "shipped"])
def test_constraints_hold_on_random_inputs(which: str, request: pytest.FixtureRequest) -> None:
    torch.manual_seed(0)
    model = P.ProposalModel() if which == "untrained" else request.getfixturevalue("shipped")
    image, x_m, x_s = random_partial(16, model.config.input_size, seed=1)
    x = torch.cat([image, x_m, x_s], dim=1)
    with torch.no_grad():
        assert_constraints(model.decode(model.prior_sample(16), x), x_m, x_s)
        # also with posterior samples, as in training
        logits, _, _ = model(x, torch.cat([torch.maximum(x_m, (image > 0.5).float()), x_s], dim=1))
        assert_constraints(logits, x_m, x_s)
    # extreme logits cannot break them either
    assert_constraints(torch.full((16, 2, *x_m.shape[-2:]), 50.0), x_m, x_s)
    assert_constraints(torch.full((16, 2, *x_m.shape[-2:]), -50.0), x_m, x_s)


@pytest.mark.parametrize("shape", [(32, 32), (57, 41), (130, 96)])
def test_propose_next_steps_keeps_input_at_any_resolution(shape: tuple[int, int], shipped: P.ProposalModel) -> None:
    rng = np.random.default_rng(3)
    image = rng.normal(100.0, 30.0, shape)
    partial = rng.random(shape) < 0.3
    seg = partial & (rng.random(shape) < 0.5)
    proposals = P.propose_next_steps(shipped, image, partial, seg, k=4, seed=7)
    assert len(proposals) == 4
    for proposal in proposals:
        assert proposal.partial_mask.shape == shape and proposal.partial_mask.dtype == bool
        assert proposal.seg_mask.shape == shape and proposal.seg_mask.dtype == bool
        assert np.all(proposal.partial_mask[partial])
        assert np.array_equal(proposal.seg_mask[partial], seg[partial])
        assert not np.any(proposal.seg_mask & ~proposal.partial_mask)
        added = proposal.partial_mask & ~partial
        assert proposal.added_foreground == int((added & proposal.seg_mask).sum())
        assert proposal.added_background == int((added & ~proposal.seg_mask).sum())


def test_propose_next_steps_is_deterministic_under_a_seed(shipped: P.ProposalModel) -> None:
    images = D.make_disk_images(1, 32, np.random.default_rng(0))
    partial = np.zeros((32, 32), bool)
    partial[:, :10] = True
    seg = partial & images.objects[0].any(axis=0)
    first = P.propose_next_steps(shipped, images.images[0], partial, seg, k=5, seed=11)
    second = P.propose_next_steps(shipped, images.images[0], partial, seg, k=5, seed=11)
    for a, b in zip(first, second):
        assert np.array_equal(a.partial_mask, b.partial_mask) and np.array_equal(a.seg_mask, b.seg_mask)
    # different z give different proposals (the model is probabilistic)
    assert len({p.partial_mask.tobytes() + p.seg_mask.tobytes() for p in first}) > 1


def test_propose_next_steps_treats_foreground_as_decided_and_rejects_bad_input(shipped: P.ProposalModel) -> None:
    image = np.random.default_rng(0).random((40, 40))
    seg = np.zeros((40, 40), bool)
    seg[5:9, 5:9] = True  # foreground outside the partialness mask: it is decided all the same
    proposal = P.propose_next_steps(shipped, image, np.zeros((40, 40), bool), seg, k=1, seed=0)[0]
    assert np.all(proposal.partial_mask[seg]) and np.all(proposal.seg_mask[seg])
    empty = np.zeros((40, 40), bool)
    with pytest.raises(InvalidImageError):
        P.propose_next_steps(shipped, np.full((40, 40), np.nan), empty, empty)
    with pytest.raises(InvalidImageError):
        P.propose_next_steps(shipped, image, np.zeros((40, 41), bool), empty)
    with pytest.raises(InvalidImageError):
        P.propose_next_steps(shipped, np.zeros((4, 40, 40)), empty, empty)
    with pytest.raises(ValueError):
        P.propose_next_steps(shipped, image, empty, empty, k=0)
    # a constant image is valid (normalises to zeros)
    assert len(P.propose_next_steps(shipped, np.ones((40, 40)), empty, empty, k=2, seed=1)) == 2


# ----------------------------------------------------------------------------- loss terms


def test_dice_term_by_hand() -> None:
    pred = torch.tensor([0.5, 1.0, 0.0, 0.5]).view(1, 1, 2, 2)
    target = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 1, 2, 2)
    # 1 - 2 (0.5 + 1) / ((0.5 + 1 + 0 + 0.5) + 2) = 1 - 3 / 4
    assert P.ProposalLoss().dice(pred, target).item() == pytest.approx(0.25, abs=1e-5)


def test_weighted_dice_term_by_hand() -> None:
    pred_s = torch.tensor([0.8, 0.2, 0.9, 0.4]).view(1, 1, 2, 2)
    target_s = torch.tensor([1.0, 0.0, 0.0, 1.0]).view(1, 1, 2, 2)
    weight = torch.tensor([1.0, 1.0, 0.0, 1.0]).view(1, 1, 2, 2)  # y_m - x_m: the third pixel is not new
    # only weighted pixels count: 1 - 2 (0.8 + 0.4) / ((0.8 + 0.2 + 0.4) + 2) = 1 - 2.4 / 3.4
    value = P.ProposalLoss().weighted_dice(pred_s, target_s, mask=weight).item()
    assert value == pytest.approx(1.0 - 2.4 / 3.4, abs=1e-5)


def test_kl_term_by_hand() -> None:
    mu = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(2, 1, 1, 2)
    logvar = torch.tensor([[0.0, 0.0], [0.0, 2.0]]).view(2, 1, 1, 2)
    # item 1: 0.5 (1 + 1 - 0 - 1) = 0.5; item 2: 0.5 (0 + e^2 - 2 - 1); batch mean
    expected = (0.5 + 0.5 * (np.exp(2.0) - 3.0)) / 2
    assert P.kl_standard_normal(mu, logvar).item() == pytest.approx(expected, rel=1e-6)


def test_total_loss_combines_terms_with_paper_betas() -> None:
    g = torch.Generator().manual_seed(0)
    x_m = (torch.rand(2, 1, 4, 4, generator=g) < 0.3).float()
    y_m = torch.maximum(x_m, (torch.rand(2, 1, 4, 4, generator=g) < 0.5).float())
    y_s = y_m * (torch.rand(2, 1, 4, 4, generator=g) < 0.5).float()
    pred_m, pred_s = torch.rand(2, 1, 4, 4, generator=g), torch.rand(2, 1, 4, 4, generator=g)
    mu, logvar = torch.randn(2, 1, 2, 2, generator=g), torch.randn(2, 1, 2, 2, generator=g)
    loss = P.ProposalLoss()
    assert (loss.beta0, loss.beta1) == (1.0, 1e-3)
    terms = loss(pred_m, pred_s, y_m, y_s, x_m, mu, logvar)
    assert terms["loss"].item() == pytest.approx((terms["wdl"] + terms["dl"] + 1e-3 * terms["kl"]).item(), rel=1e-6)
    # WDL by hand per image, then averaged
    w = y_m - x_m
    inter = (w * pred_s * w * y_s).flatten(1).sum(1)
    wdl = 1 - (2 * inter + 1e-5) / ((w * pred_s).flatten(1).sum(1) + (w * y_s).flatten(1).sum(1) + 1e-5)
    assert terms["wdl"].item() == pytest.approx(wdl.mean().item(), rel=1e-5)


# ----------------------------------------------------------------------------- synthetic data


def test_disk_images_and_ground_truths() -> None:
    images = D.make_disk_images(50, 32, np.random.default_rng(0))
    assert images.images.shape == (50, 32, 32) and images.objects.shape == (50, 3, 32, 32)
    assert images.images.min() >= 0.0 and images.images.max() <= 1.0
    counts = images.objects.sum(axis=1)
    assert counts.max() == 1  # three disjoint disks
    assert np.all(images.objects.reshape(50, 3, -1).sum(axis=2) > 0)
    for i in range(50):  # the image is 0 off the disks and constant on each
        assert np.all(images.images[i][counts[i] == 0] == 0)
        for d in range(3):
            assert np.unique(images.images[i][images.objects[i, d]]).size == 1
    assert images.candidates(0).shape == (8, 32, 32)
    rng = np.random.default_rng(1)
    gt = images.sample_ground_truths(np.arange(50), rng)
    union = images.objects.any(axis=1)
    assert not np.any(gt & ~union) and np.all(gt.reshape(50, -1).any(axis=1))
    # each ground truth is a union of whole disks
    for i in range(50):
        assert any(np.array_equal(gt[i], c) for c in images.candidates(i))


def test_partial_pairs_are_nested_and_consistent() -> None:
    images = D.make_disk_images(64, 32, np.random.default_rng(0))
    rng = np.random.default_rng(2)
    gt = images.sample_ground_truths(np.arange(64), rng)
    pairs = D.make_pairs(gt, rng)
    assert np.array_equal(pairs["x_s"], gt & pairs["x_m"])
    assert np.array_equal(pairs["y_s"], gt & pairs["y_m"])
    assert not np.any(pairs["x_m"] & ~pairs["y_m"])
    assert np.all((pairs["y_m"] & ~pairs["x_m"]).reshape(64, -1).any(axis=1))  # every target grows
    assert not np.any(pairs["x_s"] & ~gt)


def test_border_growth_grows_from_the_input() -> None:
    images = D.make_disk_images(64, 32, np.random.default_rng(0))
    gt = images.sample_ground_truths(np.arange(64), np.random.default_rng(1))
    paper, border = D.make_pairs(gt, np.random.default_rng(2)), D.make_pairs(gt, np.random.default_rng(2), "border")
    assert np.array_equal(paper["x_m"], border["x_m"]) and np.array_equal(paper["x_s"], border["x_s"])
    assert not np.any(border["x_m"] & ~border["y_m"]) and np.array_equal(border["y_s"], gt & border["y_m"])
    for i in np.flatnonzero(border["x_m"].reshape(64, -1).any(axis=1)):
        new = border["y_m"][i] & ~border["x_m"][i]
        near = ndimage.binary_dilation(border["x_m"][i], iterations=5)
        assert new.any() and (not np.any(new & ~near) or np.array_equal(new, paper["y_m"][i] & ~paper["x_m"][i]))
    with pytest.raises(ValueError):
        D.make_pairs(gt, np.random.default_rng(2), "nowhere")


def test_synthetic_data_is_seeded() -> None:
    a = D.make_disk_images(10, 32, np.random.default_rng(5))
    b = D.make_disk_images(10, 32, np.random.default_rng(5))
    c = D.make_disk_images(10, 32, np.random.default_rng(6))
    assert np.array_equal(a.images, b.images) and np.array_equal(a.objects, b.objects)
    assert not np.array_equal(a.images, c.images)
    batch_a = P.sample_batch(a, 8, np.random.default_rng(1), augment=False)
    batch_b = P.sample_batch(b, 8, np.random.default_rng(1), augment=False)
    assert torch.equal(batch_a["x"], batch_b["x"]) and torch.equal(batch_a["y"], batch_b["y"])
    train = P.load_images("synthetic", "Tr", 32, 5, seed=0)
    held_out = P.load_images("synthetic", "Ts", 32, 5, seed=0)
    assert not np.array_equal(train.images, held_out.images)


def test_dice_helper_and_evaluation_on_a_perfect_oracle() -> None:
    pred = np.array([[1, 1, 0, 0], [0, 0, 0, 0]], bool)
    target = np.array([[1, 0, 0, 0], [0, 0, 0, 0]], bool)
    assert np.allclose(pairwise_dice(pred, target), [[2 / 3, 0.0], [0.0, 1.0]])
    metrics = P.evaluate(P.ProposalModel(), D.make_disk_images(6, 32, np.random.default_rng(0)), n=6, k=2, seed=0)
    assert metrics["n_inputs"] == 6 and 0.0 <= metrics["empty_fraction"] <= 1.0
    assert metrics["added_foreground"] >= 0 and metrics["added_background"] >= 0


# ----------------------------------------------------------------------------- shipped model


@pytest.mark.parametrize(("name", "size"), [(SHIPPED, 32), ("proposals-fundus", 64)])
def test_shipped_card_matches_weights(name: str, size: int) -> None:
    card = json.loads((P.MODELS_DIR / f"{name}.json").read_text())
    weights = P.MODELS_DIR / card["weights"]
    assert card["sha256"] == sha256_file(weights)
    assert weights.stat().st_size < 3 * 1024 * 1024
    for key in ("name", "task", "input_size", "training_command", "seed", "metrics"):
        assert key in card
    assert card["name"] == name and card["input_size"] == [size, size]
    assert P.load_proposal_model(name).config.input_size == size


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="unknown proposal model"):
        P.load_proposal_model("no-such-model")
    with pytest.raises(ModelError, match="does not exist"):
        P.load_proposal_model(tmp_path / "missing.pt")
    copy = tmp_path / "copy.pt"
    shutil.copy(P.MODELS_DIR / f"{SHIPPED}.pt", copy)
    shutil.copy(P.MODELS_DIR / f"{SHIPPED}.json", tmp_path / "copy.json")
    assert P.load_proposal_model(copy).config.input_size == 32
    with open(copy, "ab") as handle:
        handle.write(b"tampered")
    with pytest.raises(ModelError, match="sha256"):
        P.load_proposal_model(copy)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(ModelError):
        P.load_proposal_model(junk)


# ----------------------------------------------------------------------------- model kinds


def copy_model(name: str, folder: Path, drop_kind: bool = False, **changes: object) -> Path:
    """Copy a shipped model's weights and card into ``folder``; optionally edit the card."""
    card = json.loads((P.MODELS_DIR / f"{name}.json").read_text())
    if drop_kind:
        del card["kind"]
    card.update(changes)
    shutil.copy(P.MODELS_DIR / card["weights"], folder / card["weights"])
    (folder / f"{name}.json").write_text(json.dumps(card))
    return folder / card["weights"]


def test_cards_say_their_kind_and_legacy_cards_keep_todays_rule(tmp_path: Path) -> None:
    shipped = {path.stem: json.loads(path.read_text())["kind"] for path in P.MODELS_DIR.glob("*.json")}
    assert {kind for name, kind in shipped.items() if name.startswith("proposals-")} == {"proposals"}
    assert {kind for name, kind in shipped.items() if not name.startswith("proposals-")} == {"click-segmenter"}
    assert [card.name for card in list_models()] == sorted(n for n in shipped if not n.startswith("proposals-"))
    # cards without "kind" (written before it existed) are told apart by their keys, as before
    copy_model("demo-synthetic-blobs", tmp_path, drop_kind=True)
    legacy_weights = copy_model(SHIPPED, tmp_path, drop_kind=True)
    assert card_kind(json.loads((tmp_path / f"{SHIPPED}.json").read_text())) == "proposals"
    assert [card.name for card in list_models(tmp_path)] == ["demo-synthetic-blobs"]
    assert load_model(tmp_path / "demo-synthetic-blobs.json").card.name == "demo-synthetic-blobs"
    assert P.load_proposal_model(legacy_weights).config.input_size == 32
    # an explicit kind wins over the keys
    (tmp_path / "demo-synthetic-blobs.json").unlink()
    copy_model("demo-synthetic-blobs", tmp_path, kind="proposals")
    assert list_models(tmp_path) == []


def test_each_loader_refuses_the_other_kind(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="'click-segmenter' model, not of a proposal model"):
        P.load_proposal_model("demo-synthetic-blobs")
    with pytest.raises(ModelError, match="'proposals' model, not of a segmentation model"):
        load_model(SHIPPED)
    weights = copy_model("demo-synthetic-blobs", tmp_path)
    with pytest.raises(ModelError, match="not of a proposal model"):
        P.load_proposal_model(weights)
    card = tmp_path / "odd.json"
    card.write_text(json.dumps({**json.loads((tmp_path / "demo-synthetic-blobs.json").read_text()), "kind": "other"}))
    with pytest.raises(ModelError, match="'other' model"):
        load_model(card)


def test_save_writes_the_kind_atomically_and_the_card_holds_the_weights_sha(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "m.pt"
    card = P.save_proposal_model(P.ProposalModel(), path, {"name": "m"})
    assert card["kind"] == "proposals" and card["sha256"] == sha256_file(path)
    assert json.loads(path.with_suffix(".json").read_text()) == card
    assert not list(path.parent.glob("*.tmp")) and oct(path.stat().st_mode & 0o777) == "0o644"
    assert P.load_proposal_model(path).card == card


# ----------------------------------------------------------------------------- CLI


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    P.add_commands(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_train_then_eval(tmp_path: Path) -> None:
    out = tmp_path / "tiny.pt"
    argv = ["proposals-train", "--out", str(out), "--steps", "2", "--batch-size", "4", "--train-images", "8"]
    assert run_cli(argv) == 0
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["sha256"] == sha256_file(out) and "--steps 2" in card["training_command"]
    report, figure = tmp_path / "eval.json", tmp_path / "fig.png"
    argv = ["proposals-eval", "--model", str(out), "--n", "4", "--k", "2", "--json", str(report), "--figure", str(figure), "--update-card"]
    assert run_cli(argv) == 0
    metrics = json.loads(report.read_text())
    assert metrics["n_inputs"] == 4 and "dice_any" in metrics
    assert figure.stat().st_size > 0
    assert "synthetic" in json.loads(out.with_suffix(".json").read_text())["metrics"]


def test_cli_bad_input_raises_engine_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError):
        run_cli(["proposals-train", "--out", str(tmp_path / "m.pt"), "--data", str(tmp_path / "nowhere"), "--steps", "1"])
    with pytest.raises(ModelError):
        run_cli(["proposals-eval", "--model", "no-such-model"])
    with pytest.raises(OAIMSError):
        run_cli(["proposals-train", "--out", str(tmp_path / "m.pt"), "--steps", "1", "--size", "20"])
    with pytest.raises(SystemExit) as exit_info:  # argparse: "error: argument --steps: ...", exit 2
        run_cli(["proposals-train", "--out", str(tmp_path / "m.pt"), "--steps", "0"])
    assert exit_info.value.code == 2


# ----------------------------------------------------------------------------- real data


@pytest.mark.data
@pytest.mark.skipif(not DRISHTI.is_dir(), reason=f"{DRISHTI} is absent")
def test_fundus_loader() -> None:
    images = D.load_fundus_dataset(DRISHTI, "Ts", 64)
    assert images.images.shape[1:] == (64, 64) and images.objects.shape[1:] == (2, 64, 64)
    assert images.images.min() >= 0.0 and images.images.max() <= 1.0
    disc, cup = images.objects[:, 0], images.objects[:, 1]
    assert not np.any(cup & ~disc) and np.all(disc.reshape(len(disc), -1).any(axis=1))
    assert images.candidates(0).shape == (2, 64, 64)


def test_fundus_loader_rejects_a_non_dataset(tmp_path: Path) -> None:
    with pytest.raises(DatasetError):
        D.load_fundus_dataset(tmp_path, "Ts", 64)
    meta = {"channel_names": {"0": "FLAIR"}, "labels": {"background": 0, "lesion": 1}, "file_ending": ".nii.gz"}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="2D PNG"):
        D.load_fundus_dataset(tmp_path, "Ts", 64)
