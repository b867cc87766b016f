"""The ``proposals-train``, ``proposals-fit-prior``, ``proposals-eval`` and ``proposals-user`` commands (:func:`add_commands`)."""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

from OAIMSSegment.errors import ModelError
from OAIMSSegment.model import load_model
from OAIMSSegment.files import atomic_write_text
from OAIMSSegment.proposals.data import GROWTH_MODES, load_images
from OAIMSSegment.proposals.figure import proposal_figure
from OAIMSSegment.proposals.io import load_proposal_model, model_files, read_card, save_proposal_model, write_card
from OAIMSSegment.proposals.loss import PARTIAL_DICE_MODES
from OAIMSSegment.arguments import positive_float, positive_int
from OAIMSSegment.proposals.metrics import evaluate
from OAIMSSegment.proposals.model import SEGMENTATION_PROBABILITIES, ProposalConfig, ProposalModel
from OAIMSSegment.proposals.prior import PRIOR_KINDS, card_sampling, fit_latent_prior
from OAIMSSegment.proposals.train import train
from OAIMSSegment.proposals.user import LOOPS, compare, dataset_cases, synthetic_cases

__all__ = ["add_commands"]


def _train_command(args: argparse.Namespace) -> int:
    """``proposals-train``: train, then write MODEL.pt and its card MODEL.json."""
    synthetic = args.data == "synthetic"
    size = args.size or (32 if synthetic else 64)
    if size % 8:
        raise ModelError(f"--size must be a multiple of 8, got {size}")
    torch.set_num_threads(args.threads)
    images = load_images(args.data, "Tr", size, args.train_images, args.seed)
    started = time.time()
    config = ProposalConfig(input_size=size)
    model, log = train(
        images, args.steps, args.seed, args.batch_size, args.lr, not synthetic, config, args.growth,
        partial_dice=args.partial_dice, kl_warmup=args.kl_warmup, segmentation=args.segmentation,
    )  # fmt: skip
    command = (
        f"python -m OAIMSSegment proposals-train --out {args.out} --data {args.data} --steps {args.steps}"
        f" --seed {args.seed} --batch-size {args.batch_size} --lr {args.lr} --size {size} --growth {args.growth}"
        f" --partial-dice {args.partial_dice} --kl-warmup {args.kl_warmup} --segmentation {args.segmentation}"
        + (f" --train-images {args.train_images}" if synthetic else "")
    )
    card = {
        "name": Path(args.out).stem,
        "task": "probabilistic partial-segmentation proposals (Wong, Guttag, Dalca 2022), conditional VAE",
        "data": "synthetic disks, paper Section 3" if synthetic else f"{Path(args.data).name} imagesTr (luminance), disc or cup",
        "input_size": [size, size],
        "input": "image normalised to [0, 1] (percentiles 0.5 / 99.5), partialness mask x_m, segmentation mask x_s",
        "output": "partialness mask y^_m >= x_m, segmentation mask y^_s (= x_s on x_m, inside y^_m)",
        "training_command": command,
        "seed": args.seed,
        "growth": args.growth,
        "partial_dice": args.partial_dice,
        "kl_warmup": args.kl_warmup,
        "segmentation": args.segmentation,
        "steps": args.steps,
        "train_images": int(images.images.shape[0]),
        "train_seconds": round(time.time() - started, 1),
        "final_loss": log[-1],
        "torch": torch.__version__,
        "created": datetime.date.today().isoformat(),
    }
    card = save_proposal_model(model, Path(args.out), card)
    print(f"wrote {args.out} (sha256 {card['sha256'][:12]}...) and {Path(args.out).with_suffix('.json')}")
    return 0


def _card_path(model_name: str) -> Path:
    """The card of ``model_name``; raises ``ModelError`` when it has none."""
    _, card_path = model_files(model_name)
    if card_path is None:
        raise ModelError(f"{model_name} has no model card to update")
    return card_path


def _fit_prior_command(args: argparse.Namespace) -> int:
    """``proposals-fit-prior``: fit the aggregate-posterior Gaussian on training pairs, store it in the card."""
    torch.set_num_threads(args.threads)
    model = load_proposal_model(args.model)
    card_path = _card_path(args.model)
    synthetic = args.data == "synthetic"
    images = load_images(args.data, "Tr", model.config.input_size, model.card.get("train_images", 1000), model.card.get("seed", 0))
    started = time.time()
    fitted = fit_latent_prior(model, images, args.pairs, args.seed, model.card.get("growth", "random"), augment=not synthetic)
    fitted["seconds"] = round(time.time() - started, 1)
    fitted["command"] = (
        f"python -m OAIMSSegment proposals-fit-prior --model {args.model} --data {args.data} --pairs {args.pairs} --seed {args.seed}"
    )
    card = read_card(card_path)
    card["latent_prior"] = fitted
    write_card(card_path, card)
    print(f"fitted prior on {args.pairs} training pairs in {fitted['seconds']} s; written to {card_path} (the card samples"
          f" from {card_sampling(model)[0]!r}; proposals-eval --prior fitted --update-card makes the fitted one its choice)")  # fmt: skip
    return 0


def _sampling(model: ProposalModel, args: argparse.Namespace) -> tuple[str, float]:
    """``--prior`` / ``--temperature``, each defaulting to the model card's choice."""
    prior, temperature = card_sampling(model)
    return args.prior or prior, temperature if args.temperature is None else args.temperature


def _eval_command(args: argparse.Namespace) -> int:
    """``proposals-eval``: the paper's metrics on held-out inputs; optional JSON, figure and card update.

    ``--update-card`` also records the prior and temperature measured as the card's sampling choice.
    """
    torch.set_num_threads(args.threads)
    model = load_proposal_model(args.model)
    prior, temperature = _sampling(model, args)
    size = model.config.input_size
    images = load_images(args.data, "Ts", size, args.n, args.seed)
    started = time.time()
    growth = model.card.get("growth", "random")
    metrics = evaluate(model, images, args.n, args.k, args.seed, growth=growth, prior=prior, temperature=temperature)
    metrics["seconds"] = round(time.time() - started, 1)
    metrics["command"] = (
        f"python -m OAIMSSegment proposals-eval --model {args.model} --data {args.data} --n {args.n} --k {args.k} --seed {args.seed}"
        f" --prior {prior} --temperature {temperature:g}"
    )
    print(json.dumps(metrics, indent=2))
    if args.json:
        atomic_write_text(args.json, json.dumps(metrics, indent=2) + "\n")
    if args.figure:
        proposal_figure(model, images, Path(args.figure), args.seed, prior=prior, temperature=temperature)
    if args.update_card:
        card_path = _card_path(args.model)
        card = read_card(card_path)
        card["sampling"] = {"prior": prior, "temperature": temperature}
        card.setdefault("metrics", {})[args.data if args.data == "synthetic" else Path(args.data).name] = metrics
        write_card(card_path, card)
        print(f"{card_path}: sampling prior {prior!r}, temperature {temperature:g}")
    return 0


def _user_command_line(args: argparse.Namespace) -> str:
    """The ``proposals-user`` command line that reproduces ``args`` (for the JSON)."""
    options = ["model", "oaims_model", "data", "split", "target", "n", "data_seed", "slices_per_case", "min_pixels",
               "k", "prior", "temperature", "seeds", "brush", "threshold", "cap", "loops"]  # fmt: skip
    parts = [f"--{name.replace('_', '-')} {getattr(args, name)}" for name in options if getattr(args, name) is not None]
    return "python -m OAIMSSegment proposals-user " + " ".join(parts)


def _user_command(args: argparse.Namespace) -> int:
    """``proposals-user``: actions to Dice ``--threshold``, picking among proposals vs clicking OAIMS alone."""
    torch.set_num_threads(args.threads)
    synthetic = args.data == "synthetic"
    if args.oaims_model is None and not synthetic:
        raise ModelError("--oaims-model is required with a dataset folder (the click model the user compares against)")
    if synthetic:
        cases = synthetic_cases(args.n or 100, args.data_seed)
    else:
        cases = dataset_cases(args.data, args.split, args.target, args.slices_per_case, args.min_pixels, args.n)
    proposal_model = load_proposal_model(args.model)
    args.prior, args.temperature = _sampling(proposal_model, args)
    click_model = load_model(args.oaims_model or "demo-synthetic-blobs")
    brush = args.brush * max(cases[0].truth.shape)
    started = time.time()
    loops = [name.strip() for name in args.loops.split(",")]
    if any(name not in LOOPS for name in loops):
        raise ModelError(f"--loops must be some of {', '.join(LOOPS)}, got {args.loops!r}")
    summary = compare(
        proposal_model, click_model, cases, args.k, brush, list(range(args.seeds)), args.threshold, args.cap, loops,
        args.prior, args.temperature,
    )  # fmt: skip
    summary.update(
        model=args.model, prior=args.prior, temperature=args.temperature,
        oaims_model=args.oaims_model or "demo-synthetic-blobs", data=args.data,
        seconds=round(time.time() - started, 1), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
        command=_user_command_line(args),
    )  # fmt: skip
    for name in loops:
        entry = summary[name]
        print(f"{name:9s} actions to Dice {args.threshold}: {entry['actions_mean']:.2f} +- {entry['actions_std_over_seeds']:.2f}"
              f" (reached {100 * entry['reached']:.0f} %)")  # fmt: skip
    print(f"fewer actions per image: {summary['wins']}")
    if args.json:
        atomic_write_text(args.json, json.dumps(summary, indent=2) + "\n")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``proposals-train``, ``proposals-fit-prior``, ``proposals-eval`` and ``proposals-user``.

    Each command's ``func`` returns an exit code.
    """
    train_parser = subparsers.add_parser("proposals-train", help="train the probabilistic partial-segmentation model")
    train_parser.add_argument("--out", required=True, help="weights file MODEL.pt (its card goes to MODEL.json)")
    train_parser.add_argument("--data", default="synthetic", help="'synthetic' (paper's disks) or a 2D nnU-Net dataset folder")
    train_parser.add_argument("--steps", type=positive_int, default=3000)
    train_parser.add_argument("--seed", type=int, default=0)
    train_parser.add_argument("--batch-size", type=positive_int, default=64)
    train_parser.add_argument("--lr", type=float, default=1e-3)
    train_parser.add_argument("--size", type=int, default=0, help="model input side (default 32 synthetic, 64 dataset)")
    train_parser.add_argument("--train-images", type=positive_int, default=1000, help="synthetic training images (paper: 1,000)")
    train_parser.add_argument(
        "--growth", choices=GROWTH_MODES, default="random",
        help="target growth: 'random' (paper: anywhere), 'border' (around x_m) or 'object' (part of the ground truth and its rim)",
    )  # fmt: skip
    train_parser.add_argument(
        "--partial-dice", choices=PARTIAL_DICE_MODES, default="all", help="pixels of the partialness Dice: 'all' or 'undecided' (outside x_m)"
    )
    train_parser.add_argument(
        "--segmentation", choices=SEGMENTATION_PROBABILITIES, default="joint",
        help="soft y^_s in the loss: 'joint' p_m p_s (decided and foreground) or 'conditional' p_s",
    )  # fmt: skip
    train_parser.add_argument("--kl-warmup", type=int, default=0, help="steps of linear KL-weight warm-up (0: none)")
    train_parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads")
    train_parser.set_defaults(func=_train_command)

    fit_parser = subparsers.add_parser(
        "proposals-fit-prior", help="fit a Gaussian to the encoder's aggregate posterior and store it in the model card"
    )
    fit_parser.add_argument("--model", default="proposals-synthetic-disks", help="shipped model name or MODEL.pt (with its card)")
    fit_parser.add_argument("--data", default="synthetic", help="the model's training data: 'synthetic' or its dataset folder")
    fit_parser.add_argument("--pairs", type=positive_int, default=4000, help="training pairs to fit on")
    fit_parser.add_argument("--seed", type=int, default=1, help="seed of the pairs")
    fit_parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads")
    fit_parser.set_defaults(func=_fit_prior_command)

    def add_sampling(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--prior", choices=PRIOR_KINDS, help="latent distribution: 'standard' N(0, I) or 'fitted' (default: the card's)"
        )
        parser.add_argument("--temperature", type=positive_float, help="scale of the latent sample (default: the card's, else 1)")

    eval_parser = subparsers.add_parser("proposals-eval", help="evaluate proposals on held-out inputs (paper Section 3)")
    eval_parser.add_argument("--model", default="proposals-synthetic-disks", help="shipped model name or MODEL.pt")
    eval_parser.add_argument("--data", default="synthetic", help="'synthetic' or a 2D nnU-Net dataset folder (its imagesTs)")
    eval_parser.add_argument("--n", type=positive_int, default=1000, help="held-out inputs (paper: 1,000)")
    eval_parser.add_argument("--k", type=positive_int, default=3, help="proposals per input")
    eval_parser.add_argument("--seed", type=int, default=0)
    eval_parser.add_argument("--json", help="write the metrics to OUT.json")
    eval_parser.add_argument("--figure", help="write a Figure-3-like PNG")
    eval_parser.add_argument(
        "--update-card", action="store_true", help="record the metrics, and the prior and temperature measured, in the model card"
    )
    add_sampling(eval_parser)
    eval_parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads")
    eval_parser.set_defaults(func=_eval_command)

    user_parser = subparsers.add_parser("proposals-user", help="simulated user: choosing among proposals vs OAIMS clicks alone")
    user_parser.add_argument("--model", default="proposals-synthetic-disks", help="proposal model: shipped name or MODEL.pt")
    user_parser.add_argument("--oaims-model", help="click model for the OAIMS loop (default for synthetic: demo-synthetic-blobs)")
    user_parser.add_argument("--data", default="synthetic", help="'synthetic' or an nnU-Net raw dataset folder")
    user_parser.add_argument("--split", choices=("Tr", "Ts"), default="Ts")
    user_parser.add_argument("--target", help="class the user means (dataset.json label name; default the highest label)")
    user_parser.add_argument("--n", type=positive_int, help="synthetic images (default 100) or the first N dataset cases")
    user_parser.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic images and their truths")
    user_parser.add_argument("--slices-per-case", type=positive_int, default=3, help="axial slices of each 3D case")
    user_parser.add_argument("--min-pixels", type=positive_int, default=100, help="skip images with fewer target pixels")
    user_parser.add_argument("--k", type=positive_int, default=3, help="proposals per round")
    add_sampling(user_parser)
    user_parser.add_argument("--seeds", type=positive_int, default=3, help="seeds 0..N-1")
    user_parser.add_argument("--brush", type=float, default=1 / 16, help="correction brush radius, a fraction of the longer image side")
    user_parser.add_argument("--threshold", type=float, default=0.9, help="Dice the user stops at")
    user_parser.add_argument("--cap", type=positive_int, default=20, help="most actions per image")
    user_parser.add_argument("--loops", default=",".join(LOOPS), help="comma-separated: proposals (a), brush (a without proposals), clicks (b)")
    user_parser.add_argument("--json", help="write the summary to OUT.json")
    user_parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads")
    user_parser.set_defaults(func=_user_command)
