"""The slices a segment's propagation filled, on the main thread of the Slicer Logic (no Qt, no MRML).

:meth:`SegmentWork.propagate <OAIMSSegment.segment_session.SegmentWork.propagate>` computes the
masks on the worker; :class:`PropagatedSlices` decides, on the main thread, what that means for the
segment: which slices it writes and which earlier propagated slices it clears (a correction whose
structure now ends sooner), what each slice held before (so that undo restores the segment exactly),
and the seeds of each propagated slice (a correction click there joins them, as in
:class:`~OAIMSSegment.volume.VolumeSession`). Reading and writing a slice are passed in (the Logic's
MRML calls), so this file knows slices only by ``(axis, index)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple

import numpy as np

__all__ = ["REFRESH_AFTER_ADAPTATION", "PropagatedSlice", "PropagationStep", "PropagatedSlices"]

Key = Tuple[int, int]  # (IJK axis, slice index)

#: Whether the propagation after a click that made an MI step also re-propagates from every other worked
#: slice with the adapted weights (the volume session's and the Logic's default; docs/BENCHMARKS.md 10.10).
REFRESH_AFTER_ADAPTATION = True


@dataclass(frozen=True)
class PropagatedSlice:
    """A slice filled by propagation: the class map ``(H, W)`` written, its seed clicks (slice
    pixels) and the index of the slice the propagation started from."""

    mask: np.ndarray
    seeds: tuple
    origin: int


@dataclass(eq=False)  # steps are told apart by identity (their fields hold arrays)
class PropagationStep:
    """One propagation as an undoable step.

    Attributes:
        axis: IJK axis it ran along.
        clicks: clicks on the open slice when it was queued: undo takes the step back while they stay.
        joined: it followed a click at once (automatic propagation): undone together with that click.
        before: ``{index: class map the slice held before}`` for every slice it changed.
        previous: ``{index: PropagatedSlice or None}``: the bookkeeping it replaced.
    """

    axis: int
    clicks: int
    joined: bool = False
    before: Dict[int, np.ndarray] = field(default_factory=dict)
    previous: Dict[int, Optional[PropagatedSlice]] = field(default_factory=dict)


class PropagatedSlices:
    """The propagated slices of one segment and the undo steps of the open slice's propagations.

    Attributes:
        slices: ``{(axis, index): PropagatedSlice}``; a slice the clinician clicks leaves it (:meth:`take`).
        steps: propagations since the open slice was opened, oldest first.
    """

    def __init__(self) -> None:
        self.slices: Dict[Key, PropagatedSlice] = {}
        self.steps: List[PropagationStep] = []
        self._formers: Dict[Key, int] = {}  # worked slice -> the origin that had propagated into it

    def clear(self) -> None:
        """The segment closed (accepted, discarded, abandoned)."""
        self.slices, self.steps, self._formers = {}, [], {}

    def take(self, key: Key) -> Optional[PropagatedSlice]:
        """A click opens slice ``key``: it is the clinician's from now on. Returns what propagation
        had put there (its mask counts as the model's, its seeds join the click), or None."""
        taken = self.slices.pop(key, None)
        if taken is not None:
            self._formers[key] = taken.origin
        return taken

    def former(self, key: Key) -> Optional[int]:
        """The origin whose propagation had reached worked slice ``key`` before it was worked on, or None."""
        return self._formers.get(key)

    def chains(self, key: Key) -> Set[int]:
        """Origins whose earlier propagation a new propagation from ``key`` replaces."""
        former = self.former(key)
        return {key[1]} if former is None else {key[1], former}

    def pop(self, clicks: int, joined: bool) -> Optional[PropagationStep]:
        """Take the last step off if undo takes it back now (it was queued with ``clicks`` on the open
        slice; a ``joined`` step only with its click), else None."""
        step = self.steps[-1] if self.steps else None
        if step is None or step.clicks != clicks or step.joined != joined:
            return None
        return self.steps.pop()

    def apply(self, step: PropagationStep, origin: int, propagated: Iterable[tuple], ends: Iterable[Tuple[int, int]],
              read: Callable[[int], np.ndarray], write: Callable[[int, np.ndarray], None]) -> List[int]:
        """Write a computed propagation: each ``(index, mask, seeds)`` of ``propagated``, then, from each
        direction's end in ``ends`` (``(index, step)`` pairs), clear the contiguous slices still propagated from
        the replaced :meth:`chains`. ``read(index)`` / ``write(index, class map)`` act on the segment.
        Records what changed in ``step``; returns the indices of the slices whose content changed."""
        axis, chains = step.axis, self.chains((step.axis, origin))
        changed: Set[int] = set()
        for index, mask, seeds in propagated:
            if self._set(step, index, mask, read, write):
                changed.add(index)
            self.slices[(axis, index)] = PropagatedSlice(np.asarray(mask, np.uint8), tuple(seeds), origin)
        for end, direction in ends:
            index = end
            while (axis, index) in self.slices and self.slices[(axis, index)].origin in chains:
                if self._set(step, index, None, read, write):
                    changed.add(index)
                del self.slices[(axis, index)]
                index += direction
        return sorted(changed)

    def _set(self, step: PropagationStep, index: int, mask: Optional[np.ndarray], read, write) -> bool:
        step.previous.setdefault(index, self.slices.get((step.axis, index)))
        held = read(index)
        new = np.zeros_like(held) if mask is None else np.asarray(mask, np.uint8)
        if np.array_equal(held, new):
            return False
        step.before.setdefault(index, held)
        write(index, new)
        return True

    def undo(self, step: PropagationStep, write: Optional[Callable[[int, np.ndarray], None]]) -> List[int]:
        """Take a :meth:`pop`-ped ``step`` back: its bookkeeping, and with ``write`` what its slices held.
        Returns those slices."""
        for index, previous in step.previous.items():
            if previous is None:
                self.slices.pop((step.axis, index), None)
            else:
                self.slices[(step.axis, index)] = previous
        if write is not None:
            for index, held in step.before.items():
                write(index, held)
        return sorted(step.before)
