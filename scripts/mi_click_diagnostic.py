"""Does MI's pseudo label agree with the click that triggered it?

For each correction click t of the simulated clinician, records whether ``P_t^initial`` (the
prediction with the new click, before the MI step: Algorithm 1, line 17) has the click's class
at the clicked pixel, and which share of the click's CCG window survives the class-limited
indicator ``I_c`` (Eq. 2). Writes per-click means over images and seeds as JSON.

    PYTHONPATH=. python scripts/mi_click_diagnostic.py --model brain-lesion-flair \
        --dataset ../shared/data/Dataset002_BraTS18_T1 --json results/diagnostics/mi-click-t1.json

A recording subclass of the method replaces it in the registry
(:data:`OAIMSSegment.methods.METHODS`) for this run, so the images, order and clicks are exactly
those of ``evaluate``.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

import OAIMSSegment.evaluate as evaluate
from OAIMSSegment import methods
from OAIMSSegment.data import NnUNetDataset
from OAIMSSegment.losses import click_weight_map
from OAIMSSegment.model import load_model
from OAIMSSegment.session import AdaptConfig

RECORDS: dict[str, dict[int, list[float]]] = {"obeys": defaultdict(list), "ccg_share": defaultdict(list)}


def recording(method: type[methods.OAIMS]) -> type[methods.OAIMS]:
    """``method`` recording what its MI pseudo labels say at the click."""

    class Recording(method):
        def initial_labels(self, session, clicks):
            pseudo_label = super().initial_labels(session, clicks)
            click, t = clicks[-1], len(clicks)
            RECORDS["obeys"][t].append(float(pseudo_label[click.position] == click.label))
            sigma = session.config.sigma
            limited = click_weight_map([click], pseudo_label, sigma, class_limited=True).sum()
            window = click_weight_map([click], pseudo_label, sigma, class_limited=False).sum()
            RECORDS["ccg_share"][t].append(float(limited / window))
            return pseudo_label

    return Recording


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--split", default="Ts")
    parser.add_argument("--method", default="pi+mi", help="an OAIMS method with MI (pi+mi, mi or a pi+mi/ variant)")
    parser.add_argument("--min-foreground", type=int, default=50)
    parser.add_argument("--max-images", type=int, default=30)
    parser.add_argument("--clicks", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    samples = evaluate.select_samples(
        list(NnUNetDataset(args.dataset).samples(args.split, min_foreground=args.min_foreground)), args.max_images
    )
    method = methods.get_method(args.method)
    if not (issubclass(method, methods.OAIMS) and method.mi):
        parser.error(f"--method {args.method} is not an OAIMS method with MI")
    methods.METHODS[args.method] = recording(method)
    protocol = evaluate.Protocol(clicks=args.clicks)
    config = AdaptConfig().for_model(model.card)
    curves = []
    for seed in range(args.seeds):
        ordered = evaluate.order_samples(samples, model, protocol, seed)
        run = evaluate.run_method(model, args.method, ordered, protocol, config, seed, progress=False)
        curves.append(np.mean(run.dice, axis=0))
    result = {
        "model": model.card.name, "dataset": args.dataset, "split": args.split, "method": args.method,
        "n_images": len(samples), "seeds": args.seeds, "lr": config.lr,
        "dice": np.mean(curves, axis=0).tolist(),
        **{name: {str(t): float(np.mean(v)) for t, v in sorted(values.items())} for name, values in RECORDS.items()},
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("obeys", "ccg_share")}))


if __name__ == "__main__":
    main()
