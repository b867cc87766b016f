"""Markdown tables (the paper's format) from ``evaluate`` JSON files.

Usage: python scripts/tables.py results/brain-t1.json [more.json ...]     (print)
       python scripts/tables.py --update docs/BENCHMARKS.md               (refresh in place)
With ``--update``, every table block of the document that starts with ``**<name>**:`` is
replaced by the table of ``results/<name>.json``, so the document cannot keep stale numbers.
The header names the model, the data, the seeds and the adaptation learning rate.
Cells are Dice in % after 1/3/5/10 clicks, mean +- standard deviation over seeds; for
fundus models disc/cup; then NoC@80 / NoC@90 and MI / PI latency p50 (ms).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np


def cell(values: list[float], stds: list[float], click: int) -> str:
    if click > len(values):
        return "-"
    return f"{100 * values[click - 1]:.1f} ± {100 * stds[click - 1]:.1f}"


def scientific(value: float) -> str:
    """``3e-5`` rather than ``3e-05`` or ``0.0003``."""
    return np.format_float_scientific(value, trim="-", exp_digits=1)


def overrides(summary: dict) -> str:
    """``evaluate --working-size`` and other model card overrides, for the table header."""
    items = summary.get("card_overrides", {})
    return "".join(f", {key} {'native' if value is None else value}" for key, value in items.items())


def table(path: Path) -> str:
    summary = json.loads(path.read_text())
    results = summary["results"]
    first = next(iter(results.values()))
    clicks = [c for c in (1, 3, 5, 10, 20) if c <= len(first["dice"])]
    fundus = "disc" in first["dice_per_class"]
    header = "| method | " + " | ".join(f"{c} click{'s' if c > 1 else ''}" for c in clicks) + " | NoC@80 | NoC@90 | MI p50 ms | PI p50 ms |"
    lines = [
        f"**{path.stem}**: model `{summary['model']}` on `{summary['dataset']}`, {summary['n_images']} images, "
        f"seeds {summary.get('seeds', [summary['seed']])}, adaptation lr {scientific(summary['config']['lr'])}" + overrides(summary)
        + (" — cells: disc / cup Dice (%)" if fundus else " — cells: Dice (%)"),
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


def update(document: Path, results_dir: Path = Path("results")) -> list[str]:
    """Replace each ``**<name>**:`` block (header line, blank line, table) of ``document``."""
    lines = document.read_text().splitlines(keepends=True)
    out: list[str] = []
    refreshed: list[str] = []
    i = 0
    while i < len(lines):
        match = re.match(r"\*\*([\w.-]+)\*\*: model `", lines[i])
        source = results_dir / f"{match.group(1)}.json" if match else None
        if source is None or not source.is_file():
            out.append(lines[i])
            i += 1
            continue
        i += 1
        while i < len(lines) and not lines[i].strip():  # the blank line under the header
            i += 1
        while i < len(lines) and lines[i].startswith("|"):
            i += 1
        out.append(table(source))
        if i < len(lines) and lines[i].strip():  # a table runs on into a following non-blank line
            out.append("\n")
        refreshed.append(source.stem)
    document.write_text("".join(out))
    return refreshed


if __name__ == "__main__":
    if sys.argv[1:2] == ["--update"]:
        print("refreshed:", ", ".join(update(Path(sys.argv[2]))))
    else:
        print("\n".join(table(Path(p)) for p in sys.argv[1:]))
