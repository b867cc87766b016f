""":class:`AdaptConfig`, the hyper-parameters of online adaptation, and :data:`DEFAULT_LR`.

:mod:`OAIMSSegment.session` re-exports both (``from OAIMSSegment.session import AdaptConfig``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from OAIMSSegment.model import ModelCard

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
        stage2_localization: our change to PI stage 2 (off = Algorithm 1 as published, line
            30: ``P^ = f(I, C^)``): the generated clicks ``C^`` are given to the model together with
            the image's localization click ``c_1``, ``f(I, {c_1} + C^)``, as pretraining gives
            them (``pretrain.py`` adds the error clicks to the localization click); the CCG term
            stays on ``C^``. Without ``c_1`` stage 2 trains the model on click sets it never saw,
            e.g. background clicks only; on the demo's no-shift control that cost PI alone up to
            4 points of Dice (``docs/BENCHMARKS.md`` section 3).
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
    stage2_localization: bool = False
    ia_mask_weight: float = 0.1
    ia_weight_decay: float = 1e-2
    tsca_momentum: float = 0.9
    tsca_consistency: float = 0.1

    def for_model(self, card: ModelCard) -> "AdaptConfig":
        """This configuration with the learning rate decided (see ``lr``)."""
        if self.lr is not None:
            return self
        return replace(self, lr=card.adaptation_lr if card.adaptation_lr is not None else DEFAULT_LR)
