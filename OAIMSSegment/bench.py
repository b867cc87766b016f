"""``python -m OAIMSSegment bench``: latency of a forward pass, an MI click and a PI accept.

Measured on a 256x256 single-channel image with the architecture of the shipped brain
model (latency depends on the architecture and image size, not on the weights).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from OAIMSSegment.model import ClickSegmenter, ModelCard
from OAIMSSegment.session import InteractiveSession


def _stats(values: list[float]) -> dict[str, float]:
    return {"p50": float(np.percentile(values, 50)), "p95": float(np.percentile(values, 95)), "n": len(values)}


def bench(repeats: int = 20, size: int = 256, seed: int = 0) -> dict:
    """Latencies in ms: ``forward_ms``, ``mi_ms`` (a whole click with MI), ``pi_ms`` (a whole accept)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    card = ModelCard(name="bench", task="latency benchmark", image_channels=1, labels={"background": 0, "lesion": 1})
    model = ClickSegmenter(card).eval()
    image = rng.normal(size=(size, size)).astype(np.float32)
    image[size // 4 : size // 2, size // 4 : size // 2] += 3.0
    prepared = model.prepare(image)
    forward, mi, pi = [], [], []
    with torch.no_grad():
        model.logits(prepared, [])  # warm-up
        for _ in range(repeats):
            started = time.perf_counter()
            model.logits(prepared, [])
            forward.append((time.perf_counter() - started) * 1000.0)
    session = InteractiveSession(model, "pi+mi")
    for i in range(repeats + 1):
        session.start(image)
        session.add_click((size * 3 // 8, size * 3 // 8), 1)
        mi_click = session.add_click((int(rng.integers(size)), int(rng.integers(size))), int(rng.integers(2)))
        accepted = session.accept()
        if i:  # the first round warms up the autograd and optimizer paths
            mi.append(mi_click.latency_ms)
            pi.append(accepted.latency_ms)
    return {
        "forward_ms": _stats(forward), "mi_ms": _stats(mi), "pi_ms": _stats(pi),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "image": [size, size],
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="latency of forward, MI click and PI accept at 256x256")
    parser.add_argument("--json", required=True, help="write results here")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    result = bench(args.repeats, args.size)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    for key in ("forward_ms", "mi_ms", "pi_ms"):
        print(f"{key:<11} p50 {result[key]['p50']:7.1f}  p95 {result[key]['p95']:7.1f}")
    print(f"threads {result['threads']}, torch {result['torch']}")
    return 0
