"""The demo (``oaims demo``) and the two evaluate hooks it uses: accepting the corrected mask
(``Protocol.accept_truth``) and the adapted model of a run (``MethodRun.model``)."""

from __future__ import annotations

import json

import numpy as np
import torch

from OAIMSSegment.cli import main
from OAIMSSegment.data import synthetic_samples
from OAIMSSegment.evaluate import Protocol, run_method
from OAIMSSegment.model import load_model
from OAIMSSegment.session import AdaptConfig


def test_quick_demo_writes_every_part_and_the_figure(tmp_path, capsys):
    assert main(["demo", "--quick", "--paper-protocol", "--out", str(tmp_path)]) == 0
    parts = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in ("demo", "demo-paper", "demo-source")}
    assert set(parts["demo"]["results"]) == set(parts["demo-source"]["results"]) == {"frozen", "pi", "pi+mi"}
    assert set(parts["demo-paper"]["results"]) == {"pi", "pi+mi"}
    # the headline workflow accepts the corrected mask on both sites; the paper's protocol the model's own
    assert parts["demo"]["protocol"]["accept_truth"] and parts["demo-source"]["protocol"]["accept_truth"]
    assert not parts["demo-paper"]["protocol"]["accept_truth"]
    assert all(part["config"]["stage2_localization"] for part in parts.values())  # PI stage 2 gets c_1 (BENCHMARKS 3)
    assert all(part["n_images"] == 6 and len(part["results"]["pi"]["dice"]) == 3 for part in parts.values())
    source, target = parts["demo-source"]["results"]["frozen"]["dice"], parts["demo"]["results"]["frozen"]["dice"]
    assert source[-1] > 0.85  # the pretrained model is good on its own site ...
    assert target[-1] < source[-1] - 0.2  # ... and the new site's appearance costs it
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "before adaptation" in capsys.readouterr().out


def test_accepting_the_corrected_mask_adapts_on_the_ground_truth():
    model = load_model("demo-synthetic-blobs")
    samples = synthetic_samples(2, "target", seed=7)
    weights = lambda m: torch.cat([p.detach().flatten() for p in m.parameters()])  # noqa: E731
    own = run_method(model, "pi", samples, Protocol(clicks=2), AdaptConfig(), seed=0, progress=False)
    truth = run_method(model, "pi", samples, Protocol(clicks=2, accept_truth=True), AdaptConfig(), seed=0, progress=False)
    frozen = run_method(model, "frozen", samples, Protocol(clicks=2), AdaptConfig(), seed=0, progress=False)
    assert truth.accepted_updates == 2  # the true mask is never empty, so every accept adapts
    assert torch.equal(weights(frozen.model), weights(model))  # runs adapt copies; frozen keeps the weights
    assert not torch.equal(weights(truth.model), weights(model))
    assert not torch.equal(weights(truth.model), weights(own.model))  # another pseudo ground truth, other weights
    assert np.array_equal(np.array(own.dice)[0], np.array(truth.dice)[0])  # the first image is segmented before any accept


def test_adapting_on_corrected_target_masks_fills_the_ring_enhancing_core():
    """The demo's point on a small scale: the frozen model finds the rim of a new-site blob but not
    its dark core; PI on 8 corrected target masks (the card's rate) lets the same clicks find more."""
    from OAIMSSegment.demo import before_and_after

    model = load_model("demo-synthetic-blobs")
    run = run_method(model, "pi", synthetic_samples(8, "target", seed=11), Protocol(clicks=3, accept_truth=True),
                     AdaptConfig().for_model(model.card), seed=0, progress=False)
    assert run.accepted_updates == 8
    held_out = synthetic_samples(3, "target", seed=12)
    panels = [before_and_after(model, run.model, sample, clicks=3, seed=0) for sample in held_out]
    assert all(len(p["clicks"]) <= 3 and p["before"].shape == p["label"].shape for p in panels)
    gain = np.mean([p["dice_after"] - p["dice_before"] for p in panels])
    assert gain > 0.05, [(p["dice_before"], p["dice_after"]) for p in panels]
