"""The simulated user who compares choosing among proposals with clicking alone (issue 22).

The second paper's claim: choosing among several partial proposals gets a user to an
accurate segmentation with fewer corrections than a single complete prediction. Two
loops segment the same images, each counting *user actions* until the Dice of the
segmentation against the structure the user means reaches ``threshold`` (0.9), at most
``cap`` (20) actions:

* :func:`proposal_loop`: each round the user looks at ``k`` proposals
  (:func:`~OAIMSSegment.proposals.inference.propose_next_steps` from what is decided so far)
  and *picks* the one whose segmentation is closest to the truth (highest Dice; 1 action)
  if it is closer than what they have. When no proposal helps, they make one *correction
  click* instead (1 action): a brush dab of radius ``brush`` pixels at the interior point of
  the largest wrong region (:func:`OAIMSSegment.clicks.interior_point`), painted with the
  right label and stopping at that region's edge (a careful user), which also marks those
  pixels decided. The result is the next round's input. Undecided pixels count as background.
* :func:`click_loop`: OAIMS alone, one :class:`~OAIMSSegment.session.InteractiveSession`
  through the images in order (adapting online, ``pi+mi``), through its public API only
  (``start``, ``add_click``, ``accept``): a localization click inside the truth, then a
  correction click at the interior point of the largest wrong region of the structure.

Dice is binary, on the structure the user means (the cup of a fundus image, a tumour),
from :func:`OAIMSSegment.metrics.pairwise_dice`; action counts use
:func:`OAIMSSegment.metrics.number_of_clicks`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

from OAIMSSegment.clicks import interior_point
from OAIMSSegment.data import NnUNetDataset
from OAIMSSegment.errors import DatasetError
from OAIMSSegment.metrics import number_of_clicks, pairwise_dice
from OAIMSSegment.model import ClickSegmenter
from OAIMSSegment.proposals.data import make_disk_images
from OAIMSSegment.proposals.inference import propose_next_steps
from OAIMSSegment.proposals.model import ProposalModel
from OAIMSSegment.session import InteractiveSession

#: The loops :func:`compare` can run.
LOOPS = ("proposals", "brush", "clicks")

__all__ = [
    "LOOPS", "UserCase", "synthetic_cases", "dataset_cases", "binary_dice", "wrong_region", "proposal_loop", "click_loop", "compare",
]  # fmt: skip


@dataclass
class UserCase:
    """One image and the structure the simulated user means.

    Attributes:
        image: what :func:`propose_next_steps` takes: ``(H, W)`` raw intensities or ``(H, W, 3)`` RGB.
        session_image: what ``InteractiveSession.start`` takes: ``(C, H, W)`` raw intensities.
        labels: ``(H, W)`` int class map in the click model's classes (clicks carry these labels).
        target: the class whose Dice counts (e.g. 2, the cup).
        name: case name.
    """

    image: np.ndarray
    session_image: np.ndarray
    labels: np.ndarray
    target: int
    name: str

    @property
    def truth(self) -> np.ndarray:
        """``(H, W)`` bool, the structure the user means."""
        return self.labels == self.target


def synthetic_cases(n: int, seed: int, scale: int = 4) -> list[UserCase]:
    """``n`` held-out disk images (the evaluation's seed stream), each with one random non-empty subset as truth.

    The 32 x 32 disks (the proposal model's grid) are shown at ``32 * scale`` pixels, each
    pixel repeated, so that a click model trained on larger images sees its usual scale and
    the proposal model, resizing back, sees the disks exactly as drawn.
    """
    images = make_disk_images(n, 32, np.random.default_rng([seed, 1]))
    truths = images.sample_ground_truths(np.arange(n), np.random.default_rng([seed, 9]))
    block = np.ones((scale, scale), dtype=np.int64)
    cases = []
    for i in range(n):
        image = np.kron(images.images[i], block).astype(np.float32)
        cases.append(UserCase(image, image[None], np.kron(truths[i].astype(np.int64), block), 1, f"disks-{i}"))
    return cases


def dataset_cases(
    root: str, split: str, target: str | None, slices_per_case: int, min_pixels: int, max_cases: int | None
) -> list[UserCase]:
    """Cases of an nnU-Net raw dataset: each 2D image, or ``slices_per_case`` axial slices of a volume.

    Args:
        target: name of the class the user means (``dataset.json`` labels); None: the highest label.
        slices_per_case: slices taken from a 3D case, evenly spaced among those with at least
            ``min_pixels`` pixels of the target.
        min_pixels: images or slices with fewer target pixels are skipped.
        max_cases: the first cases only (None: all).

    Raises:
        DatasetError: an unknown target name or no usable image.
    """
    dataset = NnUNetDataset(root)
    if target is None:
        target = max(dataset.labels, key=lambda name: dataset.labels[name])
    if target not in dataset.labels or dataset.labels[target] == 0:
        raise DatasetError(f"--target {target!r} is not a foreground class of {dataset.name} ({', '.join(dataset.labels)})")
    value = dataset.labels[target]
    by_case: dict[str, list] = {}
    for sample in dataset.samples(split, min_foreground=1, max_cases=max_cases):
        if int((sample.label == value).sum()) >= min_pixels:
            by_case.setdefault(sample.name.split(":")[0], []).append(sample)
    cases = []
    for samples in by_case.values():
        picked = samples if len(samples) == 1 else [samples[int(i)] for i in np.unique(np.linspace(0, len(samples) - 1, slices_per_case).round())]
        for sample in picked:
            image = sample.image[0] if sample.image.shape[0] == 1 else np.moveaxis(sample.image[:3], 0, -1)
            cases.append(UserCase(image, sample.image, sample.label, value, sample.name))
    if not cases:
        raise DatasetError(f"{dataset.name} {split}: no image has {min_pixels} or more {target!r} pixels")
    return cases


def binary_dice(mask: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two ``(H, W)`` bool masks (1.0 when both are empty)."""
    return float(pairwise_dice(mask.reshape(1, -1), truth.reshape(1, -1))[0, 0])


def wrong_region(segmentation: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, tuple[int, int]] | None:
    """The largest wrong connected region of ``segmentation`` against ``truth`` (both ``(H, W)`` bool).

    Missed foreground and false foreground compete by size (8-connectivity). Returns the
    region's mask and its interior point (the pixel farthest from its edge), or None if
    the segmentation is right everywhere.
    """
    best: np.ndarray | None = None
    for wrong in (truth & ~segmentation, segmentation & ~truth):
        labelled, count = ndimage.label(wrong, structure=np.ones((3, 3), dtype=bool))
        if not count:
            continue
        sizes = np.bincount(labelled.ravel())[1:]
        region = labelled == int(np.argmax(sizes)) + 1
        if best is None or region.sum() > best.sum():
            best = region
    if best is None:
        return None
    row, col = interior_point(best)
    return best, (row, col)


def _brush(shape: tuple[int, int], point: tuple[int, int], radius: float) -> np.ndarray:
    """``(H, W)`` bool disk of ``radius`` pixels around ``point`` (row, col)."""
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return (rows - point[0]) ** 2 + (cols - point[1]) ** 2 <= radius**2


def _pad(curve: list[float], cap: int) -> list[float]:
    """Dice after actions 1..cap: the last value carried on once the user stops."""
    last = curve[-1] if curve else 0.0
    return (curve + [last] * cap)[:cap]


def proposal_loop(
    model: ProposalModel | None,
    case: UserCase,
    k: int,
    brush: float,
    seed: int,
    threshold: float = 0.9,
    cap: int = 20,
    prior: str | None = None,
    temperature: float | None = None,
) -> dict:
    """Segment ``case`` by picking among ``k`` proposals and brush clicks (see the module doc).

    ``prior``, ``temperature``: how the proposals' ``z`` is drawn (:func:`propose_next_steps`;
    ``None``: the model card's choice).

    ``model=None`` is the brush alone (no proposals): what the clicks of loop (a) achieve
    without anything to pick, to tell the proposals' share of a result from the brush's.

    Returns ``{"dice": [Dice after actions 1..cap], "picks", "clicks"}``.
    """
    truth = case.truth
    decided = np.zeros(truth.shape, dtype=bool)
    foreground = np.zeros(truth.shape, dtype=bool)
    curve: list[float] = []
    picks = clicks = 0
    rounds = 0
    while len(curve) < cap and (not curve or curve[-1] < threshold):
        current = binary_dice(foreground, truth)
        proposals = [] if model is None else propose_next_steps(
            model, case.image, decided, foreground, k=k, seed=seed * 1000 + rounds, prior=prior, temperature=temperature
        )
        rounds += 1
        scores = [binary_dice(p.seg_mask, truth) for p in proposals] or [-1.0]
        best = int(np.argmax(scores))
        if scores[best] > current:
            decided, foreground = proposals[best].partial_mask.copy(), proposals[best].seg_mask.copy()
            picks += 1
        else:
            found = wrong_region(foreground, truth)
            if found is None:
                break
            region, point = found
            dab = _brush(truth.shape, point, brush) & region
            decided |= dab
            foreground[dab] = truth[point]
            clicks += 1
        curve.append(binary_dice(foreground, truth))
    return {"dice": _pad(curve, cap), "picks": picks, "clicks": clicks}


def click_loop(
    model: ClickSegmenter, cases: Sequence[UserCase], seed: int, method: str = "pi+mi", threshold: float = 0.9, cap: int = 20
) -> list[dict]:
    """Segment ``cases`` in order with one OAIMS session (a copy of ``model``, adapting online).

    Returns one ``{"dice": [Dice after clicks 1..cap], "clicks"}`` per case.
    """
    session = InteractiveSession(copy.deepcopy(model), method)
    rng = np.random.default_rng([seed, 7])
    results = []
    for case in cases:
        truth = case.truth
        session.start(case.session_image)
        inside = np.flatnonzero(truth)
        first = np.unravel_index(int(rng.choice(inside)), truth.shape)
        click: tuple[tuple[int, int], int] | None = ((int(first[0]), int(first[1])), case.target)
        curve: list[float] = []
        while click is not None and len(curve) < cap:
            mask = session.add_click(click[0], click[1]).mask
            segmentation = mask == case.target
            curve.append(binary_dice(segmentation, truth))
            if curve[-1] >= threshold:
                break
            found = wrong_region(segmentation, truth)
            click = None if found is None else (found[1], int(case.labels[found[1]]))
        session.accept()
        results.append({"dice": _pad(curve, cap), "clicks": len(curve)})
    return results


def _actions(curves: np.ndarray, threshold: float, cap: int) -> np.ndarray:
    """Actions per image to reach ``threshold`` (``cap`` when never): ``(images,)``."""
    return np.array([number_of_clicks(curve[None], threshold, cap) for curve in curves])


def compare(
    proposal_model: ProposalModel,
    click_model: ClickSegmenter,
    cases: Sequence[UserCase],
    k: int,
    brush: float,
    seeds: Sequence[int],
    threshold: float = 0.9,
    cap: int = 20,
    loops: Sequence[str] = LOOPS,
    prior: str | None = None,
    temperature: float | None = None,
) -> dict:
    """The ``loops`` on ``cases`` for every seed (the seed moves ``z``, the first click and the order).

    ``loops``: any of ``"proposals"`` (loop a), ``"brush"`` (loop a without proposals) and
    ``"clicks"`` (loop b, OAIMS). ``wins`` compares proposals with clicks when both ran.
    ``prior``, ``temperature``: see :func:`proposal_loop`.

    Returns the JSON-ready summary: per loop the mean actions to reach ``threshold`` per
    seed, their mean and standard deviation over seeds, the share of images that reach it,
    the mean Dice after each action; per image and seed which loop needed fewer actions.
    """
    unknown = [name for name in loops if name not in LOOPS]
    if unknown or not loops:
        raise ValueError(f"loops must be some of {LOOPS}, got {list(loops)}")
    per_seed: dict[str, list[dict]] = {name: [] for name in loops}
    wins = {"proposals": 0, "clicks": 0, "tie": 0}
    images = []
    for seed in seeds:
        order = np.random.default_rng([seed, 8]).permutation(len(cases))
        ordered = [cases[i] for i in order]
        runs_by_loop = {}
        if "proposals" in loops:
            runs_by_loop["proposals"] = [
                proposal_loop(proposal_model, case, k, brush, seed, threshold, cap, prior, temperature) for case in ordered
            ]
        if "brush" in loops:
            runs_by_loop["brush"] = [proposal_loop(None, case, k, brush, seed, threshold, cap) for case in ordered]
        if "clicks" in loops:
            runs_by_loop["clicks"] = click_loop(click_model, ordered, seed, threshold=threshold, cap=cap)
        for name, runs in runs_by_loop.items():
            curves = np.array([run["dice"] for run in runs])
            actions = _actions(curves, threshold, cap)
            entry = {
                "seed": seed,
                "actions_mean": float(actions.mean()),
                "reached": float((curves.max(axis=1) >= threshold).mean()),
                "dice_curve": curves.mean(axis=0).tolist(),
                "actions": actions.tolist(),
            }
            if name != "clicks":
                entry["picks_mean"] = float(np.mean([run["picks"] for run in runs]))
                entry["clicks_mean"] = float(np.mean([run["clicks"] for run in runs]))
            per_seed[name].append(entry)
        for row, case in enumerate(ordered):
            counts = {name: per_seed[name][-1]["actions"][row] for name in loops}
            if "proposals" in counts and "clicks" in counts:
                a, b = counts["proposals"], counts["clicks"]
                wins["proposals" if a < b else "clicks" if b < a else "tie"] += 1
            images.append({"seed": seed, "case": case.name, **counts, "truth_pixels": int(case.truth.sum())})
    summary: dict = {"threshold": threshold, "cap": cap, "k": k, "brush_px": brush, "seeds": list(seeds), "n_images": len(cases)}
    for name, entries in per_seed.items():
        means = [e["actions_mean"] for e in entries]
        summary[name] = {
            "actions_mean": float(np.mean(means)),
            "actions_std_over_seeds": float(np.std(means)),
            "reached": float(np.mean([e["reached"] for e in entries])),
            "per_seed": entries,
        }
    summary["wins"] = wins
    summary["images"] = images
    return summary
