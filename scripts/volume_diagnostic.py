"""Per-volume diagnostic of the 3D benchmark (docs/BENCHMARKS.md 10.10): where the error voxels are.

Runs the simulated clinician of ``evaluate-volumes`` (one method, one seed) and, after every
interaction, splits each volume's errors into

* ``over``: false positives on slices without ground truth (propagated past the lesion's end),
* ``missed``: false negatives on slices the prediction left empty (propagation stopped early),
* ``in_fp`` / ``in_fn``: false positives / negatives on slices where both have foreground,

and reports for each category the 3D Dice points it costs (Dice with that category's errors
corrected, minus Dice). Binary foreground (the brain sets' one class).

    python scripts/volume_diagnostic.py --model brain-lesion-robust --split Tr \
        --dataset ../shared/data/Dataset005_LGG_FLAIR --max-volumes 20 --json runs/diag-lgg-tr.json \
        [--method pi+mi] [--set min_overlap=0.5 --set seeding=interior]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from OAIMSSegment.data import NnUNetDataset  # noqa: E402
from OAIMSSegment.evaluate_volumes import load_volumes, run_volumes, volume_sequence  # noqa: E402
from OAIMSSegment.files import atomic_write_text  # noqa: E402
from OAIMSSegment.model import load_model  # noqa: E402
from OAIMSSegment.segment_propagation import REFRESH_AFTER_ADAPTATION  # noqa: E402
from OAIMSSegment.session import AdaptConfig  # noqa: E402
from OAIMSSegment.volume import Propagation  # noqa: E402

CATEGORIES = ("over", "missed", "in_fp", "in_fn")


def dice(tp: int, fp: int, fn: int) -> float:
    return 1.0 if tp + fp + fn == 0 else 2.0 * tp / (2.0 * tp + fp + fn)


def breakdown(prediction: np.ndarray, truth: np.ndarray) -> dict:
    """Error voxels of a binary ``prediction`` against ``truth`` (both ``(D, H, W)``) by category,
    the Dice points each costs, and slice counts."""
    pred, gt = prediction > 0, truth > 0
    pred_slices, gt_slices = pred.any(axis=(1, 2)), gt.any(axis=(1, 2))
    fp, fn = pred & ~gt, gt & ~pred
    tp = int((pred & gt).sum())
    voxels = {
        "over": int(fp[~gt_slices].sum()),
        "missed": int(fn[~pred_slices].sum()),
        "in_fp": int(fp[gt_slices].sum()),
        "in_fn": int(fn[pred_slices].sum()),
    }
    total_fp, total_fn = voxels["over"] + voxels["in_fp"], voxels["missed"] + voxels["in_fn"]
    base = dice(tp, total_fp, total_fn)
    lost = {
        "over": dice(tp, total_fp - voxels["over"], total_fn) - base,
        "in_fp": dice(tp, total_fp - voxels["in_fp"], total_fn) - base,
        # a corrected false negative becomes a true positive
        "missed": dice(tp + voxels["missed"], total_fp, total_fn - voxels["missed"]) - base,
        "in_fn": dice(tp + voxels["in_fn"], total_fp, total_fn - voxels["in_fn"]) - base,
    }
    return {"dice": base, "voxels": voxels, "points_lost": lost,
            "slices_over": int((pred_slices & ~gt_slices).sum()), "slices_missed": int((gt_slices & ~pred_slices).sum())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--split", default="Tr", choices=["Tr", "Ts"])
    parser.add_argument("--max-volumes", type=int)
    parser.add_argument("--method", default="frozen")
    parser.add_argument("--interactions", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a Propagation field (repeatable), e.g. min_overlap=0.5")
    parser.add_argument("--refresh-after-adaptation", action=argparse.BooleanOptionalAction, default=REFRESH_AFTER_ADAPTATION)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    fields = {}
    for item in args.set:
        name, _, value = item.partition("=")
        default = getattr(Propagation(), name)
        fields[name] = value if isinstance(default, str) else (None if value.lower() == "none" else (float if default is None else type(default))(json.loads(value.lower())))
    propagation = Propagation(**fields)
    model = load_model(args.model)
    volumes = load_volumes(NnUNetDataset(args.dataset), args.split, "axial", args.max_volumes)
    order = volume_sequence(volumes, args.seed)
    rows: dict[str, dict] = {}

    def observe(volume, t, prediction):
        gt = volume.label > 0
        row = rows.setdefault(volume.name, {"voxels": int(gt.sum()), "gt_slices": int(gt.any(axis=(1, 2)).sum()),
                                            "interactions": []})
        row["interactions"].append(breakdown(prediction, volume.label))

    run_volumes(model, args.method, order, args.interactions, AdaptConfig().for_model(model.card), propagation,
                False, progress=False, observe=observe, refresh_after_adaptation=args.refresh_after_adaptation)
    at = [t for t in (1, 3, 5) if t <= args.interactions]
    print(f"{'volume':<28}{'vox':>7}{'sl':>4}" + "".join(f"{f'd@{t}':>7}" for t in at)
          + "".join(f"{c:>8}" for c in CATEGORIES) + f"{'sl+':>5}{'sl-':>5}")
    for name, row in rows.items():
        last = row["interactions"][-1]
        print(f"{name:<28}{row['voxels']:>7}{row['gt_slices']:>4}"
              + "".join(f"{100 * row['interactions'][t - 1]['dice']:>7.1f}" for t in at)
              + "".join(f"{100 * last['points_lost'][c]:>8.1f}" for c in CATEGORIES)
              + f"{last['slices_over']:>5}{last['slices_missed']:>5}")
    mean = {t: float(np.mean([row["interactions"][t - 1]["dice"] for row in rows.values()])) for t in at}
    lost = {c: float(np.mean([row["interactions"][-1]["points_lost"][c] for row in rows.values()])) for c in CATEGORIES}
    print("mean " + " ".join(f"d@{t} {100 * v:.1f}" for t, v in mean.items())
          + " | points lost at the last: " + " ".join(f"{c} {100 * v:.1f}" for c, v in lost.items()))
    atomic_write_text(args.json, json.dumps({"dataset": args.dataset, "split": args.split, "method": args.method,
                                              "model": args.model, "seed": args.seed, "propagation": fields,
                                              "refresh_after_adaptation": args.refresh_after_adaptation,
                                              "mean_dice": mean, "mean_points_lost": lost, "volumes": rows},
                                             indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
