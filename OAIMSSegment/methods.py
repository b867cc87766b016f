"""The adaptation methods an :class:`~OAIMSSegment.session.InteractiveSession` can run.

One class per method. A method declares whether it adapts per click (``mi``, Mid-Interaction)
and on accept (``pi``, Post-Interaction), and holds its MI loss and its PI update; the session
owns the image, the clicks, the optimizer and the safety nets (undo snapshots, the PI drift
guard) and passes itself to the method's hooks:

* ``mi_loss(session, clicks)``: the loss of the MI step after ``clicks[-1]`` (working pixels;
  the new click is last); the session takes the optimizer step. The session's passes
  ``initial_logits`` (P_t^initial, shared with the first feedback), ``previous_logits``
  (P_{t-1} with gradients, from the kept graph when ``uses_previous_prediction``) and
  ``train_logits_and_labels`` (one pass for both) avoid repeating forward passes,
* ``after_mi_step(session)``: e.g. TSCA's teacher update,
* ``pi_update(session, final, n_clicks)``: the post-interaction update towards the accepted
  working class map ``final (Hp, Wp)``; returns the loss of each stage,
* ``predictor(session)``: the network whose predictions are shown (TSCA: its teacher),
* ``state_dict()`` / ``load_state_dict(state)``: what the method adds to the session's state.

:data:`METHODS` maps each name to its class; :func:`get_method` and :func:`describe_methods`
(names, one-line descriptions and the MI / PI flags, for the Slicer panel and the CLI help) read
it without building a model. A new baseline is one class and one line in :data:`METHODS`.

Methods: ``frozen`` (the non-adaptive "ICNN" backbone), OAIMS ``mi``, ``pi``, ``pi+mi``, and
re-implementations of the paper's baselines from their papers' descriptions: ``ia+sa``,
``tsca``, and the self-training variants of Appendix A.10 ``ce-pi``, ``ce-mi+pi``, ``ent-pi``,
``ent-mi+pi``. The CCG ablations (paper Table 5, Appendix A.8) are ``pi+mi/no-class`` (no
class-limited indicator), ``pi+mi/uniform`` (no Gaussian) and ``pi+mi/sigma0`` (the clicked pixel
only). ``pi+mi/click-label`` is our extension, not the paper's: MI's pseudo label agrees with the
new click within ``sigma`` pixels of it (see :class:`~OAIMSSegment.session.AdaptConfig`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Sequence

import numpy as np
import torch
from monai.losses import FocalLoss

from OAIMSSegment.clicks import Click, ranked_error_clicks, stamp_clicks
from OAIMSSegment.losses import ccg_loss, pixel_cross_entropy
from OAIMSSegment.model import hard_labels, probabilities

if TYPE_CHECKING:
    from OAIMSSegment.model import ClickSegmenter
    from OAIMSSegment.session import InteractiveSession


def weights_snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``module``'s state dict."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class AdaptationMethod:
    """A method that adapts nothing (``frozen``); every method derives from it and overrides
    the hooks it needs.

    Class attributes:
        name: the registry name (``--methods``, ``InteractiveSession(method=...)``).
        description: one line for the CLI help and the Slicer panel.
        mi: adapts after every click but an image's first (Algorithm 1, lines 15-20).
        pi: adapts when the segment is accepted (Algorithm 1, lines 22-32).
        overrides: :class:`~OAIMSSegment.session.AdaptConfig` fields this method fixes.
        uses_previous_prediction: ``mi_loss`` takes P_{t-1} from ``session.previous_logits``, so
            the session keeps the graph of each shown prediction for the next click.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    mi: ClassVar[bool] = False
    pi: ClassVar[bool] = False
    overrides: ClassVar[dict[str, object]] = {}
    uses_previous_prediction: ClassVar[bool] = False

    def __init__(self, model: ClickSegmenter) -> None:
        """``model``: the session's network (a method may copy it, e.g. TSCA's teacher)."""

    def predictor(self, session: InteractiveSession) -> ClickSegmenter:
        """The network whose predictions the session shows."""
        return session.model

    def mi_loss(self, session: InteractiveSession, clicks: Sequence[Click]) -> torch.Tensor:
        """Loss of the MI step after ``clicks[-1]`` (``clicks`` in working pixels, the new one last)."""
        raise NotImplementedError(f"method {self.name!r} has no mid-interaction update")

    def after_mi_step(self, session: InteractiveSession) -> None:
        """Called after each successful MI optimizer step."""

    def pi_update(self, session: InteractiveSession, final: torch.Tensor, n_clicks: int) -> dict[str, float]:
        """Post-interaction update towards ``final`` (working class map ``(Hp, Wp)``); the loss
        of each stage before its step. Raises FloatingPointError on a non-finite loss."""
        raise NotImplementedError(f"method {self.name!r} has no post-interaction update")

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """What the method adds to :meth:`InteractiveSession.state_dict` (nothing here)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore from a session state (``state["model"]`` is always there)."""


def variant(base: type[AdaptationMethod], name: str, description: str, **attributes: object) -> type[AdaptationMethod]:
    """A method that is ``base`` with other class attributes (flags, ``kind``, config ``overrides``)."""
    namespace = {"name": name, "description": description, "__doc__": description, "__module__": __name__}
    return type(f"{base.__name__}[{name}]", (base,), {**namespace, **attributes})


Frozen = variant(AdaptationMethod, "frozen", "the pretrained model, never adapted (the paper's ICNN)")


# -- OAIMS -----------------------------------------------------------------------------------------


def oaims_loss(session: InteractiveSession, logits: torch.Tensor, target: torch.Tensor, clicks: Sequence[Click]) -> torch.Tensor:
    """``L_DF + beta * L_CCG`` of Algorithm 1 (lines 18 and 31): ``logits (1, 1|K, Hp, Wp)``
    against the class map ``target (Hp, Wp)``, the CCG term centred on ``clicks``."""
    cfg = session.config
    loss = session.dice_focal(logits, target[None])
    if clicks:
        loss = loss + cfg.beta * ccg_loss(logits, target[None], [clicks], cfg.sigma, cfg.ccg_class_limited, cfg.ccg_kernel)
    return loss


class OAIMS(AdaptationMethod):
    """OAIMS with MI and PI (Algorithm 1); :class:`OAIMSMidInteraction` and
    :class:`OAIMSPostInteraction` switch one of them off."""

    name = "pi+mi"
    description = "OAIMS: a CCG step after every click and a two-stage update on accept"
    mi = True
    pi = True
    uses_previous_prediction = True

    def initial_labels(self, session: InteractiveSession, clicks: Sequence[Click]) -> torch.Tensor:
        """Hard labels ``(Hp, Wp)`` of P_t^initial: the prediction with every click, no gradient."""
        return hard_labels(session.initial_logits(list(clicks)))[0]

    def mi_loss(self, session: InteractiveSession, clicks: Sequence[Click]) -> torch.Tensor:
        """Algorithm 1, lines 17-18: pseudo label P_t^initial (no gradient) supervises P_{t-1}
        (with gradient: the previous click's shown prediction, whose graph the session kept)."""
        click = clicks[-1]
        pseudo_label = self.initial_labels(session, clicks)
        if session.config.mi_click_label:
            pseudo_label = stamp_clicks(pseudo_label, [click], session.config.sigma)
        previous = session.previous_logits(list(clicks[:-1]))
        return oaims_loss(session, previous, pseudo_label, [click])

    def pi_update(self, session: InteractiveSession, final: torch.Tensor, n_clicks: int) -> dict[str, float]:
        """Algorithm 1, lines 22-32: stage 1 refits the first-click prediction to ``final``;
        stage 2 trains on up to ``n_clicks`` clicks generated in its remaining errors (given with
        the localization click when ``config.stage2_localization``)."""
        clicks = session.working_clicks
        first_logits, first_labels = session.train_logits_and_labels(clicks[:1])
        losses = {"stage1": session.optimizer_step(session.dice_focal(first_logits, final[None]))}
        generated = ranked_error_clicks(
            first_labels.cpu().numpy(), final.cpu().numpy(), session.card.num_classes, n_clicks, _image_rng(clicks)
        )
        if generated:
            given = clicks[:1] + generated if session.config.stage2_localization else generated
            losses["stage2"] = session.optimizer_step(oaims_loss(session, session.train_logits(given), final, generated))
        return losses


def _image_rng(clicks: Sequence[Click]) -> np.random.Generator:
    """Seeded from the image's clicks, so an accept is reproducible."""
    seed = hash(tuple((c.position, c.label) for c in clicks)) & 0xFFFFFFFF
    return np.random.default_rng(seed)


OAIMSMidInteraction = variant(OAIMS, "mi", "OAIMS MI only: a CCG step after every click, none on accept", pi=False)
OAIMSPostInteraction = variant(OAIMS, "pi", "OAIMS PI only: the two-stage update on accept, none per click", mi=False)
#: The CCG ablations of paper Table 5 / Appendix A.8, and our click-label extension of MI.
NoClassCCG = variant(OAIMS, "pi+mi/no-class", "OAIMS ablation: CCG without the class-limited indicator",
                     overrides={"ccg_class_limited": False})
UniformCCG = variant(OAIMS, "pi+mi/uniform", "OAIMS ablation: CCG with a uniform window instead of the Gaussian",
                     overrides={"ccg_kernel": "uniform"})
ClickPixelCCG = variant(OAIMS, "pi+mi/sigma0", "OAIMS ablation: CCG on the clicked pixel only (sigma 0)",
                        overrides={"sigma": 0.0})
ClickLabelOAIMS = variant(
    OAIMS, "pi+mi/click-label",
    "OAIMS with MI's pseudo label made to agree with the click within sigma (our extension)",
    overrides={"mi_click_label": True},
)
#: PI stage 2 given the localization click with its generated clicks (``AdaptConfig.stage2_localization``;
#: the demo's PI), next to Algorithm 1's on real data (docs/BENCHMARKS.md section 3.3).
LocalizedStage2PI = variant(OAIMSPostInteraction, "pi/stage2-c1",
                            "OAIMS PI with stage 2 given the localization click (our change)",
                            overrides={"stage2_localization": True})
LocalizedStage2OAIMS = variant(OAIMS, "pi+mi/stage2-c1",
                               "OAIMS with PI's stage 2 given the localization click (our change)",
                               overrides={"stage2_localization": True})


# -- baselines -----------------------------------------------------------------------------------


def clicked_pixels(clicks: Sequence[Click]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows, columns and labels of ``clicks`` (working pixels), each ``(N,)``."""
    return (
        torch.tensor([c.position[0] for c in clicks]),
        torch.tensor([c.position[1] for c in clicks]),
        torch.tensor([c.label for c in clicks]),
    )


class IASA(AdaptationMethod):
    """IA+SA-style (Kontogianni et al.): sparse cross-entropy on the clicked pixels, regularised
    towards the image's first prediction and towards the initial weights."""

    name = "ia+sa"
    description = "IA+SA: cross-entropy on the clicked pixels, regularised to the first prediction and the initial weights"
    mi = True

    def mi_loss(self, session: InteractiveSession, clicks: Sequence[Click]) -> torch.Tensor:
        cfg = session.config
        logits = session.train_logits(clicks)
        rows, cols, labels = clicked_pixels(clicks)
        target = session.steps[0].labels.clone()
        target[rows, cols] = labels
        click_ce = pixel_cross_entropy(logits, target[None])[0]
        sparse = click_ce[rows, cols].mean()
        first_prediction = click_ce.mean()
        pretrained = session.pretrained
        decay = sum(((p - pretrained[name]) ** 2).sum() for name, p in session.model.named_parameters() if name in pretrained)
        return sparse + cfg.ia_mask_weight * first_prediction + cfg.ia_weight_decay * decay


class TSCA(AdaptationMethod):
    """TSCA-style: the student is trained with a focal loss on the clicked pixels plus
    consistency with an EMA teacher; the teacher makes the predictions shown."""

    name = "tsca"
    description = "TSCA: student-teacher, focal loss on the clicks plus consistency; the EMA teacher predicts"
    mi = True

    def __init__(self, model: ClickSegmenter) -> None:
        self.teacher = copy.deepcopy(model).eval()
        self.teacher.requires_grad_(False)

    def predictor(self, session: InteractiveSession) -> ClickSegmenter:
        return self.teacher

    def mi_loss(self, session: InteractiveSession, clicks: Sequence[Click]) -> torch.Tensor:
        cfg, binary = session.config, session.card.binary
        logits = session.train_logits(clicks)
        teacher_labels = hard_labels(session.initial_logits(list(clicks)))[0]  # the teacher's P_t^initial
        rows, cols, labels = clicked_pixels(clicks)
        clicked = logits[0, :, rows, cols].T[..., None]  # (N, L, 1): the clicked pixels as a batch
        focal = FocalLoss(use_softmax=not binary, to_onehot_y=not binary)
        sparse = focal(clicked, labels.view(-1, 1, 1).float() if binary else labels.view(-1, 1, 1))
        consistency = pixel_cross_entropy(logits, teacher_labels[None]).mean()
        return sparse + cfg.tsca_consistency * consistency

    def after_mi_step(self, session: InteractiveSession) -> None:
        """Teacher <- momentum * teacher + (1 - momentum) * student (buffers copied)."""
        momentum = session.config.tsca_momentum
        with torch.no_grad():
            student = dict(session.model.state_dict())
            for name, value in self.teacher.state_dict().items():
                if value.is_floating_point():
                    value.mul_(momentum).add_(student[name], alpha=1.0 - momentum)
                else:
                    value.copy_(student[name])

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"teacher": weights_snapshot(self.teacher)}

    def load_state_dict(self, state: dict) -> None:
        """The saved teacher, else (a state saved by another method) the student's weights."""
        self.teacher.load_state_dict(state.get("teacher", state["model"]))


class SelfTraining(AdaptationMethod):
    """Appendix A.10: cross-entropy against the model's own hard prediction (``kind = "ce"``) or
    its entropy (``"ent"``), after every click (the ``-mi+pi`` variants) and on accept."""

    name = "ce-pi"
    description = "self-training on accept: cross-entropy against the model's own prediction"
    pi = True
    kind: ClassVar[str] = "ce"

    def loss(self, session: InteractiveSession, clicks: Sequence[Click]) -> torch.Tensor:
        logits = session.train_logits(clicks)
        if self.kind == "ce":
            return pixel_cross_entropy(logits, hard_labels(logits.detach())).mean()
        probs = probabilities(logits)
        return -(probs * torch.log(probs.clamp_min(1e-8))).sum(dim=1).mean()

    def mi_loss(self, session: InteractiveSession, clicks: Sequence[Click]) -> torch.Tensor:
        return self.loss(session, clicks)

    def pi_update(self, session: InteractiveSession, final: torch.Tensor, n_clicks: int) -> dict[str, float]:
        return {self.kind: session.optimizer_step(self.loss(session, session.working_clicks))}


SelfTrainingPerClick = variant(
    SelfTraining, "ce-mi+pi",
    "self-training after every click and on accept: cross-entropy against the model's own prediction", mi=True,
)
EntropyMinimisation = variant(SelfTraining, "ent-pi", "entropy minimisation on accept", kind="ent")
EntropyMinimisationPerClick = variant(
    SelfTraining, "ent-mi+pi", "entropy minimisation after every click and on accept", mi=True, kind="ent"
)


# -- registry --------------------------------------------------------------------------------------

#: Every method by name, in the order of the CLI help and the Slicer panel.
METHODS: dict[str, type[AdaptationMethod]] = {
    method.name: method
    for method in (
        Frozen, OAIMSMidInteraction, OAIMSPostInteraction, OAIMS, IASA, TSCA,
        SelfTraining, SelfTrainingPerClick, EntropyMinimisation, EntropyMinimisationPerClick,
        NoClassCCG, UniformCCG, ClickPixelCCG, ClickLabelOAIMS, LocalizedStage2PI, LocalizedStage2OAIMS,
    )
}


def get_method(name: str) -> type[AdaptationMethod]:
    """The class registered as ``name``; ValueError naming the choices for an unknown one."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


@dataclass(frozen=True)
class MethodInfo:
    """What a method menu shows: ``name``, a one-line ``description``, and whether it adapts
    per click (``mi``) and on accept (``pi``)."""

    name: str
    description: str
    mi: bool
    pi: bool


def describe_methods() -> list[MethodInfo]:
    """Every registered method, in registry order."""
    return [MethodInfo(m.name, m.description, m.mi, m.pi) for m in METHODS.values()]
