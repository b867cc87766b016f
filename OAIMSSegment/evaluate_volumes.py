"""The simulated-clinician benchmark in 3D: whole volumes segmented with a :class:`VolumeSession`.

Volumes are segmented one after the other (seeded order) by one session per method, so
adaptation carries over from patient to patient; each volume is accepted after its
interactions. The simulated clinician works in 3D:

* interaction 1: a click at the interior point (farthest from the border) of the ground
  truth's largest cross-section along the slicing axis;
* each later interaction: a correction click in the largest 3D error component (false
  negatives and false positives compete by size, 26-connectivity), on the slice where that
  component's cross-section is largest, at the interior point of that cross-section,
  labelled with the ground truth's class there.

3D Dice is measured after every interaction. Besides the paper's NoC, the JSON has what the
CVPR 2025 interactive 3D segmentation challenge reports: Dice after each of the first 6
interactions and the area under that curve (trapezoids, unit spacing, as
``sklearn.metrics.auc(range(6), dice)``: at most 5).

``--slice-by-slice`` also runs the 2D workflow for comparison: each slice holding ground
truth is its own image for the 2D session (largest first), the existing 2D simulated
clinician clicks on it (a localization click, then correction clicks, until the slice's Dice
reaches ``--slice-target`` or ``--slice-clicks`` clicks), the slice is accepted, and clicks
are counted until the assembled volume's 3D Dice reaches 0.8 (``--slice-cap`` if never).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm

from OAIMSSegment.clicks import Click, correction_click, interior_point, localization_click
from OAIMSSegment.data import SLICE_AXES, NnUNetDataset
from OAIMSSegment.errors import DatasetError, OAIMSError
from OAIMSSegment.evaluate import plot_curves
from OAIMSSegment.files import atomic_write_text
from OAIMSSegment.metrics import class_dice, mean_foreground, number_of_clicks
from OAIMSSegment.model import ClickSegmenter, load_model
from OAIMSSegment.segment_propagation import REFRESH_AFTER_ADAPTATION
from OAIMSSegment.session import METHODS, AdaptConfig, InteractiveSession
from OAIMSSegment.volume import SEEDINGS, Propagation, VolumeSession

#: Interactions the CVPR 2025 interactive 3D challenge scores (first prompt + 5 refinements).
CHALLENGE_INTERACTIONS = 6


@dataclass
class Volume:
    """One case: ``image (D, C, H, W)`` and ``label (D, H, W)`` with D along the slicing axis."""

    image: np.ndarray
    label: np.ndarray
    name: str


@dataclass
class VolumeRun:
    """Dice curves (volumes x interactions), wall time per volume and 2D-workflow click counts."""

    dice: list[list[float]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    slice_clicks: list[int] = field(default_factory=list)
    propagation: dict[str, float] = field(default_factory=dict)


def volume_dice(prediction: np.ndarray, target: np.ndarray, labels: dict[str, int]) -> float:
    """Mean foreground 3D Dice, computed on the bounding box of both maps (Dice ignores the rest)."""
    box = _bounding_box((prediction > 0) | (target > 0))
    if box is None:
        return 1.0
    return mean_foreground(class_dice(prediction[box], target[box], labels), labels)


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    found = ndimage.find_objects(mask.astype(np.int8))
    return found[0] if found else None


def first_click(target: np.ndarray) -> tuple[int, Click]:
    """Interaction 1: ``(slice, click)`` at the interior point of the largest cross-section of ``target (D, H, W)``."""
    areas = (target > 0).reshape(len(target), -1).sum(axis=1)
    if not areas.any():
        raise DatasetError("the volume's ground truth is empty: nothing to click on")
    index = int(np.argmax(areas))
    position = interior_point(target[index] > 0)
    return index, Click(position, int(target[index][position]))


def correction_click_3d(prediction: np.ndarray, target: np.ndarray, num_classes: int) -> tuple[int, Click] | None:
    """A correction ``(slice, click)`` in the largest 3D error component (None when perfect).

    Errors lie in the bounding box of both maps, so components are labelled there only.
    """
    box = _bounding_box((prediction > 0) | (target > 0))
    if box is None:
        return None
    pred, truth = prediction[box], target[box]
    structure = ndimage.generate_binary_structure(3, 3)
    best: tuple[int, int, np.ndarray, int] | None = None  # size, class, labelled, index
    for k in range(num_classes):
        labelled, count = ndimage.label((truth == k) & (pred != k), structure=structure)
        if count == 0:
            continue
        sizes = np.bincount(labelled.ravel())[1:]
        index = int(np.argmax(sizes)) + 1
        if best is None or sizes[index - 1] > best[0]:
            best = (int(sizes[index - 1]), k, labelled, index)
    if best is None:
        return None
    _, k, labelled, index = best
    component = labelled == index
    local_slice = int(np.argmax(component.reshape(len(component), -1).sum(axis=1)))
    row, col = interior_point(component[local_slice])
    return local_slice + box[0].start, Click((row + box[1].start, col + box[2].start), k)


def run_volumes(model: ClickSegmenter, method: str, volumes: list[Volume], interactions: int, config: AdaptConfig,
                propagation: Propagation, learn_from_propagated: bool, progress: bool = True,
                observe: Callable[[Volume, int, np.ndarray], None] | None = None,
                refresh_after_adaptation: bool = REFRESH_AFTER_ADAPTATION) -> VolumeRun:
    """Segment ``volumes`` in order with a fresh copy of ``model`` adapted by ``method``.

    ``observe(volume, interaction, prediction (D, H, W))`` is called after every interaction
    (0-based; diagnostics)."""
    session = VolumeSession(InteractiveSession(copy.deepcopy(model), method, config), propagation, learn_from_propagated,
                            refresh_after_adaptation)
    labels, num_classes = model.card.labels, model.card.num_classes
    run = VolumeRun()
    for volume in tqdm(volumes, desc=method, unit="vol", disable=not progress, leave=False):
        started = time.perf_counter()
        session.open(volume.image, axis=0)
        curve: list[float] = []
        prediction = session.volume_mask()
        for t in range(interactions):
            step = first_click(volume.label) if t == 0 else correction_click_3d(prediction, volume.label, num_classes)
            if step is not None:
                index, click = step
                session.click(index, click.position, click.label)
                prediction = session.volume_mask()
            curve.append(volume_dice(prediction, volume.label, labels))
            if observe is not None:
                observe(volume, t, prediction)
        session.accept()
        run.seconds.append(time.perf_counter() - started)
        run.dice.append(curve)
    run.propagation = dict(session.propagation_cost)
    return run


def slice_by_slice_clicks(session: InteractiveSession, volume: Volume, threshold: float = 0.8,
                          slice_target: float = 0.9, slice_clicks: int = 5, cap: int = 400,
                          rng: np.random.Generator | None = None) -> int:
    """Clicks the 2D workflow needs until the assembled volume reaches ``threshold`` 3D Dice
    (``cap`` if it never does). Slices with ground truth are segmented largest first, each as
    its own image, with the 2D simulated clinician, and accepted."""
    rng = rng or np.random.default_rng(0)
    labels, num_classes = session.card.labels, session.card.num_classes
    truth = volume.label
    areas = (truth > 0).reshape(len(truth), -1).sum(axis=1)
    assembled = np.zeros_like(truth)
    total = 0
    for index in np.argsort(-areas, kind="stable")[: int((areas > 0).sum())]:
        session.start(volume.image[index])
        mask = np.zeros_like(truth[index])
        for t in range(slice_clicks):
            click = localization_click(truth[index], rng) if t == 0 else correction_click(mask, truth[index], num_classes)
            if click is None:
                break
            mask = session.add_click(click.position, click.label).mask
            assembled[index] = mask
            total += 1
            if volume_dice(assembled, truth, labels) >= threshold:
                session.accept()
                return total
            if total >= cap:
                session.discard()
                return cap
            if mean_foreground(class_dice(mask, truth[index], labels), labels) >= slice_target:
                break
        session.accept()
    return cap


def load_volumes(dataset: NnUNetDataset, split: str, axis: str, max_volumes: int | None) -> list[Volume]:
    """3D cases with foreground, as :class:`Volume` with D along ``axis``."""
    if axis not in SLICE_AXES:
        raise DatasetError(f"axis must be one of {', '.join(SLICE_AXES)}, got {axis!r}")
    along = SLICE_AXES[axis]
    volumes = []
    for case in dataset.cases(split):
        image, label = dataset.load_case(case, split)
        if label.ndim != 3:
            raise DatasetError(f"{dataset.name}: case {case} is not a 3D volume (label shape {label.shape})")
        if not (label > 0).any():
            continue
        volumes.append(Volume(np.ascontiguousarray(np.moveaxis(image, along + 1, 0)),
                              np.ascontiguousarray(np.moveaxis(label, along, 0)), case))
    if max_volumes is not None and len(volumes) > max_volumes:
        volumes = [volumes[i] for i in np.linspace(0, len(volumes) - 1, max_volumes).round().astype(int)]
    return volumes


def summarise(runs: list[VolumeRun]) -> dict:
    """The per-method JSON entry from one :class:`VolumeRun` per seed."""
    curves = np.array([np.mean(run.dice, axis=0) for run in runs])  # seeds x interactions
    every = np.concatenate([np.array(run.dice) for run in runs])
    mean = curves.mean(axis=0)
    first = mean[:CHALLENGE_INTERACTIONS]
    entry = {
        "dice": mean.tolist(),
        "dice_std": curves.std(axis=0).tolist(),
        "noc": {"80": number_of_clicks(every, 0.8), "90": number_of_clicks(every, 0.9)},
        "seconds_per_volume": float(np.mean([s for run in runs for s in run.seconds])),
        "dice_auc_6": float(((first[1:] + first[:-1]) / 2.0).sum()),
        "dice_first_6": first.tolist(),
    }
    slices = sum(run.propagation["slices"] for run in runs)
    if slices:
        entry["propagation_ms_per_slice"] = {
            "wall": 1000.0 * sum(run.propagation["seconds"] for run in runs) / slices,
            "cpu": 1000.0 * sum(run.propagation["cpu_seconds"] for run in runs) / slices,
        }
    if runs[0].slice_clicks:
        entry["slice_by_slice_clicks_to_80"] = float(np.mean([c for run in runs for c in run.slice_clicks]))
    return entry


def volume_sequence(volumes: list[Volume], seed: int) -> list[Volume]:
    """The order in which seed ``seed`` shows ``volumes`` to the simulated clinician."""
    return [volumes[i] for i in np.random.default_rng(seed).permutation(len(volumes))]


def evaluate_volumes(model: ClickSegmenter, volumes: list[Volume], methods: list[str], interactions: int,
                     seeds: list[int], config: AdaptConfig, propagation: Propagation,
                     learn_from_propagated: bool = False, slice_by_slice: dict | None = None,
                     refresh_after_adaptation: bool = REFRESH_AFTER_ADAPTATION) -> dict:
    """Every method over the volume sequence (one seeded order per seed): ``{"results": {...}}``.

    ``slice_by_slice``: also run the 2D workflow, with these :func:`slice_by_slice_clicks` options."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise OAIMSError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    orders = {seed: volume_sequence(volumes, seed) for seed in seeds}
    results = {}
    for method in methods:
        runs = []
        for seed in seeds:
            run = run_volumes(model, method, orders[seed], interactions, config, propagation, learn_from_propagated,
                              refresh_after_adaptation=refresh_after_adaptation)
            if slice_by_slice is not None:
                session, rng = InteractiveSession(copy.deepcopy(model), method, config), np.random.default_rng(seed)
                run.slice_clicks = [slice_by_slice_clicks(session, volume, rng=rng, **slice_by_slice)
                                    for volume in orders[seed]]
            runs.append(run)
        results[method] = summarise(runs)
    return {"results": results}


# -- command line -------------------------------------------------------------------------------


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    from OAIMSSegment import arguments as types

    parser = subparsers.add_parser("evaluate-volumes", help="simulated-clinician benchmark on whole 3D volumes")
    parser.add_argument("--model", required=True, help="shipped model name or weights/card path")
    parser.add_argument("--interactions", type=types.positive_int, default=10, help="clicks per volume")
    parser.add_argument("--dataset", required=True, help="nnU-Net raw dataset folder of 3D volumes")
    parser.add_argument("--axis", default="axial", help="slicing orientation")
    parser.add_argument("--split", default="Ts", choices=["Tr", "Ts"])
    parser.add_argument("--max-volumes", type=types.positive_int, help="use at most N volumes, spread evenly over the dataset")
    parser.add_argument("--methods", type=types.name_list, default="frozen,pi+mi", help=f"comma-separated, from: {', '.join(METHODS)}")
    parser.add_argument("--seed", type=int, default=0, help="first seed (volume order)")
    parser.add_argument("--seeds", type=types.positive_int, default=1, help="number of seeds (seed, seed+1, ...)")
    parser.add_argument("--lr", type=types.positive_float, help="adaptation learning rate (default: the model card's)")
    parser.add_argument("--json", type=types.writable_file, required=True, help="write results here (checked before the run)")
    parser.add_argument("--plot", type=types.writable_file, help="write a Dice-vs-interactions PNG here")
    defaults = Propagation()
    parser.add_argument("--seeding", default=defaults.seeding, choices=SEEDINGS)
    parser.add_argument("--min-area-ratio", type=types.non_negative_float, default=defaults.min_area_ratio)
    parser.add_argument("--max-area-ratio", type=types.positive_float, default=defaults.max_area_ratio)
    parser.add_argument("--min-overlap", type=types.probability, default=defaults.min_overlap)
    parser.add_argument("--min-confidence", type=types.probability, default=defaults.min_confidence)
    parser.add_argument("--keep-connected", action="store_true", default=defaults.keep_connected)
    parser.add_argument("--within", type=_pixels_or_none, default=defaults.within,
                        help="keep a propagated mask within this many pixels of its neighbour's ('none': anywhere)")
    parser.add_argument("--learn-from-propagated", action="store_true",
                        help="on accept, also adapt on propagated slices left unedited")
    parser.add_argument("--refresh-after-adaptation", action=argparse.BooleanOptionalAction, default=REFRESH_AFTER_ADAPTATION,
                        help="after a click's MI step, re-propagate from every other worked slice with the adapted weights")
    parser.add_argument("--slice-by-slice", action="store_true",
                        help="also count the clicks the 2D slice-by-slice workflow needs to reach 3D Dice 0.8")
    parser.add_argument("--slice-target", type=types.probability, default=0.9, help="2D workflow: a slice is done at this Dice")
    parser.add_argument("--slice-clicks", type=types.positive_int, default=5, help="2D workflow: at most this many clicks per slice")
    parser.add_argument("--slice-cap", type=types.positive_int, default=400,
                        help="2D workflow: clicks counted for a volume never reaching 0.8")
    parser.add_argument("--threads", type=types.non_negative_int, default=0, help="torch threads (0: torch default)")
    parser.set_defaults(func=_run)


def _pixels_or_none(text: str) -> float | None:
    """``--within``: 'none' (anywhere) or a finite distance of 0 or more pixels."""
    from OAIMSSegment.arguments import non_negative_float

    return None if text.strip().lower() == "none" else non_negative_float(text)


def _run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    dataset = NnUNetDataset(args.dataset)
    if dataset.image_channels != model.card.image_channels:
        raise DatasetError(f"model {model.card.name!r} takes {model.card.image_channels} channel(s) but "
                           f"{dataset.name} has {dataset.image_channels}")
    if set(dataset.labels) != set(model.card.labels):
        raise DatasetError(f"dataset labels {dataset.labels} differ from the model's {model.card.labels}")
    volumes = load_volumes(dataset, args.split, args.axis, args.max_volumes)
    if not volumes:
        raise DatasetError(f"{dataset.name} images{args.split} holds no volume with foreground")
    propagation = Propagation(args.seeding, min_area_ratio=args.min_area_ratio, max_area_ratio=args.max_area_ratio,
                              min_overlap=args.min_overlap, min_confidence=args.min_confidence,
                              keep_connected=args.keep_connected, within=args.within)
    config = AdaptConfig(lr=args.lr).for_model(model.card)
    seeds = list(range(args.seed, args.seed + args.seeds))
    methods = args.methods
    slice_options = None
    if args.slice_by_slice:
        slice_options = {"slice_target": args.slice_target, "slice_clicks": args.slice_clicks, "cap": args.slice_cap}
    started = time.time()
    summary: dict = {"results": {}}
    for method in methods:  # the JSON is rewritten after each method, so a long run keeps what it finished
        summary["results"].update(evaluate_volumes(model, volumes, [method], args.interactions, seeds, config,
                                                   propagation, args.learn_from_propagated, slice_options,
                                                   args.refresh_after_adaptation)["results"])
        summary.update({
            "n_volumes": len(volumes), "dataset": f"{dataset.name}/images{args.split}", "model": model.card.name,
            "seed": args.seed, "seeds": seeds, "axis": args.axis, "propagation": asdict(propagation),
            "learn_from_propagated": args.learn_from_propagated,
            "refresh_after_adaptation": args.refresh_after_adaptation, "config": asdict(config),
            "slice_by_slice": slice_options, "threads": torch.get_num_threads(), "wall_s": round(time.time() - started, 1),
        })
        atomic_write_text(args.json, json.dumps(summary, indent=1) + "\n")
    if args.plot:
        plot_curves(summary, args.plot, f"{summary['model']} on {summary['dataset']} ({summary['n_volumes']} volumes)",
                    xlabel="interactions (clicks)", ylabel="3D Dice")
    _print_table(summary)
    return 0


def _print_table(summary: dict, at: tuple[int, ...] = (1, 3, 5, 10)) -> None:
    """3D Dice (%) at selected interaction counts, NoC@80/90, AUC-6 and seconds, one row per method."""
    count = len(next(iter(summary["results"].values()))["dice"])
    columns = [c for c in at if c <= count] or [count]
    print(f"{'method':<16}" + "".join(f"{f'{c} int':>9}" for c in columns) + f"{'NoC@80':>8}{'NoC@90':>8}{'AUC6':>7}{'s/vol':>7}")
    for method, result in summary["results"].items():
        cells = "".join(f"{100 * result['dice'][c - 1]:>9.1f}" for c in columns)
        print(f"{method:<16}{cells}{result['noc']['80']:>8.2f}{result['noc']['90']:>8.2f}"
              f"{result['dice_auc_6']:>7.2f}{result['seconds_per_volume']:>7.1f}")
