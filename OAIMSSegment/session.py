"""The online interactive session: OAIMS Algorithm 1 and the baselines it is compared with.

One :class:`InteractiveSession` serves the Slicer Logic, the simulated-clinician benchmark
and the tests. It holds a model and its optimizer across images (that is the "online"
in online adaptation) and, for the image being segmented, the clicks and predictions:

* :meth:`~InteractiveSession.start` an image (raw intensities, the model card's
  normalisation is applied here),
* :meth:`~InteractiveSession.add_click` returns the new prediction; with Mid-Interaction
  adaptation (MI) on, it first takes one optimizer step (Algorithm 1, lines 15-20),
* :meth:`~InteractiveSession.undo` the last click (prediction *and* that click's update),
* :meth:`~InteractiveSession.accept` the segment: with Post-Interaction adaptation (PI)
  on, two optimizer steps using the accepted mask as pseudo ground truth (lines 22-32),
* :meth:`~InteractiveSession.discard` the image and every update it caused.

Methods (``method=``): ``frozen`` (the non-adaptive "ICNN" backbone), ``mi``, ``pi``,
``pi+mi`` (OAIMS), and re-implementations of the paper's baselines from their papers'
descriptions: ``ia+sa``, ``tsca``, and the unsupervised-loss variants of Appendix A.10
``ce-pi``, ``ce-mi+pi``, ``ent-pi``, ``ent-mi+pi``. The CCG ablations are
``pi+mi/no-class`` (no class-limited indicator), ``pi+mi/uniform`` (no Gaussian) and
``pi+mi/sigma0`` (the clicked pixel only). ``pi+mi/click-label`` is our extension, not the
paper's: MI's pseudo label is made to agree with the new click within ``sigma`` pixels of it
(see :class:`AdaptConfig`).

Optimizer: Adam, chosen by the measured sweep recorded in ``docs/BENCHMARKS.md``. Its
state (moment estimates) is part of :meth:`~InteractiveSession.state_dict`, so a site
model continues where it stopped.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import FocalLoss

from OAIMSSegment.clicks import Click, ranked_error_clicks, stamp_clicks
from OAIMSSegment.errors import SessionStateError
from OAIMSSegment.losses import DiceFocal, ccg_loss, pixel_cross_entropy
from OAIMSSegment.model import ClickSegmenter, ModelCard, PreparedImage, hard_labels, probabilities

BASE_METHODS = ("frozen", "mi", "pi", "pi+mi", "ia+sa", "tsca", "ce-pi", "ce-mi+pi", "ent-pi", "ent-mi+pi")

#: CCG ablations of OAIMS (paper Table 5 and Appendix A.8), as overrides of :class:`AdaptConfig`.
VARIANTS: dict[str, dict[str, object]] = {
    "no-class": {"ccg_class_limited": False},
    "uniform": {"ccg_kernel": "uniform"},
    "sigma0": {"sigma": 0.0},
    "click-label": {"mi_click_label": True},
}

METHODS = BASE_METHODS + tuple(f"pi+mi/{variant}" for variant in VARIANTS)


def method_name(mi: bool, pi: bool) -> str:
    """The OAIMS method for a pair of MI / PI switches (as in the Slicer module)."""
    return {(True, True): "pi+mi", (True, False): "mi", (False, True): "pi", (False, False): "frozen"}[(mi, pi)]


#: Adam learning rate of online adaptation for a model whose card names none.
DEFAULT_LR = 3e-5


@dataclass
class AdaptConfig:
    """Hyper-parameters of online adaptation.

    Attributes:
        lr: Adam learning rate; None takes the model card's ``adaptation_lr`` (chosen per
            model by the sweep in ``docs/BENCHMARKS.md``), else :data:`DEFAULT_LR`.
        beta: weight of the CCG loss (paper: 200).
        sigma: CCG Gaussian standard deviation in working pixels (paper: 3).
        alpha: focal weight in the Dice-Focal loss (paper: 0.7).
        ccg_class_limited: the indicator ``I_c`` of Eq. 2.
        ccg_kernel: ``"gaussian"`` or ``"uniform"`` (ablation).
        mi_click_label: our extension of MI (off = Algorithm 1 as published): before the MI
            step, the pixels within ``sigma`` of the new click take the click's class in the
            pseudo label ``P_t^initial``. A model that ignores a click predicts the wrong class
            right under it, and the class-limited CCG term then drops most of the click's
            window (measured in ``docs/BENCHMARKS.md``, section 9.1).
        max_dice_drop: PI safety guard: if, after the update, the model's prediction with the
            image's clicks matches the accepted mask worse by more than this Dice, the update is
            undone (a collapsing update must never reach a site model).
        ia_mask_weight, ia_weight_decay: IA+SA regularisers towards the first prediction and
            towards the initial weights.
        tsca_momentum, tsca_consistency: TSCA teacher EMA momentum and student-teacher weight.
    """

    lr: float | None = None
    beta: float = 200.0
    sigma: float = 3.0
    alpha: float = 0.7
    ccg_class_limited: bool = True
    ccg_kernel: str = "gaussian"
    mi_click_label: bool = False
    max_dice_drop: float = 0.1
    ia_mask_weight: float = 0.1
    ia_weight_decay: float = 1e-2
    tsca_momentum: float = 0.9
    tsca_consistency: float = 0.1

    def for_model(self, card: ModelCard) -> "AdaptConfig":
        """This configuration with the learning rate decided (see ``lr``)."""
        if self.lr is not None:
            return self
        return replace(self, lr=card.adaptation_lr if card.adaptation_lr is not None else DEFAULT_LR)


@dataclass
class ClickResult:
    """What one click produced.

    Attributes:
        mask: class map ``(H, W)`` uint8 at the image's original size.
        probabilities: ``(K, H, W)`` float32 class probabilities.
        click: the click, in original pixel coordinates.
        latency_ms: wall time of the whole click (adaptation + prediction).
        adapt_ms: wall time of the adaptation step (0 when none ran).
        loss: the adaptation loss before the step, or None.
    """

    mask: np.ndarray
    probabilities: np.ndarray
    click: Click
    latency_ms: float
    adapt_ms: float
    loss: float | None


@dataclass
class AcceptResult:
    """Outcome of accepting a segment.

    Attributes:
        applied: whether the model's weights were updated.
        reason: why not, when ``applied`` is False ("" otherwise).
        latency_ms: wall time of the post-interaction update.
        losses: loss values of each stage.
        clicks: number of clicks the image took.
        dice_before, dice_after: Dice (mean over foreground classes) of the model's prediction
            with the image's clicks against the accepted mask, before and after the update.
    """

    applied: bool
    reason: str
    latency_ms: float
    losses: dict[str, float] = field(default_factory=dict)
    clicks: int = 0
    dice_before: float | None = None
    dice_after: float | None = None


def _weights_snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def mean_foreground_dice(prediction: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Dice averaged over foreground classes present in either map (1.0 when both are empty)."""
    scores = []
    for k in range(1, num_classes):
        p, t = prediction == k, target == k
        total = int(p.sum() + t.sum())
        if total:
            scores.append(2.0 * float((p & t).sum()) / total)
    return float(np.mean(scores)) if scores else 1.0


class InteractiveSession:
    """Online interactive segmentation with a persistent, adapting model.

    Args:
        model: the segmentation model; its weights are updated in place by adaptive methods.
        method: one of :data:`METHODS`.
        config: adaptation hyper-parameters.
    """

    def __init__(self, model: ClickSegmenter, method: str = "pi+mi", config: AdaptConfig | None = None) -> None:
        base, _, variant = method.partition("/")
        if base not in BASE_METHODS or (variant and (base != "pi+mi" or variant not in VARIANTS)):
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        self.model = model
        self.method = method
        self.config = replace(config or AdaptConfig(), **VARIANTS.get(variant, {})).for_model(model.card)
        self.card = model.card
        self.dice_focal = DiceFocal(binary=self.card.binary, alpha=self.config.alpha)
        self.optimizer = self._new_optimizer()
        self.pretrained = _weights_snapshot(model)
        self.teacher: ClickSegmenter | None = None
        if base == "tsca":
            self.teacher = copy.deepcopy(model).eval()
            self.teacher.requires_grad_(False)
        self._base = base
        self._clear_image()

    # -- configuration ------------------------------------------------------------------------

    @property
    def mi_enabled(self) -> bool:
        return self._base in ("mi", "pi+mi", "ia+sa", "tsca", "ce-mi+pi", "ent-mi+pi")

    @property
    def pi_enabled(self) -> bool:
        return self._base in ("pi", "pi+mi", "ce-pi", "ce-mi+pi", "ent-pi", "ent-mi+pi")

    # -- image lifecycle ------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """True between :meth:`start` and :meth:`accept` / :meth:`discard`."""
        return self.prepared is not None

    @property
    def clicks(self) -> list[Click]:
        """The image's clicks, in original pixel coordinates."""
        return list(self._clicks)

    @property
    def mask(self) -> np.ndarray | None:
        """The current class map ``(H, W)`` (None before the first click)."""
        return self._results[-1].mask if self._results else None

    def start(self, image: np.ndarray) -> None:
        """Begin a new image (raw intensities, ``(H, W)`` or ``(C, H, W)``).

        An image still open is discarded first, with its updates. Raises
        :class:`~OAIMSSegment.errors.InvalidImageError` for an unusable image.
        """
        prepared = self.model.prepare(image)
        if self.active:
            self.discard()
        self.prepared = prepared
        self._image_start = self.state_dict()

    def add_click(self, position: tuple[float, ...], label: int) -> ClickResult:
        """Add a click (``position`` an array index ``(row, col)`` in original pixels; ``label``
        the class, 0 = background) and return the new prediction.

        With MI on, the click first triggers one optimizer step (Algorithm 1, lines 17-19)
        unless it is the image's first click, which has no previous prediction to correct.
        """
        prepared = self._require_image()
        started = time.perf_counter()
        click = self.model.working_click(prepared, Click(tuple(position), int(label)))
        original = Click(tuple(int(round(float(v))) for v in position), int(label))
        snapshot = self.state_dict() if self.mi_enabled and self._wclicks else None
        self._wclicks.append(click)
        loss, adapt_ms = None, 0.0
        if snapshot is not None:
            adapt_start = time.perf_counter()
            loss = self._mid_interaction(click, snapshot)
            adapt_ms = (time.perf_counter() - adapt_start) * 1000.0
        self._clicks.append(original)
        self._snapshots.append(snapshot)
        with torch.no_grad():
            logits = self._predict(self._wclicks)
        self._working_labels.append(hard_labels(logits)[0])
        result = self._result(logits, original, started, adapt_ms, loss)
        self._results.append(result)
        return result

    def resume(self, image: np.ndarray, clicks: list[Click]) -> np.ndarray | None:
        """Re-open an image segmented earlier with its ``clicks`` (original pixels) and their
        predictions, **without** adapting (their MI steps were taken when they were made), e.g. to
        accept it (PI) or click on it again. Returns the mask (None without clicks). An image still
        open is discarded first, as by :meth:`start`; undoing a resumed click reverts no update."""
        self.start(image)
        for click in clicks:
            started = time.perf_counter()
            self._wclicks.append(self.model.working_click(self.prepared, Click(tuple(click.position), int(click.label))))
            self._clicks.append(Click(tuple(int(round(float(v))) for v in click.position), int(click.label)))
            self._snapshots.append(None)
            with torch.no_grad():
                logits = self._predict(self._wclicks)
            self._working_labels.append(hard_labels(logits)[0])
            self._results.append(self._result(logits, self._clicks[-1], started, 0.0, None))
        return self.mask

    def undo(self) -> np.ndarray | None:
        """Remove the last click, revert the update it caused, and return the previous mask."""
        self._require_image()
        if not self._clicks:
            raise SessionStateError("there is no click to undo")
        self._clicks.pop()
        self._wclicks.pop()
        self._working_labels.pop()
        self._results.pop()
        snapshot = self._snapshots.pop()
        if snapshot is not None:
            self.load_state_dict(snapshot)
        return self.mask

    def discard(self) -> None:
        """Drop the image and revert every update made while segmenting it."""
        if self.active and self._image_start is not None:
            self.load_state_dict(self._image_start)
        self._clear_image()

    def accept(self, mask: np.ndarray | None = None) -> AcceptResult:
        """Accept the segment and run post-interaction adaptation (when the method has it).

        Args:
            mask: the accepted class map ``(H, W)`` at the original size, e.g. after the
                clinician edited it; None accepts the current prediction.
        """
        prepared = self._require_image()
        if not self._clicks:
            raise SessionStateError("nothing to accept: the image has no clicks")
        started = time.perf_counter()
        n_clicks = len(self._clicks)
        if mask is not None:
            mask = np.asarray(mask)
            if mask.shape != prepared.original_shape:
                raise SessionStateError(
                    f"accepted mask has shape {mask.shape}, the image is {prepared.original_shape}"
                )
            if mask.min() < 0 or mask.max() >= self.card.num_classes:
                raise SessionStateError(f"accepted mask has labels outside 0..{self.card.num_classes - 1}")
            final = prepared.mask_to_working(mask)
        else:
            final = self._working_labels[-1]
        try:
            if not self.pi_enabled:
                return AcceptResult(False, f"method {self.method!r} has no post-interaction update",
                                    (time.perf_counter() - started) * 1000.0, clicks=n_clicks)
            if not bool((final > 0).any()):
                return AcceptResult(False, "the accepted mask is empty; the model was not adapted",
                                    (time.perf_counter() - started) * 1000.0, clicks=n_clicks)
            return self._post_interaction(final, started, n_clicks)
        finally:
            self._clear_image()

    # -- state ----------------------------------------------------------------------------------

    def _new_optimizer(self) -> torch.optim.Adam:
        return torch.optim.Adam(self.model.parameters(), lr=self.config.lr)

    def state_dict(self) -> dict:
        """Model weights and optimizer state (plus the TSCA teacher), for the site store."""
        state = {"model": _weights_snapshot(self.model), "optimizer": copy.deepcopy(self.optimizer.state_dict())}
        if self.teacher is not None:
            state["teacher"] = _weights_snapshot(self.teacher)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output (raises on weights of another architecture).

        A state without optimizer state (a site store milestone) starts a fresh optimizer:
        moments estimated on other weights must not drive the next steps.
        """
        self.model.load_state_dict(state["model"])
        if state.get("optimizer"):
            self.optimizer.load_state_dict(state["optimizer"])
            # The saved state carries the learning rate it was saved with; the config decides.
            for group in self.optimizer.param_groups:
                group["lr"] = self.config.lr
        else:
            self.optimizer = self._new_optimizer()
        if self.teacher is not None:
            self.teacher.load_state_dict(state.get("teacher", state["model"]))

    def reconfigure(self, method: str | None = None, config: AdaptConfig | None = None) -> None:
        """Change the method and/or hyper-parameters between images, keeping the adapted
        weights, the optimizer state and the pretrained reference used by :meth:`reset_weights`."""
        if self.active:
            raise SessionStateError("accept or discard the current image before changing adaptation settings")
        state, pretrained = self.state_dict(), self.pretrained
        self.__init__(self.model, method or self.method, config or self.config)
        self.pretrained = pretrained
        self.load_state_dict(state)

    def reset_weights(self) -> None:
        """Back to the pretrained weights, with a fresh optimizer."""
        self.discard()
        self.model.load_state_dict(self.pretrained)
        self.optimizer = self._new_optimizer()
        if self.teacher is not None:
            self.teacher.load_state_dict(self.pretrained)

    # -- internals: prediction ------------------------------------------------------------------

    def _require_image(self) -> PreparedImage:
        if self.prepared is None:
            raise SessionStateError("no image is open: call start(image) first")
        return self.prepared

    def _clear_image(self) -> None:
        self.prepared: PreparedImage | None = None
        self._clicks: list[Click] = []
        self._wclicks: list[Click] = []
        self._working_labels: list[torch.Tensor] = []
        self._results: list[ClickResult] = []
        self._snapshots: list[dict | None] = []
        self._image_start: dict | None = None

    def _predictor(self) -> ClickSegmenter:
        return self.teacher if self.teacher is not None else self.model

    def _predict(self, clicks: list[Click]) -> torch.Tensor:
        predictor = self._predictor()
        predictor.eval()
        return predictor.logits(self.prepared, clicks)

    def _result(self, logits: torch.Tensor, click: Click, started: float, adapt_ms: float, loss: float | None) -> ClickResult:
        probs = probabilities(self.prepared.logits_to_original(logits))[0]
        mask = probs.argmax(dim=0).to(torch.uint8).numpy()
        latency = (time.perf_counter() - started) * 1000.0
        return ClickResult(mask, probs.numpy().astype(np.float32), click, latency, adapt_ms, loss)

    # -- internals: losses and steps --------------------------------------------------------------

    def _oaims_loss(self, logits: torch.Tensor, target: torch.Tensor, clicks: list[Click]) -> torch.Tensor:
        """``L_DF + beta * L_CCG`` of Algorithm 1 (lines 18 and 31)."""
        cfg = self.config
        loss = self.dice_focal(logits, target[None])
        if clicks:
            loss = loss + cfg.beta * ccg_loss(
                logits, target[None], [clicks], cfg.sigma, cfg.ccg_class_limited, cfg.ccg_kernel
            )
        return loss

    def _step(self, loss: torch.Tensor) -> float:
        value = float(loss.detach())
        if not np.isfinite(value):
            raise FloatingPointError(f"non-finite adaptation loss {value}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return value

    def _train_logits(self, clicks: list[Click]) -> torch.Tensor:
        self.model.train()
        return self.model.logits(self.prepared, clicks)

    def _mid_interaction(self, click: Click, snapshot: dict) -> float | None:
        """One adaptation step after ``click`` (already appended); ``snapshot`` is restored if it fails."""
        strategy: dict[str, Callable[[Click], torch.Tensor]] = {
            "mi": self._mi_loss_oaims,
            "pi+mi": self._mi_loss_oaims,
            "ia+sa": self._mi_loss_ia_sa,
            "tsca": self._mi_loss_tsca,
            "ce-mi+pi": lambda _: self._self_training_loss("ce", self._wclicks),
            "ent-mi+pi": lambda _: self._self_training_loss("ent", self._wclicks),
        }
        try:
            value = self._step(strategy[self._base](click))
        except FloatingPointError:
            self.load_state_dict(snapshot)
            return None
        if self.teacher is not None:
            self._update_teacher()
        return value

    def _mi_initial_labels(self) -> torch.Tensor:
        """Hard labels ``(Hp, Wp)`` of P_t^initial: the prediction with every click, no gradient."""
        with torch.no_grad():
            return hard_labels(self._predict(self._wclicks))[0]

    def _mi_loss_oaims(self, click: Click) -> torch.Tensor:
        """Algorithm 1, lines 17-18: pseudo label P_t^initial (no gradient) supervises P_{t-1}."""
        pseudo_label = self._mi_initial_labels()
        if self.config.mi_click_label:
            pseudo_label = stamp_clicks(pseudo_label, [click], self.config.sigma)
        previous = self._train_logits(self._wclicks[:-1])
        return self._oaims_loss(previous, pseudo_label, [click])

    def _clicked_pixels(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows, columns and labels of the image's clicks in working pixels, each ``(N,)``."""
        return (
            torch.tensor([c.position[0] for c in self._wclicks]),
            torch.tensor([c.position[1] for c in self._wclicks]),
            torch.tensor([c.label for c in self._wclicks]),
        )

    def _mi_loss_ia_sa(self, click: Click) -> torch.Tensor:
        """IA+SA-style: sparse cross-entropy on the clicked pixels, regularised towards the
        image's first prediction and towards the initial weights (Kontogianni et al.)."""
        cfg = self.config
        logits = self._train_logits(self._wclicks)
        rows, cols, labels = self._clicked_pixels()
        target = self._working_labels[0].clone()
        target[rows, cols] = labels
        click_ce = pixel_cross_entropy(logits, target[None])[0]
        sparse = click_ce[rows, cols].mean()
        first_prediction = click_ce.mean()
        decay = sum(((p - self.pretrained[name]) ** 2).sum() for name, p in self.model.named_parameters() if name in self.pretrained)
        return sparse + cfg.ia_mask_weight * first_prediction + cfg.ia_weight_decay * decay

    def _mi_loss_tsca(self, click: Click) -> torch.Tensor:
        """TSCA-style: student trained with a focal loss on the clicked pixels plus consistency
        with the EMA teacher's prediction; the teacher makes the predictions shown."""
        cfg = self.config
        logits = self._train_logits(self._wclicks)
        with torch.no_grad():
            teacher_labels = hard_labels(self._predict(self._wclicks))[0]
        rows, cols, labels = self._clicked_pixels()
        clicked = logits[0, :, rows, cols].T[..., None]  # (N, L, 1): the clicked pixels as a batch
        focal = FocalLoss(use_softmax=not self.card.binary, to_onehot_y=not self.card.binary)
        sparse = focal(clicked, labels.view(-1, 1, 1).float() if self.card.binary else labels.view(-1, 1, 1))
        consistency = pixel_cross_entropy(logits, teacher_labels[None]).mean()
        return sparse + cfg.tsca_consistency * consistency

    def _update_teacher(self) -> None:
        momentum = self.config.tsca_momentum
        with torch.no_grad():
            student = dict(self.model.state_dict())
            for name, value in self.teacher.state_dict().items():
                if value.is_floating_point():
                    value.mul_(momentum).add_(student[name], alpha=1.0 - momentum)
                else:
                    value.copy_(student[name])

    def _self_training_loss(self, kind: str, clicks: list[Click]) -> torch.Tensor:
        """Appendix A.10: cross-entropy against the model's own hard prediction, or entropy."""
        logits = self._train_logits(clicks)
        if kind == "ce":
            return pixel_cross_entropy(logits, hard_labels(logits.detach())).mean()
        probs = probabilities(logits)
        return -(probs * torch.log(probs.clamp_min(1e-8))).sum(dim=1).mean()

    def _post_interaction(self, final: torch.Tensor, started: float, n_clicks: int) -> AcceptResult:
        """Algorithm 1, lines 22-32, with a guard that undoes a harmful update."""
        before = self.state_dict()
        with torch.no_grad():
            dice_before = mean_foreground_dice(hard_labels(self._predict(self._wclicks))[0], final, self.card.num_classes)
        losses: dict[str, float] = {}
        try:
            if self._base == "pi" or self._base == "pi+mi":
                first = self._wclicks[:1]
                with torch.no_grad():
                    first_labels = hard_labels(self._predict(first))[0]
                losses["stage1"] = self._step(self.dice_focal(self._train_logits(first), final[None]))
                generated = ranked_error_clicks(
                    first_labels.numpy(), final.numpy(), self.card.num_classes, n_clicks, self._rng()
                )
                if generated:
                    losses["stage2"] = self._step(self._oaims_loss(self._train_logits(generated), final, generated))
            else:
                kind = "ce" if self._base.startswith("ce") else "ent"
                losses[kind] = self._step(self._self_training_loss(kind, self._wclicks))
        except FloatingPointError as error:
            self.load_state_dict(before)
            return AcceptResult(False, f"update rejected: {error}", (time.perf_counter() - started) * 1000.0,
                                losses, n_clicks, dice_before)
        with torch.no_grad():
            dice_after = mean_foreground_dice(hard_labels(self._predict(self._wclicks))[0], final, self.card.num_classes)
        finite = all(torch.isfinite(p).all() for p in self.model.parameters())
        if not finite or dice_after < dice_before - self.config.max_dice_drop:
            self.load_state_dict(before)
            reason = "non-finite weights" if not finite else (
                f"update rejected: Dice on the accepted image fell from {dice_before:.3f} to {dice_after:.3f}"
            )
            return AcceptResult(False, reason, (time.perf_counter() - started) * 1000.0, losses, n_clicks,
                                dice_before, dice_after)
        return AcceptResult(True, "", (time.perf_counter() - started) * 1000.0, losses, n_clicks, dice_before, dice_after)

    def _rng(self) -> np.random.Generator:
        """Seeded per image from its clicks, so an accept is reproducible."""
        seed = hash(tuple((c.position, c.label) for c in self._wclicks)) & 0xFFFFFFFF
        return np.random.default_rng(seed)
