"""Pretraining the interactive model: OAIMS Algorithm 2 (DF + CCG with simulated clicks).

For each training image: a localization click inside the target, the model's prediction
from that click alone (no gradient), the error components of that prediction ranked by
size with one random click in each, the first ``K ~ U{1..T_max}`` of them; the model then
predicts from the localization click plus those ``K`` clicks and is trained with
``L_DF + beta * L_CCG``. (Algorithm 2 line 13 lists only the ``K`` error clicks; we keep the
localization click too, because at inference it is always present.)

Training runs in the model's working space (normalised, resized, padded as at inference)
on random crops containing foreground, with flips and intensity augmentation. Optionally
(``--intensity-remap``) the image's intensities are passed through a random monotone curve,
increasing or decreasing, as in single-source cross-modality domain generalisation (Zhou et
al., CVPR 2022, Bezier-curve style augmentation): the model cannot rely on one modality's
contrast and has to take the clicks and shapes into account. Progress bar, atomic
checkpoints, resumable, seeded.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.transforms import RandHistogramShift
from tqdm import tqdm

from OAIMSSegment import arguments as types
from OAIMSSegment.augment import RECIPES, RGB_RECIPES, Recipe
from OAIMSSegment.clicks import Click, correction_click, guidance_maps, localization_click, ranked_error_clicks
from OAIMSSegment.data import NnUNetDataset, Sample, synthetic_samples
from OAIMSSegment.errors import DatasetError, InvalidImageError, ModelError
from OAIMSSegment.losses import DiceFocal, ccg_loss
from OAIMSSegment.files import atomic_write_bytes
from OAIMSSegment.model import NORMALIZATIONS, ClickSegmenter, ModelCard, hard_labels, load_model, save_model


@dataclass
class TrainItem:
    """A training image in working space: ``image (C, Hp, Wp)`` normalised, ``label (Hp, Wp)``."""

    image: torch.Tensor
    label: torch.Tensor


@dataclass
class PretrainConfig:
    steps: int = 3000
    batch_size: int = 8
    lr: float = 1e-3
    crop: int | None = 160
    max_clicks: int = 10
    beta: float = 200.0
    sigma: float = 3.0
    alpha: float = 0.7
    seed: int = 0
    checkpoint_every: int = 250
    iterative: int = 0
    intensity_remap: float = 0.0
    bf16: bool = False
    average_last: float = 0.0
    augment: str = "none"


def to_working(model: ClickSegmenter, samples: list[Sample]) -> list[TrainItem]:
    """Apply the model card's preprocessing to every sample (as the session does at inference).

    Samples whose foreground vanishes at the working resolution (a few pixels of tumour
    down-scaled) are dropped: they cannot take a localization click. Images the model cannot
    take (NaN/inf, constant, under 16 px) are skipped and named on stderr, not fatal."""
    items, skipped = [], []
    for sample in samples:
        try:
            prepared = model.prepare(sample.image)
        except InvalidImageError as error:
            skipped.append(f"{sample.name} ({error})")
            continue
        label = prepared.mask_to_working(sample.label)
        if bool((label > 0).any()):
            items.append(TrainItem(prepared.tensor[0], label))
    if skipped:
        print(f"skipped {len(skipped)} of {len(samples)} training image(s) that cannot be segmented: "
              + "; ".join(skipped[:5]) + ("; ..." if len(skipped) > 5 else ""), file=sys.stderr)
    return items


def _crop(item: TrainItem, size: int | None, rng: np.random.Generator) -> TrainItem:
    """A random ``size`` crop containing foreground (the whole image when ``size`` is None or larger)."""
    height, width = item.label.shape
    if size is None or (size >= height and size >= width):
        return item
    size_h, size_w = min(size, height), min(size, width)
    foreground = torch.nonzero(item.label > 0)
    centre = foreground[rng.integers(len(foreground))].tolist() if len(foreground) else [height // 2, width // 2]
    top = int(np.clip(centre[0] - rng.integers(size_h), 0, height - size_h))
    left = int(np.clip(centre[1] - rng.integers(size_w), 0, width - size_w))
    return TrainItem(item.image[:, top : top + size_h, left : left + size_w], item.label[top : top + size_h, left : left + size_w])


def remap_intensities(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """A random monotone intensity curve (MONAI ``RandHistogramShift``), increasing or decreasing
    with equal chance, applied to each channel's non-zero pixels; the result is z-scored again
    over those pixels, as the card's normalisation would. ``image`` is ``(C, H, W)``; zero
    background (skull-stripped MRI) stays 0."""
    curve = RandHistogramShift(num_control_points=(4, 10), prob=1.0)
    curve.set_random_state(seed=int(rng.integers(2**31)))
    out = image.clone()
    for c in range(image.shape[0]):
        foreground = image[c] != 0
        if int(foreground.sum()) < 16:
            continue
        values = torch.as_tensor(curve(image[c][foreground][None]))[0]
        if rng.random() < 0.5:
            values = values.max() + values.min() - values
        out[c][foreground] = (values - values.mean()) / values.std().clamp_min(1e-6)
    return out


def _augment(item: TrainItem, rng: np.random.Generator, remap: float = 0.0, recipe: Recipe | None = None) -> TrainItem:
    """Flips, the named MONAI ``recipe`` (:mod:`OAIMSSegment.augment`), with probability ``remap``
    a random intensity curve (:func:`remap_intensities`), and a random intensity scale, shift and
    noise of the normalised image."""
    image, label = item.image, item.label
    if recipe is not None:
        image, label = recipe(image, label, rng)
    if rng.random() < 0.5:
        image, label = image.flip(-1), label.flip(-1)
    if rng.random() < 0.5:
        image, label = image.flip(-2), label.flip(-2)
    if remap and rng.random() < remap:
        image = remap_intensities(image, rng)
    scale = float(rng.uniform(0.8, 1.2))
    shift = float(rng.uniform(-0.2, 0.2))
    image = image * scale + shift
    if rng.random() < 0.3:
        image = image + float(rng.uniform(0.0, 0.1)) * torch.randn_like(image)
    return TrainItem(image.contiguous(), label.contiguous())


def _batch(items: list[TrainItem], config: PretrainConfig, rng: np.random.Generator, recipe: Recipe | None = None) -> list[TrainItem]:
    picked = [items[i] for i in rng.integers(len(items), size=config.batch_size)]
    batch = [_augment(_crop(item, config.crop, rng), rng, config.intensity_remap, recipe) for item in picked]
    multiple = 16
    height = max(b.label.shape[0] for b in batch)
    width = max(b.label.shape[1] for b in batch)
    height, width = -(-height // multiple) * multiple, -(-width // multiple) * multiple
    padded = []
    for b in batch:
        pad = (0, width - b.label.shape[1], 0, height - b.label.shape[0])
        padded.append(TrainItem(torch.nn.functional.pad(b.image, pad), torch.nn.functional.pad(b.label, pad)))
    return padded


def _autocast(config: PretrainConfig) -> torch.autocast:
    """bfloat16 mixed precision for the U-Net's passes when ``config.bf16`` (weights, optimizer
    and losses stay float32). 1.5x faster per step on the AVX512-BF16 CPU of docs/BENCHMARKS.md section 4."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16)


def _predict(model: ClickSegmenter, images: torch.Tensor, click_sets: list[list[Click]], config: PretrainConfig) -> np.ndarray:
    """Hard predictions ``(B, H, W)`` without gradient for a batch and its click sets."""
    card = model.card
    guidance = torch.stack([guidance_maps(cs, images.shape[-2:], card.num_classes, card.guidance_sigma) for cs in click_sets])
    model.eval()
    with torch.no_grad(), _autocast(config):
        return hard_labels(model(torch.cat([images, guidance], dim=1)).float()).numpy()


def train_step(
    model: ClickSegmenter,
    optimizer: torch.optim.Optimizer,
    batch: list[TrainItem],
    dice_focal: DiceFocal,
    config: PretrainConfig,
    rng: np.random.Generator,
) -> float:
    """One step of Algorithm 2 on a batch. Returns the loss."""
    card = model.card
    images = torch.stack([b.image for b in batch])
    labels = torch.stack([b.label for b in batch])
    shape = labels.shape[-2:]
    targets = [b.label.numpy() for b in batch]
    click_sets: list[list[Click]] = [[localization_click(target, rng)] for target in targets]
    predictions = _predict(model, images, click_sets, config)
    # Optional inference-style rounds (as in RITM): the simulated clinician's corrections of
    # the model's own predictions, so training also sees click sets built one click at a time.
    rounds = int(rng.integers(0, config.iterative + 1)) if config.iterative else 0
    for _ in range(rounds):
        for i, target in enumerate(targets):
            click = correction_click(predictions[i], target, card.num_classes)
            if click is not None:
                click_sets[i].append(click)
        predictions = _predict(model, images, click_sets, config)
    for i, target in enumerate(targets):
        k = int(rng.integers(1, config.max_clicks + 1))
        click_sets[i] += ranked_error_clicks(predictions[i], target, card.num_classes, k, rng)
    guidance = torch.stack([guidance_maps(cs, shape, card.num_classes, card.guidance_sigma) for cs in click_sets])
    model.train()
    with _autocast(config):
        logits = model(torch.cat([images, guidance], dim=1)).float()
    loss = dice_focal(logits, labels) + config.beta * ccg_loss(logits, labels, click_sets, config.sigma)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def pretrain(
    card: ModelCard,
    samples: list[Sample],
    out: str | Path,
    config: PretrainConfig,
    resume: bool = True,
    init: ClickSegmenter | None = None,
) -> ModelCard:
    """Train a new model for ``card`` on ``samples`` and save weights + card to ``out``.

    A checkpoint ``<out>.ckpt`` is written every ``config.checkpoint_every`` steps and, with
    ``resume``, training continues from it. ``init`` starts from a trained model's weights
    (fine-tuning) instead of a random initialisation. Returns the saved card (with sha256).
    """
    if not samples:
        raise DatasetError("no training samples (no image has foreground?)")
    if config.augment in RGB_RECIPES and card.image_channels != 3:
        raise ModelError(f"--augment {config.augment} is for RGB photographs; {card.name!r} has {card.image_channels} channel(s)")
    out = Path(out)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = ClickSegmenter(card)
    if init is not None:
        model.load_state_dict(init.state_dict())
    items = to_working(model, samples)
    if not items:
        raise DatasetError(f"none of the {len(samples)} training image(s) can be used (see the skipped images above)")
    recipe = None if config.augment == "none" else RECIPES[config.augment](card.normalization)
    # Stochastic weight averaging (SWA): the saved weights are the uniform mean of the weights after
    # each of the last ``average_last`` fraction of steps (flatter minima; docs/ENGINE.md).
    average_from = config.steps - max(1, round(config.average_last * config.steps)) if config.average_last else None
    averaged = torch.optim.swa_utils.AveragedModel(model) if average_from is not None else None
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scheduler = one_cycle(optimizer, config.lr, config.steps)
    dice_focal = DiceFocal(binary=card.binary, alpha=config.alpha)
    checkpoint = out.with_suffix(".ckpt")
    step = 0
    if resume and checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        if averaged is not None and "averaged" in state:
            averaged.load_state_dict(state["averaged"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = int(state["step"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
    started = time.time()
    losses: list[float] = []
    with tqdm(total=config.steps, initial=step, desc=f"pretrain {card.name}", unit="step") as progress:
        while step < config.steps:
            loss = train_step(model, optimizer, _batch(items, config, rng, recipe), dice_focal, config, rng)
            if not np.isfinite(loss):
                raise ModelError(f"training diverged at step {step} (loss {loss}); lower --lr")
            scheduler.step()
            step += 1
            if averaged is not None and step > average_from:
                averaged.update_parameters(model)
            losses.append(loss)
            progress.update(1)
            progress.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
            if step % config.checkpoint_every == 0 or step == config.steps:
                buffer = io.BytesIO()
                torch.save({
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "step": step,
                    "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                    **({"averaged": averaged.state_dict()} if averaged is not None else {}),
                }, buffer)
                atomic_write_bytes(checkpoint, buffer.getvalue())
    if averaged is not None:
        model = averaged.module
    model.eval()
    training = {
        **card.training,
        "steps": config.steps, "batch_size": config.batch_size, "lr": config.lr, "crop": config.crop,
        "max_clicks": config.max_clicks, "iterative": config.iterative, "intensity_remap": config.intensity_remap, "bf16": config.bf16, "average_last": config.average_last, "augment": config.augment, "beta": config.beta, "sigma": config.sigma, "seed": config.seed,
        "samples": len(samples), "final_loss": float(np.mean(losses[-50:])) if losses else None,
        "wall_s_last_run": round(time.time() - started, 1),
    }
    return save_model(model, out, training=training)


# -- command line -------------------------------------------------------------------------------


def one_cycle(optimizer: torch.optim.Optimizer, lr: float, steps: int) -> torch.optim.lr_scheduler.OneCycleLR:
    """The training schedule: one cycle up to ``lr`` over a 5 % warm-up, then down over ``steps``.

    OneCycleLR divides by (warm-up fraction x steps - 1), which is zero for a 20-step probe, so runs
    of 3 to 39 steps warm up over two steps instead (longer runs keep their published schedule)."""
    warmup = max(0.05, 2 / steps) if steps >= 3 else 0.05
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=warmup)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("pretrain", help="pretrain a click-guided model (Algorithm 2)")
    parser.add_argument("--dataset", required=True, action="append",
                        help="nnU-Net raw dataset folder, or 'synthetic'; repeat it (or give a comma list) to train on "
                             "the imagesTr of several datasets with the same channels and labels")
    parser.add_argument("--out", type=types.writable_file, required=True,
                        help="weights file to write (a card <out>.json is written beside it; checked before training)")
    parser.add_argument("--name", help="model name (default: the output file's stem)")
    parser.add_argument("--task", default="", help="one-line description for the model card")
    parser.add_argument("--axis", type=types.slice_axes, action="append",
                        help="slicing orientations of 3D volumes, a comma list (e.g. axial,coronal,sagittal); once for "
                             "every dataset, or once per --dataset in their order (default: axial)")
    parser.add_argument("--normalization", choices=list(NORMALIZATIONS), help="default: zscore for RGB, zscore_nonzero otherwise")
    parser.add_argument("--working-size", type=types.working_size,
                        help=f"resize the longer image side to this, 16..{types.MAX_WORKING_SIZE} px (default: native)")
    parser.add_argument("--channels", type=types.int_list, default="16,32,64,128,256", help="U-Net channels per level")
    parser.add_argument("--norm", choices=["instance", "none"], default="instance",
                        help="U-Net normalisation layers; none: no normalisation, so a click's effect stays local "
                        "(instance statistics spread every click over the whole image)")
    parser.add_argument("--steps", type=types.positive_int, default=PretrainConfig.steps)
    parser.add_argument("--batch-size", type=types.positive_int, default=PretrainConfig.batch_size)
    parser.add_argument("--lr", type=types.positive_float, default=PretrainConfig.lr)
    parser.add_argument("--crop", type=types.non_negative_int, default=PretrainConfig.crop,
                        help="training crop side in working pixels (0: whole image)")
    parser.add_argument("--synthetic-n", type=types.positive_int, default=400, help="number of synthetic source images")
    parser.add_argument("--iterative", type=types.non_negative_int, default=0,
                        help="up to N extra rounds of simulated correction clicks before the training clicks (0: Algorithm 2 as published)")
    parser.add_argument("--intensity-remap", type=types.finite_float, default=0.0, metavar="P",
                        help="probability of a random monotone intensity curve per training image (0: off)")
    parser.add_argument("--bf16", action="store_true",
                        help="bfloat16 mixed precision for training's forward/backward passes (faster on CPUs with AVX512-BF16)")
    parser.add_argument("--average-last", type=types.finite_float, default=0.0, metavar="F",
                        help="save the mean of the weights over the last fraction F of steps (stochastic weight averaging; 0: off)")
    parser.add_argument("--augment", default="none", choices=sorted(RECIPES),
                        help="named MONAI augmentation recipe (OAIMSSegment/augment.py; seeded by --seed)")
    parser.add_argument("--adaptation-lr", type=types.finite_float,
                        help="online-adaptation learning rate to record in the card (chosen by a held-out sweep)")
    parser.add_argument("--init", help="start from this model's weights (name or path) instead of a random initialisation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=types.non_negative_int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if not 0.0 <= args.intensity_remap <= 1.0:
        raise ModelError(f"--intensity-remap is a probability in [0, 1], got {args.intensity_remap}")
    if not 0.0 <= args.average_last <= 1.0:
        raise ModelError(f"--average-last is a fraction of the steps in [0, 1], got {args.average_last}")
    name = args.name or Path(args.out).stem
    channels = args.channels
    network = {"channels": channels, "strides": [2] * (len(channels) - 1), "num_res_units": 2,
               "norm": None if args.norm == "none" else args.norm}
    folders = [part for value in args.dataset for part in value.split(",") if part]
    if folders == ["synthetic"]:
        samples = synthetic_samples(args.synthetic_n, "source", seed=args.seed)
        card = ModelCard(
            name=name, task=args.task or "Synthetic blob segmentation (demo)", image_channels=1,
            channel_names=["intensity"], labels={"background": 0, "blob": 1}, normalization="zscore",
            network=network, adaptation_lr=args.adaptation_lr,
            training={"dataset": "synthetic source domain (OAIMSSegment.data.synthetic_samples)",
                      "command": _command(args)},
        )
    else:
        datasets = [NnUNetDataset(folder) for folder in folders]
        dataset = _same_layout(datasets)
        axes = _axes_per_dataset(args.axis or [["axial"]], len(datasets))
        samples = [sample for each, its_axes in zip(datasets, axes) for axis in its_axes
                   for sample in each.samples("Tr", axis=axis)]
        described = " + ".join(f"{each.name} imagesTr ({len(each.cases('Tr'))} cases, {'+'.join(its_axes)} slices)"
                               for each, its_axes in zip(datasets, axes))
        card = ModelCard(
            name=name, task=args.task or f"Interactive segmentation trained on {described}",
            image_channels=dataset.image_channels, channel_names=dataset.channel_names, labels=dataset.labels,
            normalization=args.normalization or ("zscore" if dataset.rgb else "zscore_nonzero"),
            working_size=args.working_size or None, network=network, adaptation_lr=args.adaptation_lr,
            training={"dataset": f"{described} with foreground",
                      "command": _command(args)},
        )
    config = PretrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                            crop=args.crop or None, seed=args.seed, iterative=args.iterative,
                            intensity_remap=args.intensity_remap, bf16=args.bf16, average_last=args.average_last,
                            augment=args.augment)
    init = None
    if args.init:
        init = load_model(args.init)
        card.network = dict(init.card.network)
        card.training["init"] = {"model": init.card.name, "sha256": init.card.sha256, "training": init.card.training}
    saved = pretrain(card, samples, args.out, config, resume=not args.no_resume, init=init)
    print(f"saved {args.out} (sha256 {saved.sha256[:12]}...) and its card {Path(args.out).with_suffix('.json')}")
    return 0


def _axes_per_dataset(axes: list[list[str]], n_datasets: int) -> list[list[str]]:
    """``--axis`` given once applies to every dataset; otherwise once per ``--dataset``, in order."""
    if len(axes) == 1:
        return axes * n_datasets
    if len(axes) != n_datasets:
        raise DatasetError(f"--axis was given {len(axes)} times for {n_datasets} dataset(s): give it once for all, "
                           "or once per --dataset in their order")
    return axes


def _same_layout(datasets: list[NnUNetDataset]) -> NnUNetDataset:
    """The first dataset, after checking that every one has its channels and labels (one model learns them all)."""
    first = datasets[0]
    for other in datasets[1:]:
        if (other.channel_names, other.labels, other.rgb) != (first.channel_names, first.labels, first.rgb):
            raise DatasetError(
                f"{other.name} (channels {other.channel_names}, labels {other.labels}) cannot be trained together with "
                f"{first.name} (channels {first.channel_names}, labels {first.labels})"
            )
    return first


def _command(args: argparse.Namespace) -> str:
    return "python -m OAIMSSegment " + " ".join(sys.argv[1:]) if sys.argv[1:] else "python -m OAIMSSegment pretrain"
