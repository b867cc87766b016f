"""The simulated-clinician benchmark (OAIMS paper, Section 3 and Appendix A.2/A.9).

A sequence of images (seeded order, or "worst first") is segmented one after the other by
one :class:`~OAIMSSegment.session.InteractiveSession` per method, so adaptation carries
over from image to image as at a real site. On each image the simulated clinician places
a localization click inside the target and then ``T - 1`` correction clicks, each in the
largest erroneous region of the current prediction (:mod:`OAIMSSegment.clicks`); Dice is
measured after every click; then the segment is accepted (post-interaction adaptation
uses the model's final prediction, never the ground truth).

Robustness options of the paper (Table 11): a fraction of the clicks placed wrongly, or
the first ``k`` clicks wrong. A wrong click is placed on a pixel the model already got
right and asks for another class.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from OAIMSSegment.clicks import correction_click, localization_click, wrong_click
from OAIMSSegment.colour import colour_jitter, jitter_rng
from OAIMSSegment.data import NnUNetDataset, Sample
from OAIMSSegment.errors import DatasetError, OAIMSError
from OAIMSSegment.files import atomic_write_bytes, atomic_write_text
from OAIMSSegment.methods import METHODS
from OAIMSSegment.metrics import class_dice, mean_foreground, number_of_clicks
from OAIMSSegment.model import ClickSegmenter, load_model
from OAIMSSegment.session import DEFAULT_LR, AdaptConfig, InteractiveSession

@dataclass
class Protocol:
    """How the simulated clinician behaves.

    Attributes:
        clicks: clicks per image ``T``.
        wrong_fraction: probability that a click (after the first) is a wrong click.
        first_wrong: the first ``k`` clicks of every image are wrong.
        order: ``"random"`` (seeded) or ``"worst-first"`` (ascending frozen Dice after one click).
        accept_truth: the clinician corrects the segment before *Accept*, so PI adapts on the
            ground truth instead of the model's final prediction (the paper's protocol: False).
    """

    clicks: int = 10
    wrong_fraction: float = 0.0
    first_wrong: int = 0
    order: str = "random"
    accept_truth: bool = False


@dataclass
class MethodRun:
    """Per-image Dice curves and latencies of one method over one sequence."""

    dice: list[list[float]] = field(default_factory=list)  # images x clicks, mean foreground Dice
    names: list[str] = field(default_factory=list)  # the images' sample names, in the order of ``dice``
    dice_per_class: dict[str, list[list[float]]] = field(default_factory=dict)
    mi_ms: list[float] = field(default_factory=list)
    pi_ms: list[float] = field(default_factory=list)
    accepted_updates: int = 0
    model: ClickSegmenter | None = None  # the session's model after the sequence (adapted, unless frozen)


def run_method(
    model: ClickSegmenter,
    method: str,
    samples: Sequence[Sample],
    protocol: Protocol,
    config: AdaptConfig,
    seed: int,
    progress: bool = True,
    site: SiteSession | None = None,
) -> MethodRun:
    """Segment ``samples`` in order with a fresh copy of ``model`` adapted by ``method``, or with
    ``site``'s session (at the site's current version), accepting each image into the site."""
    session = InteractiveSession(copy.deepcopy(model), method, config) if site is None else site.session
    labels = model.card.labels
    rng = np.random.default_rng(seed)
    run = MethodRun()
    for sample in tqdm(samples, desc=method, unit="img", disable=not progress, leave=False):
        target = sample.label
        session.start(sample.image)
        curve: list[float] = []
        per_class: dict[str, list[float]] = {}
        mask = np.zeros_like(target)
        for t in range(protocol.clicks):
            wrong = t < protocol.first_wrong or (t > 0 and rng.random() < protocol.wrong_fraction)
            if wrong:
                click = wrong_click(mask, target, model.card.num_classes, rng)
            elif t == 0:
                click = localization_click(target, rng)
            else:
                click = correction_click(mask, target, model.card.num_classes)
            if click is not None:
                result = session.add_click(click.position, click.label)
                mask = result.mask
                if result.adapt_ms > 0:
                    run.mi_ms.append(result.latency_ms)
            scores = class_dice(mask, target, labels)
            curve.append(mean_foreground(scores, labels))
            for name, value in scores.items():
                per_class.setdefault(name, []).append(value)
        corrected = target if protocol.accept_truth else None
        accepted = session.accept(corrected) if site is None else site.accept(corrected).outcome
        if accepted.applied:
            run.accepted_updates += 1
            run.pi_ms.append(accepted.latency_ms)
        run.dice.append(curve)
        run.names.append(sample.name)
        for name, values in per_class.items():
            run.dice_per_class.setdefault(name, []).append(values)
    run.model = session.model
    return run


def order_samples(samples: list[Sample], model: ClickSegmenter, protocol: Protocol, seed: int) -> list[Sample]:
    """Seeded random order, or worst first: ascending Dice of the frozen model after one click."""
    rng = np.random.default_rng(seed)
    ordered = [samples[i] for i in rng.permutation(len(samples))]
    if protocol.order == "random":
        return ordered
    if protocol.order != "worst-first":
        raise OAIMSError(f"unknown order {protocol.order!r} (random or worst-first)")
    first = run_method(model, "frozen", ordered, Protocol(clicks=1), AdaptConfig(), seed, progress=False)
    return [ordered[i] for i in np.argsort([curve[0] for curve in first.dice], kind="stable")]


def _percentiles(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return float(np.percentile(values, 50)), float(np.percentile(values, 95))


def evaluate(
    model: ClickSegmenter,
    samples: list[Sample],
    methods: Sequence[str],
    protocol: Protocol,
    seeds: Sequence[int],
    config: AdaptConfig | None = None,
    site: SiteSession | None = None,
    runs: dict[str, list[MethodRun]] | None = None,
) -> dict:
    """Run every method over the sequence for every seed; return the JSON-ready summary
    (and, when ``runs`` is given, put each method's :class:`MethodRun` per seed in it).

    Per method: ``dice`` (mean Dice after clicks 1..T, averaged over images, then seeds),
    ``dice_std`` (standard deviation over seeds), ``per_image`` (each image's curve by its sample
    name, averaged over seeds: where the mean loses), ``dice_per_class``, ``noc`` (``"80"``,
    ``"90"``), ``latency_ms`` (``mi_p50``, ``mi_p95``, ``pi_p50``, ``pi_p95``). With ``site``
    (one method, one seed: see :func:`~OAIMSSegment.site_session.open_benchmark_site`) every
    accept goes through :meth:`~OAIMSSegment.site_session.SiteSession.accept`.
    """
    config = config or AdaptConfig()
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise OAIMSError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    # One order per seed, shared by every method (worst-first costs a frozen pass).
    orders = {seed: order_samples(samples, model, protocol, seed) for seed in seeds}
    results: dict[str, dict] = {}
    for method in methods:
        per_seed = [run_method(model, method, orders[seed], protocol, config, seed, site=site) for seed in seeds]
        if runs is not None:
            runs[method] = per_seed
        curves = np.array([np.mean(run.dice, axis=0) for run in per_seed])  # seeds x clicks
        all_curves = np.concatenate([np.array(run.dice) for run in per_seed])
        names = list(per_seed[0].dice_per_class)
        mi = [v for run in per_seed for v in run.mi_ms]
        pi = [v for run in per_seed for v in run.pi_ms]
        mi_p50, mi_p95 = _percentiles(mi)
        pi_p50, pi_p95 = _percentiles(pi)
        results[method] = {
            "dice": curves.mean(axis=0).tolist(),
            "dice_std": curves.std(axis=0).tolist(),
            "per_image": _per_image(per_seed),
            "dice_per_class": {
                name: np.mean([np.mean(run.dice_per_class[name], axis=0) for run in per_seed], axis=0).tolist()
                for name in names
            },
            "dice_per_class_std": {
                name: np.std([np.mean(run.dice_per_class[name], axis=0) for run in per_seed], axis=0).tolist()
                for name in names
            },
            "noc": {
                "80": number_of_clicks(all_curves, 0.8),
                "90": number_of_clicks(all_curves, 0.9),
            },
            "latency_ms": {"mi_p50": mi_p50, "mi_p95": mi_p95, "pi_p50": pi_p50, "pi_p95": pi_p95},
            "accepted_updates": int(sum(run.accepted_updates for run in per_seed)),
        }
    return {"results": results}


def _per_image(per_seed: Sequence[MethodRun]) -> dict[str, list[float]]:
    """Each image's Dice curve (clicks 1..T), averaged over the seeds' runs, keyed by sample name."""
    curves: dict[str, list[list[float]]] = {}
    for run in per_seed:
        for name, curve in zip(run.names, run.dice):
            curves.setdefault(name, []).append(curve)
    return {name: np.mean(each, axis=0).tolist() for name, each in curves.items()}


def plot_curves(summary: dict, path: str | Path, title: str, metric: str | None = None,
                xlabel: str = "clicks", ylabel: str = "Dice") -> None:
    """Dice (or one class's Dice) vs clicks (or interactions), one line per method with a +-1 std
    band over seeds; the PNG is written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axis = plt.subplots(figsize=(6, 4), dpi=120)
    for method, result in summary["results"].items():
        mean = np.array(result["dice"] if metric is None else result["dice_per_class"][metric])
        std = np.array(result["dice_std"] if metric is None else result["dice_per_class_std"][metric])
        clicks = np.arange(1, len(mean) + 1)
        axis.plot(clicks, mean, marker="o", markersize=3, label=method)
        axis.fill_between(clicks, mean - std, mean + std, alpha=0.15)
    axis.set_xlabel(xlabel)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # clicks are counted, not measured
    axis.set_ylabel(ylabel if metric is None else f"{ylabel} ({metric})")
    axis.set_title(title, fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def select_samples(samples: list[Sample], max_images: int | None) -> list[Sample]:
    """At most ``max_images`` samples, picked evenly across the dataset (deterministic)."""
    if max_images is None or len(samples) <= max_images:
        return samples
    indices = np.linspace(0, len(samples) - 1, max_images).round().astype(int)
    return [samples[i] for i in indices]


# -- command line -------------------------------------------------------------------------------


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    from OAIMSSegment import arguments as types

    parser = subparsers.add_parser("evaluate", help="simulated-clinician benchmark on a dataset")
    parser.add_argument("--model", required=True, help="shipped model name or weights/card path")
    parser.add_argument("--dataset", required=True, help="nnU-Net raw dataset folder")
    parser.add_argument("--split", default="Ts", choices=["Tr", "Ts"])
    parser.add_argument("--methods", type=types.name_list, default="frozen,pi,pi+mi",
                        help=f"comma-separated, from: {', '.join(METHODS)}")
    parser.add_argument("--clicks", type=types.positive_int, default=10, help="clicks per image T")
    parser.add_argument("--max-images", type=types.positive_int, help="use at most N images, spread evenly over the dataset")
    parser.add_argument("--min-foreground", type=types.positive_int, default=1, help="skip slices with fewer foreground pixels")
    parser.add_argument("--axis", default="axial", help="slicing orientation of 3D volumes")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--seeds", type=types.positive_int, default=1, help="number of seeds (seed, seed+1, ...)")
    parser.add_argument("--order", default="random", choices=["random", "worst-first"])
    parser.add_argument("--wrong-fraction", type=types.probability, default=0.0, help="fraction of wrong clicks (paper: 0.4)")
    parser.add_argument("--first-wrong", type=types.non_negative_int, default=0, help="the first k clicks of each image are wrong")
    parser.add_argument("--lr", type=types.positive_float,
                        help=f"adaptation learning rate (default: the model card's adaptation_lr, else {DEFAULT_LR:g})")
    parser.add_argument("--beta", type=types.non_negative_float, default=AdaptConfig.beta)
    parser.add_argument("--sigma", type=types.positive_float, default=AdaptConfig.sigma)
    parser.add_argument(
        "--working-size", type=types.working_size,
        help="segment with the longer image side at this many pixels instead of the model card's "
        f"working_size (16..{types.MAX_WORKING_SIZE}); 0: native resolution (up to the card's max_side)",
    )
    parser.add_argument("--colour-jitter", type=int, metavar="SEED",
                        help="evaluate on a colour-jittered copy of an RGB dataset: each image gets a random brightness, "
                        "contrast, saturation and hue (OAIMSSegment/colour.py), seeded by SEED and its case name; "
                        "the dataset's files are not changed")
    parser.add_argument("--threads", type=types.non_negative_int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--json", type=types.writable_file, required=True, help="write results here (checked before the run)")
    parser.add_argument("--plot", type=types.writable_file, help="write a Dice-vs-clicks PNG here")
    parser.add_argument("--site-store", help="accept every image into a site of this site model store, saving a "
                        "version per image that adapted the model (one method, one seed)")
    parser.add_argument("--site", help="site name in --site-store (default: default)")
    parser.set_defaults(func=_run_evaluate)


def _usable_samples(samples: list[Sample], model: ClickSegmenter) -> tuple[list[Sample], list[dict]]:
    """The samples ``model`` can segment, and ``{"name", "reason"}`` for each it cannot (NaN/inf,
    constant, smaller than 16 px...): one bad slice is named and skipped, not fatal to a run."""
    usable, skipped = [], []
    for sample in samples:
        try:
            model.prepare(sample.image)
        except OAIMSError as error:
            skipped.append({"name": sample.name, "reason": str(error)})
        else:
            usable.append(sample)
    return usable, skipped


def _run_evaluate(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    card_overrides = {}
    if args.working_size is not None:
        card_overrides["working_size"] = args.working_size or None
        model.card = replace(model.card, **card_overrides)
    dataset = NnUNetDataset(args.dataset)
    if dataset.image_channels != model.card.image_channels:
        raise DatasetError(
            f"model {model.card.name!r} takes {model.card.image_channels} channel(s) but {dataset.name} has "
            f"{dataset.image_channels} ({', '.join(dataset.channel_names)})"
        )
    if set(dataset.labels) != set(model.card.labels):
        raise DatasetError(f"dataset labels {dataset.labels} differ from the model's {model.card.labels}")
    where = f"{dataset.name}/images{args.split}"
    found = list(dataset.samples(args.split, axis=args.axis, min_foreground=args.min_foreground))
    if not found:
        raise DatasetError(
            f"no {args.axis} slice of {where} has at least {args.min_foreground} foreground pixel(s); lower --min-foreground"
        )
    selected = select_samples(found, args.max_images)
    if args.colour_jitter is not None:
        if not dataset.rgb:
            raise DatasetError(f"--colour-jitter needs an RGB dataset; {dataset.name} has channels {', '.join(dataset.channel_names)}")
        selected = [replace(sample, image=colour_jitter(sample.image, jitter_rng(args.colour_jitter, sample.name), sample.name))
                    for sample in selected]
        where += f" (colour jitter, seed {args.colour_jitter})"
    samples, skipped = _usable_samples(selected, model)
    if skipped:
        names = "; ".join(f"{s['name']} ({s['reason']})" for s in skipped[:5]) + ("; ..." if len(skipped) > 5 else "")
        print(f"skipped {len(skipped)} of {len(samples) + len(skipped)} slice(s) that cannot be segmented: {names}")
    if not samples:
        raise DatasetError(f"none of the {len(skipped)} selected slice(s) of {where} can be segmented: {skipped[0]['reason']}")
    protocol = Protocol(args.clicks, args.wrong_fraction, args.first_wrong, args.order)
    config = AdaptConfig(lr=args.lr, beta=args.beta, sigma=args.sigma).for_model(model.card)
    seeds = list(range(args.seed, args.seed + args.seeds))
    from OAIMSSegment.site_session import open_benchmark_site

    site = open_benchmark_site(args, model, args.methods, seeds, config)
    started = time.time()
    summary = evaluate(model, samples, args.methods, protocol, seeds, config, site)
    if site is not None:
        summary["site"] = {**vars(site.info()), "saved_versions": site.saved}
    summary.update({
        "n_images": len(samples), "n_skipped": len(skipped), "skipped": skipped, "dataset": where,
        "model": model.card.name, "seed": args.seed, "seeds": seeds, "protocol": vars(protocol), "config": vars(config),
        "threads": torch.get_num_threads(), "wall_s": round(time.time() - started, 1),
    })
    if card_overrides:
        summary["card_overrides"] = card_overrides
    if args.colour_jitter is not None:
        summary["colour_jitter"] = args.colour_jitter
    atomic_write_text(args.json, json.dumps(summary, indent=1) + "\n")
    if args.plot:
        plot_curves(summary, args.plot, f"{model.card.name} on {summary['dataset']} ({len(samples)} images)")
    print_table(summary)
    return 0


def print_table(summary: dict, at: Sequence[int] = (1, 3, 5, 10)) -> None:
    """Dice (%) at selected click counts and NoC@80/90, one row per method."""
    clicks = len(next(iter(summary["results"].values()))["dice"])
    columns = [c for c in at if c <= clicks] or [clicks]
    print(f"{'method':<16}" + "".join(f"{f'{c} clk':>9}" for c in columns) + f"{'NoC@80':>8}{'NoC@90':>8}")
    for method, result in summary["results"].items():
        cells = "".join(f"{100 * result['dice'][c - 1]:>9.1f}" for c in columns)
        print(f"{method:<16}{cells}{result['noc']['80']:>8.2f}{result['noc']['90']:>8.2f}")
