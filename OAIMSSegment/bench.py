"""``python -m OAIMSSegment bench``: latency of each pass of a click, for shipped models.

From one run, per model: a forward pass, a forward + backward pass, an MI click (the whole
``add_click``), a PI accept (the whole ``accept``) and the first feedback of an MI click (the
``on_first_feedback`` preview), each p50 / p95 in ms and as a ratio to the forward pass's p50;
the same session with ``reuse_graphs=False`` (the path before issue 21: passes recomputed, undo
snapshots deep-copied, per-tensor Adam); and the memory a kept graph holds. Every operation and
both paths run once a round, so that all of them (and so the ratios) see the same machine load. The network works
at ``size x size`` (the card's working size is set to ``size``; the shipped fundus model works
at 256 anyway). A caller may time more operations (``timings``, e.g. the volume session's
40-slice propagation as ``propagate40``) in the same run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from dataclasses import replace
from typing import Callable, Mapping

import numpy as np
import torch

from OAIMSSegment.clicks import Click
from OAIMSSegment.files import atomic_write_text
from OAIMSSegment.losses import DiceFocal
from OAIMSSegment.model import ClickSegmenter, load_model
from OAIMSSegment.reuse import saved_tensor_bytes
from OAIMSSegment.session import InteractiveSession

#: The models of ``docs/BENCHMARKS.md`` section 1.
MODELS = ("brain-lesion-flair", "fundus-disc-cup")

#: ``name -> function(model, image)``: more operations to time, reported as ``name_ms``.
Timings = Mapping[str, Callable[[ClickSegmenter, np.ndarray], object]]


def _stats(values: list[float]) -> dict[str, float]:
    return {"p50": float(np.percentile(values, 50)), "p95": float(np.percentile(values, 95)), "n": len(values)}


def _timed(function: Callable[[], object]) -> float:
    started = time.perf_counter()
    function()
    return (time.perf_counter() - started) * 1000.0


def _image(channels: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A ``(C, size, size)`` noise image with a bright square (the object the clicks are in)."""
    image = rng.normal(size=(channels, size, size)).astype(np.float32)
    image[:, size // 4 : size // 2, size // 4 : size // 2] += 3.0
    return image[0] if channels == 1 else image


def _passes(model: ClickSegmenter, image: np.ndarray, click: Click) -> dict[str, Callable[[], None]]:
    """A forward pass (eval, no gradient) and a forward + backward pass (train, Dice-Focal loss)."""
    prepared = model.prepare(image)
    clicks = [model.working_click(prepared, click)]
    loss = DiceFocal(binary=model.card.binary)
    target = torch.zeros(prepared.tensor.shape[-2:], dtype=torch.long)[None]

    def forward() -> None:
        model.eval()
        with torch.no_grad():
            model.logits(prepared, clicks)

    def forward_backward() -> None:
        model.train()
        loss(model.logits(prepared, clicks), target).backward()
        model.zero_grad(set_to_none=True)

    return {"forward": forward, "forward_backward": forward_backward}


def _session_round(session: InteractiveSession, image: np.ndarray, clicks: list[Click], times: dict[str, list[float]]) -> None:
    """One image: a first click, an MI click (with a first feedback), an accept."""
    session.start(image)
    session.add_click(clicks[0].position, clicks[0].label)
    previews: list[float] = []
    mi_click = session.add_click(clicks[1].position, clicks[1].label, on_first_feedback=lambda r: previews.append(r.latency_ms))
    accepted = session.accept()
    times["mi"].append(mi_click.latency_ms)
    times["first_feedback"].extend(previews)
    times["pi"].append(accepted.latency_ms)


def propagate40(model: ClickSegmenter, image: np.ndarray) -> None:
    """Propagation through 40 slices by the volume session (:mod:`OAIMSSegment.volume`): a stack of
    41 copies of the bench image, one click on the middle slice, then propagation up and down, one
    forward pass per slice. Raises if propagation stopped early (the figure would not be 40 slices)."""
    from OAIMSSegment.volume import VolumeSession

    volume = VolumeSession(InteractiveSession(model, "frozen"))
    volume.open(np.stack([image] * 41))
    size = image.shape[-1]
    volume.click(20, (size * 3 // 8, size * 3 // 8), 1, propagate=False)
    changed = volume.propagate(20)
    volume.discard()
    if len(changed) != 40:
        raise RuntimeError(f"propagation reached {len(changed)} of 40 slices")


def bench_model(name: str, repeats: int = 20, size: int = 256, seed: int = 0, timings: Timings | None = None) -> dict:
    """The figures of one shipped model (see the module docstring)."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model = load_model(name)
    model.card = replace(model.card, working_size=size)
    image = _image(model.card.image_channels, size, rng)
    operations: dict[str, Callable[[], object]] = dict(_passes(model, image, Click((size * 3 // 8, size * 3 // 8), 1)))
    operations.update({extra: (lambda function=function: function(model, image)) for extra, function in (timings or {}).items()})
    sessions = {reuse: InteractiveSession(copy.deepcopy(model), "pi+mi", reuse_graphs=reuse) for reuse in (True, False)}
    per_path: dict[bool, dict[str, list[float]]] = {reuse: {"mi": [], "pi": [], "first_feedback": []} for reuse in sessions}
    times: dict[str, list[float]] = {name: [] for name in operations}
    # Every operation once a round, both session paths in alternation: a ratio compares figures
    # taken under the same machine load, even when the load drifts during the run.
    for i in range(repeats + 1):
        clicks = [Click((size * 3 // 8, size * 3 // 8), 1),
                  Click((int(rng.integers(size)), int(rng.integers(size))), int(rng.integers(model.card.num_classes)))]
        for name, function in operations.items():
            elapsed = _timed(function)
            if i:  # round 0 warms up
                times[name].append(elapsed)
        for reuse, session in sessions.items():
            round_times = per_path[reuse] if i else {"mi": [], "pi": [], "first_feedback": []}
            _session_round(session, image, clicks, round_times)
    times = {**{name: times[name] for name in ("forward", "forward_backward")}, **per_path[True],
             **{name: values for name, values in times.items() if name not in ("forward", "forward_backward")}}
    forward = float(np.percentile(times["forward"], 50))
    probe = sessions[True]
    probe.start(image)
    probe.add_click((size * 3 // 8, size * 3 // 8), 1)
    _, graph_bytes = saved_tensor_bytes(lambda: probe.train_logits(probe.working_clicks), exclude=probe.model)
    probe.discard()
    return {
        **{f"{key}_ms": _stats(values) for key, values in times.items()},
        "ratio_to_forward": {key: float(np.percentile(values, 50)) / forward for key, values in times.items()},
        "recompute": {f"{key}_ms": _stats(values) for key, values in per_path[False].items()},
        "recompute_ratio_to_forward": {key: float(np.percentile(v, 50)) / forward for key, v in per_path[False].items()},
        "kept_graph_mb": graph_bytes / 2**20,
        "working_shape": list(model.prepare(image).tensor.shape[-2:]),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def bench(models: tuple[str, ...] = MODELS, repeats: int = 20, size: int = 256, seed: int = 0,
          timings: Timings | None = None) -> dict:
    """Latencies in ms per model (:func:`bench_model`), with the threads, torch version and the
    1-minute load average at the start and the end (a shared machine inflates every figure)."""
    start_load = os.getloadavg()
    results = {name: bench_model(name, repeats, size, seed, timings) for name in models}
    return {
        "models": results, "threads": torch.get_num_threads(), "torch": torch.__version__, "image": [size, size],
        "load_average": {"start": list(start_load), "end": list(os.getloadavg())}, "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    from OAIMSSegment import arguments as types

    parser = subparsers.add_parser("bench", help="latency of forward, forward+backward, MI click, PI accept and first feedback")
    parser.add_argument("--json", type=types.writable_file, required=True, help="write results here (checked before the run)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="shipped model names")
    parser.add_argument("--repeats", type=types.positive_int, default=20)
    parser.add_argument("--size", type=types.image_side, default=256, help="image side and working size (px, 16 or more)")
    parser.add_argument("--threads", type=types.non_negative_int, default=0, help="torch threads (0: torch default)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    result = bench(tuple(args.models), args.repeats, args.size, timings={"propagate40": propagate40})
    atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")
    for name, figures in result["models"].items():
        print(f"{name} at {figures['working_shape'][0]}x{figures['working_shape'][1]}:")
        for key, ratio in figures["ratio_to_forward"].items():
            stats = figures[f"{key}_ms"]
            old = figures["recompute"].get(f"{key}_ms")
            before = f"  (recomputing: p50 {old['p50']:7.1f})" if old else ""
            print(f"  {key:<17} p50 {stats['p50']:7.1f}  p95 {stats['p95']:7.1f} ms  {ratio:4.1f} x forward{before}")
        print(f"  kept graph {figures['kept_graph_mb']:.1f} MiB")
    load = result["load_average"]
    print(f"threads {result['threads']}, torch {result['torch']}, load average {load['start'][0]:.1f} -> {load['end'][0]:.1f}")
    return 0
