"""The site-regression check of a post-interaction update (issue 23; our extension, not the paper's).

The PI drift guard (:meth:`~OAIMSSegment.session.InteractiveSession.accept`) compares the model's
prediction on the accepted image before and after the update. An update can fit that image and
still harm the next ones: with Adam, whose steps are about ``lr`` per parameter whatever the
gradient's size and whose momentum carries one image's direction into the next accepts' steps,
the demo's no-shift control lost up to 20 points of Dice on a few later images
(``docs/BENCHMARKS.md`` section 3). :class:`RecentCases` keeps the last few accepted images of a
session as :class:`AcceptedCase`\\ s and scores a model on them: the prediction with each image's
own clicks against its accepted mask, the question a site asks ("does the model still segment
what we accepted?"). The session undoes an update after which that score falls by more than
:attr:`~OAIMSSegment.adapt_config.AdaptConfig.max_regression`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Iterable

import torch

from OAIMSSegment.clicks import Click
from OAIMSSegment.metrics import mean_foreground_dice
from OAIMSSegment.model import ClickSegmenter, PreparedImage, hard_labels, set_mode


@dataclass(frozen=True)
class AcceptedCase:
    """One accepted image, as the check replays it.

    Attributes:
        prepared: the image in working space (``tensor (1, C, Hp, Wp)``).
        clicks: its clicks in working pixels, in the order they were placed.
        mask: the accepted working class map ``(Hp, Wp)`` (long).
    """

    prepared: PreparedImage
    clicks: tuple[Click, ...]
    mask: torch.Tensor


class RecentCases:
    """The last ``capacity`` accepted images of a session (the oldest is dropped first).

    Memory: one working-space image and one class map per case (for a 512 x 512 single-channel
    image, about 3 MiB).
    """

    def __init__(self, capacity: int) -> None:
        self._cases: deque[AcceptedCase] = deque(maxlen=capacity)

    @property
    def capacity(self) -> int:
        return self._cases.maxlen or 0

    def __len__(self) -> int:
        return len(self._cases)

    def resize(self, capacity: int) -> None:
        """Keep at most ``capacity`` cases from now on, the newest first kept."""
        self._cases = deque(self._cases, maxlen=capacity)

    def add(self, case: AcceptedCase) -> None:
        """Remember ``case`` (nothing when the capacity is 0)."""
        if self.capacity:
            self._cases.append(case)

    def mean_dice(self, predictor: ClickSegmenter, num_classes: int) -> float | None:
        """Mean over the kept cases of the mean foreground Dice of ``predictor``'s prediction (eval
        mode, no gradient) with the case's clicks against its accepted mask; None without cases.
        Cases whose working images have one shape are segmented in one batch."""
        if not self._cases:
            return None
        set_mode(predictor, training=False)
        scores = []
        with torch.no_grad():
            for batch in _same_shape_batches(self._cases):
                inputs = torch.cat([torch.cat([c.prepared.tensor, predictor.guidance(c.prepared, c.clicks)], dim=1)
                                    for c in batch])
                labels = hard_labels(predictor(inputs))
                scores += [mean_foreground_dice(labels[i], case.mask, num_classes) for i, case in enumerate(batch)]
        return sum(scores) / len(scores)


def _same_shape_batches(cases: Iterable[AcceptedCase]) -> list[list[AcceptedCase]]:
    """``cases`` grouped by the shape of their working image tensor, in order of first appearance."""
    groups: dict[tuple[int, ...], list[AcceptedCase]] = {}
    for case in cases:
        groups.setdefault(tuple(case.prepared.tensor.shape), []).append(case)
    return list(groups.values())
