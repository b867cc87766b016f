"""Soak test of the site model store: many simulated accepts, checking what must never drift.

Each accept is one real Adam step of a small MONAI 2D U-Net (the engine's click-guided network
shape: image + 2 guidance channels) on a synthetic image (noisy disk), then ``save_version`` of
``{"model": ..., "optimizer": ...}`` (about 4.9 MB) in a ``SiteModel.transaction()`` with the
images count, as the site workflow saves. Every ``--restart-every`` accepts the network
and optimizer are rebuilt from ``load_current()``, as when Slicer restarts. Checked:

* no non-finite weights (in memory after every step, and in every reloaded state);
* every reload equals the in-memory state (sha256-verified, weights_only loading);
* memory flat: resident set size (RSS) over the last tenth of the run vs. the tenth after warm-up;
* the images count (kept in the manifest) equals the accepts, and every version's parent and
  based_on are the version before it;
* store size within the retention bound: at most ``keep_last + n // keep_every + 2`` files, of
  which at most ``keep_last + 2`` hold the optimizer state (the rest are weights-only milestones).

Writes a JSON result and exits 1 if any check fails. Not part of the fast test suite::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/soak_store.py --accepts 500 --out runs/soak_store.json
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monai.networks.nets import UNet  # noqa: E402

from OAIMSSegment.files import atomic_write_text  # noqa: E402
from OAIMSSegment.store import SiteModelStore  # noqa: E402

BASE_SHA256 = "0" * 64  # a synthetic base model: only identity matters to the store
MEMORY_TOLERANCE_MB = 20.0


def rss_mb() -> float:
    """Current resident set size in MB (psutil if installed, else /proc/self/status)."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    raise RuntimeError("cannot measure memory on this platform")


def build(state: dict | None) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The network and optimizer, restored from a stored state when given (a 'restart')."""
    torch.manual_seed(0)
    net = UNet(
        spatial_dims=2, in_channels=3, out_channels=1, channels=(16, 32, 64, 128),
        strides=(2, 2, 2), num_res_units=2, norm="instance",
    )
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    if state is not None:
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    return net, opt


def synthetic_accept(gen: torch.Generator, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """A noisy disk image with one foreground and one background click map, and its mask."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    cy, cx = (torch.rand(2, generator=gen) * size * 0.5 + size * 0.25).tolist()
    r = float(torch.rand(1, generator=gen)) * size * 0.2 + size * 0.1
    mask = (((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r).float()
    image = mask + 0.3 * torch.randn(size, size, generator=gen)
    fg = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 50.0)
    bg = torch.exp(-((yy - 2) ** 2 + (xx - 2) ** 2) / 50.0)
    return torch.stack([image, fg, bg])[None], mask[None, None]


def all_finite(state: dict) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in iter_tensors(state) if t.is_floating_point())


def iter_tensors(obj: object):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from iter_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from iter_tensors(v)


def serialized_size(state: dict) -> int:
    buf = io.BytesIO()
    torch.save(state, buf)
    return len(buf.getvalue())


def same(a: dict, b: dict) -> bool:
    ta, tb = list(iter_tensors(a)), list(iter_tensors(b))
    return len(ta) == len(tb) and all(torch.equal(x, y) for x, y in zip(ta, tb))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--accepts", type=int, default=500)
    parser.add_argument("--keep-last", type=int, default=10)
    parser.add_argument("--keep-every", type=int, default=10)
    parser.add_argument("--restart-every", type=int, default=100)
    parser.add_argument("--root", type=Path, help="store folder (default: a temporary folder, removed afterwards)")
    parser.add_argument("--out", type=Path, default=Path("runs/soak_store.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    root = args.root or Path(tempfile.mkdtemp(prefix="soak_store_"))
    store = SiteModelStore(root, keep_last=args.keep_last, keep_every=args.keep_every)
    site = store.open("soak-site", "unet2d-click", BASE_SHA256)
    gen = torch.Generator().manual_seed(1)
    net, opt = build(site.load_current())
    rss, save_s, losses = [], [], []
    problems: list[str] = []
    max_version_bytes = 0
    start = time.perf_counter()
    try:
        for i in range(1, args.accepts + 1):
            x, mask = synthetic_accept(gen)
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x), mask)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            state = {"model": net.state_dict(), "optimizer": opt.state_dict()}
            if not math.isfinite(losses[-1]) or not all_finite(state):
                problems.append(f"accept {i}: non-finite loss or weights")
                break
            t = time.perf_counter()
            with site.transaction() as txn:  # as the site workflow commits: on top of the newest version
                version = txn.save(state, {"images": (txn.images or 0) + 1, "clicks": 2, "loss": losses[-1]},
                                   based_on=txn.version)
            save_s.append(time.perf_counter() - t)
            max_version_bytes = max(max_version_bytes, site.versions()[-1].size)
            if version != i:
                problems.append(f"accept {i}: got version {version}")
            if i % args.restart_every == 0:
                loaded = site.load_current()
                if site.loaded_version != i or not same(state, loaded) or not all_finite(loaded):
                    problems.append(f"accept {i}: reloaded state differs or is not finite")
                del state
                net, opt = build(loaded)
                del loaded
            rss.append(rss_mb())
        elapsed = time.perf_counter() - start

        files = list((site.path / "versions").iterdir())
        store_bytes = sum(p.stat().st_size for p in files)
        n = len(save_s)
        bound_files = args.keep_last + n // args.keep_every + 2 if args.keep_every else args.keep_last + 2
        weights_bytes = serialized_size({"model": net.state_dict()})  # a milestone; the shapes never change
        full_files = min(bound_files, args.keep_last + 2)
        bound_bytes = full_files * max_version_bytes + (bound_files - full_files) * weights_bytes
        if store_bytes > bound_bytes or len(files) > bound_files:
            problems.append(f"store holds {len(files)} files / {store_bytes} B, bound {bound_files} / {bound_bytes} B")
        tenth = max(1, n // 10)
        early, late = statistics.median(rss[tenth: 2 * tenth]), statistics.median(rss[-tenth:])
        if late - early > MEMORY_TOLERANCE_MB:
            problems.append(f"RSS grew from {early:.1f} MB to {late:.1f} MB")
        adapt_lines = sum(1 for h in site.history() if h["action"] == "adapt")
        if adapt_lines != n:
            problems.append(f"history has {adapt_lines} adapt lines for {n} accepts")
        final = site.load_current()
        if final is None or not all_finite(final):
            problems.append("final state missing or not finite")
        if site.images() != n:
            problems.append(f"the manifest counts {site.images()} images for {n} accepts")
        if any(v.parent != v.version - 1 or v.based_on != v.parent for v in site.versions()):
            problems.append("a version's parent or based_on is not the version before it")

        result = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "date": time.strftime("%Y-%m-%d"),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(),
            "accepts": n,
            "keep_last": args.keep_last,
            "keep_every": args.keep_every,
            "version_bytes": max_version_bytes,
            "milestone_bytes_bound": weights_bytes,
            "elapsed_s": round(elapsed, 1),
            "save_s_mean": round(statistics.mean(save_s), 4),
            "save_s_p95": round(sorted(save_s)[int(0.95 * (n - 1))], 4),
            "save_s_max": round(max(save_s), 4),
            "rss_mb_after_warmup": round(early, 1),
            "rss_mb_end": round(late, 1),
            "rss_mb_max": round(max(rss), 1),
            "store_files": len(files),
            "store_bytes": store_bytes,
            "bound_files": bound_files,
            "bound_bytes": bound_bytes,
            "loss_first": round(losses[0], 4),
            "loss_last_50_mean": round(statistics.mean(losses[-50:]), 4),
            "history_adapt_lines": adapt_lines,
            "images_counted": site.images(),
            "problems": problems,
            "ok": not problems,
        }
    finally:
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
