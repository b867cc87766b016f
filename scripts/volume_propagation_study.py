"""Measure seeding and stopping rules of slice propagation (docs/BENCHMARKS.md, volumes section).

For each seeding, one click (the 3D simulated clinician's first) on each volume is propagated
with no stopping rule but the empty mask, recording per propagated slice its area ratio and
Dice overlap to the neighbour and its mean foreground probability. Each stopping rule is then
applied offline by cutting each direction's chain at the first slice the rule rejects (a rule
only decides where a chain ends, never what it holds), and the 3D Dice of the result is
reported. Frozen model, so the volume order does not matter.

    python scripts/volume_propagation_study.py --model brain-lesion-flair \
        --dataset ../shared/data/Dataset001_BraTS18_FLAIR --json runs/volume-study-brats.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from OAIMSSegment.evaluate_volumes import first_click, load_volumes, volume_dice  # noqa: E402
from OAIMSSegment.data import NnUNetDataset  # noqa: E402
from OAIMSSegment.files import atomic_write_text  # noqa: E402
from OAIMSSegment.model import load_model  # noqa: E402
from OAIMSSegment.session import InteractiveSession  # noqa: E402
from OAIMSSegment.volume import Propagation, VolumeSession  # noqa: E402


class RecordingSession(VolumeSession):
    """Records the mean foreground probability of every propagated slice."""

    def _predict(self, index, seeds):
        predicted = super()._predict(index, seeds)
        if predicted is not None:
            self.confidence[index] = predicted[1]
        return predicted


#: Stopping rules, each on top of "no rule" (``min_overlap`` 0; the class's default is 0.7).
RULES = {
    "empty only": {},
    **{f"area ratio >= {a}": {"min_area_ratio": a} for a in (0.3, 0.5)},
    **{f"area ratio in [{a}, {b}]": {"min_area_ratio": a, "max_area_ratio": b} for a, b in ((0.3, 2.0), (0.5, 1.5))},
    **{f"overlap >= {o}": {"min_overlap": o} for o in (0.3, 0.4, 0.5, 0.6, 0.7)},
    **{f"confidence >= {c}": {"min_confidence": c} for c in (0.7, 0.8, 0.9)},
    **{f"overlap >= {o}, confidence >= {c}": {"min_overlap": o, "min_confidence": c}
       for o, c in itertools.product((0.4, 0.5, 0.6, 0.7), (0.8, 0.9))},
}


def chain_cut(masks, origin, confidence, rule: Propagation):
    """``masks`` with each direction's chain cut at the first slice ``rule`` rejects."""
    out = masks.copy()
    for step in (1, -1):
        index, stopped = origin + step, False
        while 0 <= index < len(masks):
            if not stopped and index in confidence and rule.accepts(masks[index], out[index - step], confidence[index]):
                index += step
                continue
            stopped = True
            out[index] = 0
            index += step
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--split", default="Ts")
    parser.add_argument("--max-volumes", type=int)
    parser.add_argument("--variants", default="interior,interior+background,interior:connected",
                        help="comma-separated seedings, ':connected' for keep_connected")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model(args.model)
    dataset = NnUNetDataset(args.dataset)
    volumes = load_volumes(dataset, args.split, "axial", args.max_volumes)
    labels = model.card.labels
    results = {}
    for variant in args.variants.split(","):
        seeding, _, connected = variant.partition(":")
        name = seeding + (", keep connected" if connected else "")
        session = RecordingSession(InteractiveSession(model, "frozen"), Propagation(seeding, keep_connected=connected, min_overlap=0.0))
        scores = {rule: [] for rule in RULES}
        for volume in volumes:
            session.confidence = {}
            session.open(volume.image)
            index, click = first_click(volume.label)
            session.click(index, click.position, click.label)
            masks = session.volume_mask()
            for rule, settings in RULES.items():
                cut = chain_cut(masks, index, session.confidence, Propagation(seeding, **{"min_overlap": 0.0, **settings}))
                scores[rule].append(volume_dice(cut, volume.label, labels))
            session.discard()
            print(name, volume.name, {r: round(s[-1], 3) for r, s in scores.items()}, flush=True)
        results[name] = {rule: {"mean": float(np.mean(s)), "per_volume": s} for rule, s in scores.items()}
    atomic_write_text(args.json, json.dumps({"dataset": dataset.name, "model": model.card.name,
                                              "n_volumes": len(volumes), "results": results}, indent=1) + "\n")
    for name, table in results.items():
        for rule, value in table.items():
            print(f"{name:<30} {rule:<36} {value['mean']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
