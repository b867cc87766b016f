"""Next-step proposals for the image open in an interactive session (Wong et al., PPS).

The proposal model is given the open image, the pixels already decided (the current mask's
foreground and every clicked pixel, a background click decides its pixel too) and the active
class's foreground; it returns larger segments of that class. Picking one makes it the active
class in the mask that Accept adapts to. The Slicer Logic shows the proposals as temporary
segments. No Qt, no Slicer.
"""

from __future__ import annotations

import numpy as np

from OAIMSSegment.errors import SessionStateError
from OAIMSSegment.session import InteractiveSession


class NextSteps:
    """Proposals for one open image and the one picked.

    Args:
        model_name: shipped proposal model name or ``.pt`` path (loaded on first use).

    Attributes:
        picked: the class map ``(H, W)`` made from the picked proposal, for Accept (None: none picked).
        shown: index of the proposal shown to the clinician (stepped with :meth:`step`; 0 after :meth:`propose`).
    """

    def __init__(self, model_name: str) -> None:
        self.model_name = str(model_name)
        self.picked: np.ndarray | None = None
        self._model = None
        self._proposals: list = []
        self.shown = 0

    def use(self, model_name: str) -> None:
        """Propose with another model from now on (loaded on first use)."""
        self.model_name, self._model = str(model_name), None

    def forget(self) -> None:
        """Drop the picked mask (a new click or an accept makes it stale)."""
        self.picked = None

    def _current(self, session: InteractiveSession) -> np.ndarray:
        """The class map ``(H, W)`` proposals extend: the picked one, else the session's prediction."""
        if not session.active or session.mask is None:
            raise SessionStateError("click in a slice first: proposals extend the current segment")
        return self.picked if self.picked is not None else session.mask

    def propose(self, session: InteractiveSession, image: np.ndarray, active_class: int, k: int = 3,
                seed: int | None = None) -> list[np.ndarray]:
        """``k`` proposed segments, bool ``(H, W)``, of ``active_class`` for the open ``image``
        (channels first ``(C, H, W)``, raw intensities); the same ``seed`` gives the same ones."""
        from OAIMSSegment.proposals import load_proposal_model, propose_next_steps

        mask = self._current(session)
        if self._model is None:
            self._model = load_proposal_model(self.model_name)
        image2d = image[0] if image.shape[0] == 1 else np.moveaxis(image, 0, -1)
        decided = mask > 0
        for click in session.clicks:
            decided[click.position] = True
        self._proposals = propose_next_steps(self._model, image2d, decided, mask == active_class, k=k, seed=seed)
        self.shown = 0
        return [proposal.seg_mask for proposal in self._proposals]

    @property
    def count(self) -> int:
        """Proposals made for the open image (0 before :meth:`propose` and after :meth:`clear`)."""
        return len(self._proposals)

    def clear(self) -> None:
        """The proposals are gone (picked, or the segment changed)."""
        self._proposals, self.shown = [], 0

    def step(self, delta: int) -> int:
        """Show the next (``delta`` 1) or previous (-1) proposal, wrapping around; returns :attr:`shown`."""
        if not self._proposals:
            raise SessionStateError("there are no proposals to step through: propose next steps first")
        self.shown = (self.shown + int(delta)) % len(self._proposals)
        return self.shown

    def pick(self, session: InteractiveSession, index: int, active_class: int) -> np.ndarray:
        """Make proposal ``index`` (0-based) the ``active_class`` region of the mask to accept; returns that class map."""
        if not 0 <= index < len(self._proposals):
            raise SessionStateError(f"there is no proposal {index} (have {len(self._proposals)})")
        mask = self._current(session).copy()
        mask[mask == active_class] = 0
        mask[self._proposals[index].seg_mask] = active_class
        self.picked = mask
        return mask
