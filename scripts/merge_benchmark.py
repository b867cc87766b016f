"""Several workstations on one site: does the merged site model keep every workstation's improvement?

The demo model (pretrained on the synthetic source appearance) adapts with PI+MI to 30 images of
the shifted synthetic target site (``OAIMSSegment.data.synthetic_samples``, simulated clinician of
``evaluate.run_method``), each accept saved into a site store, in four ways:

* ``sequential``: one workstation accepts all 30 images in order;
* ``merged``: three workstations (``SiteSession`` s on one store folder) take turns, 10 images
  each; every workstation computes on the version it last saved, so each of its saves after the
  first round lands on two newer versions and is merged (``SiteSession.save_update``);
* ``last_writer_wins``: the same turns, each save simply replacing the newest version (the
  behaviour before issue 20: the carry step replaced by "keep mine");
* ``one_workstation``: the first workstation's 10 images alone.

Each final site version, and the pretrained model, is then scored without adaptation on held-out
target images (Dice after 1 and 3 simulated clicks), and its update (final minus pretrained
weights, all tensors as one vector) is compared with the sequential one: ``update_norm_ratio``
(its length over the sequential update's) and ``update_cosine``. Writes JSON::

    OMP_NUM_THREADS=1 python scripts/merge_benchmark.py --out runs/merge_benchmark.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from OAIMSSegment.data import synthetic_samples  # noqa: E402
from OAIMSSegment.demo import DEMO_MODEL  # noqa: E402
from OAIMSSegment.evaluate import Protocol, run_method  # noqa: E402
from OAIMSSegment.files import atomic_write_bytes  # noqa: E402
from OAIMSSegment.model import ClickSegmenter, load_model  # noqa: E402
from OAIMSSegment.session import AdaptConfig, InteractiveSession  # noqa: E402
from OAIMSSegment.site_session import SiteSession  # noqa: E402


def accept_in_turns(model: ClickSegmenter, store: Path, samples: list, workstations: int, args) -> dict:
    """``workstations`` SiteSessions on one site take turns accepting ``samples`` (workstation ``k``
    gets ``samples[k::workstations]``); returns the final site weights and what the accepts did."""
    config, protocol = AdaptConfig(), Protocol(clicks=args.clicks)
    sites = [SiteSession(InteractiveSession(copy.deepcopy(model), "pi+mi", config), store, "site")
             for _ in range(workstations)]
    dice, merges = [], 0
    for index, sample in enumerate(samples):
        site = sites[index % workstations]
        saved_before = len(site.saved)
        run = run_method(model, "pi+mi", [sample], protocol, config, args.seed, progress=False, site=site)
        dice.append(run.dice[0][-1])
        if len(site.saved) > saved_before:
            merges += site.site_model.versions()[-1].merged
    state = sites[0].site_model.load_current()
    return {"state": state, "sequence_dice_last_click": float(np.mean(dice)), "merged_saves": int(merges),
            "versions": sites[0].site_model.current_version}


def held_out_dice(model: ClickSegmenter, state: dict | None, samples: list, seed: int) -> dict:
    """Dice of ``model`` with ``state``'s weights, not adapting, after 1 and 3 clicks (mean over ``samples``)."""
    scored = copy.deepcopy(model)
    if state is not None:
        scored.load_state_dict(state["model"])
    curves = np.array(run_method(scored, "frozen", samples, Protocol(clicks=3), AdaptConfig(), seed, progress=False).dice)
    return {"dice_1": float(curves[:, 0].mean()), "dice_3": float(curves[:, 2].mean())}


def update_vector(state: dict, pretrained: dict) -> torch.Tensor:
    """All weights of ``state`` minus the pretrained ones, as one vector."""
    return torch.cat([(state["model"][key] - value).flatten().double() for key, value in pretrained.items()])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON result file")
    parser.add_argument("--images", type=int, default=30, help="accepted images in all (split over 3 workstations)")
    parser.add_argument("--held-out", type=int, default=32, help="held-out target images scored at the end")
    parser.add_argument("--clicks", type=int, default=5, help="simulated clicks per accepted image")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model = load_model(DEMO_MODEL)
    train = synthetic_samples(args.images, "target", seed=2000 + args.seed)
    held_out = synthetic_samples(args.held_out, "target", seed=3000 + args.seed)
    arms = {}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        runs = {
            "sequential": lambda: accept_in_turns(model, root / "sequential", train, 1, args),
            "merged": lambda: accept_in_turns(model, root / "merged", train, 3, args),
            "one_workstation": lambda: accept_in_turns(model, root / "one", train[0::3], 1, args),
        }
        for name, run in runs.items():
            arms[name] = run()
        with mock.patch("OAIMSSegment.site_session.carry_update", lambda newest, based_on, mine: mine):
            arms["last_writer_wins"] = accept_in_turns(model, root / "lww", train, 3, args)
    result = {"pretrained": held_out_dice(model, None, held_out, args.seed)}
    pretrained = model.state_dict()
    sequential = update_vector(arms["sequential"]["state"], pretrained)
    for name, arm in arms.items():
        update = update_vector(arm["state"], pretrained)
        geometry = {"update_norm_ratio": float(update.norm() / sequential.norm()),
                    "update_cosine": float(torch.nn.functional.cosine_similarity(update, sequential, dim=0))}
        result[name] = {**held_out_dice(model, arm.pop("state"), held_out, args.seed), **geometry, **arm}
    result.update(model=DEMO_MODEL, images=args.images, held_out=args.held_out, clicks=args.clicks, seed=args.seed,
                  wall_s=round(time.perf_counter() - started, 1), python=platform.python_version(),
                  torch=torch.__version__, threads=torch.get_num_threads())
    atomic_write_bytes(out, (json.dumps(result, indent=1) + "\n").encode("utf-8"))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
