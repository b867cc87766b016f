"""``python -m OAIMSSegment demo``: online adaptation on a shifted synthetic site, in about a minute.

The shipped demo model was pretrained (``scripts/train_models.sh demo``) on the synthetic
*source* appearance: blobs on a dark background with little noise. The demo segments a
sequence of *target*-site images (a much noisier scanner with a bias field,
:func:`OAIMSSegment.data.synthetic_sample`) with the frozen model, PI and PI+MI, and
prints Dice after each click.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from OAIMSSegment.data import synthetic_samples
from OAIMSSegment.evaluate import Protocol, evaluate, plot_curves, print_table
from OAIMSSegment.model import load_model
from OAIMSSegment.session import AdaptConfig

DEMO_MODEL = "demo-synthetic-blobs"


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="frozen vs PI vs PI+MI on a shifted synthetic site (about a minute)")
    parser.add_argument("--out", default="oaims-demo", help="folder for demo.json and demo.png")
    parser.add_argument("--images", type=int, default=24, help="target-site images in the sequence")
    parser.add_argument("--clicks", type=int, default=5, help="clicks per image")
    parser.add_argument("--site", choices=["target", "source"], default="target",
                        help="segment the shifted target site (default) or the source appearance (no-shift control)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    started = time.time()
    model = load_model(DEMO_MODEL)
    samples = synthetic_samples(args.images, args.site, seed=1000 + args.seed)
    what = "a shifted target site" if args.site == "target" else "the source appearance (no shift)"
    print(f"{model.card.name}: pretrained on the synthetic source appearance; "
          f"segmenting {len(samples)} images of {what}, {args.clicks} simulated clicks each")
    summary = evaluate(model, samples, ["frozen", "pi", "pi+mi"], Protocol(clicks=args.clicks), [args.seed], AdaptConfig())
    summary.update({"n_images": len(samples), "dataset": f"synthetic {args.site} site", "model": model.card.name,
                    "seed": args.seed, "threads": torch.get_num_threads()})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot_curves(summary, out / "demo.png", f"Demo: model from the synthetic source, images from the {args.site} site")
    print_table(summary, at=range(1, args.clicks + 1))
    print(f"wrote {out / 'demo.json'} and {out / 'demo.png'} in {time.time() - started:.0f} s")
    return 0
