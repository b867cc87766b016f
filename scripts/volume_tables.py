"""Markdown rows (BENCHMARKS section 10) from ``evaluate-volumes`` JSON files of one dataset.

Files of the same dataset and method that ran different seeds (e.g. ``--seeds 1`` and
``--seed 1 --seeds 2``) are pooled, each weighted by its number of seeds.

Usage: python scripts/volume_tables.py results/volumes3/Dataset001_BraTS18_FLAIR-s1.json results/volumes3/Dataset001_BraTS18_FLAIR-s12.json ...
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

import numpy as np


def pooled(paths: list[str]) -> dict[tuple[str, str], dict]:
    """``(dataset, method) -> {"seeds", "n_volumes", "dice", "noc80", "noc90", "auc6", "seconds"}``."""
    sums: dict[tuple[str, str], dict] = defaultdict(lambda: defaultdict(float))
    for path in paths:
        run = json.load(open(path))
        weight = len(run["seeds"])
        for method, result in run["results"].items():
            entry = sums[(run["dataset"], method)]
            entry["seeds"] += weight
            entry["n_volumes"] = run["n_volumes"]
            entry["dice"] = entry.get("dice", 0) + weight * np.asarray(result["dice"])
            entry["noc80"] += weight * result["noc"]["80"]
            entry["noc90"] += weight * result["noc"]["90"]
            entry["auc6"] += weight * result["dice_auc_6"]
            entry["seconds"] += weight * result["seconds_per_volume"]
    return {key: {name: (value / entry["seeds"] if name not in ("seeds", "n_volumes") else value)
                  for name, value in entry.items()} for key, entry in sums.items()}


def main(paths: list[str]) -> None:
    print("| dataset | method | seeds | 1 | 3 | 5 | 10 | NoC@80 | NoC@90 | AUC-6 | Dice after 1..6 | s / volume |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (dataset, method), e in sorted(pooled(paths).items()):
        dice = 100 * e["dice"]
        print(f"| {dataset} ({e['n_volumes']} vol) | {method} | {e['seeds']:.0f} | "
              + " | ".join(f"{dice[i - 1]:.1f}" if i <= len(dice) else "-" for i in (1, 3, 5, 10))
              + f" | {e['noc80']:.1f} | {e['noc90']:.1f} | {e['auc6']:.2f} | {' '.join(f'{v:.1f}' for v in dice[:6])} | {e['seconds']:.0f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
