"""Markdown tables (the paper's format) from ``evaluate`` JSON files.

Usage: python scripts/tables.py results/brain-t1.json [more.json ...]
Cells are Dice in % after 1/3/5/10 clicks, mean +- standard deviation over seeds; for
fundus models disc/cup; then NoC@80 / NoC@90 and MI / PI latency p50 (ms).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def cell(values: list[float], stds: list[float], click: int) -> str:
    if click > len(values):
        return "-"
    return f"{100 * values[click - 1]:.1f} ± {100 * stds[click - 1]:.1f}"


def table(path: Path) -> str:
    summary = json.loads(path.read_text())
    results = summary["results"]
    first = next(iter(results.values()))
    clicks = [c for c in (1, 3, 5, 10, 20) if c <= len(first["dice"])]
    fundus = "disc" in first["dice_per_class"]
    header = "| method | " + " | ".join(f"{c} click{'s' if c > 1 else ''}" for c in clicks) + " | NoC@80 | NoC@90 | MI p50 ms | PI p50 ms |"
    lines = [
        f"**{path.stem}**: model `{summary['model']}` on `{summary['dataset']}`, {summary['n_images']} images, "
        f"seeds {summary.get('seeds', [summary['seed']])}" + (" — cells: disc / cup Dice (%)" if fundus else " — cells: Dice (%)"),
        "",
        header,
        "|" + "---|" * (len(clicks) + 5),
    ]
    for method, result in results.items():
        if fundus:
            per, std = result["dice_per_class"], result["dice_per_class_std"]
            cells = [f"{cell(per['disc'], std['disc'], c)} / {cell(per['cup'], std['cup'], c)}" for c in clicks]
        else:
            cells = [cell(result["dice"], result["dice_std"], c) for c in clicks]
        latency = result["latency_ms"]
        fmt = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
        lines.append(
            f"| {method} | " + " | ".join(cells)
            + f" | {result['noc']['80']:.2f} | {result['noc']['90']:.2f} | {fmt(latency['mi_p50'])} | {fmt(latency['pi_p50'])} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print("\n".join(table(Path(p)) for p in sys.argv[1:]))
