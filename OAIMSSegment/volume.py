"""Volume sessions: segment a lesion through a 3D volume from a few 2D clicks.

The OAIMS method is 2D (one slice is one image). :class:`VolumeSession` makes it volumetric
without a 3D network, on top of one :class:`~OAIMSSegment.session.InteractiveSession`
(its public API only), so the model adapts as the clinician works through the volume:

* :meth:`~VolumeSession.click` on any slice segments that slice with the 2D session (with
  Mid-Interaction adaptation when the method has it: the slice's earlier clicks, and the seed
  clicks of a propagated slice, are its click set), then propagates the result up and down the
  slicing axis (:meth:`~VolumeSession.propagate`) until the structure ends or a slice the
  clinician already worked on is reached.
* Propagation seeds each slice from its neighbour's mask (:class:`Propagation`: the interior
  point of each component of the neighbour's mask, optionally background clicks around it)
  and runs one forward pass per slice, without adaptation. It stops at an empty or constant
  slice, or when a stopping rule fires (area ratio to the neighbour, overlap with it, mean
  foreground probability), and keeps a mask near its neighbour's. The defaults were chosen by
  measurement (docs/BENCHMARKS.md). After a click's MI step, the other worked slices are
  re-propagated with the adapted weights (``refresh_after_adaptation``).
* :meth:`~VolumeSession.undo` restores the slices *and* the weights and optimizer state an
  interaction changed, exactly.
* :meth:`~VolumeSession.accept` runs Post-Interaction adaptation on each slice the clinician
  clicked or edited (and, with ``learn_from_propagated``, on the propagated slices too).

Coordinates: a volume is ``(D, H, W)`` or ``(D, C, H, W)`` (numpy order, e.g. (z, y, x));
``axis`` is the spatial axis (0, 1 or 2 of the three spatial axes) along which slices are
taken. A slice index counts along that axis; a click position ``(row, col)`` is an array
index into the slice, whose two axes are the remaining spatial axes in order.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Callable, Container, Iterable, Iterator

import numpy as np
import torch
from scipy import ndimage

from OAIMSSegment.clicks import Click, interior_point, validate_click
from OAIMSSegment.errors import InvalidClickError, InvalidImageError, SessionStateError
from OAIMSSegment.model import probabilities, set_mode
from OAIMSSegment.segment_propagation import REFRESH_AFTER_ADAPTATION
from OAIMSSegment.session import AcceptResult, InteractiveSession

#: Seeding strategies of :class:`Propagation`.
SEEDINGS = ("interior", "interior+background")


@dataclass
class Propagation:
    """How a slice is seeded from its neighbour's mask and when propagation stops.

    The defaults (the interior click of each component, stop below 0.6 Dice overlap with the
    neighbour or above 1.5x its area, keep what lies within 5 px of it) are the best of the
    alternatives measured for the shipped ``brain-lesion-robust`` on training-split volumes
    (docs/BENCHMARKS.md 10.7, 10.10): without an overlap rule the model draws a blob around the
    seed wherever it falls, so an "empty prediction" rule never fires and propagation runs past
    the lesion's end; past a small lesion's end that blob is larger than the lesion was.

    Attributes:
        seeding: ``"interior"``: one foreground click at the interior point (farthest from the
            border, Euclidean distance transform) of each component of the neighbour's mask;
            ``"interior+background"``: plus four background clicks ``background_margin`` pixels
            outside the neighbour mask's bounding box (above, below, left, right).
        min_component: components of the neighbour's mask smaller than this many pixels do not
            seed (specks would grow blobs of their own).
        background_margin: pixels between the neighbour's bounding box and a background click.
        min_area_ratio, max_area_ratio: stop when the new mask's area divided by the
            neighbour's falls outside this range.
        min_overlap: stop when the Dice between the new mask and the neighbour's is below this.
        min_confidence: stop when the mean foreground probability over the new mask is below this.
        keep_connected: keep only the predicted components that overlap the neighbour's mask.
        within: keep only the predicted pixels at most this many pixels (Euclidean) from the
            neighbour's mask (the neighbour as a prior on where the structure can be); None: anywhere.
    """

    seeding: str = "interior"
    min_component: int = 10
    background_margin: int = 10
    min_area_ratio: float = 0.0
    max_area_ratio: float = 1.5
    min_overlap: float = 0.6
    min_confidence: float = 0.0
    keep_connected: bool = False
    within: float | None = 5.0

    def __post_init__(self) -> None:
        if self.seeding not in SEEDINGS:
            raise ValueError(f"unknown seeding {self.seeding!r}; choose one of {', '.join(SEEDINGS)}")

    def seeds(self, neighbour: np.ndarray) -> list[Click]:
        """Clicks ``(row, col)`` for the next slice from the neighbour's class map ``(H, W)``."""
        seeds = []
        for k in np.unique(neighbour[neighbour > 0]):
            labelled, count = ndimage.label(neighbour == k, structure=np.ones((3, 3), bool))
            sizes = np.bincount(labelled.ravel(), minlength=count + 1)
            for index in np.flatnonzero(sizes[1:] >= self.min_component) + 1:
                seeds.append(Click(interior_point(labelled == index), int(k)))
        if seeds and self.seeding == "interior+background":
            rows, cols = np.nonzero(neighbour > 0)
            height, width = neighbour.shape
            m = self.background_margin
            centre_row, centre_col = int(rows.mean()), int(cols.mean())
            for row, col in ((rows.min() - m, centre_col), (rows.max() + m, centre_col),
                             (centre_row, cols.min() - m), (centre_row, cols.max() + m)):
                if 0 <= row < height and 0 <= col < width:
                    seeds.append(Click((int(row), int(col)), 0))
        return seeds

    def accepts(self, mask: np.ndarray, neighbour: np.ndarray, confidence: float) -> bool:
        """Whether a propagated ``mask`` continues the structure of ``neighbour`` (both ``(H, W)``)."""
        area, previous = int((mask > 0).sum()), int((neighbour > 0).sum())
        if area == 0 or previous == 0:
            return False
        ratio = area / previous
        overlap = 2.0 * int(((mask > 0) & (neighbour > 0)).sum()) / (area + previous)
        return (self.min_area_ratio <= ratio <= self.max_area_ratio and overlap >= self.min_overlap
                and confidence >= self.min_confidence)


@dataclass
class _Snapshot:
    """What one interaction may change: restored by :meth:`VolumeSession.undo`."""

    state: dict
    masks: dict[int, np.ndarray]
    clicks: dict[int, list[Click]]
    seeds: dict[int, list[Click]]
    source: dict[int, int]
    formers: dict[int, int]
    edited: set[int]
    order: list[int]
    last: int | None


@dataclass
class VolumeAcceptResult:
    """Outcome of accepting a volume: one :class:`AcceptResult` per slice learnt from."""

    slices: list[int] = field(default_factory=list)
    results: list[AcceptResult] = field(default_factory=list)

    @property
    def applied(self) -> int:
        """How many slice updates were applied (not rejected by the drift guard)."""
        return sum(result.applied for result in self.results)


class VolumeSession:
    """Slice propagation with online adaptation over a 2D :class:`InteractiveSession`.

    Args:
        session: the 2D session (its model and optimizer carry over between volumes).
        propagation: seeding and stopping rules.
        learn_from_propagated: on accept, also adapt on propagated slices the clinician left
            unedited (self-training on the model's own output; off by default, see BENCHMARKS).
        refresh_after_adaptation: after a click's MI step, re-propagate from every other worked
            slice with the adapted weights (docs/BENCHMARKS.md 10.10).
    """

    def __init__(self, session: InteractiveSession, propagation: Propagation | None = None,
                 learn_from_propagated: bool = False, refresh_after_adaptation: bool = REFRESH_AFTER_ADAPTATION) -> None:
        self.session = session
        self.propagation = propagation or Propagation()
        self.learn_from_propagated = learn_from_propagated
        self.refresh_after_adaptation = refresh_after_adaptation
        #: Propagation cost since construction: forward passes, wall and CPU seconds (``bench`` figures).
        self.propagation_cost = {"slices": 0, "seconds": 0.0, "cpu_seconds": 0.0}
        self._slices: np.ndarray | None = None
        self._axis = 0
        self._channels = False

    # -- volume lifecycle -----------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """True between :meth:`open` and :meth:`accept` / :meth:`discard`."""
        return self._slices is not None

    @property
    def num_slices(self) -> int:
        return 0 if self._slices is None else len(self._slices)

    def open(self, volume: np.ndarray, axis: int = 0) -> None:
        """Begin a volume ``(D, H, W)`` or ``(D, C, H, W)`` sliced along spatial ``axis`` (0, 1, 2).

        A volume still open is discarded first, with its updates.
        """
        array = np.asarray(volume)
        if array.ndim not in (3, 4):
            raise InvalidImageError(f"expected a volume (D, H, W) or (D, C, H, W), got shape {array.shape}")
        if axis not in (0, 1, 2):
            raise InvalidImageError(f"axis must be 0, 1 or 2 (a spatial axis), got {axis!r}")
        channels = array.ndim == 4
        if channels:
            array = np.moveaxis(array, 1, 0)  # (C, D, H, W)
        if (array.shape[0] if channels else 1) != self.session.card.image_channels:
            raise InvalidImageError(
                f"model {self.session.card.name!r} expects {self.session.card.image_channels} channel(s), "
                f"the volume has shape {np.asarray(volume).shape}")
        spatial = array if channels else array[None]
        slices = np.moveaxis(spatial, axis + 1, 0)  # (S, C, a, b)
        if self.active:
            self.discard()
        self._slices = np.ascontiguousarray(slices if channels else slices[:, 0])
        self._axis, self._channels = axis, channels
        self._masks = np.zeros((len(slices), *slices.shape[2:]), dtype=np.uint8)
        self._clicks: dict[int, list[Click]] = {}
        self._seeds: dict[int, list[Click]] = {}
        self._source: dict[int, int] = {}
        self._formers: dict[int, int] = {}  # worked slice -> the worked slice whose propagation had reached it
        self._edited: set[int] = set()
        self._order: list[int] = []
        self._history: list[_Snapshot] = []
        self._last: int | None = None
        self._open_slice: int | None = None
        self._volume_start = self.session.state_dict()

    def mask(self, slice_index: int) -> np.ndarray:
        """The class map ``(H, W)`` of one slice (a copy)."""
        self._require()
        return self._masks[self._slice(slice_index)].copy()

    def volume_mask(self) -> np.ndarray:
        """The class map of the whole volume, ``(D, H, W)`` in the volume's own axis order."""
        self._require()
        return np.moveaxis(self._masks, 0, self._axis).copy()

    @property
    def worked_slices(self) -> list[int]:
        """Slices the clinician clicked or edited, in the order first worked on."""
        return list(self._order) if self.active else []

    @property
    def propagated_slices(self) -> list[int]:
        """Slices whose mask comes from propagation (sorted)."""
        return sorted(self._seeds) if self.active else []

    # -- interactions ----------------------------------------------------------------------------

    def click(self, slice_index: int, position: tuple[float, float], label: int, propagate: bool = True) -> list[int]:
        """A click on one slice; returns the slices whose mask changed (sorted).

        The slice is re-segmented by the 2D session with its click set (the slice's earlier
        clicks, or the seed clicks that propagated it, then this click): with MI on, this click
        triggers one adaptation step unless it is the slice's first. With ``propagate`` the
        result is propagated onward (:func:`propagation_steps`: both ways, or on a propagated
        slice away from the worked slice that had reached it).
        """
        self._require()
        index = self._slice(slice_index)
        self._validate(index, position, label)
        snapshot = self._snapshot()
        self._history.append(snapshot)
        try:
            self._open_2d(index)
            result = self.session.add_click(position, label)
        except Exception:
            self._history.pop()
            self._restore(snapshot)
            raise
        self._clicks[index] = self.session.clicks
        self._seeds.pop(index, None)
        former = self._work_on(index)
        self._edited.discard(index)
        if index not in self._order:
            self._order.append(index)
        changed = {index} if not np.array_equal(result.mask, self._masks[index]) else set()
        self._remember(index)
        self._masks[index] = result.mask
        self._last = index
        if propagate:
            changed |= set(self._propagate_from(index, former))
            if result.loss is not None and self.refresh_after_adaptation:
                changed |= set(self._refresh(index))
        return sorted(changed)

    def propagate(self, slice_index: int | None = None) -> list[int]:
        """Propagate from ``slice_index`` (default: the last slice clicked or edited) up and down
        until the structure ends or a worked slice; returns the slices changed (sorted).

        Undoable as its own interaction (no weights change)."""
        self._require()
        index = self._last if slice_index is None else self._slice(slice_index)
        if index is None:
            raise SessionStateError("nothing to propagate: click or edit a slice first")
        self._history.append(self._snapshot())
        return self._propagate_from(index, self._formers.get(index))

    def set_mask(self, slice_index: int, mask: np.ndarray, propagate: bool = False) -> list[int]:
        """The clinician edited a slice's mask (e.g. painted it): it becomes a worked slice."""
        self._require()
        index = self._slice(slice_index)
        mask = np.asarray(mask)
        if mask.shape != self._masks.shape[1:]:
            raise SessionStateError(f"mask has shape {mask.shape}, the slices are {self._masks.shape[1:]}")
        if mask.min() < 0 or mask.max() >= self.session.card.num_classes:
            raise SessionStateError(f"mask has labels outside 0..{self.session.card.num_classes - 1}")
        self._history.append(self._snapshot())
        self._close_2d()
        self._remember(index)
        self._masks[index] = mask.astype(np.uint8)
        self._edited.add(index)
        self._seeds.pop(index, None)
        self._clicks.setdefault(index, [])
        former = self._work_on(index)
        if index not in self._order:
            self._order.append(index)
        self._last = index
        return sorted({index} | (set(self._propagate_from(index, former)) if propagate else set()))

    def undo(self) -> list[int]:
        """Revert the last interaction: its slices, weights and optimizer state. Returns the
        slices whose mask changed back (sorted)."""
        self._require()
        if not self._history:
            raise SessionStateError("there is no interaction to undo")
        snapshot = self._history.pop()
        changed = sorted(i for i, mask in snapshot.masks.items() if not np.array_equal(mask, self._masks[i]))
        self._restore(snapshot)
        return changed

    def discard(self) -> None:
        """Drop the volume and revert every update made while segmenting it."""
        if not self.active:
            return
        self._close_2d()
        self.session.load_state_dict(self._volume_start)
        self._slices = None

    def accept(self) -> VolumeAcceptResult:
        """Accept the volume's segment: Post-Interaction adaptation on each worked slice, in
        the order worked on (then on the propagated ones with ``learn_from_propagated``)."""
        self._require()
        outcome = VolumeAcceptResult()
        self._close_2d()
        if self.session.pi_enabled:
            slices = [i for i in self._order if self._masks[i].any()]
            if self.learn_from_propagated:
                slices += [i for i in sorted(self._seeds) if self._masks[i].any()]
            for index in slices:
                clicks = self._clicks.get(index) or self._seeds.get(index) or []
                if not clicks:  # an edited slice without clicks: a localization click inside it
                    foreground = self._masks[index] > 0
                    point = interior_point(foreground)
                    clicks = [Click(point, int(self._masks[index][point]))]
                self._replay(index, clicks)
                outcome.slices.append(index)
                outcome.results.append(self.session.accept(self._masks[index]))
        self._slices = None
        return outcome

    # -- internals: bookkeeping ------------------------------------------------------------------

    def _require(self) -> None:
        if self._slices is None:
            raise SessionStateError("no volume is open: call open(volume, axis) first")

    def _slice(self, slice_index: int) -> int:
        if isinstance(slice_index, (bool, np.bool_)) or not isinstance(slice_index, (int, np.integer)):
            raise InvalidClickError(f"slice index must be an integer, got {slice_index!r}")
        if not 0 <= int(slice_index) < len(self._slices):
            raise InvalidClickError(
                f"slice {int(slice_index)} is outside the volume: it has {len(self._slices)} slices along axis {self._axis}")
        return int(slice_index)

    def _validate(self, index: int, position: tuple[float, float], label: int) -> None:
        """Reject a click outside the slice before anything changes."""
        try:
            validate_click(Click(tuple(position), int(label)), self._masks.shape[1:], self.session.card.num_classes)
        except InvalidClickError as error:
            raise InvalidClickError(f"slice {index}: {error}") from None

    def _snapshot(self) -> _Snapshot:
        # Weights are captured before any change; masks are copied lazily by _remember.
        return _Snapshot(self.session.state_dict(), {}, dict(self._clicks), dict(self._seeds), dict(self._source),
                         dict(self._formers), set(self._edited), list(self._order), self._last)

    def _restore(self, snapshot: _Snapshot) -> None:
        self._close_2d()
        self.session.load_state_dict(snapshot.state)
        for index, mask in snapshot.masks.items():
            self._masks[index] = mask
        self._clicks, self._seeds, self._source = snapshot.clicks, snapshot.seeds, snapshot.source
        self._formers = snapshot.formers
        self._edited, self._order, self._last = snapshot.edited, snapshot.order, snapshot.last

    def _work_on(self, index: int) -> int | None:
        """Slice ``index`` becomes a worked slice: returns the worked slice whose propagation had
        reached it (kept for its later clicks, as the Slicer Logic's ``PropagatedSlices.former``), or None."""
        former = self._source.pop(index, None)
        if former is not None:
            self._formers[index] = former
        return self._formers.get(index)

    def _remember(self, index: int) -> None:
        """Keep slice ``index``'s mask as it was before the current interaction (first change only)."""
        if self._history:
            self._history[-1].masks.setdefault(index, self._masks[index].copy())

    # -- internals: the 2D session -----------------------------------------------------------------

    def _close_2d(self) -> None:
        """Close the 2D image, keeping the weights it adapted (``discard`` alone would revert them)."""
        if self.session.active:
            state = self.session.state_dict()
            self.session.discard()
            self.session.load_state_dict(state)
        self._open_slice = None

    def _replay(self, index: int, clicks: list[Click]) -> None:
        """Open slice ``index`` in the 2D session with ``clicks`` already placed, without repeating
        their adaptation steps (:meth:`InteractiveSession.resume`)."""
        self._close_2d()
        self.session.resume(self._slices[index], clicks)
        self._open_slice = index

    def _open_2d(self, index: int) -> None:
        """Make slice ``index`` the 2D session's image with its current click set."""
        if self._open_slice == index and self.session.active and self.session.clicks == self._clicks.get(index):
            return
        self._replay(index, self._clicks.get(index) or self._seeds.get(index) or [])

    # -- internals: propagation --------------------------------------------------------------------

    def _predict(self, index: int, seeds: list[Click]) -> tuple[np.ndarray, float] | None:
        self.propagation_cost["slices"] += 1
        return seeded_prediction(self.session.model, self._slices[index], seeds)

    def _propagate_from(self, origin: int, former: int | None = None) -> list[int]:
        """Propagate from ``origin`` in :func:`propagation_steps`; ``former``: the worked slice that had
        propagated into ``origin`` before it was worked on (its chain beyond ``origin`` is replaced too)."""
        chains = {origin} if former is None else {origin, former}
        changed: list[int] = []
        wall, cpu = time.perf_counter(), time.process_time()
        for step in propagation_steps(origin, former):
            changed += self._propagate_direction(origin, step, chains)
        self.propagation_cost["seconds"] += time.perf_counter() - wall
        self.propagation_cost["cpu_seconds"] += time.process_time() - cpu
        return sorted(changed)

    def _refresh(self, adapted: int) -> list[int]:
        """After an adaptation step on slice ``adapted``: re-propagate from every other worked slice
        with the adapted weights, so that the step reaches the whole volume."""
        changed: list[int] = []
        for origin in [i for i in self._order if i != adapted]:
            changed += self._propagate_from(origin, self._formers.get(origin))
        return changed

    def _propagate_direction(self, origin: int, step: int, chains: set[int]) -> list[int]:
        """Propagate from ``origin`` towards ``origin + step, ...``; then clear what is left in
        that direction of the earlier propagation from ``chains`` (it now ends sooner)."""
        ahead = slices_ahead(origin, step, len(self._masks), self._order)
        changed, index = [], origin + step
        for index, mask, seeds in propagate_line(self._predict, self._masks[origin], ahead, self.propagation):
            if self._set_propagated(index, mask, seeds, origin):
                changed.append(index)
            index += step
        while 0 <= index < len(self._masks) and self._source.get(index) in chains:
            if self._set_propagated(index, None, None, origin):
                changed.append(index)
            index += step
        return changed

    def _set_propagated(self, index: int, mask: np.ndarray | None, seeds: list[Click] | None, origin: int) -> bool:
        """Store a propagated mask (None clears the slice); True when the mask changed."""
        new = np.zeros_like(self._masks[index]) if mask is None else mask
        differs = not np.array_equal(new, self._masks[index])
        if differs:
            self._remember(index)
            self._masks[index] = new
        if mask is None:
            self._seeds.pop(index, None)
            self._source.pop(index, None)
        else:
            self._seeds[index], self._source[index] = seeds, origin
        return differs


def seeded_prediction(model, image: np.ndarray, seeds: list[Click]) -> tuple[np.ndarray, float] | None:
    """One forward pass of ``model`` on a slice ``image`` (``(H, W)`` or ``(C, H, W)``, raw) with
    ``seeds`` (slice pixels): ``(class map (H, W) uint8, mean foreground probability)``, or None for a
    slice the model cannot take (constant, empty)."""
    try:
        prepared = model.prepare(image)
    except InvalidImageError:
        return None
    working = [model.working_click(prepared, click) for click in seeds]
    set_mode(model, training=False)
    with torch.inference_mode():
        probs = probabilities(prepared.logits_to_original(model.logits(prepared, working)))[0]
    best = probs.max(dim=0)  # the class map (torch.argmax's indices, model.class_map) and its probabilities
    foreground = best.indices > 0
    confidence = float(best.values[foreground].mean()) if bool(foreground.any()) else 0.0
    return best.indices.to(torch.uint8).cpu().numpy(), confidence


def propagation_steps(origin: int, former: int | None) -> tuple[int, ...]:
    """The directions (+1 up, -1 down) to propagate a just-worked slice ``origin`` in: both, or, when a
    propagation from the worked slice ``former`` had reached ``origin``, away from ``former`` only. The
    slices between were derived from ``former``'s work and stay: a correction at a chain's far end
    (typically a background click where the lesion tapers off) must not re-seed the whole chain from
    that end (BENCHMARKS 10.9)."""
    if former is None or former == origin:
        return (1, -1)
    return (1,) if origin > former else (-1,)


def slices_ahead(origin: int, step: int, count: int, blocked: Container[int]) -> Iterator[int]:
    """Slice indices from ``origin + step`` towards the end of a stack of ``count`` slices (``step``
    +1: up, -1: down), up to (not including) the first ``blocked`` one: where a propagation may go."""
    return itertools.takewhile(lambda index: index not in blocked, range(origin + step, count if step > 0 else -1, step))


def propagate_line(predict: Callable[[int, list[Click]], "tuple[np.ndarray, float] | None"], origin_mask: np.ndarray,
                   indices: Iterable[int], rule: Propagation) -> list[tuple[int, np.ndarray, list[Click]]]:
    """Propagate ``origin_mask`` ``(H, W)`` through the slices ``indices``, in order, each seeded from
    the one before (``rule.seeds``) and segmented by ``predict(index, seeds)``; stops at the first slice
    the rule refuses, that has no seed or that ``predict`` cannot take. Returns ``(index, mask, seeds)``
    of each slice propagated."""
    propagated, neighbour = [], origin_mask
    for index in indices:
        seeds = rule.seeds(neighbour) if neighbour.any() else []
        if not any(seed.label > 0 for seed in seeds):
            break
        predicted = predict(index, seeds)
        if predicted is None:
            break
        mask, confidence = predicted
        if rule.keep_connected:
            mask = _connected_to(mask, neighbour)
        if not rule.accepts(mask, neighbour, confidence):
            break
        if rule.within is not None:  # after the stopping rule, which judges the model's own mask
            mask = _within(mask, neighbour, rule.within)
        propagated.append((index, mask, seeds))
        neighbour = mask
    return propagated


def _within(mask: np.ndarray, reference: np.ndarray, pixels: float) -> np.ndarray:
    """``mask`` ``(H, W)`` with only the pixels at most ``pixels`` (Euclidean) from ``reference``'s
    foreground; the distance transform runs on ``reference``'s bounding box grown by that margin."""
    rows, cols = np.nonzero(reference > 0)
    margin = int(np.ceil(pixels)) + 1
    box = (slice(max(rows.min() - margin, 0), rows.max() + margin + 1),
           slice(max(cols.min() - margin, 0), cols.max() + margin + 1))
    near = np.zeros(mask.shape, bool)
    near[box] = ndimage.distance_transform_edt(reference[box] == 0) <= pixels
    return np.where(near, mask, 0).astype(mask.dtype)


def _connected_to(mask: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``mask`` ``(H, W)`` with only the connected components that overlap ``reference``."""
    labelled, count = ndimage.label(mask > 0, structure=np.ones((3, 3), bool))
    if count == 0:
        return mask
    keep = np.unique(labelled[(reference > 0) & (labelled > 0)])
    return np.where(np.isin(labelled, keep), mask, 0).astype(mask.dtype)
