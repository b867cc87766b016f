"""``python -m OAIMSSegment demo`` (``oaims demo``): what online adaptation does, on synthetic data, in under a minute.

The shipped demo model (``scripts/train_models.sh demo``) was pretrained on the synthetic
*source* site (:func:`OAIMSSegment.data.synthetic_sample`: uniformly bright blobs on a dark
background). The demo runs the simulated-clinician benchmark
(:func:`OAIMSSegment.evaluate.evaluate`, the same session and clicks as ``evaluate``) on

* ``demo``: a *target* site where the blobs are ring-enhancing (a bright rim around a dark
  core, the core part of the object) (frozen, PI, PI+MI);
* ``demo-source``: the source site itself, the no-shift control (frozen, PI, PI+MI);

both in the workflow of a clinician who corrects the segment before *Accept*, so PI adapts on
the corrected (true) mask (``Protocol.accept_truth``). ``--paper-protocol`` adds ``demo-paper``:
the target sequence when the model's own final mask is accepted, as in the paper's
experiments (PI, PI+MI). It then segments one held-out target image with the same clicks
before and after adaptation. It writes one ``<part>.json`` per part (the ``evaluate`` JSON)
and ``demo.png``.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from OAIMSSegment.clicks import Click, correction_click, localization_click
from OAIMSSegment.data import Sample, synthetic_samples
from OAIMSSegment.evaluate import MethodRun, Protocol, evaluate, print_table
from OAIMSSegment.files import atomic_write_bytes, atomic_write_text
from OAIMSSegment.metrics import class_dice, mean_foreground
from OAIMSSegment.model import ClickSegmenter, load_model
from OAIMSSegment.session import AdaptConfig, InteractiveSession

DEMO_MODEL = "demo-synthetic-blobs"

#: Seeds of the demo's sequences, plus ``--seed``: apart from the 400 training images (seed 0)
#: and from the adaptation-rate sweep (``--seed 500``).
SOURCE_SEED, TARGET_SEED, PANEL_SEED = 1000, 2000, 3000

#: Sequence lengths: at the card's adaptation rate, low enough for the no-shift control, the target
#: site needs about this many accepts to show its gain; the 60 s budget bounds both (docs/BENCHMARKS.md section 3).
TARGET_IMAGES, SOURCE_IMAGES = 84, 36


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    from OAIMSSegment import arguments as types

    parser = subparsers.add_parser("demo", help="frozen vs PI vs PI+MI on a synthetic site shift, with its no-shift control (about a minute of CPU)")
    parser.add_argument("--out", default="oaims-demo", help="folder for demo.json, demo-source.json (demo-paper.json) and demo.png")
    parser.add_argument("--images", type=types.positive_int, default=TARGET_IMAGES, help="images in the target site's sequence")
    parser.add_argument("--source-images", type=types.positive_int, default=SOURCE_IMAGES,
                        help="images in the source site's sequence (the control)")
    parser.add_argument("--clicks", type=types.positive_int, default=5, help="clicks per image")
    parser.add_argument("--paper-protocol", action="store_true",
                        help="also run the target sequence accepting the model's own final masks, as the paper's experiments do "
                        "(demo-paper.json; about 25 s more)")
    parser.add_argument("--quick", action="store_true", help="6 images per site, 3 clicks: a smoke run (CI)")
    parser.add_argument("--lr", type=types.positive_float, help="adaptation learning rate (default: the model card's adaptation_lr)")
    parser.add_argument("--paper-stage2", action="store_true",
                        help="PI stage 2 as Algorithm 1 publishes it, without the localization click (the demo gives it, "
                        "AdaptConfig.stage2_localization: without it PI alone cost the no-shift control up to 4 points)")
    parser.add_argument("--threads", type=types.non_negative_int, default=1,
                        help="torch threads (0: torch default); the small images gain nothing from more, and a busy machine loses")
    parser.add_argument("--seed", type=int, default=0,
                        help="offsets every sequence (the card's adaptation_lr was chosen with --seed 500 to 503)")
    parser.set_defaults(func=_run)


def demo_parts(target: list[Sample], source: list[Sample], protocol: Protocol, paper_protocol: bool) -> dict[str, tuple]:
    """The demo's parts: name -> (what it shows, samples, methods, protocol). The headline workflow
    accepts the corrected mask on both sites; the paper's protocol (own mask accepted) is optional."""
    corrected = replace(protocol, accept_truth=True)
    parts = {
        "demo": ("target site, the clinician corrects the mask before Accept", target, ["frozen", "pi", "pi+mi"], corrected),
        "demo-source": ("source site (no shift), the clinician corrects the mask before Accept: the control", source,
                        ["frozen", "pi", "pi+mi"], corrected),
    }
    if paper_protocol:
        parts["demo-paper"] = ("target site, paper protocol (the model's own mask is accepted)", target, ["pi", "pi+mi"],
                               replace(protocol, accept_truth=False))
    return parts


def _run(args: argparse.Namespace) -> int:
    started = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    images, source_images, clicks = (6, 6, 3) if args.quick else (args.images, args.source_images, args.clicks)
    model = load_model(DEMO_MODEL)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{model.card.name}: pretrained on the synthetic source site; {source_images} source and {images} target "
          f"images, {clicks} simulated clicks each")
    config = AdaptConfig(lr=args.lr, stage2_localization=not args.paper_stage2).for_model(model.card)
    source = synthetic_samples(source_images, "source", seed=SOURCE_SEED + args.seed)
    target = synthetic_samples(images, "target", seed=TARGET_SEED + args.seed)
    parts = demo_parts(target, source, Protocol(clicks=clicks), args.paper_protocol)
    summaries: dict[str, dict] = {}
    for name, (what, samples, methods, part_protocol) in parts.items():
        part_started = time.time()
        runs: dict[str, list[MethodRun]] = {}
        summary = evaluate(model, samples, methods, part_protocol, [args.seed], config, runs=runs)
        summary.update({
            "n_images": len(samples), "dataset": f"synthetic {samples[0].name.split('-')[1]} site", "model": model.card.name,
            "part": what, "seed": args.seed, "seeds": [args.seed], "protocol": vars(part_protocol),
            "config": vars(config), "threads": torch.get_num_threads(),
            "wall_s": round(time.time() - part_started, 1),
        })
        summaries[name] = summary
        if name == "demo":
            adapted = runs["pi+mi"][0].model  # the model after PI+MI on the target sequence
        atomic_write_text(out / f"{name}.json", json.dumps(summary, indent=1) + "\n")
        print(f"\n{name}: {what}")
        print_table(summary, at=range(1, clicks + 1))
    panel_sample = synthetic_samples(1, "target", seed=PANEL_SEED + args.seed)[0]
    panel = before_and_after(model, adapted, panel_sample, clicks, args.seed)
    plot_demo(summaries, panel, out / "demo.png")
    print(f"\nheld-out target image, the same {clicks} clicks: Dice {100 * panel['dice_before']:.1f} before adaptation, "
          f"{100 * panel['dice_after']:.1f} after PI+MI on the target sequence")
    print(f"wrote {', '.join(f'{name}.json' for name in parts)} and demo.png to {out} in {time.time() - started:.0f} s")
    return 0


def before_and_after(pretrained: ClickSegmenter, adapted: ClickSegmenter, sample: Sample, clicks: int, seed: int) -> dict:
    """Segment ``sample`` with the pretrained and the adapted model, given the same clicks.

    The simulated clinician clicks for the pretrained model (a localization click, then
    corrections of its predictions); the adapted model then gets exactly those clicks.

    Returns:
        ``image (H, W)``, ``label (H, W)``, ``clicks`` (list of :class:`Click`), ``before`` and
        ``after`` class maps ``(H, W)``, ``dice_before``, ``dice_after``.
    """
    num_classes, labels = pretrained.card.num_classes, pretrained.card.labels
    session = InteractiveSession(copy.deepcopy(pretrained), "frozen")
    session.start(sample.image)
    placed: list[Click] = []
    click = localization_click(sample.label, np.random.default_rng(seed))
    for _ in range(clicks):
        placed.append(click)
        before = session.add_click(click.position, click.label).mask
        click = correction_click(before, sample.label, num_classes)
        if click is None:
            break
    session = InteractiveSession(copy.deepcopy(adapted), "frozen")
    session.start(sample.image)
    for click in placed:
        after = session.add_click(click.position, click.label).mask
    return {
        "image": sample.image[0], "label": sample.label, "clicks": placed, "before": before, "after": after,
        "dice_before": mean_foreground(class_dice(before, sample.label, labels), labels),
        "dice_after": mean_foreground(class_dice(after, sample.label, labels), labels),
    }


#: Line style per (part, method) of the demo figure (parts that did not run are left out).
STYLES = {
    ("demo-source", "frozen"): dict(color="0.55", linestyle=":", label="source site (no shift): frozen"),
    ("demo-source", "pi"): dict(color="0.55", linestyle="--", label="source site (no shift): PI"),
    ("demo-source", "pi+mi"): dict(color="0.55", linestyle="-.", label="source site (no shift): PI+MI"),
    ("demo", "frozen"): dict(color="black", label="target site: frozen"),
    ("demo", "pi+mi"): dict(color="tab:red", label="target: PI+MI"),
    ("demo", "pi"): dict(color="tab:blue", linestyle="--", label="target: PI"),  # drawn over PI+MI, which it may hide
    ("demo-paper", "pi"): dict(color="tab:blue", linestyle=":", label="target: PI, own mask accepted (paper)"),
    ("demo-paper", "pi+mi"): dict(color="tab:red", linestyle=":", label="target: PI+MI, own mask accepted (paper)"),
}


def plot_demo(summaries: dict[str, dict], panel: dict, path: Path) -> None:
    """Dice vs clicks of every part (left) and the held-out image before / after adaptation (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = plt.figure(figsize=(12, 4.2), dpi=110)
    grid = figure.add_gridspec(1, 4, width_ratios=[2.2, 1, 1, 1])
    curves = figure.add_subplot(grid[0])
    shown = [(part, method) for part, method in STYLES if part in summaries]
    for part, method in shown:
        dice = summaries[part]["results"][method]["dice"]
        curves.plot(range(1, len(dice) + 1), [100 * d for d in dice], marker="o", markersize=3, **STYLES[part, method])
    clicks = len(summaries["demo"]["results"]["frozen"]["dice"])
    curves.set_xticks(range(1, clicks + 1))
    curves.set_xlabel("clicks")
    curves.set_ylabel("Dice (%), mean over the sequence")
    accepted = "corrected mask accepted" + ("; dotted: own mask (paper)" if "demo-paper" in summaries else "")
    curves.set_title(f"{summaries['demo']['n_images']} target, {summaries['demo-source']['n_images']} source images in turn; "
                     f"{accepted}", fontsize=8)
    curves.grid(alpha=0.3)
    lowest = min(min(summaries[part]["results"][method]["dice"]) for part, method in shown)
    curves.set_ylim(max(0.0, 100 * lowest - 30), 101)  # room below the curves for the legend
    curves.legend(fontsize=6.5, loc="lower right")
    rows, cols = zip(*(c.position for c in panel["clicks"]))
    colours = ["lime" if c.label else "magenta" for c in panel["clicks"]]
    views = [("target image, true outline", None),
             (f"before adaptation: {100 * panel['dice_before']:.0f} %", panel["before"]),
             (f"after PI+MI: {100 * panel['dice_after']:.0f} %", panel["after"])]
    for index, (title, mask) in enumerate(views):
        axis = figure.add_subplot(grid[index + 1])
        axis.imshow(panel["image"], cmap="gray")
        if mask is not None:
            axis.imshow(np.ma.masked_equal(mask, 0), cmap="autumn", alpha=0.45, vmin=0, vmax=1)
        axis.contour(panel["label"], levels=[0.5], colors="cyan", linewidths=0.8)
        axis.scatter(cols, rows, c=colours, s=14, edgecolors="black", linewidths=0.5)
        axis.set_title(title, fontsize=9)
        axis.set_axis_off()
    figure.suptitle(f"Demo: {summaries['demo']['model']}, pretrained on the synthetic source site; held-out "
                    f"target image with the same {len(panel['clicks'])} clicks (green: object, magenta: background)",
                    fontsize=9)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
