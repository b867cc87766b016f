"""The online interactive session: OAIMS Algorithm 1 and the baselines it is compared with.

One :class:`InteractiveSession` serves the Slicer Logic, the simulated-clinician benchmark
and the tests. It holds a model and its optimizer across images (that is the "online"
in online adaptation) and, for the image being segmented, the clicks and predictions:

* :meth:`~InteractiveSession.start` an image (raw intensities, the model card's
  normalisation is applied here),
* :meth:`~InteractiveSession.add_click` returns the new prediction; with Mid-Interaction
  adaptation (MI) on, it first takes one optimizer step (Algorithm 1, lines 15-20); its
  ``on_first_feedback`` callback receives the prediction with the new click and the old
  weights (P_t^initial, one forward pass) before the step,
* :meth:`~InteractiveSession.undo` the last click (prediction *and* that click's update),
* :meth:`~InteractiveSession.accept` the segment: with Post-Interaction adaptation (PI)
  on, two optimizer steps using the accepted mask as pseudo ground truth (lines 22-32),
* :meth:`~InteractiveSession.discard` the image and every update it caused.

Methods (``method=``): the names of :data:`OAIMSSegment.methods.METHODS`; each method's MI loss
and PI update live in :mod:`OAIMSSegment.methods`, the session keeps the image, its clicks (one
:class:`ClickStep` per click), the optimizer and the safety nets (undo, discard, the PI guard).

Work is not repeated (issue 21; ``reuse_graphs=False`` keeps the old computation, the reference
for the tests and ``bench``): the shown prediction is computed with its graph kept when the next
MI step needs it as P_{t-1}; P_t^initial serves the first feedback and the MI pseudo label; the PI
drift guard's "before" is the last click's prediction; PI stage 1 takes the first-click labels
and gradients from one pass. Each is used only when it is provably the same computation
(:mod:`OAIMSSegment.reuse`). Undo snapshots are copied into reused buffers
(:mod:`OAIMSSegment.snapshot`) instead of deep copies of :meth:`~InteractiveSession.state_dict`,
and Adam updates all parameters in one multi-tensor step (``foreach``: the same arithmetic).

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
from torch.nn.utils import parameters_to_vector

from OAIMSSegment.adapt_config import DEFAULT_LR, AdaptConfig  # noqa: F401 (DEFAULT_LR: importable from here, as before)
from OAIMSSegment.clicks import Click
from OAIMSSegment.errors import SessionStateError
from OAIMSSegment.losses import DiceFocal
from OAIMSSegment.methods import METHODS as METHOD_CLASSES
from OAIMSSegment.methods import AdaptationMethod, get_method, weights_snapshot
from OAIMSSegment.metrics import mean_foreground_dice
from OAIMSSegment.model import ClickSegmenter, PreparedImage, class_map, hard_labels, probabilities, set_mode
from OAIMSSegment.reuse import train_equals_eval, weights_version
from OAIMSSegment.snapshot import SnapshotPool, StateSnapshot
from OAIMSSegment.validation import accepted_mask, click_input

#: Every method name, in registry order (:data:`OAIMSSegment.methods.METHODS` maps them to classes).
METHODS = tuple(METHOD_CLASSES)


def method_name(mi: bool, pi: bool) -> str:
    """The OAIMS method for a pair of MI / PI switches (as in the Slicer module)."""
    return {(True, True): "pi+mi", (True, False): "mi", (False, True): "pi", (False, False): "frozen"}[(mi, pi)]


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


@dataclass
class ClickStep:
    """One click of the open image, as :meth:`InteractiveSession.undo` needs it.

    Attributes:
        click: the click in original pixel coordinates.
        working_click: the same click in working pixels.
        snapshot: the weights and optimizer state before the click's MI update (None when the
            click caused none): a :class:`~OAIMSSegment.snapshot.StateSnapshot`, whose buffers are
            reused once the click is undone or its image closed (with ``reuse_graphs=False``, an
            :meth:`InteractiveSession.state_dict`).
        labels: the prediction with the clicks up to this one, working class map ``(Hp, Wp)``.
        result: what :meth:`InteractiveSession.add_click` returned.
    """

    click: Click
    working_click: Click
    snapshot: StateSnapshot | dict | None
    labels: torch.Tensor
    result: ClickResult


@dataclass
class _Pass:
    """Logits of one forward pass and what they were computed from: a pass is reused only for
    the same ``clicks`` (working pixels) and the same weights (:func:`weights_version`)."""

    clicks: tuple[Click, ...]
    version: tuple[int, ...]
    logits: torch.Tensor


class InteractiveSession:
    """Online interactive segmentation with a persistent, adapting model.

    Args:
        model: the segmentation model; its weights are updated in place by adaptive methods.
        method: one of :data:`METHODS`.
        config: adaptation hyper-parameters (the method's overrides are applied on top).
        reuse_graphs: reuse forward passes and undo buffers (see the module docstring); False
            repeats the passes and deep-copies the state as before issue 21 (the same weights
            and masks, more work: the reference the tests and ``bench`` compare with).
    """

    def __init__(self, model: ClickSegmenter, method: str = "pi+mi", config: AdaptConfig | None = None,
                 reuse_graphs: bool = True) -> None:
        method_class = get_method(method)
        self.model = model
        self.card = model.card
        self.reuse_graphs = reuse_graphs
        self._mode_free = train_equals_eval(model.net)
        self.pretrained = weights_snapshot(model)
        self._configure(method, method_class, config or AdaptConfig())
        self.adaptation: AdaptationMethod = method_class(model)
        self.optimizer = self._new_optimizer()
        self._snapshots = SnapshotPool()
        self._steps: list[ClickStep] = []
        self._image_start: StateSnapshot | dict | None = None
        self._clear_image()

    def _configure(self, method: str, method_class: type[AdaptationMethod], config: AdaptConfig) -> None:
        """Set the method name, the effective config and the loss it parameterises."""
        self.method = method
        self._requested_config = config
        self.config = replace(config, **method_class.overrides).for_model(self.card)
        self.dice_focal = DiceFocal(binary=self.card.binary, alpha=self.config.alpha)

    # -- configuration ------------------------------------------------------------------------

    @property
    def mi_enabled(self) -> bool:
        return self.adaptation.mi

    @property
    def pi_enabled(self) -> bool:
        return self.adaptation.pi

    # -- image lifecycle ------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """True between :meth:`start` and :meth:`accept` / :meth:`discard`."""
        return self.prepared is not None

    @property
    def steps(self) -> list[ClickStep]:
        """The open image's clicks, one :class:`ClickStep` each, in order."""
        return list(self._steps)

    @property
    def clicks(self) -> list[Click]:
        """The image's clicks, in original pixel coordinates."""
        return [step.click for step in self._steps]

    @property
    def working_clicks(self) -> list[Click]:
        """The image's clicks, in working pixels."""
        return [step.working_click for step in self._steps]

    @property
    def mask(self) -> np.ndarray | None:
        """The current class map ``(H, W)`` (None before the first click)."""
        return self._steps[-1].result.mask if self._steps else None

    def start(self, image: np.ndarray) -> None:
        """Begin a new image (raw intensities, ``(H, W)`` or ``(C, H, W)``).

        An image still open is discarded first, with its updates. Raises
        :class:`~OAIMSSegment.errors.InvalidImageError` for an unusable image.
        """
        prepared = self.model.prepare(image)
        if self.active:
            self.discard()
        self.prepared = prepared
        self._image_start = self._snapshot()

    def add_click(self, position: tuple[float, ...], label: int,
                  on_first_feedback: Callable[[ClickResult], None] | None = None) -> ClickResult:
        """Add a click (``position`` an array index ``(row, col)`` in original pixels; ``label``
        the class, 0 = background) and return the new prediction.

        With MI on, the click first triggers one optimizer step (Algorithm 1, lines 17-19)
        unless it is the image's first click, which has no previous prediction to correct.

        ``on_first_feedback(result)``, when given, is called once, as soon as a prediction with
        the new click exists: before an MI step, with the prediction of the new click and the
        weights before the step (P_t^initial: one forward pass, ``adapt_ms`` 0, ``loss`` None),
        which the returned P_t then replaces; without an MI step, with the returned result
        itself. An exception it raises aborts the click like any other (nothing is recorded).

        Raises :class:`~OAIMSSegment.errors.InvalidClickError` for a position that is not a
        finite ``(row, col)`` inside the image or a label that is not a class of the model.
        """
        prepared = self._require_image()
        position, label = click_input(position, label, self.card.num_classes)
        started = time.perf_counter()
        click = self.model.working_click(prepared, Click(position, label))
        original = Click(tuple(int(round(v)) for v in position), label)
        clicks = self.working_clicks + [click]
        snapshot = self._snapshot() if self.mi_enabled and self._steps else None
        loss, adapt_ms = None, 0.0
        try:
            if snapshot is not None:
                adapt_start = time.perf_counter()
                if on_first_feedback is not None:
                    on_first_feedback(self._result(self.initial_logits(clicks), original, started, 0.0, None))
                loss = self._mid_interaction(clicks, snapshot)
                adapt_ms = (time.perf_counter() - adapt_start) * 1000.0
            logits = self._shown_logits(clicks)
            result = self._result(logits, original, started, adapt_ms, loss)
            if snapshot is None and on_first_feedback is not None:
                on_first_feedback(result)
        except BaseException:
            self._kept = None
            if snapshot is not None:  # the click is not recorded, so neither is its update
                self._restore(snapshot)
                self._snapshots.release(snapshot)
            raise
        finally:
            self._initial = None
        self._steps.append(ClickStep(original, click, snapshot, hard_labels(logits)[0], result))
        self._shown_version = self._weights_version()
        return result

    def resume(self, image: np.ndarray, clicks: list[Click]) -> np.ndarray | None:
        """Re-open an image segmented earlier with its ``clicks`` (original pixels) and their
        predictions, **without** adapting (their MI steps were taken when they were made), e.g. to
        accept it (PI) or click on it again. Returns the mask (None without clicks). An image still
        open is discarded first, as by :meth:`start`; undoing a resumed click reverts no update."""
        self.start(image)
        for given in clicks:
            started = time.perf_counter()
            original = Click(tuple(int(round(float(v))) for v in given.position), int(given.label))
            working = self.model.working_click(self.prepared, Click(tuple(given.position), int(given.label)))
            with torch.no_grad():
                logits = self.predict_logits(self.working_clicks + [working])
            result = self._result(logits, original, started, 0.0, None)
            self._steps.append(ClickStep(original, working, None, hard_labels(logits)[0], result))
        return self.mask

    def undo(self) -> np.ndarray | None:
        """Remove the last click, revert the update it caused, and return the previous mask."""
        self._require_image()
        if not self._steps:
            raise SessionStateError("there is no click to undo")
        snapshot = self._steps.pop().snapshot
        self._kept = self._shown_version = None  # passes of the undone click
        if snapshot is not None:
            self._restore(snapshot)
            self._snapshots.release(snapshot)
        return self.mask

    def discard(self) -> None:
        """Drop the image and revert every update made while segmenting it."""
        if self.active and self._image_start is not None:
            self._restore(self._image_start)
        self._clear_image()

    def accept(self, mask: np.ndarray | None = None) -> AcceptResult:
        """Accept the segment and run post-interaction adaptation (when the method has it).

        Args:
            mask: the accepted class map ``(H, W)`` at the original size, e.g. after the
                clinician edited it; None accepts the current prediction.

        Raises :class:`~OAIMSSegment.errors.InvalidMaskError` (the image stays open) for a mask
        of another shape, with NaN, fractional or unknown labels.
        """
        prepared = self._require_image()
        if not self._steps:
            raise SessionStateError("nothing to accept: the image has no clicks")
        started = time.perf_counter()
        n_clicks = len(self._steps)
        if mask is not None:
            final = prepared.mask_to_working(accepted_mask(mask, prepared.original_shape, self.card.num_classes))
        else:
            final = self._steps[-1].labels
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
        return torch.optim.Adam(self.model.parameters(), lr=self.config.lr, foreach=self._foreach)

    @property
    def _foreach(self) -> bool | None:
        """Adam's multi-tensor step (bit for bit the per-tensor loop's arithmetic on CPU) or torch's default."""
        return True if self.reuse_graphs else None

    def _snapshot(self) -> StateSnapshot | dict:
        """The weights, optimizer and method state, for :meth:`_restore` (a deep copy on the old path)."""
        if not self.reuse_graphs:
            return self.state_dict()
        return self._snapshots.capture(self.model, self.optimizer, self.adaptation.state_dict())

    def _restore(self, snapshot: StateSnapshot | dict) -> None:
        if isinstance(snapshot, dict):
            return self.load_state_dict(snapshot)
        self._kept = None  # a kept graph is of the weights being replaced
        snapshot.restore(self.model, self.optimizer, self.adaptation)

    def state_dict(self) -> dict:
        """Model weights and optimizer state (plus what the method keeps, e.g. TSCA's teacher),
        for the site store."""
        state = {"model": weights_snapshot(self.model), "optimizer": copy.deepcopy(self.optimizer.state_dict())}
        state.update(self.adaptation.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output (raises on weights of another architecture).

        A state without optimizer state (a site store milestone) starts a fresh optimizer:
        moments estimated on other weights must not drive the next steps.
        """
        self._kept = None  # a kept graph is of the weights being replaced
        self.model.load_state_dict(state["model"])
        if state.get("optimizer"):
            self.optimizer.load_state_dict(state["optimizer"])
            self._set_learning_rate()  # the saved state carries the settings it was saved with; the config decides
        else:
            self.optimizer = self._new_optimizer()
        self.adaptation.load_state_dict(state)

    def _set_learning_rate(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr
            group["foreach"] = self._foreach

    def reconfigure(self, method: str | None = None, config: AdaptConfig | None = None) -> None:
        """Change the method and/or hyper-parameters between images, keeping the adapted
        weights, the optimizer state and the pretrained reference used by :meth:`reset_weights`.

        The new method's overrides apply to ``config`` (default: the config last asked for)."""
        if self.active:
            raise SessionStateError("accept or discard the current image before changing adaptation settings")
        method = method or self.method
        method_class = get_method(method)
        if method != self.method:
            state = self.state_dict()
            self.adaptation = method_class(self.model)
            self.adaptation.load_state_dict(state)
        self._configure(method, method_class, config or self._requested_config)
        self._set_learning_rate()

    def reset_weights(self) -> None:
        """Back to the pretrained weights, with a fresh optimizer."""
        self.discard()
        self.model.load_state_dict(self.pretrained)
        self.optimizer = self._new_optimizer()
        self.adaptation.load_state_dict({"model": self.pretrained})

    # -- for the adaptation methods (:mod:`OAIMSSegment.methods`) ----------------------------------

    def predict_logits(self, clicks: list[Click]) -> torch.Tensor:
        """Logits ``(1, 1|K, Hp, Wp)`` of the method's predictor (eval mode) on the open image with
        ``clicks`` (working pixels); the caller decides about gradients."""
        predictor = self.adaptation.predictor(self)
        set_mode(predictor, training=False)
        return predictor.logits(self.prepared, clicks)

    def train_logits(self, clicks: list[Click]) -> torch.Tensor:
        """Logits ``(1, 1|K, Hp, Wp)`` of the adapted model in train mode, with gradients."""
        set_mode(self.model, training=True)
        return self.model.logits(self.prepared, clicks)

    def initial_logits(self, clicks: list[Click]) -> torch.Tensor:
        """P_t^initial: :meth:`predict_logits` with ``clicks`` at the current weights, no gradient,
        computed once per click (the first feedback and the MI pseudo label share it)."""
        version = self._weights_version()
        initial = self._initial
        if self.reuse_graphs and initial is not None and initial.clicks == tuple(clicks) and initial.version == version:
            return initial.logits
        with torch.no_grad():
            logits = self.predict_logits(clicks)
        self._initial = _Pass(tuple(clicks), version, logits)
        return logits

    def previous_logits(self, clicks: list[Click]) -> torch.Tensor:
        """P_{t-1} for the MI step: :meth:`train_logits` with ``clicks`` (the image's clicks before
        the new one). The shown prediction's kept graph when it is this computation (same clicks,
        same weights), else a new forward pass. A graph is freed by its backward pass, so it is
        handed out once."""
        kept, self._kept = self._kept, None
        if kept is not None and kept.clicks == tuple(clicks) and kept.version == self._weights_version():
            return kept.logits
        return self.train_logits(clicks)

    def train_logits_and_labels(self, clicks: list[Click]) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`train_logits` with ``clicks`` and the hard labels ``(Hp, Wp)`` of
        :meth:`predict_logits` with the same clicks and weights: one pass when the two are the
        same computation, two otherwise."""
        logits = self.train_logits(clicks)
        if self._passes_interchangeable():
            return logits, hard_labels(logits.detach())[0]
        with torch.no_grad():
            return logits, hard_labels(self.predict_logits(clicks))[0]

    def optimizer_step(self, loss: torch.Tensor) -> float:
        """One optimizer step on ``loss``; returns its value before the step. Raises
        FloatingPointError (taking no step) for a non-finite loss."""
        value = float(loss.detach())
        if not np.isfinite(value):
            raise FloatingPointError(f"non-finite adaptation loss {value}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return value

    # -- internals ------------------------------------------------------------------------------

    def _require_image(self) -> PreparedImage:
        if self.prepared is None:
            raise SessionStateError("no image is open: call start(image) first")
        return self.prepared

    def _clear_image(self) -> None:
        self._snapshots.release(self._image_start, *[step.snapshot for step in self._steps])
        self.prepared: PreparedImage | None = None
        self._steps = []
        self._image_start = None
        self._kept: _Pass | None = None  # the shown prediction with its graph (P_{t-1} of the next MI step)
        self._initial: _Pass | None = None  # P_t^initial of the click in progress
        self._shown_version: tuple[int, ...] | None = None  # weights of the last click's prediction

    def _weights_version(self) -> tuple[int, ...]:
        """:func:`~OAIMSSegment.reuse.weights_version` of the adapted model and of the predictor."""
        predictor = self.adaptation.predictor(self)
        return weights_version(self.model) if predictor is self.model else weights_version(self.model, predictor)

    def _passes_interchangeable(self) -> bool:
        """Whether a train-mode pass of the adapted model is the shown predictor's eval-mode pass."""
        return self.reuse_graphs and self._mode_free and self.adaptation.predictor(self) is self.model

    def _shown_logits(self, clicks: list[Click]) -> torch.Tensor:
        """The prediction shown after a click, ``(1, 1|K, Hp, Wp)`` without graph. When the next
        click's MI step takes it as P_{t-1} (:meth:`previous_logits`), it is computed in train
        mode with gradients and its graph kept: the next step then skips that forward pass."""
        self._kept = None
        if self.mi_enabled and self.adaptation.uses_previous_prediction and self._passes_interchangeable():
            logits = self.train_logits(clicks)
            if logits.requires_grad:  # not under a caller's torch.no_grad()
                self._kept = _Pass(tuple(clicks), self._weights_version(), logits)
            return logits.detach()
        with torch.no_grad():
            return self.predict_logits(clicks)

    def _result(self, logits: torch.Tensor, click: Click, started: float, adapt_ms: float, loss: float | None) -> ClickResult:
        probs = probabilities(self.prepared.logits_to_original(logits))[0]
        mask = class_map(probs, dim=0).to(torch.uint8).cpu().numpy()
        latency = (time.perf_counter() - started) * 1000.0
        return ClickResult(mask, probs.cpu().numpy().astype(np.float32), click, latency, adapt_ms, loss)

    def _mid_interaction(self, clicks: list[Click], snapshot: StateSnapshot | dict) -> float | None:
        """One adaptation step after ``clicks[-1]``; ``snapshot`` is restored if its loss is not finite."""
        try:
            value = self.optimizer_step(self.adaptation.mi_loss(self, clicks))
        except FloatingPointError:
            self._restore(snapshot)
            return None
        self.adaptation.after_mi_step(self)
        return value

    def _prediction_dice(self, final: torch.Tensor) -> float:
        """Mean foreground Dice of the prediction with the image's clicks against ``final``."""
        with torch.no_grad():
            labels = hard_labels(self.predict_logits(self.working_clicks))[0]
        return mean_foreground_dice(labels, final, self.card.num_classes)

    def _post_interaction(self, final: torch.Tensor, started: float, n_clicks: int) -> AcceptResult:
        """The method's PI update (Algorithm 1, lines 22-32), undone if it harms the accepted image."""
        self._snapshots.release(self._image_start)  # the image closes after its accept: its start's buffers serve
        before = self._image_start = self._snapshot()  # and are released with the image
        if self.reuse_graphs and self._shown_version == self._weights_version():  # the last click's prediction
            dice_before = mean_foreground_dice(self._steps[-1].labels, final, self.card.num_classes)
        else:
            dice_before = self._prediction_dice(final)
        elapsed = lambda: (time.perf_counter() - started) * 1000.0  # noqa: E731
        try:
            losses = self.adaptation.pi_update(self, final, n_clicks)
        except FloatingPointError as error:
            self._restore(before)
            return AcceptResult(False, f"update rejected: {error}", elapsed(), {}, n_clicks, dice_before)
        dice_after = self._prediction_dice(final)
        finite = bool(torch.isfinite(parameters_to_vector(self.model.parameters())).all())  # one pass, not one a tensor
        if not finite or dice_after < dice_before - self.config.max_dice_drop:
            self._restore(before)
            reason = "non-finite weights" if not finite else (
                f"update rejected: Dice on the accepted image fell from {dice_before:.3f} to {dice_after:.3f}"
            )
            return AcceptResult(False, reason, elapsed(), losses, n_clicks, dice_before, dice_after)
        return AcceptResult(True, "", elapsed(), losses, n_clicks, dice_before, dice_after)
