"""Record measured Dice in a model card from an ``evaluate`` JSON (the weights, and so the
card's sha256, are unchanged).

Usage: python scripts/card_metrics.py Resources/Models/NAME.json results/RUN.json [method]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from OAIMSSegment.model import ModelCard


def main(card_path: str, results_path: str, method: str = "frozen") -> None:
    card = ModelCard.from_json(card_path)
    summary = json.loads(Path(results_path).read_text())
    result = summary["results"][method]
    clicks = [c for c in (1, 3, 5, 10) if c <= len(result["dice"])]
    entry = {
        "dataset": summary["dataset"], "images": summary["n_images"], "method": method,
        "seeds": summary.get("seeds", [summary["seed"]]), "results_file": results_path,
        "dice_at_clicks": {str(c): round(result["dice"][c - 1], 4) for c in clicks},
        "dice_per_class_at_clicks": {
            name: {str(c): round(values[c - 1], 4) for c in clicks} for name, values in result["dice_per_class"].items()
        },
        "noc": result["noc"],
    }
    card.metrics[f"{Path(results_path).stem}:{method}"] = entry
    card.to_json(card_path)
    print(f"{card_path}: metrics[{Path(results_path).stem}:{method}] = {entry['dice_at_clicks']}")


if __name__ == "__main__":
    main(*sys.argv[1:])
