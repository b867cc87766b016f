"""The proposals' training choices of issue 22 and the simulated user who compares proposals with clicks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from OAIMSSegment import proposals as P
from OAIMSSegment.cli import main
from OAIMSSegment.errors import DatasetError
from OAIMSSegment.model import ClickSegmenter
from OAIMSSegment.proposals import data as D
from OAIMSSegment.proposals import user as U

from conftest import SHARED_DATA, tiny_card

ORIGA = SHARED_DATA / "Dataset004_ORIGA"
BRATS = SHARED_DATA / "Dataset001_BraTS18_FLAIR"


def test_object_growth_stays_near_the_ground_truth() -> None:
    rng = np.random.default_rng(0)
    gt = D.make_disk_images(16, 32, rng).sample_ground_truths(np.arange(16), rng)
    pairs = D.make_pairs(gt, rng, growth="object")
    new = pairs["y_m"] & ~pairs["x_m"]
    near = np.stack([ndimage.binary_dilation(g, iterations=2) for g in gt])
    assert not (new & ~near).any()
    assert (pairs["y_m"] | near).sum() > 0 and new.any(axis=(1, 2)).mean() > 0.8
    # a larger share of the growth is foreground than with the paper's shapes anywhere
    paper = D.make_pairs(gt, np.random.default_rng(1), growth="random")
    paper_new = paper["y_m"] & ~paper["x_m"]
    assert (new & gt).sum() / new.sum() > 2 * (paper_new & gt).sum() / paper_new.sum()
    with pytest.raises(ValueError, match="growth"):
        D.make_pairs(gt, rng, growth="nowhere")


def test_partialness_dice_over_undecided_pixels_by_hand() -> None:
    torch.manual_seed(0)
    pred_m, target_m = torch.rand(2, 1, 8, 8), (torch.rand(2, 1, 8, 8) > 0.5).float()
    x_m = (torch.rand(2, 1, 8, 8) > 0.6).float()
    target_m = torch.maximum(target_m, x_m)
    pred_m = torch.maximum(pred_m, x_m)
    zeros = torch.zeros_like(pred_m)
    mu, logvar = torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    free = 1 - x_m
    eps = 1e-5
    inter = (pred_m * target_m * free).sum(dim=(1, 2, 3))
    total = (pred_m * free).sum(dim=(1, 2, 3)) + (target_m * free).sum(dim=(1, 2, 3))
    expected = (1 - (2 * inter + eps) / (total + eps)).mean()
    terms = P.ProposalLoss(partial_dice="undecided")(pred_m, zeros, target_m, zeros, x_m, mu, logvar)
    assert torch.isclose(terms["dl"], expected, atol=1e-5)
    everywhere = P.ProposalLoss(partial_dice="all")(pred_m, zeros, target_m, zeros, x_m, mu, logvar)
    assert everywhere["dl"] < terms["dl"]  # the decided pixels, matched by construction, flatter the Dice
    with pytest.raises(ValueError, match="partial_dice"):
        P.ProposalLoss(partial_dice="some")


def test_conditional_segmentation_probability_leaves_p_m_out_of_y_s() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 6, 6)
    x_m = (torch.rand(2, 1, 6, 6) > 0.5).float()
    x_s = x_m * (torch.rand(2, 1, 6, 6) > 0.5).float()
    joint_m, joint_s = P.compose(logits, x_m, x_s, "joint")
    cond_m, cond_s = P.compose(logits, x_m, x_s, "conditional")
    free = x_m == 0
    assert torch.equal(joint_m, cond_m) and torch.allclose(cond_s[free], torch.sigmoid(logits[:, 1:2])[free])
    assert torch.equal(cond_s[~free], x_s[~free]) and torch.all(joint_s <= joint_m)
    with pytest.raises(ValueError, match="segmentation"):
        P.compose(logits, x_m, x_s, "either")


def test_training_records_the_choices_in_the_card(tmp_path: Path) -> None:
    out = tmp_path / "p.pt"
    argv = ["proposals-train", "--out", str(out), "--steps", "2", "--batch-size", "4", "--train-images", "8",
            "--growth", "object", "--partial-dice", "undecided", "--kl-warmup", "10", "--segmentation", "conditional"]  # fmt: skip
    assert main(argv) == 0
    card = json.loads(out.with_suffix(".json").read_text())
    assert (card["growth"], card["partial_dice"], card["kl_warmup"], card["segmentation"]) == ("object", "undecided", 10, "conditional")
    assert "--partial-dice undecided --kl-warmup 10 --segmentation conditional" in card["training_command"]


def test_wrong_region_is_the_largest_error_and_its_interior() -> None:
    truth = np.zeros((20, 20), dtype=bool)
    truth[2:12, 2:12] = True
    segmentation = truth.copy()
    segmentation[2:12, 2:5] = False  # 30 px missed
    segmentation[15:19, 15:19] = True  # 16 px false foreground
    region, point = U.wrong_region(segmentation, truth)
    assert region.sum() == 30 and region[point] and not segmentation[point]
    assert U.wrong_region(truth, truth) is None


def test_proposal_loop_never_loses_dice_and_counts_its_actions() -> None:
    torch.manual_seed(0)
    case = U.synthetic_cases(1, seed=3, scale=2)[0]
    run = U.proposal_loop(P.ProposalModel(), case, k=3, brush=3.0, seed=0, threshold=0.9, cap=12)
    curve = np.array(run["dice"])
    assert len(curve) == 12 and np.all(np.diff(curve) >= -1e-12)  # a pick must help; a dab only fixes pixels
    assert 1 <= run["picks"] + run["clicks"] <= 12
    reached = np.flatnonzero(curve >= 0.9)
    assert reached.size == 0 or run["picks"] + run["clicks"] == reached[0] + 1


def test_brush_alone_and_the_loops_option() -> None:
    case = U.synthetic_cases(1, seed=3, scale=2)[0]
    run = U.proposal_loop(None, case, k=3, brush=3.0, seed=0, threshold=0.9, cap=10)
    assert run["picks"] == 0 and run["clicks"] >= 1 and np.all(np.diff(run["dice"]) >= -1e-12)
    summary = U.compare(P.ProposalModel(), ClickSegmenter(tiny_card()), [case], k=2, brush=3.0, seeds=[0], cap=3, loops=["brush"])
    assert "brush" in summary and "clicks" not in summary and sum(summary["wins"].values()) == 0
    with pytest.raises(ValueError, match="loops"):
        U.compare(P.ProposalModel(), ClickSegmenter(tiny_card()), [case], k=2, brush=3.0, seeds=[0], loops=["pick"])


def test_click_loop_uses_the_session_and_stops_at_the_threshold() -> None:
    torch.manual_seed(0)
    model = ClickSegmenter(tiny_card())
    cases = U.synthetic_cases(2, seed=0, scale=1)
    runs = U.click_loop(model, cases, seed=0, threshold=0.0, cap=5)
    assert [run["clicks"] for run in runs] == [1, 1]  # Dice >= 0 after the first click
    runs = U.click_loop(model, cases, seed=0, threshold=1.01, cap=3)
    assert all(run["clicks"] == 3 and len(run["dice"]) == 3 for run in runs)
    assert all(0.0 <= value <= 1.0 for run in runs for value in run["dice"])


def test_compare_summary_and_cli(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cases = U.synthetic_cases(2, seed=0, scale=1)
    summary = U.compare(P.ProposalModel(), ClickSegmenter(tiny_card()), cases, k=2, brush=2.0, seeds=[0, 1], cap=4)
    assert summary["n_images"] == 2 and sum(summary["wins"].values()) == 4
    for name in ("proposals", "clicks"):
        assert 1 <= summary[name]["actions_mean"] <= 4 and len(summary[name]["per_seed"]) == 2
    out = tmp_path / "user.json"
    assert main(["proposals-user", "--n", "1", "--seeds", "1", "--cap", "2", "--json", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["oaims_model"] == "demo-synthetic-blobs" and "proposals-user" in written["command"]
    assert main(["proposals-user", "--data", str(tmp_path)]) == 2  # a folder needs --oaims-model


def test_dataset_cases_reject_an_unknown_target(tmp_path: Path) -> None:
    with pytest.raises(DatasetError):
        U.dataset_cases(str(tmp_path), "Ts", None, 3, 100, None)


@pytest.mark.data
@pytest.mark.skipif(not ORIGA.is_dir(), reason=f"{ORIGA} is absent")
def test_origa_cases_mean_the_cup() -> None:
    cases = U.dataset_cases(str(ORIGA), "Ts", None, 3, 100, 2)
    assert len(cases) == 2 and all(case.target == 2 and case.image.ndim == 3 for case in cases)
    assert all(case.session_image.shape[0] == 3 and case.truth.sum() >= 100 for case in cases)
    with pytest.raises(DatasetError, match="target"):
        U.dataset_cases(str(ORIGA), "Ts", "background", 3, 100, 1)


@pytest.mark.data
@pytest.mark.skipif(not BRATS.is_dir(), reason=f"{BRATS} is absent")
def test_brats_cases_are_spread_slices_with_tumour() -> None:
    cases = U.dataset_cases(str(BRATS), "Ts", None, 3, 200, 1)
    slices = [int(case.name.split(":")[1]) for case in cases]
    assert len(cases) == 3 and slices == sorted(set(slices))
    assert all(case.image.ndim == 2 and case.truth.sum() >= 200 for case in cases)
